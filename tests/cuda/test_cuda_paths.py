"""Code paths that only exist on CUDA, run on one GPU (`scripts/gpu_check.sh`); skipped without CUDA.

On a CPU run, offload copies host memory to host memory, FSDP2's reduce-scatter and its post-reduce hooks
share the one stream there is, and the parameter offload's update runs where the compute does. Here they
do not: pinned host memory with non-blocking copies against the compute stream, LOMO's update in FSDP2's
post-reduce hooks on its reduce-scatter stream, AdaLomo's statistics made in host memory and summed by
NCCL, the CUDA allocator's peak against `lisa-dist estimate`, and the GPU's own generator seeded per step.

Each run is `torchrun --nproc_per_node 1 -m lisa_dist train` on the first GPU (the generator's test runs in
process). Runs compared bit for bit use eager attention and a fixed cuBLAS workspace, so the same kernels run
in the same order in both."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.randomness import model_randomness
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths: needs a GPU")

# The source tree first, then whatever the check put on the path (the GPU bundle's packages, scripts/gpu_check.sh).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
       "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "4"}
COMMON = [f"data.path={TINY_ALPACA}", "data.pack=true", "optim.schedule=constant", "optim.warmup_steps=0",
          "progress_bar=false", "save_every=0", "overwrite=true", "model.attn_implementation=eager"]


def train(out: Path, *overrides: str) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "-m", "lisa_dist", "train", str(REPO / "configs" / "tiny.yaml"), *COMMON, f"output_dir={out}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_equal_models(a: Path, b: Path) -> None:
    wa, wb = final(a), final(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# preset small, 512 tokens of 4 sequences: each layer input is 4 MiB, above the 1 MiB offload threshold
SMALL = ["model.path=null", "model.preset=small", "data.seq_len=512", "train.global_batch_size=8",
         "train.micro_batch_size=4", "train.dtype=fp32", "max_steps=4"]


def test_pinned_offload_with_non_blocking_copies_trains_bit_for_bit_like_resident(tmp_path):
    """Activation offload (pinned, non-blocking, on the compute stream) and optimizer-state offload: a copy
    read before it landed, or freed before it was read, changes the numbers."""
    lisa = [*SMALL, "method=lisa", "lisa.gamma=4", "lisa.interval=2", "optim.name=adamw", "optim.lr=1e-3",
            "model.activation_checkpointing=true"]
    plain = train(tmp_path / "plain", *lisa)
    offloaded = train(tmp_path / "offloaded", *lisa, "model.activation_offload=true", "optim.offload_state=true")
    assert losses(plain) == losses(offloaded)
    assert_equal_models(plain, offloaded)


def test_lomo_in_post_reduce_hooks_equals_post_backward_sgd(tmp_path):
    """FSDP2 runs the post-reduce hooks, and so LOMO's update, on its reduce-scatter stream; SGD updates after
    backward on the compute stream. Same gradients, same update (tests/gloo/test_fused.py on CPU)."""
    full = [*SMALL, "train.micro_batch_size=8", "method=full", "optim.lr=0.05", "optim.max_grad_norm=0",
            "optim.weight_decay=0.1"]  # one micro-batch: LOMO does not accumulate
    lomo = train(tmp_path / "lomo", *full, "optim.name=lomo")
    sgd = train(tmp_path / "sgd", *full, "optim.name=sgd", "optim.momentum=0")
    assert losses(lomo) == losses(sgd)
    assert_equal_models(lomo, sgd)


def test_adalomo_with_parameter_offload_matches_resident_after_one_step(tmp_path):
    """engine.offload_params: the shards, gradients and AdaLomo's update are in host memory, and its row,
    column and RMS statistics are summed over ranks through the device (NCCL has no host tensors).

    The forward and backward are the same GPU kernels; only the update moves to the host's processor. Its
    elementwise fp32 operations are correctly rounded on both, so the two updates differ only through the
    sums feeding each element: the factored second moment's row, column and total means, the update's RMS
    and the weight's RMS, five sums of at most n terms, each within n * eps relative (recursive summation,
    eps = 2^-24). So each weight's change agrees within 5 * n * eps of itself, plus an ulp of the weight
    for the final rounding."""
    adalomo = [f"model.path={TINY_MODEL_DIR}", "data.seq_len=64", "train.global_batch_size=8",
               "train.micro_batch_size=8", "train.dtype=fp32", "method=full", "optim.name=adalomo",
               "optim.lr=1e-2", "max_steps=1"]
    resident = final(train(tmp_path / "resident", *adalomo))
    offloaded = final(train(tmp_path / "offloaded", *adalomo, "engine.offload_params=true"))
    start = load_file(TINY_MODEL_DIR / "model.safetensors")
    n = max(t.numel() for t in start.values())
    eps = 2.0 ** -24
    for name, before in start.items():
        change = (resident[name] - before.float()).abs()
        assert change.max() > 0, f"{name} did not move"
        bound = 5 * n * eps * change + torch.finfo(torch.float32).eps * resident[name].abs()
        assert ((offloaded[name] - resident[name]).abs() <= bound).all(), name


SHALLOW_7B = ["model.path=null", "model.preset=llama2-7b", "model.num_layers=2", "data.seq_len=2048",
              "train.global_batch_size=1", "train.micro_batch_size=1", "train.dtype=bf16", "max_steps=3",
              "model.attn_implementation=sdpa", "lisa.gamma=1", "lisa.interval=2"]


@pytest.mark.parametrize("method, optim", [("lisa", "adamw"), ("full", "lomo")])
def test_allocator_peak_is_within_10_percent_of_estimate_on_a_shallow_7b(tmp_path, method, optim):
    """The CUDA allocator's peak (max_memory_allocated, each step) against `estimate` of the same job."""
    job = [*SHALLOW_7B, f"method={method}", f"optim.name={optim}", "optim.lr=1e-4"]
    out = train(tmp_path / "run", *job)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    measured = max(r["peak_mem_gib"] for r in records)
    done = subprocess.run([sys.executable, "-m", "lisa_dist", "estimate", str(REPO / "configs" / "tiny.yaml"),
                           *COMMON, *job, "--world-size", "1", "--json"], cwd=REPO,
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    estimated = json.loads(done.stdout.strip().splitlines()[-1])["peak_gib"]
    assert math.isfinite(measured) and measured > 0
    assert estimated == pytest.approx(measured, rel=0.10)


def test_dropout_on_the_gpu_draws_from_seed_step_and_rank_and_leaves_the_generator_as_it_was():
    device = torch.device("cuda", 0)

    def mask(step: int) -> torch.Tensor:
        with model_randomness(0, step, 0, device):
            return torch.nn.functional.dropout(torch.ones(1000, device=device), 0.5)

    torch.cuda.manual_seed(5)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed(5)
    first = mask(3)
    assert torch.equal(torch.rand(4, device=device), expected)
    assert torch.equal(mask(3), first)
    assert not torch.equal(mask(4), first)  # 1000 coin flips: equal with probability 2**-1000
