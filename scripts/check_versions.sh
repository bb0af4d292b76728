#!/usr/bin/env bash
# The version ranges pyproject.toml admits, run: each set gets a scratch venv with lisa_dist[test] installed
# and runs the unit and gloo tests there, so an old or new torch, transformers, accelerate or DeepSpeed that
# breaks lisa_dist is caught here, not by a user.
#
#   scripts/check_versions.sh [SET ...] [-- PYTEST ARGS]     SETs: oldest newest python310 (default: oldest newest)
#
#   oldest     the oldest the ranges admit, which is the GPU image's set: Python 3.12, torch 2.11.0 (a CUDA build
#              from the registry; it runs on the CPU), transformers 5.17.0, accelerate 1.15.0, DeepSpeed 0.19.3,
#              datasets 4.7.0
#   newest     the newest the ranges allow, on Python 3.11: torch 2.14.1 (this disk's CPU-runnable build; the
#              machines' pip constraints cap it there) and everything else upgraded eagerly
#   python310  Python 3.10 with the newest versions that install there (trl needs 3.11, so its tests skip)
#
# Writes $SCRATCH/SET/{freeze.txt,pytest.txt} (SCRATCH defaults to /tmp/lisa_dist_versions) and prints one
# markdown row per set for the table in docs/testing.md. For the newest set it also lists the versions that
# differ from requirements/lock.txt: refresh the lock from its freeze.txt once the whole suite passes there.
set -uo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-/tmp/lisa_dist_versions}
SETS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SETS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#SETS[@]} -gt 0 ] || SETS=(oldest newest)
[ $# -gt 0 ] || set -- -m "not slow" tests/unit tests/gloo

python_for() {  # the interpreter of a Python version: pyenv's if it has one, else pythonX.Y on the PATH
  local version=$1 prefix
  prefix=$(pyenv prefix "$(pyenv versions --bare 2>/dev/null | grep -m1 "^$version\.")" 2>/dev/null) \
    && echo "$prefix/bin/python$version" || command -v "python$version"
}

install_set() {  # SET VENV: a fresh venv with torch first (pinned, so nothing pulls another build), then lisa_dist
  local set=$1 venv=$2 python torch pins=() upgrade=()
  case $set in
    oldest) python=3.12 torch=2.11.0
            pins=(transformers==5.17.0 accelerate==1.15.0 deepspeed==0.19.3 datasets==4.7.0) ;;
    newest) python=3.11 torch=2.14.1 upgrade=(--upgrade --upgrade-strategy eager) ;;
    python310) python=3.10 torch=2.14.1 upgrade=(--upgrade --upgrade-strategy eager) ;;
    *) echo "check_versions: unknown set '$set' (oldest, newest, python310)" >&2; return 2 ;;
  esac
  "$(python_for $python)" -m venv "$venv" || return 1
  printf '%s\n' "torch==$torch" "${pins[@]}" > "$venv/constraints.txt"
  local pip=("$venv/bin/python" -m pip install -q -c "$venv/constraints.txt")
  "${pip[@]}" --upgrade pip setuptools wheel && "${pip[@]}" "torch==$torch" \
    && "${pip[@]}" "${upgrade[@]}" --no-build-isolation -e ".[test]"  # DeepSpeed builds against that torch
}

rows=()
for set in "${SETS[@]}"; do
  dir="$SCRATCH/$set"
  rm -rf "$dir" && mkdir -p "$dir"
  echo "== $set: installing into $dir/venv"
  if ! install_set "$set" "$dir/venv" > "$dir/install.txt" 2>&1; then
    tail -20 "$dir/install.txt"; rows+=("| $set | install failed: see $dir/install.txt |"); continue
  fi
  "$dir/venv/bin/python" -m pip freeze --all 2>/dev/null | grep -v '^-e\|^#\|^lisa_dist' | sed 's/+cpu$//' \
    | sort -f > "$dir/freeze.txt"
  versions=$("$dir/venv/bin/python" - <<'EOF'
import importlib.metadata as m, platform
names = ["torch", "transformers", "accelerate", "deepspeed", "datasets", "trl"]
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "-"
print(" | ".join([platform.python_version()] + [version(n) for n in names]))
EOF
)
  echo "== $set: $versions; pytest $*"
  start=$(date +%s)
  OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu "$dir/venv/bin/python" -m pytest -q -p no:cacheprovider "$@" 2>&1 \
    | tee "$dir/pytest.txt" | tail -5
  summary=$(grep -E '^=* ?[0-9]+ (passed|failed)|[0-9]+ passed|[0-9]+ failed' "$dir/pytest.txt" | tail -1 | tr -d '=')
  rows+=("| $set | $versions | $(echo $summary) ($(( $(date +%s) - start )) s) |")
  if [ "$set" = newest ]; then
    echo "versions that differ from requirements/lock.txt (lock -> newest):"
    lower() { sed 's/==/=/' | tr 'A-Z' 'a-z' | LC_ALL=C sort -t= -k1,1; }  # NAME=VERSION, one field each
    LC_ALL=C join -t= -j1 <(grep -v '^#' requirements/lock.txt | lower) <(lower < "$dir/freeze.txt") -a2 -e '(none)' \
      -o 0,1.2,2.2 \
      | awk -F= '$2 != $3 {printf "  %s: %s -> %s\n", $1, $2, $3; n++} END {if (!n) print "  none"}'
  fi
done
echo
echo "| set | Python | torch | transformers | accelerate | DeepSpeed | datasets | trl | unit and gloo tests |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
! printf '%s\n' "${rows[@]}" | grep -q "failed"
