"""scripts/summarize_runs.py: medians over a run's training steps; evaluation rows are not steps."""

import json
import runpy
from tests.helpers import REPO


def test_medians_of_the_training_steps_with_evaluation_rows_in_the_file(tmp_path):
    summarize = runpy.run_path(str(REPO / "scripts" / "summarize_runs.py"))["summarize"]
    steps = [{"step": i, "loss": 5.0 - i, "tokens_per_s": 100.0 * i, "step_time_s": 1.0 / i,
              "peak_mem_gib": 1.0 + i, "optim_state_gib": 0.5} for i in range(1, 5)]
    rows = [*steps[:2], {"step": 2, "eval_loss": 4.5, "eval_perplexity": 90.0}, *steps[2:]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = summarize(tmp_path, skip=1)
    assert out["steps"] == 4 and out["first_loss"] == 4.0 and out["last_loss"] == 1.0
    assert out["median_loss"] == 2.0 and out["max_peak_mem_gib"] == 5.0  # steps 2-4
