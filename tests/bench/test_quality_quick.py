"""`python -m benchmarks.quality.run --quick`: the benchmark's pipeline end to end (pre-training, a 2-rank
lisa-dist fine-tune, scoring), and that full fine-tuning learns the task's answers."""

import json
import math

from benchmarks.quality.run import main


def test_quick_benchmark_runs_and_full_fine_tuning_learns_the_answer_format(tmp_path):
    assert main(["--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    base = json.loads((tmp_path / "out" / "base.json").read_text())
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert row["method"] == "full_adamw" and row["steps"] == 30
    # The base model was never shown a question: its held-out answer loss is several nats. Thirty steps
    # teach the answer form (a colour, a place) if training works at all.
    assert row["eval_loss"] < 0.5 * base["eval_loss"]
    assert 0 <= row["exact_match"] <= 1 and row["peak_mib"] > 0 and row["step_s"] > 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| full_adamw |" in table


def test_quick_moe_benchmark_trains_experts_at_a_fraction_of_full_fine_tunings_state(tmp_path):
    """`--quick --base moe`: a Mixtral base (8 experts, top 2), full AdamW and LISA over experts by routing."""
    assert main(["--quick", "--base", "moe", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    base = json.loads((tmp_path / "out" / "base.json").read_text())
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert sorted(rows) == ["full_adamw", "lisa_expert_routing"]
    config = json.loads(next((tmp_path / "cache").glob("base-*/config.json")).read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8
    for row in rows.values():
        assert row["eval_loss"] < 0.6 * base["eval_loss"], row["method"]
    # 18 of 72 units (the same share of elements as 2 of 8 layers) plus the embeddings and head, against all
    assert rows["lisa_expert_routing"]["state_mib"] < 0.5 * rows["full_adamw"]["state_mib"]


def test_quick_string_task_trains_lisa_with_inactive_updates_at_plain_lisas_state(tmp_path):
    """`--quick --task strings`: the string task's pipeline, full AdamW and LISA whose units not sampled train by
    AdaLomo inside backward; both learn that an answer is letters, and LISA's optimizer state stays a fraction of
    full's (AdaLomo's row and column statistics are small beside AdamW's two moments of every element)."""
    assert main(["--quick", "--task", "strings", "--methods", "full_adamw", "lisa_inactive_adalomo", "--out",
                 str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    base = json.loads((tmp_path / "out" / "base.json").read_text())
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert sorted(rows) == ["full_adamw", "lisa_inactive_adalomo"]
    # A uniform guess among the 26 letters costs ln 26 = 3.26 nats an answer token; the quick base, which never
    # saw the instruction format, is above it (about 4.1), and 30 steps that teach the answer form go below.
    assert base["eval_loss"] > math.log(26)
    for row in rows.values():
        assert row["eval_loss"] < math.log(26), row["method"]
    # 2 of 8 layers plus the embeddings and head, against all, and a vector per matrix for the rest
    assert rows["lisa_inactive_adalomo"]["state_mib"] < 0.6 * rows["full_adamw"]["state_mib"]
