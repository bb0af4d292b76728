"""The shipped large-model configs (LLaMA-2-70B, Mixtral-8x7B, Qwen3-30B-A3B) through `lisa-dist estimate` (the
real FSDP2 step on fake tensors), against `plan`. Its own file, so the suite's scheduler (one xdist worker per
file) runs these minutes of estimates beside test_plan.py's other work instead of after it."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lisa_dist.config import load_config
from lisa_dist.sizing.memory import GIB
from lisa_dist.sizing.plan import ModelShape, run_plan
from tests.helpers import ENV, REPO

SHIPPED = {"llama2_70b_lisa": 8, "qwen3_30b_a3b_lisa": 4, "llama2_70b_lisa_4gpu": 4, "llama2_70b_lomo": 8,
           "mixtral_8x7b_lisa": 8, "llama2_70b_lomo_4gpu": 4}
"""The shipped configs (configs/NAME.yaml) and the cards each is for; the longest estimates first."""


@pytest.fixture(scope="module")
def estimates() -> dict[str, dict]:
    """`lisa-dist estimate --world-size W --json` of every shipped config, two at a time: each is one
    single-threaded process (minutes of fake-tensor dispatch), and the machine has two cores."""
    def run(name: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "lisa_dist", "estimate",
                               str(REPO / "configs" / f"{name}.yaml"), "--world-size",
                               str(SHIPPED[name]), "--gpu-mem-gib", "22.35", "--json"],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SHIPPED, pool.map(run, SHIPPED)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_configs_fit_their_cards_of_24_gb(name, estimates):
    """The project's promise: every shipped config on its cards (70B on 8, or 4 with parameter offload; the
    mixtures of experts on 8 and 4), through the real FSDP2 step on fake tensors, and `plan` within 10 %."""
    world_size = SHIPPED[name]
    config = load_config(REPO / "configs" / f"{name}.yaml")
    result = estimates[name]
    assert result["fits"] is True and result["peak_gib"] <= 21.5
    planned = run_plan(config, world_size=world_size, gpu_mem_gib=22.35, suggest=False)
    assert planned["fits"] is True and planned["peak_gib"] == pytest.approx(result["peak_gib"], rel=0.10)
    shards = ModelShape.of(config).total * 2 / world_size  # bf16
    if config.engine.offload_params:  # the shards (32.1 GiB per rank) are in host memory, not on the card
        assert result["categories"]["sharded_params"] == 0 and result["host_offload_gib"] * GIB >= shards
        assert planned["host_offload_gib"] == pytest.approx(result["host_offload_gib"], rel=0.10)
    else:
        assert result["peak_gib"] * GIB > shards  # the bf16 shards (70B: 16.06 GiB) are on the card
