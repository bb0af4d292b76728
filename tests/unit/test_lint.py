"""The repository passes ruff with the configuration in pyproject.toml (what the pre-commit hook runs)."""

import subprocess
import sys

import pytest
from tests.helpers import REPO

pytest.importorskip("ruff")


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
