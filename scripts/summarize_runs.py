"""`python scripts/summarize_runs.py RUN_DIR ...`: medians of runs' training steps (metrics.jsonl), for docs and
comparisons. Evaluation rows are left out."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FIELDS = ("loss", "tokens_per_s", "step_time_s", "peak_mem_gib", "optim_state_gib")


def summarize(run_dir: Path, skip: int = 1) -> dict[str, float]:
    """Medians over steps, skipping the first `skip` (lazy initialization, first switch)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in rows if "eval_loss" not in r]
    if len(records) <= skip:
        raise ValueError(f"{run_dir}: {len(records)} steps recorded, need more than {skip}")
    kept = records[skip:]
    out = {f"median_{k}": statistics.median(r[k] for r in kept) for k in FIELDS}
    out["max_peak_mem_gib"] = max(r["peak_mem_gib"] for r in kept)
    out["max_optim_state_gib"] = max(r["optim_state_gib"] for r in kept)
    out["first_loss"], out["last_loss"] = records[0]["loss"], records[-1]["loss"]
    out["steps"] = len(records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--skip", type=int, default=1, help="leading steps left out of the medians")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    rows = {str(r): summarize(r, args.skip) for r in args.runs}
    if args.json:
        print(json.dumps(rows))
        return
    keys = list(next(iter(rows.values())))
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.6g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
