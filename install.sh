#!/usr/bin/env bash
# Create .venv and install lisa_dist with exactly the versions the suite last passed with
# (requirements/lock.txt, as pip constraints). torch comes first, pinned, so that no other requirement
# pulls a CUDA build; deepspeed builds against that torch (hence no build isolation).
# LISA_DIST_UNLOCKED=1 skips the lock: the newest versions pyproject.toml's ranges allow
# (scripts/check_latest.sh uses it in a scratch venv).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ "${LISA_DIST_UNLOCKED:-0}" = 1 ]; then
  # Everything newest but torch: the CPU build on this disk (a newer torch from PyPI is a CUDA build).
  VERSIONS=(--upgrade --upgrade-strategy eager -c "$VENV/torch-pin.txt")
else
  VERSIONS=(-c requirements/lock.txt)
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "torch==2.13.0" > "$VENV/torch-pin.txt"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "${VERSIONS[@]}" pip setuptools wheel
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "${VERSIONS[@]}" --no-build-isolation -e ".[test]"
"$VENV/bin/python" -c "import torch, deepspeed, transformers, accelerate; print('lisa_dist install ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | grep "install ok"
