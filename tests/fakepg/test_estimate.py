"""`lisa-dist estimate` (fake tensors, fake process group) against real measured peaks of the same run."""

import json
import subprocess
import sys

import pytest

from tests.cli.test_train_cli import ENV, REPO
from tests.helpers import run_distributed, start_trainer, tiny_config

TINY = ["model.path=" + str(REPO / "lisa_dist" / "assets" / "tiny-llama"), "data.seq_len=64",
        "train.global_batch_size=16", "train.micro_batch_size=4", "lisa.interval=5"]


def estimate(*args: str, world_size: int = 2, gpu: float = 22.35) -> dict:
    cmd = [sys.executable, "-m", "lisa_dist", "estimate", str(REPO / "configs" / "tiny.yaml"), *args,
           "--world-size", str(world_size), "--gpu-mem-gib", str(gpu), "--json"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measured_worker(rank: int, world_size: int, output_dir: str, method: str, optim: str) -> float:
    config = tiny_config(output_dir, method=method, lisa={"gamma": 2, "interval": 5},
                         data={"seq_len": 64}, train={"dtype": "bf16", "global_batch_size": 16,
                                                      "micro_batch_size": 4 if method == "lisa" else 8},
                         optim={"name": optim, "lr": 1e-3})
    trainer = start_trainer(config)
    return max(trainer._measured_step(step)["peak_mem_gib"] for step in ([0, 1, 5] if method == "lisa" else [0, 1]))


@pytest.mark.parametrize("method, optim", [("lisa", "adamw"), ("full", "lomo"), ("full", "adamw")])
def test_estimate_matches_the_measured_peak_of_the_same_run(tmp_path, method, optim):
    micro = "4" if method == "lisa" else "8"
    result = estimate(*TINY, f"method={method}", f"optim.name={optim}", "optim.lr=1e-3", "train.dtype=bf16",
                      f"train.micro_batch_size={micro}")
    measured = run_distributed(_measured_worker, 2, output_dir=str(tmp_path), method=method, optim=optim)[0]
    assert {"peak_gib", "fits", "world_size", "categories"} <= result.keys() and result["world_size"] == 2
    assert result["peak_gib"] == pytest.approx(measured, rel=0.10)


def test_estimate_says_when_it_does_not_fit():
    result = estimate(*TINY, gpu=0.855)  # 0.005 GiB left after the 0.85 GiB reserve
    assert result["fits"] is False and result["budget_gib"] == pytest.approx(0.005)
