"""Shared test helpers: tiny configs and a runner for gloo multi-process workers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.config import Config, from_dict
from lisa_dist.data import IGNORE_INDEX, TokenizedExample
from lisa_dist.validation import validate


REPO = Path(__file__).resolve().parents[1]


def tiny_config(output_dir: Path | str, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "seed": 0, "max_steps": 6, "output_dir": str(output_dir), "method": "lisa", "progress_bar": False,
        "lisa": {"gamma": 2, "interval": 3},
        "model": {"path": str(TINY_MODEL_DIR)},
        "data": {"path": str(TINY_ALPACA), "seq_len": 48},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "dtype": "fp32"},
        "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": 0.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    config = from_dict(raw)
    validate(config)
    return config


def accelerate_variant(out_dir: Path, name: str, **changes: Any) -> Path:
    """configs/accelerate/NAME with `section__key=value` (or top-level `key=value`) changes, written to out_dir."""
    raw = yaml.safe_load((REPO / "configs" / "accelerate" / name).read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (raw.setdefault(section, {}) if section else raw)[field] = value
    path = Path(out_dir) / name
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str, kwargs: dict,
           parent_env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(parent_env)  # a forked worker starts with the environment of its server, not the test's
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    result = fn(rank=rank, world_size=world_size, **kwargs)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Like `lisa-dist train`: the interpreter's teardown sometimes aborts on gloo/DeepSpeed threads
    # ("terminate called without an active exception") after all work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Imported once by the fork server each test process starts, so that a worker starts in a fraction of a
# second instead of importing these for 6 s (the suite starts about a hundred workers). DeepSpeed is left
# out: it reads DS_ACCELERATOR when first imported.
_PRELOAD = ["torch", "torch.distributed.fsdp", "transformers.modeling_utils",
            "transformers.models.llama.modeling_llama", "lisa_dist.train"]


def run_distributed(fn: Callable[..., Any], world_size: int = 2, fresh: bool = False, **kwargs: Any) -> list[Any]:
    """Run `fn(rank=, world_size=, **kwargs)` in `world_size` processes; return each rank's result.

    Workers are forked from a server that imported torch, transformers and lisa_dist (a clean process, not
    this one); `fresh=True` spawns new interpreters instead, for tests about what a process imported."""
    if not fresh:
        mp.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, out_dir, kwargs, dict(os.environ)),
                           nprocs=world_size, start_method="spawn" if fresh else "forkserver", join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def start_trainer(config: Config):
    """Inside a worker: the process group, the engine and a Trainer, as `lisa-dist train` builds them."""
    from lisa_dist.distributed import init_distributed
    from lisa_dist.env import read_launch_env
    from lisa_dist.train import Trainer, prepare

    env = read_launch_env()
    source, sequences, eval_sequences = prepare(config, env.world_size)
    runtime = init_distributed(env, config.engine.timeout_s)
    return Trainer(config, runtime, source, sequences, eval_sequences)


def engine_weights(trainer) -> dict[str, torch.Tensor] | None:
    """Unsharded fp32 weights from either engine (ZeRO-3: on rank 0 only, None elsewhere)."""
    if trainer.core.engine.name == "fsdp2":
        return full_weights(trainer)
    state = trainer.core.engine.full_state_dict()
    names = {n for n, _ in trainer.core.model.named_parameters()}  # not the persistent buffers it also holds
    return None if state is None else {k: v.float() for k, v in state.items() if k in names}


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Unsharded weights on every rank (all-gathered DTensors), for comparisons."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in trainer.core.model.named_parameters():
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
    return out


# Parity across reduction orders (2 ranks against 1 process, ZeRO-3 against FSDP2, a resharded resume).
# Each gradient element is a sum of fp32 terms (tokens of the batch, features of a layer, ranks); in another
# order such a sum of up to 2^10 terms differs by at most 2^10 * 2^-24 of the sum of the terms' magnitudes
# (Higham's gamma_n). The tiny model's sums are shorter (384 tokens, 176 features, 2 ranks), and we take the
# magnitudes' sum as the gradient's scale: the largest gradient norm of the run bounds every element.
REDUCTION_ROUNDING = 2.0 ** -14
# An update rule turns that gradient difference into a weight difference at most its Lipschitz constant
# times larger. SGD/LOMO: 1. AdamW, m/(sqrt(v)+eps) after bias correction (m and sqrt(v) are each
# 1-Lipschitz in the gradients): 1/eps through m, plus |m|/sqrt(v) / (4 eps) through sqrt(v), and
# |m|/sqrt(v) <= 1.05 in the first ten steps with betas (0.9, 0.999) (Cauchy-Schwarz), so < 1.3/eps: we
# take 3/eps; AdamW with its default eps of 1e-8 amplifies rounding by ~1e8 where a gradient nearly cancels,
# so parity tests use PARITY_EPS (the 'SGD-like' setting) and the bound stays small. AdaLomo:
# g/sqrt(v + eps1) is 1/sqrt(eps1)-Lipschitz, times the RMS renormalization's factor (at most 3), times
# step scale max(eps2, RMS(W)) <= the largest RMS of a weight matrix (at most 1: norms are ones).
PARITY_EPS = 1e-2
PARITY_ADALOMO_EPS1 = 1e-6


def parity_atol(optim: dict, steps: int, grad_scale: float) -> float:
    """Largest element difference the rounding of another reduction order can make between two runs of
    `steps` optimizer steps with `optim` (the config section), whose gradient norms stay below `grad_scale`.

    Per step each element moves by at most lr * L * REDUCTION_ROUNDING * grad_scale more in one run than in
    the other (L the rule's Lipschitz constant above); differences already in the weights change later
    gradients only at second order (lr * curvature * difference), which the factor of 2 covers."""
    name, lr = optim["name"], optim["lr"]
    if name in ("sgd", "lomo"):
        lipschitz = 1.0
    elif name == "adamw":
        assert optim.get("eps", 1e-8) >= PARITY_EPS, "cross-order AdamW parity needs eps=PARITY_EPS"
        lipschitz = 3.0 / optim["eps"]
    elif name == "adalomo":
        eps1 = optim.get("adalomo_eps", [1e-30])[0]
        assert eps1 >= PARITY_ADALOMO_EPS1, "cross-order AdaLomo parity needs adalomo_eps[0]=PARITY_ADALOMO_EPS1"
        lipschitz = 3.0 / eps1 ** 0.5
    else:
        raise ValueError(name)
    if optim.get("max_grad_norm"):
        lipschitz *= 2  # the clip coefficient is itself a reduced sum (the norm), rounded the same way
    return 2 * steps * lr * lipschitz * REDUCTION_ROUNDING * grad_scale


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    """Every element within `atol` (from `parity_atol`)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=0, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# The loss: a mean over at most 2^10 tokens' cross-entropies (positive terms) in another order, plus the
# logits' own rounding at the same relative level.
LOSS_RTOL = 2 * REDUCTION_ROUNDING


def tiny_start_weights() -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class WholeShards:
    """Shard access to a plain model (`ShardAccess`): every parameter is its own whole shard."""

    def local_shard(self, param):
        return param.data

    def shard_info(self, param):
        from lisa_dist.optim.shard_info import local_shard_info

        return local_shard_info(param)


# Whole-CLI runs (tests/cli, tests/fakepg, tests/gloo/test_resume.py) and data helpers shared by test files.

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# A constant schedule lets resume tests stop a run early by a smaller max_steps (cosine depends on it); AdamW's
# eps keeps runs that reduce in another order (resharded resumes) within tests.helpers.parity_atol.
COMMON = [f"model.path={TINY_MODEL_DIR}", f"data.path={TINY_ALPACA}", "data.seq_len=48", "lisa.interval=2",
          "optim.schedule=constant", "optim.warmup_steps=0", "optim.eps=0.01",
          "train.global_batch_size=8", "train.micro_batch_size=2", "progress_bar=false"]


def torchrun_command(*args: str, nproc: int = 2, options: tuple[str, ...] = (),
                     entry: tuple[str, ...] = ("-m", "lisa_dist")) -> list[str]:
    """`torchrun [options] ENTRY train configs/tiny.yaml COMMON args`."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *options, *entry, "train", str(REPO / "configs" / "tiny.yaml"), *COMMON, *args]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, nproc=nproc), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)


def lisa_dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lisa_dist", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def assert_same_final(a: Path, b: Path) -> None:
    """The two runs' final models are equal bit for bit."""
    final_a = load_file(a / "final" / "model.safetensors")
    final_b = load_file(b / "final" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


def layer_of(name: str) -> int | None:
    """The decoder layer a parameter of the tiny LLaMA belongs to (`model.layers.N.`), or None."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


ZERO3 = ["engine.name=zero3", f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero3.json'}",
         "train.dtype=fp32", "save_every=3"]


DS_ENV = {**ENV, "DS_ACCELERATOR": "cpu"}


def deepspeed_launcher(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "lisa_dist", "train", str(REPO / "configs" / "tiny.yaml"), *COMMON, *args]
    return subprocess.run(cmd, cwd=REPO, env=DS_ENV, capture_output=True, text=True, timeout=300)


def assert_same_training(a: Path, b: Path, first_step: int) -> None:
    """Equal up to the rounding of a different reduction order: losses, and final weights within
    tests.helpers.parity_atol for the runs' AdamW settings (configs/tiny.yaml with COMMON)."""
    records_a, records_b = metrics(a), metrics(b)
    ra = records_a[first_step:]
    rb = records_b[-len(ra):]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["active_layers"] for r in ra] == [r["active_layers"] for r in rb]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=LOSS_RTOL, abs=0)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    everything = records_a + records_b
    optim = {"name": "adamw", "lr": max(r["lr"] for r in everything), "eps": 0.01, "max_grad_norm": 1.0}
    assert_weights_close(wa, wb, parity_atol(optim, len(records_a), max(r["grad_norm"] for r in everything)))


