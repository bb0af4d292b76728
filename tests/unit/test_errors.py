"""Every error a user is shown is a named class in lisa_dist.errors, and the CLI maps bad input to exit 2
and a failed run to exit 1, with one message and no traceback."""

import ast
from pathlib import Path

import pytest

import lisa_dist
from lisa_dist import errors
from lisa_dist.cli import main

PACKAGE = Path(lisa_dist.__file__).parent


def _exception_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception"))) for b in node.bases)]


def test_every_exception_class_of_the_package_is_defined_in_the_errors_module():
    elsewhere = {str(p.relative_to(PACKAGE)): names for p in PACKAGE.rglob("*.py")
                 if p.name != "errors.py" and (names := _exception_classes(p))}
    assert elsewhere == {}
    for name in _exception_classes(PACKAGE / "errors.py"):
        error = getattr(errors, name)
        assert issubclass(error, errors.LisaDistError)
        assert error.exit_code == (2 if issubclass(error, errors.UserError) else 1), name


def test_a_malformed_launcher_environment_is_exit_2_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", str(PACKAGE.parent / "configs" / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert "lisa-dist: error: launcher environment variable WORLD_SIZE='two' is not an integer" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("error, code", [(errors.DataError("data.jsonl:3: no output"), 2),
                                         (errors.NonFiniteStepsError("steps 1 to 20 ..."), 1)])
def test_the_cli_exit_status_follows_the_error_class(monkeypatch, capsys, tmp_path, error, code):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("lisa_dist.plots.write_report", fail)
    assert main(["report", str(tmp_path)]) == code
    assert capsys.readouterr().err == f"lisa-dist: error: {error}\n"
