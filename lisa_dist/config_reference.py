"""docs/config.md, written from the config dataclasses: each key's type, default and the docstring under its
field in `lisa_dist/config.py`. `tests/unit/test_config_reference.py` fails when the file is stale.

    python -m lisa_dist.config_reference docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from lisa_dist import config

HEADER = """# Configuration keys

Generated from the docstrings in `lisa_dist/config.py` by `python -m lisa_dist.config_reference docs/config.md`;
edit those, not this file (`tests/unit/test_config_reference.py` fails when it is stale).

A run config is YAML (`configs/tiny.yaml`); any key can be overridden on the command line as `section.key=value`
(`lisa-dist train configs/tiny.yaml lisa.gamma=4 optim.lr=1e-4`). An unknown key or a value outside the allowed
ones stops the run before it starts, naming the key.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass `cls` (the string literal that follows it)."""
    return {name: doc for name, (_, doc) in _fields_in_source(cls).items() if doc}


def _fields_in_source(cls: type) -> dict[str, tuple[str, str]]:
    """Each field of the dataclass `cls` as its source writes it: (annotation, the docstring under it or "")."""
    (node,) = ast.parse(inspect.getsource(cls)).body
    out = {}
    for statement, following in zip(node.body, [*node.body[1:], None]):
        if isinstance(statement, ast.AnnAssign):
            out[statement.target.id] = (ast.unparse(statement.annotation), " ".join(_string(following).split()))
    return out


def _string(statement: ast.stmt | None) -> str:
    """The text of a bare string-literal statement; "" for anything else."""
    value = statement.value if isinstance(statement, ast.Expr) else None
    return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else ""


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    source = _fields_in_source(cls)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS:
            continue
        annotation, doc = source[f.name]
        default = default_of(f)
        shown = "null" if default is None else repr(default).lower() if isinstance(default, bool) else repr(default)
        rows.append(f"| `{prefix}{f.name}` | `{_cell(annotation)}` | `{_cell(shown)}` | {_cell(doc)} |")
    return rows


SECTIONS = {f.name: type(default) for f in dataclasses.fields(config.Config)
            if dataclasses.is_dataclass(default := default_of(f))}
"""The config's sections (`lisa`, `model`, ...) and their dataclasses, in the order `Config` declares them."""


def render() -> str:
    lines = [HEADER, "## Run", "", *_table(config.Config, "")]
    for name, cls in SECTIONS.items():
        lines += ["", f"## `{name}`", "", *_table(cls, f"{name}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lisa_dist.config_reference OUT.md", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
