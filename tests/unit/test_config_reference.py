"""docs/config.md is generated from lisa_dist/config.py's field docstrings and kept current."""

import dataclasses

from lisa_dist import config
from lisa_dist.config_reference import SECTIONS, field_docs, render
from tests.helpers import REPO


def test_docs_config_md_is_what_the_code_says():
    assert (REPO / "docs" / "config.md").read_text() == render(), \
        "docs/config.md is stale: run python -m lisa_dist.config_reference docs/config.md"


def test_every_key_is_documented_under_its_field():
    for cls in [config.Config, *SECTIONS.values()]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS and not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_the_reference_lists_every_key_once():
    text = render()
    keys = [f.name for f in dataclasses.fields(config.Config) if f.name not in SECTIONS]
    keys += [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    for key in keys:
        assert text.count(f"| `{key}` |") == 1, key