# A ChatML-style template that adds a default system prompt when the conversation has none (as Qwen2's
# does), each turn ended by the tokenizer's eos token (as Qwen2-Instruct's <|im_end|> is its eos).
CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.' + eos_token + '\n' }}"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labelled_runs(example: TokenizedExample) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as token ids."""
    runs: list[list[int]] = []
    previous_labelled = False
    for token, label in zip(example.input_ids, example.labels):
        labelled = label != IGNORE_INDEX
        if labelled:
            assert label == token
            if not previous_labelled:
                runs.append([])
            runs[-1].append(token)
        previous_labelled = labelled
    return runs


def full_disk(path: Path | str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def failing_writes(me: int, rank: int, where: str, step: int):
    """In process `me`, if it is `rank`, the write of checkpoint `step` fails: in DCP's shard writer (`shard`)
    or rank 0's state file (`state`)."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    from lisa_dist import checkpoint as ckpt

    shard_write, synced_write = dcp_filesystem._write_item, ckpt._write_synced

    def write_item(*args, **kwargs):
        stream = args[1]
        if f"step_{step}.tmp" in str(getattr(stream, "name", "")):
            raise full_disk(stream.name)
        return shard_write(*args, **kwargs)

    def write_synced(path: Path, text: str) -> None:
        if f"step_{step}.tmp" in str(path) and path.name == ckpt.STATE_FILE:
            raise full_disk(path)
        synced_write(path, text)

    if me == rank:
        if where == "shard":
            dcp_filesystem._write_item = write_item
        else:
            ckpt._write_synced = write_synced
    try:
        yield
    finally:
        dcp_filesystem._write_item, ckpt._write_synced = shard_write, synced_write
