"""Which tests share a pytest-xdist worker (`--dist loadscope`, pyproject.toml).

Each test file is one scope, so a module fixture runs once, on one worker. A session fixture runs once per
worker that asks for it: the files that use the CLI's reference runs (tests/cli/conftest.py: `run`,
`zero3_run`, each a launch of two ranks) form one scope, so those runs are made once, not once per worker.
(xdist's `loadgroup` marks cannot do this with pytest 9, whose node ids xdist 3.8 can no longer rename.)"""

from __future__ import annotations

import ast
import functools

import pytest

from tests.helpers import REPO

REFERENCE_RUNS = {"run", "zero3_run", "one_node"}


@functools.cache
def uses_reference_runs(path: str) -> bool:
    """A test or fixture of the file takes one of REFERENCE_RUNS, or asks for one by name."""
    file = REPO / path
    if not file.is_file():
        return False
    for node in ast.walk(ast.parse(file.read_text())):
        if (isinstance(node, ast.FunctionDef) and (node.name.startswith("test_") or node.decorator_list)
                and REFERENCE_RUNS & {a.arg for a in node.args.args}):
            return True
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getfixturevalue"
                and any(isinstance(c, ast.Constant) and c.value in REFERENCE_RUNS for c in ast.walk(node))):
            return True
    return False


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist (-p no:xdist) it is simply not called
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests using the CLI's reference runs" if uses_reference_runs(path) else path

    return FileScopes(config, log)
