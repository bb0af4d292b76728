"""What rank 0 prints without a terminal, and trackers that are not installed."""

import importlib.util

import pytest

from lisa_dist.errors import ConfigError
from lisa_dist.progress import Reporter, check_trackers
from tests.helpers import tiny_config


def _record(step):
    return {"step": step, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.0, "peak_mem_gib": 0.5,
            "active_layers": [1, 6], "grad_norm": 1.0, "optim_state_gib": 0.1}


def test_without_a_terminal_rank_0_prints_a_line_every_log_every_steps_and_at_the_end(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=7, logging={"log_every": 3})
    reporter = Reporter(config, is_main=True, is_tty=False, start_step=0)
    for step in range(1, 8):
        reporter.step(_record(step))
        if step == 4:
            reporter.evaluation({"step": 4, "eval_loss": 2.25, "eval_perplexity": 9.49, "eval_sequences": 10})
    reporter.close()
    lines = capsys.readouterr().err.splitlines()
    steps = [line.split()[2] for line in lines if line.startswith("lisa-dist: step")]
    assert steps == ["3/7", "6/7", "7/7"]
    assert lines[0].startswith("lisa-dist: step 3/7 loss 2.5000 lr 0.001 tokens/s 1234 peak 512 MiB layers [1, 6] "
                               "elapsed 0:00:00 remaining 0:00:00")
    assert "lisa-dist: eval at step 4: loss 2.2500, perplexity 9.49 over 10 sequences" in lines
    assert " eval_loss 2.2500 " in lines[-1]


def test_other_ranks_and_terminals_print_no_lines(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=2, logging={"log_every": 1})
    for is_main, is_tty in ((False, False), (True, True)):
        reporter = Reporter(config, is_main=is_main, is_tty=is_tty, start_step=0)
        reporter.step(_record(1))
        reporter.close()
    assert "lisa-dist: step" not in capsys.readouterr().err


@pytest.mark.parametrize("tracker, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_that_is_not_installed_is_refused_before_start_naming_the_extra(tmp_path, monkeypatch, tracker,
                                                                                  package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    config = tiny_config(tmp_path, logging={"report_to": [tracker]})
    with pytest.raises(ConfigError, match=rf"logging.report_to includes {tracker} but the {package} package is not "
                                          rf"installed; pip install 'lisa_dist\[{tracker}\]'"):
        check_trackers(config)
