"""`lisa-dist report`: the layer heatmap's data, the layer count, and clear errors on bad run directories."""

import json
import math

import pytest

from lisa_dist.errors import ReportError
from lisa_dist.plots import (active_matrix, expert_load, load_metrics, max_expert_load, mean_layer_updates, num_layers,
                             write_report)


def _write_run(run, records, layers=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if layers is not None:
        (run / "final").mkdir()
        (run / "final" / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))


def _record(step, active, ratios=None):
    return {"step": step, "loss": 5.0 - 0.1 * step, "tokens_per_s": 100.0, "peak_mem_gib": 0.2,
            "peak_mem_gib_per_rank": [0.2, 0.19], "optim_state_gib": 0.01, "active_layers": active,
            "layer_update_ratio": ratios if ratios is not None else [0.01 * (layer + 1) for layer in active]}


def _eval(step):
    return {"step": step, "eval_loss": 4.0, "eval_perplexity": 54.6, "eval_tokens": 10, "eval_sequences": 2}


def test_active_matrix_marks_the_trained_layers_of_each_step():
    records = [_record(1, [0, 3]), _record(2, [0, 3]), _eval(2), _record(3, [1, 2])]
    assert active_matrix(records, 5) == [[1, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_the_mean_layer_update_counts_only_the_steps_that_trained_the_layer():
    records = [_record(1, [0, 3], [0.1, 0.4]), _record(2, [0, 1], [0.3, 0.2]), _eval(2)]
    means = mean_layer_updates(records, 5)
    assert means[0] == pytest.approx(0.2) and means[1] == 0.2 and means[3] == 0.4
    assert math.isnan(means[2]) and math.isnan(means[4])  # never trained


def test_layer_count_comes_from_the_exported_model_else_from_the_schedule(tmp_path):
    records = [_record(1, [0, 3])]
    _write_run(tmp_path / "with_final", records, layers=8)
    _write_run(tmp_path / "without", records)
    assert num_layers(tmp_path / "with_final", records) == 8
    assert num_layers(tmp_path / "without", records) == 4


def test_report_writes_five_pngs_and_eval_rows_do_not_disturb_them(tmp_path):
    records = [_record(s, [s % 4, 4 + s % 4]) for s in range(1, 9)]
    _write_run(tmp_path / "run", records[:4] + [_eval(4)] + records[4:] + [_eval(8)], layers=8)
    written = write_report(tmp_path / "run")
    assert sorted(p.name for p in written) == ["layer_updates.png", "layers.png", "loss.png", "memory.png",
                                               "throughput.png"]
    assert all(p.parent == tmp_path / "run" / "report" and p.stat().st_size > 1000 for p in written)


def test_expert_load_is_each_experts_share_of_its_layers_tokens_over_the_run():
    records = [{**_record(1, [1]), "expert_tokens": {"1": [4, 0, 2, 2], "10": [1, 1, 1, 1]}}, _eval(1),
               {**_record(2, [1]), "expert_tokens": {"1": [4, 0, 0, 4], "10": [0, 0, 0, 0]}}]
    names, shares = expert_load(records)
    assert names == ["1", "10"]  # by layer index, not as strings
    assert shares == [[2.0, 0.0, 0.5, 1.5], [1.0, 1.0, 1.0, 1.0]]  # [8, 0, 2, 6] and [1, 1, 1, 1], 4 experts
    assert max_expert_load(records) == [(1, 2.0), (2, 2.0)]  # a layer without tokens does not count


def test_report_draws_the_expert_load_of_a_mixture_of_experts_run(tmp_path):
    records = [{**_record(s, [s % 2]), "expert_tokens": {str(i): [s, 2, 3, 4] for i in range(2)}}
               for s in range(1, 5)]
    _write_run(tmp_path / "moe", records, layers=2)
    written = write_report(tmp_path / "moe")
    assert "experts.png" in {p.name for p in written}
    assert (tmp_path / "moe" / "report" / "experts.png").stat().st_size > 1000


def test_two_runs_are_compared_on_loss_and_per_layer_updates(tmp_path):
    _write_run(tmp_path / "lisa", [_record(s, [s % 4]) for s in range(1, 9)], layers=4)
    _write_run(tmp_path / "full", [_record(s, [0, 1, 2, 3]) for s in range(1, 9)] + [_eval(8)], layers=4)
    written = write_report([tmp_path / "lisa", tmp_path / "full"])
    assert sorted(p.name for p in written) == ["layer_updates.png", "loss.png"]
    assert all(p.parent == tmp_path / "lisa" / "report" / "compare" for p in written)


@pytest.mark.parametrize("content, message", [
    (None, "has no metrics.jsonl"),
    ("", "holds no steps yet"),
    ('{"step": 1}\n{not json\n', "metrics.jsonl:2: not JSON"),
])
def test_bad_run_directories_are_clear_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        load_metrics(tmp_path)
