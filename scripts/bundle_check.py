"""After an offline install of scripts/gpu_bundle.sh's wheels (`pip install --no-index --no-deps --target`):
every requirement of every bundled wheel is met by what Python now sees (the bundle over the machine's own
packages), and each bundled top-level package imports. `--no-deps` checks nothing, so this is the check.

    python scripts/bundle_check.py BUNDLE       # exit 1, naming each unmet requirement, if any
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMPORT_NAMES = {"lisa-dist": "lisa_dist", "typing-extensions": "typing_extensions", "pydantic-core": "pydantic_core",
                "annotated-types": "annotated_types", "typing-inspection": "typing_inspection"}


def wheel_requirements(wheel: Path) -> tuple[str, list[Requirement]]:
    """The wheel's project name and the requirements that apply here without extras."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = archive.read(name).decode()
    project = next(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Name:"))
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                    if line.startswith("Requires-Dist:")]
    return project, [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def unmet(requirement: Requirement) -> str | None:
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return "not installed"
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{version} installed"
    return None


def main(bundle: Path) -> int:
    problems = []
    for wheel in sorted(bundle.glob("*.whl")):
        project, requirements = wheel_requirements(wheel)
        installed = metadata.version(project)
        module = IMPORT_NAMES.get(canonicalize_name(project), canonicalize_name(project).replace("-", "_"))
        try:
            where = Path(importlib.import_module(module).__file__).parent
        except Exception as error:  # any failure to import is what this check reports
            problems.append(f"{project}: import {module} failed: {type(error).__name__}: {error}")
            where = "-"
        print(f"{project} {installed} ({where})")
        for requirement in requirements:
            reason = unmet(requirement)
            if reason:
                problems.append(f"{project} needs {requirement}: {reason}")
    for problem in problems:
        print(f"bundle_check: {problem}", file=sys.stderr)
    print(f"bundle_check: {len(problems)} unmet of the bundle's requirements")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
