"""benchmarks/async_save.py's reading of a run: what training waited for at each save and the steps after one,
from the marks each rank writes."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.async_save import read_run


def _write(result: Path, rank: int, marks: list[tuple[str, int, float]], loop_s: float) -> None:
    result.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{result}.{rank}.json").write_text(json.dumps(
        {"loop_s": loop_s, "steps": 4, "marks": marks, "peak_rss_mib": 100.0 + rank, "shard_mib": 2.0 + rank}))


def test_a_run_is_read_as_its_slower_rank_and_its_saves_held_time(tmp_path):
    result = tmp_path / "async" / "result"
    # steps 1..4, a save after 2 and 4, then the final publication of step 4's background checkpoint
    _write(result, 0, [("step", 1, 0.0), ("step", 2, 1.0), ("save", 2, 1.25), ("step", 3, 3.25), ("step", 4, 4.25),
                       ("save", 4, 4.5), ("published", 4, 5.0)], loop_s=5.0)
    _write(result, 1, [("step", 1, 0.0), ("step", 2, 1.0), ("save", 2, 1.5), ("step", 3, 3.0), ("step", 4, 4.0),
                       ("save", 4, 4.25), ("published", 4, 4.25)], loop_s=4.25)

    run = read_run(result)

    assert run["per_step_s"] == 5.0 / 3  # the slower rank's loop over steps 2..4
    assert run["peak_rss_mib"] == 101.0 and run["shard_mib"] == 3.0
    # rank 0's saves 0.25, 0.25 and its publication 0.5; rank 1's 0.5, 0.25 (its publication took no time)
    assert sorted(run["held_s"]) == [0.25, 0.25, 0.25, 0.5, 0.5]
    assert sorted(run["after_save_s"]) == [1.5, 2.0]
    assert sorted(run["step_s"]) == [1.0, 1.0]  # step 4 on each rank; step 3 follows a save
