"""examples/hf_trainer.py: a Hugging Face Trainer script with LisaDistTrainer, under `accelerate launch`
with the FSDP2 and ZeRO-3 config files. The CLI's guarantees hold: optimizer state only for the active
layers, frozen layers untouched, fused updates all run inside backward; and 2 ranks train like 1."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lisa_dist.assets import TINY_MODEL_DIR
from scripts.soak import worker_pids
from tests.cli.test_reliability_cli import wait_for
from tests.helpers import (ENV, PARITY_ADALOMO_EPS1, PARITY_EPS, REDUCTION_ROUNDING, REPO, assert_weights_close,
                           free_port, layer_of, parity_atol)

EXAMPLE = str(REPO / "examples" / "hf_trainer.py")
CASES = {"fsdp2-adamw": ("fsdp2.yaml", "adamw"), "zero3-adalomo": ("zero3.yaml", "adalomo")}
STEPS, LR = 4, 1e-3  # examples/hf_trainer.py's --steps and --lr defaults
SAVE_STEPS = 2  # checkpoint-2 ends the first LISA interval (lisa.interval=2)
# Settings under which another reduction order's rounding stays small (tests.helpers.parity_atol).
PARITY = ["--adam-epsilon", str(PARITY_EPS), "--adalomo-eps1", str(PARITY_ADALOMO_EPS1)]
OPTIM = {"sgd": {"name": "sgd", "lr": LR, "max_grad_norm": 1.0},
         "adamw": {"name": "adamw", "lr": LR, "eps": PARITY_EPS, "max_grad_norm": 1.0},
         "adalomo": {"name": "adalomo", "lr": LR, "adalomo_eps": [PARITY_ADALOMO_EPS1, 1e-3], "max_grad_norm": 1.0}}


def run_example(out, *args: str, accelerate_file: str | None = None, nproc: int = 1) -> list[dict]:
    record = out / "record.jsonl"
    if accelerate_file is None and nproc == 1:  # one plain process: the reference
        cmd = [sys.executable, EXAMPLE]
    elif accelerate_file is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", EXAMPLE]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / accelerate_file), "--mixed_precision", "no",
               "--main_process_port", str(free_port()), EXAMPLE]
    result = subprocess.run([*cmd, "--out", str(out), "--steps", str(STEPS), "--record", str(record), *PARITY, *args],
                            cwd=REPO,
                            env={**ENV, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    accelerate_file, optim = CASES[request.param]
    out = tmp_path_factory.mktemp("hf") / request.param
    return out, optim, run_example(out, "--optim", optim, "--save-steps", str(SAVE_STEPS),
                                   accelerate_file=accelerate_file)



def test_optimizer_state_is_held_for_the_active_layers_only(case):
    _, _, records = case
    names = load_file(TINY_MODEL_DIR / "model.safetensors").keys()
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["active_layers"] != records[2]["active_layers"]  # the interval of 2 switched
    for r in records:
        expected = sorted(n for n in names if layer_of(n) is None or layer_of(n) in r["active_layers"])
        assert r["optim_state"] == expected


def test_frozen_layers_are_untouched_and_active_ones_trained(case):
    out, _, records = case
    before, after = load_file(TINY_MODEL_DIR / "model.safetensors"), load_file(out / "model.safetensors")
    trained = {i for r in records for i in r["active_layers"]}
    for name, tensor in before.items():
        layer = layer_of(name)
        if layer is not None and layer not in trained:
            assert torch.equal(after[name].float(), tensor.float()), name
        elif "proj" in name:
            assert not torch.equal(after[name].float(), tensor.float()), name


def test_fused_updates_ran_inside_backward_for_every_trainable_parameter(case):
    _, optim, records = case
    for r in records:
        assert r["fused_updates"] == (len(r["optim_state"]) if optim in ("lomo", "adalomo") else 0)
        assert r["grad_norm"] > 0


def test_two_ranks_train_like_one_process(case, tmp_path):
    out, optim, records = case
    single = run_example(tmp_path, "--optim", optim)
    assert [r["active_layers"] for r in single] == [r["active_layers"] for r in records]
    for r, s in zip(records, single):
        # A norm is a reduced sum of squares: relative rounding 2 * REDUCTION_ROUNDING (tests.helpers), twice
        # for the weights' own rounding-level difference after the first step.
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=4 * REDUCTION_ROUNDING, abs=0)
    final, reference = load_file(out / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    grad_scale = max(r["grad_norm"] for r in records + single)
    assert_weights_close(final, reference, parity_atol(OPTIM[optim], STEPS, grad_scale))


def test_a_trainer_checkpoint_resumes_exactly_under_another_launcher(case, tmp_path):
    """`trainer.train(resume_from_checkpoint=".../checkpoint-2")` under torchrun, from a checkpoint that
    `accelerate launch` wrote: shards, optimizer state, layer schedule, scheduler and data position come
    back, so the last two steps and the final weights are the uninterrupted run's, bit for bit (fp32 on
    CPU is deterministic for the same world size)."""
    out, optim, records = case
    engine = "zero3" if "zero3" in out.name else "fsdp2"
    resumed = run_example(tmp_path, "--optim", optim, "--engine", engine, "--save-steps", str(SAVE_STEPS),
                          "--resume", str(out / f"checkpoint-{SAVE_STEPS}"), nproc=2)
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed == records[SAVE_STEPS:]
    final, straight = load_file(tmp_path / "model.safetensors"), load_file(out / "model.safetensors")
    assert final.keys() == straight.keys()
    for name in final:
        assert torch.equal(final[name], straight[name]), name


def test_a_loss_the_trainer_computes_trains_on_two_ranks_like_one_process(tmp_path):
    """With label smoothing the Trainer's compute_loss gives the loss (normalized as the Trainer does for
    its ranks and accumulation steps); the core must backpropagate the same gradient on any world size."""
    smoothing = ["--optim", "sgd", "--label-smoothing", "0.1"]
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = run_example(tmp_path / "two", *smoothing, nproc=2)
    one = run_example(tmp_path / "one", *smoothing)
    assert [r["active_layers"] for r in two] == [r["active_layers"] for r in one]
    for r, s in zip(two, one):
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=4 * REDUCTION_ROUNDING, abs=0)
    grad_scale = max(r["grad_norm"] for r in two + one)
    assert_weights_close(load_file(tmp_path / "two" / "model.safetensors"),
                         load_file(tmp_path / "one" / "model.safetensors"),
                         parity_atol(OPTIM["sgd"], STEPS, grad_scale))


def test_bf16_and_gradient_checkpointing_arguments_train_as_lisa_dists_own_settings(tmp_path):
    """TrainingArguments bf16=True and gradient_checkpointing=True mean train.dtype=bf16 and
    model.activation_checkpointing: two ranks given the flags train bit for bit like two ranks given the settings."""
    flags = run_example(tmp_path / "flags", "--bf16", "--gradient-checkpointing", nproc=2)
    settings = run_example(tmp_path / "settings", "--lisa-dist-bf16-checkpointing", nproc=2)
    assert all(r["dtype"] == "bf16" and r["checkpointing"] is True for r in flags + settings)
    assert [r["grad_norm"] for r in flags] == [r["grad_norm"] for r in settings]
    final = {name: load_file(tmp_path / name / "model.safetensors") for name in ("flags", "settings")}
    assert final["flags"].keys() == final["settings"].keys()
    for key, value in final["flags"].items():
        assert torch.equal(value, final["settings"][key]), key


def test_an_moe_model_adding_its_router_loss_trains_on_two_ranks_like_one_process(tmp_path):
    """Mixtral whose config asks for the router's load-balancing loss (output_router_logits): the model adds
    coef x that loss of each micro-batch to the loss the Trainer computes. With the same one-sequence
    micro-batches (2 ranks x 2 accumulated, or 4 accumulated in one process) the update is the same, the
    router's loss moves it, and every step counts k = 2 experts per token of each layer."""
    from tests.families import write_family

    model = write_family("mixtral", tmp_path / "mixtral")
    raw = json.loads((model / "config.json").read_text())
    runs = {}
    for name, coef, nproc in (("two", 0.2, 2), ("one", 0.2, 1), ("without", 0.0, 1)):
        directory = tmp_path / f"model_{name}"
        directory.mkdir()
        for item in model.iterdir():
            (directory / item.name).symlink_to(item)
        (directory / "config.json").unlink()
        (directory / "config.json").write_text(json.dumps({**raw, "output_router_logits": coef > 0,
                                                           "router_aux_loss_coef": coef}))
        (tmp_path / name).mkdir()
        runs[name] = run_example(tmp_path / name, "--model", str(directory), "--optim", "sgd", "--micro-batch", "1",
                                 nproc=nproc)
    for r, s in zip(runs["two"], runs["one"]):
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=4 * REDUCTION_ROUNDING, abs=0)
        assert all(sum(row) == 2 * r["tokens"] for row in r["expert_tokens"].values())
    # the same weights route alike (later steps' weights differ by rounding, which may flip a near tie)
    assert runs["two"][0]["expert_tokens"] == runs["one"][0]["expert_tokens"]
    atol = parity_atol(OPTIM["sgd"], STEPS, max(r["grad_norm"] for r in runs["two"] + runs["one"]))
    final = {name: load_file(tmp_path / name / "model.safetensors") for name in runs}
    assert_weights_close(final["two"], final["one"], atol)
    moved = max(float((final["without"][k] - final["one"][k]).abs().max()) for k in final["one"])
    assert moved > 10 * atol, "the router loss changes the update beyond the parity bound"


