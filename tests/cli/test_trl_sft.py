"""examples/trl_sft.py: TRL's SFTTrainer mixed with LisaDistTrainer, 2 ranks under `accelerate launch`, against
TRL's SFTTrainer alone in one process with the decoder layers LISA did not draw frozen. Every step takes the
whole dataset (8 rows, or 4 packed rows), so both runs see the same batches whatever the order, and must
train alike: TRL's completion-only labels, its packed rows (sequences that must not attend to each other) and
its own loss (loss_type='dft') hold, and the layers not drawn stay bit-identical."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lisa_dist.assets import TINY_MODEL_DIR
from tests.helpers import ENV, REDUCTION_ROUNDING, REPO, assert_weights_close, free_port, layer_of, parity_atol

pytest.importorskip("trl")

EXAMPLE = str(REPO / "examples" / "trl_sft.py")
STEPS, LR = 3, 1e-2  # examples/trl_sft.py's defaults
SGD = {"name": "sgd", "lr": LR, "max_grad_norm": 1.0}
# case: (accelerate file, example arguments, per-device rows on 2 ranks); 2 x rows x 2 accumulation = all rows
CASES = {"fsdp2-completions": ("fsdp2.yaml", ["--data", "text"], 2),
         "zero3-packed": ("zero3.yaml", ["--data", "tokens", "--packing", "--eval"], 1),
         "fsdp2-sft-own-loss": ("fsdp2.yaml", ["--data", "text", "--loss-type", "dft"], 2)}


def run_example(out, *args: str, accelerate_file: str | None = None) -> list[dict]:
    record = out / "record.jsonl"
    cmd = [sys.executable, EXAMPLE]
    if accelerate_file is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / accelerate_file), "--mixed_precision", "no",
               "--main_process_port", str(free_port()), EXAMPLE]
    result = subprocess.run([*cmd, "--out", str(out), "--record", str(record), *args], cwd=REPO, capture_output=True,
                            env={**ENV, "DS_ACCELERATOR": "cpu", "HF_HUB_DISABLE_TELEMETRY": "1",
                                 "HF_HUB_OFFLINE": "1"},
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    """(lisa_dist on 2 ranks, TRL alone in one process with the same layers trained) records and weights."""
    accelerate_file, args, rows = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    lisa = run_example(root / "lisa", *args, "--batch", str(rows), accelerate_file=accelerate_file)
    drawn = ",".join(map(str, lisa[0]["active_layers"]))
    alone = run_example(root / "trl", *args, "--vanilla", "--train-layers", drawn, "--batch", str(2 * rows))
    return lisa, alone, load_file(root / "lisa" / "model.safetensors"), load_file(root / "trl" / "model.safetensors")



def test_lisa_dist_trains_like_trl_alone_with_the_same_layers(runs):
    lisa, alone, final, reference = runs
    steps = [r for r in lisa if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["active_layers"] == steps[0]["active_layers"] for r in steps)  # lisa.interval = the run
    for r, s in zip(lisa, alone, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in r:
                # a sum of positive terms reduced in another order: relative rounding REDUCTION_ROUNDING each
                # (tests.helpers), twice for the weights' own rounding-level difference after the first step
                assert r[key] == pytest.approx(s[key], rel=4 * REDUCTION_ROUNDING, abs=0), key
    grad_scale = max(r["grad_norm"] for r in steps + alone if "grad_norm" in r)
    assert_weights_close(final, reference, parity_atol(SGD, STEPS, grad_scale))


def test_optimizer_state_only_for_the_drawn_layers_and_the_others_untouched(runs):
    lisa, _, final, _ = runs
    initial = load_file(TINY_MODEL_DIR / "model.safetensors")
    drawn = set(lisa[0]["active_layers"])
    assert lisa[0]["optim_state"] == sorted(n for n in initial if layer_of(n) is None or layer_of(n) in drawn)
    for name, tensor in initial.items():
        if layer_of(name) is not None and layer_of(name) not in drawn:
            assert torch.equal(final[name], tensor), name
        elif "proj" in name:
            assert not torch.equal(final[name], tensor), name
