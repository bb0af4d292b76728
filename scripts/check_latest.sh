#!/usr/bin/env bash
# Install the newest versions pyproject.toml's ranges allow into a scratch venv and run the fast tests
# against them, so a new transformers, DeepSpeed or accelerate release is caught here, not by a user.
#   scripts/check_latest.sh [pytest args]     (default: -m "not slow" tests/unit tests/gloo)
# Prints the versions that differ from requirements/lock.txt. If the tests pass, refresh the lock with
#   grep -v '^-e' /tmp/lisa_dist_latest/freeze.txt > requirements/lock.txt   (keep the header and torch line)
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-/tmp/lisa_dist_latest}
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
VENV="$SCRATCH/venv" LISA_DIST_UNLOCKED=1 ./install.sh
"$SCRATCH/venv/bin/python" -m pip freeze --all | grep -v '^-e\|^#' | sed 's/+cpu$//' | sort -f > "$SCRATCH/freeze.txt"
echo "versions that differ from requirements/lock.txt (lock -> newest):"
join -i -t= -j1 <(grep -v '^#' requirements/lock.txt | sort -f) "$SCRATCH/freeze.txt" -a2 -e '(none)' -o 0,1.2,2.2 \
  | awk -F= '$2 != $3 {printf "  %s: %s -> %s\n", $1, $2, $3; n++} END {if (!n) print "  none"}'
[ $# -gt 0 ] || set -- -m "not slow" tests/unit tests/gloo
OMP_NUM_THREADS=1 "$SCRATCH/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
