"""Step checkpoints (sharded, atomic), the final HF directory, and export of any step checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from accelerate import init_empty_weights

from lisa_dist.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
HF_CONFIG_DIR = "hf"


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step}"


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete step checkpoints, oldest first; `step_N.tmp` (being written, or left
    by a crash) never counts."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        name = child.name
        if child.is_dir() and name.startswith("step_") and name[5:].isdigit() and is_complete(child):
            found.append((int(name[5:]), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def set_aside_newer(output_dir: Path, step: int) -> list[Path]:
    """A run resumed from `step` abandons the checkpoints written after it (as it cuts metrics.jsonl back):
    move them under checkpoints/abandoned/, where resume=auto and pruning never look, rather than let a
    later resume=auto pick one or pruning delete the new checkpoints in their favour."""
    moved = []
    for saved_step, directory in complete_checkpoints(output_dir):
        if saved_step > step:
            target = output_dir / "checkpoints" / "abandoned" / f"{directory.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            directory.rename(target)
            moved.append(target)
    return moved


def prune(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints. The marker goes first, so a crash halfway
    through a deletion leaves an incomplete directory that resume=auto skips, never a damaged 'complete' one."""
    found = [directory for _, directory in complete_checkpoints(output_dir)]
    doomed = found[:-keep] if keep else []
    for directory in doomed:
        (directory / COMPLETE_MARKER).unlink()
        shutil.rmtree(directory)
    return doomed


GENERATION_CONFIG = "generation_config.json"


def write_hf_meta(directory: Path, hf_config: transformers.PretrainedConfig, tokenizer_dir: Path,
                  model_dir: Path | None) -> None:
    """Config, tokenizer and the model's generation settings beside the shards, so a checkpoint exports
    without the original model."""
    target = directory / HF_CONFIG_DIR
    target.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    _copy_generation_config(model_dir, target)


def _copy_generation_config(model_dir: Path | None, target: Path) -> None:
    """The source model's generation_config.json (sampling settings, stop tokens) replaces the default one
    `save_pretrained` derives from the model config."""
    if model_dir is not None and (model_dir / GENERATION_CONFIG).is_file():
        shutil.copyfile(model_dir / GENERATION_CONFIG, target / GENERATION_CONFIG)


def begin_save(output_dir: Path, step: int, is_main: bool) -> Path:
    tmp = step_dir(output_dir, step).with_name(f"step_{step}.tmp")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def finish_save(tmp: Path, final: Path, state: dict[str, Any], is_main: bool) -> None:
    """Every rank has written its shards; rank 0 completes the directory, then one rename publishes it.

    A crash before the rename leaves only `step_N.tmp`, which `latest_checkpoint` never picks; an older
    `step_N` (a re-save after resume) is moved aside first and removed only after the new one is in place.
    """
    dist.barrier()
    if is_main:
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1))
        _write_synced(tmp / COMPLETE_MARKER, "ok\n")
        publish(tmp, final)
    dist.barrier()


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished `tmp` with one rename; an older `final` is removed only afterwards."""
    aside = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    if aside.exists():
        shutil.rmtree(aside)


def read_state(directory: Path) -> dict[str, Any]:
    if not is_complete(directory):
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return json.loads((directory / STATE_FILE).read_text())


def save_hf_model(state_dict: dict[str, torch.Tensor], hf_config: transformers.PretrainedConfig,
                  tokenizer_dir: Path, out_dir: Path, model_dir: Path | None) -> None:
    """Write an HF directory that `AutoModelForCausalLM.from_pretrained` loads; `model_dir` gives the
    generation_config.json to carry over."""
    tied = getattr(hf_config, "tie_word_embeddings", False)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    if tied:
        model.tie_weights()
    # A tied head is one parameter under two names; named_parameters lists it once, under the embedding's name.
    names = {n for n, _ in model.named_parameters()}
    model.load_state_dict({k: v for k, v in state_dict.items() if k in names}, strict=False, assign=True)
    if tied:
        model.tie_weights()  # the head follows the embedding that was just assigned
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the model state lacks {', '.join(missing[:3])}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    _copy_generation_config(model_dir, tmp)
    publish(tmp, out_dir)


def export_checkpoint(checkpoint_dir: Path, out_dir: Path) -> None:
    """Turn a sharded step checkpoint into an HF model directory, in one process, without a process group."""
    import torch.distributed.checkpoint as dcp

    from lisa_dist.engines.base import engine_class

    engine = engine_class(read_state(checkpoint_dir)["engine"])
    meta = checkpoint_dir / HF_CONFIG_DIR
    hf_config = transformers.AutoConfig.from_pretrained(meta)
    dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(hf_config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    stored = engine.checkpoint_shapes(skeleton)
    template = {"model": {k: torch.empty(shape, dtype=dtype) for k, shape in stored.items()}}
    dcp.load(template, checkpoint_id=str(checkpoint_dir), no_dist=True)
    state = {k: v.reshape(shapes[k]) for k, v in template["model"].items()}
    save_hf_model(state, hf_config, meta, out_dir, meta)
