#!/usr/bin/env bash
# The random-kill soak: scripts/soak.sh N [--seed S] [--engine fsdp2|zero3] [--out DIR] (scripts/soak.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/soak.py "$@"