def test_a_preemption_signal_saves_the_agreed_step_exits_75_and_resume_ends_with_the_same_weights(case, tmp_path):
    """SIGTERM to rank 1 of a torchrun'd Trainer script at a random step: both ranks stop after the same step,
    the Trainer saves it as checkpoint-N and each rank exits 75; the script resumed from checkpoint-N ends with
    the uninterrupted run's weights bit for bit."""
    out, optim, records = case
    if "zero3" in out.name:
        pytest.skip("the Trainer's preemption path does not depend on the engine; each engine's save on a signal: "
                    "tests/gloo/test_preemption.py")
    record = tmp_path / "record.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           EXAMPLE, "--out", str(tmp_path), "--steps", str(STEPS), "--record", str(record), *PARITY,
           "--optim", optim, "--engine", "fsdp2"]
    log = tmp_path / "torchrun.log"
    job = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
    after = random.Random(int.from_bytes(os.urandom(4))).randint(1, STEPS - 2)
    wait_for(lambda: record.exists() and len(record.read_text().splitlines()) >= after)
    os.kill(worker_pids(job.pid)[1], signal.SIGTERM)
    assert job.wait(timeout=240) != 0
    text = log.read_text()
    stopped = len(record.read_text().splitlines())
    assert after <= stopped < STEPS, (after, text[-3000:])
    assert text.count(f"lisa-dist: stopped: SIGTERM received; every rank stopped after step {stopped}") == 2, \
        text[-3000:]
    # torchrun reports the first rank to exit (75), then stops the other, which may not have exited yet
    assert "failed (exitcode: 75)" in text, text[-3000:]
    resumed = run_example(tmp_path / "resumed", "--optim", optim, "--engine", "fsdp2",
                          "--resume", str(tmp_path / f"checkpoint-{stopped}"), nproc=2)
    assert resumed == records[stopped:]
    final, straight = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in final:
        assert torch.equal(final[name], straight[name]), name


def test_a_model_with_dropout_resumes_exactly_from_a_trainer_checkpoint(tmp_path):
    """A GPT-2 written by save_pretrained keeps dropout 0.1: the run resumed from checkpoint-2 ends with the
    uninterrupted run's weights, bit for bit. (The Trainer saves and restores its generators itself; lisa_dist's
    per-step seeding, which the CLI's resume relies on, is tests/gloo/test_model_randomness.py.)"""
    model = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=512)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    transformers.GPT2LMHeadModel(config).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, model / name)
    out = tmp_path / "straight"
    common = ["--model", str(model), "--engine", "fsdp2", "--save-steps", str(SAVE_STEPS)]
    records = run_example(out, *common, nproc=2)
    resumed = run_example(tmp_path / "resumed", *common, "--resume", str(out / f"checkpoint-{SAVE_STEPS}"), nproc=2)
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed == records[SAVE_STEPS:]
    final, straight = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in straight:
        assert torch.equal(final[name], straight[name]), name
