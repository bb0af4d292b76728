#!/usr/bin/env bash
# Create .venv and install lisa_dist with exactly the versions the suite last passed with
# (requirements/lock.txt, as pip constraints). torch comes first, pinned, so that no other requirement
# pulls a CUDA build; deepspeed builds against that torch (hence no build isolation).
# Other versions: scripts/check_versions.sh (the oldest and newest the ranges in pyproject.toml admit).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
VERSIONS=(-c requirements/lock.txt)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "${VERSIONS[@]}" pip setuptools wheel
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "${VERSIONS[@]}" --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "import torch, deepspeed, transformers, accelerate; print('lisa_dist install ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | grep "install ok"
