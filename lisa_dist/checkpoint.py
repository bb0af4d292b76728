"""Checkpointing in one place: step checkpoints (sharded, atomic) that are saved, found, checked against
the run (resume compatibility), loaded and pruned by `Checkpointer`; the final HF directory; and export of
any step checkpoint to one."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.tensor import DTensor

from lisa_dist.checksums import MANIFEST, check_share, digest_share, file_digest
from lisa_dist.config import Config
from lisa_dist.distributed import gather_objects, verify_same_across_ranks
from lisa_dist.engines import engine_class
from lisa_dist.engines.base import Engine
from lisa_dist.engines.interfaces import CheckpointLayout, ShardAccess
from lisa_dist.errors import CheckpointError, CheckpointWriteError
from lisa_dist.models.build import parameters_on_meta, persistent_buffers

if TYPE_CHECKING:
    from lisa_dist.core import TrainingCore

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


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def attempt(action: Callable[[], Any]) -> str | None:
    """None when `action` wrote what it had to; else what failed (a file system error: ENOSPC, EIO, EDQUOT)."""
    try:
        action()
    except OSError as e:
        return _os_error(e, "a file")
    return None


def _os_error(e: OSError, what: str) -> str:
    """`FILE: strerror`, the file named as the error names it (`what` when it names none)."""
    return f"{e.filename or what}: {e.strerror or e}"


def agree_on_errors(error: str | None) -> list[str]:
    """Every rank's write error (collective), so that all ranks go on or all stop together."""
    return [f"rank {rank}: {e}" for rank, e in enumerate(gather_objects(error)) if e]


def _digests(tmp: Path) -> dict[str, dict]:
    """This rank's share of the digests of the files in `tmp` (the state file is written after them)."""
    return digest_share(tmp, dist.get_rank(), dist.get_world_size(), skip=(STATE_FILE,))


def _written_share(written: Future, tmp: Path) -> dict[str, dict]:
    """Once a background write is done (every rank's files: DCP's save ends in a collective), this rank's share
    of their digests; run off the training thread, so that a save's hashing does not hold up a step."""
    written.result()
    return _digests(tmp)


def _shard_write_errors(error: BaseException) -> list[str]:
    """A DCP CheckpointException (raised on every rank when any rank's write failed), one line per rank."""
    failures = getattr(error, "failures", {}) or {}
    return [f"rank {rank}: {_cause(failure)}" for rank, failure in sorted(failures.items())] or [str(error)]


def _cause(failure: Any) -> str:
    exc = failure[0] if isinstance(failure, tuple) else failure
    if isinstance(exc, OSError):
        return _os_error(exc, "a shard file")
    return f"{type(exc).__name__}: {exc}"


def damage(directory: Path) -> list[str]:
    """The damaged files of a complete checkpoint, checked against its checksums by every rank in parallel
    (collective); [] when intact."""
    if not dist.is_initialized():
        return check_share(directory, 0, 1)
    found = gather_objects(check_share(directory, dist.get_rank(), dist.get_world_size()))
    return [problem for share in found for problem in share]


def check_intact(directory: Path) -> None:
    """Raise CheckpointError naming each damaged file of `directory` (collective)."""
    problems = damage(directory)
    if problems:
        raise CheckpointError(f"{directory} is damaged: {'; '.join(problems[:4])}"
                              f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}; its files "
                              "differ from the checksums recorded when it was written")


def newest_intact(output_dir: Path) -> Path | None:
    """resume=auto's checkpoint: the newest complete one whose files match their checksums; a damaged one is
    named and skipped (collective: every rank checks its share of each)."""
    found = complete_checkpoints(output_dir)
    # checked collectively, one checkpoint after another: the ranks must list the same ones (a node-local disk
    # that missed a save would otherwise pair one rank's check with another's)
    verify_same_across_ranks("the complete checkpoints in output_dir", [str(d) for _, d in found])
    for _, directory in reversed(found):
        problems = damage(directory)
        if not problems:
            return directory
        if dist.get_rank() == 0:
            print(f"lisa-dist: {directory} is damaged ({'; '.join(problems[:2])}); trying the one before",
                  file=sys.stderr)
    return None


def publish(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished `tmp` with one rename; an older `final` is removed only afterwards."""
    aside = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    if aside.exists():
        shutil.rmtree(aside)


def read_state(directory: Path, checked: bool = False) -> dict[str, Any]:
    """The run state of a complete, intact checkpoint (checking its files is collective; `checked`: the
    caller did it)."""
    if not is_complete(directory):
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    if not checked:
        check_intact(directory)
    return json.loads((directory / STATE_FILE).read_text())


def save_hf_model(state_dict: dict[str, torch.Tensor], hf_config: transformers.PretrainedConfig,
                  tokenizer_dir: Path, out_dir: Path, model_dir: Path | None) -> None:
    """Write an HF directory that `AutoModelForCausalLM.from_pretrained` loads; `model_dir` gives the
    generation_config.json to carry over."""
    tied = getattr(hf_config, "tie_word_embeddings", False)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    if tied:
        model.tie_weights()
    # A tied head is one parameter under two names; named_parameters lists it once, under the embedding's name.
    names = {n for n, _ in model.named_parameters()} | set(persistent_buffers(model))
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
    buffers = persistent_buffers(skeleton)  # in their own dtype, as the model keeps them
    template = {"model": {k: torch.empty(shape, dtype=buffers[k].dtype if k in buffers else dtype)
                          for k, shape in stored.items()}}
    dcp.load(template, checkpoint_id=str(checkpoint_dir), no_dist=True)
    state = {k: v.reshape(shapes[k]) for k, v in template["model"].items()}
    save_hf_model(state, hf_config, meta, out_dir, meta)


# Keys that may change between a run and its resume; anything else would change what is trained.
# The engine, its options and the micro-batch split decide where tensors live and how sums are ordered, not
# what is trained: a checkpoint resumes on another engine or world size (equal up to rounding).
RESUMABLE_CHANGES = {"output_dir", "resume", "save_every", "save_total_limit", "progress_bar", "overwrite",
                     "max_steps", "train.max_consecutive_skips", "train.micro_batch_size", "optim.offload_state",
                     "engine.name", "engine.deepspeed_config", "engine.reshard_after_forward", "engine.split_layers",
                     "engine.backward_prefetch", "engine.offload_params", "engine.layer_class", "engine.timeout_s",
                     "preempt.signals", "preempt.exit_code", "save_errors", "async_save"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict[str, Any], config: Config) -> None:
    old, new = _flatten(saved), _flatten(config.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise CheckpointError(f"the checkpoint was written with a different configuration ({details}); "
                              "resuming would not continue the same run")
    if old["max_steps"] != new["max_steps"] and (config.optim.schedule != "constant"):
        raise CheckpointError(f"max_steps changed from {old['max_steps']} to {new['max_steps']} with the "
                              f"{config.optim.schedule} schedule, which depends on it")


OptimState = dict[str, dict[str, torch.Tensor]]


def _local_bytes(state: Any) -> int:
    """Bytes of this rank's tensors in a (nested) checkpoint state: its shards of the checkpoint."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, DTensor):
        state = state.to_local()
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def save_shards(layout: CheckpointLayout, directory: Path, optim_state: OptimState) -> None:
    """Model shards and the optimizer's local state, as a resharding-capable DCP checkpoint."""
    dcp.save(layout.checkpoint_state(optim_state), checkpoint_id=str(directory))


def load_shards(engine: Engine, directory: Path, optim_state: OptimState, written_by: str) -> None:
    """Fill the model shards and `optim_state` (local tensors allocated by the caller) in place.

    DCP reshards a checkpoint in this engine's layout to any world size; another engine's layout is read
    tensor by tensor and sliced (`_load_other_layout`)."""
    names = {name for name, _ in engine.model.named_parameters()}
    params = {name: entries for name, entries in optim_state.items() if name in names}
    if written_by == engine.name:
        state = engine.checkpoint_state(params)
        dcp.load(state, checkpoint_id=str(directory))
        # DCP loads in place into DTensors; plain tensors (replicated scalars) are replaced in the dict.
        for name, entries in state["optim"].items():
            for key, value in entries.items():
                if not isinstance(value, DTensor):
                    params[name][key].copy_(value)
    else:
        _load_other_layout(engine, engine.model, directory, params)
    _load_expert_parts(directory, {key: entries for key, entries in optim_state.items() if key not in names})
    engine.after_load()


def _span(key: str) -> tuple[str, tuple[int, int]]:
    """An expert part's slot key and its range of the expert's flat elements."""
    base, _, span = key.partition("@")
    start, end = span.split(":")
    return base, (int(start), int(end))


@torch.no_grad()
def _load_expert_parts(directory: Path, parts: OptimState) -> None:
    """The optimizer state of experts' parts (lisa.unit=expert). Each was stored as its rank held it, keyed by
    its range of the expert (`ShardedOptimizer.state_dict`); another world size or engine cuts experts
    elsewhere, so each part is assembled from the stored pieces it overlaps, read whole (one expert's at most).
    Entries as long as their part are elementwise; the others (the step, AdaLomo's per-expert statistics) are
    the same in every piece and read from one."""
    if not parts:
        return
    stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    pieces: dict[str, dict[str, tuple[int, int]]] = {}
    for name in stored:
        if name.startswith("optim.") and "#" in name:
            slot = name[len("optim."):].rsplit(".", 1)[0]
            base, span = _span(slot)
            pieces.setdefault(base, {})[slot] = span
    plan = {key: {entry: _piece_reads(directory, key, entry, target, pieces.get(_span(key)[0], {}), stored)
                  for entry, target in entries.items()} for key, entries in parts.items()}
    wanted = {name for entries in plan.values() for reads in entries.values() for name, _, _ in reads}
    whole = {name: torch.empty(stored[name].size, dtype=stored[name].properties.dtype) for name in wanted}
    dcp.load(whole, checkpoint_id=str(directory), no_dist=True)
    for key, entries in plan.items():
        for entry, reads in entries.items():
            target = parts[key][entry]
            for name, source, into in reads:
                if into is None:
                    target.copy_(whole[name].view_as(target))
                else:
                    target.view(-1)[into[0]:into[1]].copy_(whole[name].view(-1)[source[0]:source[1]])


Reads = list[tuple[str, tuple[int, int], tuple[int, int] | None]]


def _piece_reads(directory: Path, key: str, entry: str, target: torch.Tensor, pieces: dict[str, tuple[int, int]],
                 stored: dict[str, Any]) -> Reads:
    """(stored name, its range to read, the target's range to fill or None for all of it) for one entry of a
    part: the overlaps with every stored piece for an elementwise entry, or one piece for the others."""
    base, span = _span(key)
    found = {f"optim.{slot}.{entry}": piece for slot, piece in pieces.items() if f"optim.{slot}.{entry}" in stored}
    sizes = {name: math.prod(stored[name].size) for name in found}
    if target.dim() == 0 or target.numel() != span[1] - span[0] or any(
            sizes[name] != high - low for name, (low, high) in found.items()):
        same = [name for name in found if sizes[name] == target.numel()]
        if not same:
            raise CheckpointError(f"{directory} holds no {entry} of {target.numel()} values for {base} "
                                  "(lisa.unit=expert); it was not written for this model and method")
        return [(same[0], (0, target.numel()), None)]
    reads, covered = [], 0
    for name, (low, high) in sorted(found.items(), key=lambda item: item[1]):
        start, end = max(low, span[0]), min(high, span[1])
        if start < end:
            reads.append((name, (start - low, end - low), (start - span[0], end - span[0])))
            covered += end - start
    if covered != span[1] - span[0]:
        raise CheckpointError(f"{directory} holds {covered} of the {span[1] - span[0]} values of {entry} for "
                              f"{key}; the checkpoint is incomplete")
    return reads


@torch.no_grad()
def _load_other_layout(access: ShardAccess, model: nn.Module, directory: Path, optim_state: OptimState) -> None:
    """Another engine stores tensors in its own shapes (ZeRO-3 flat, FSDP2 as the parameter), which DCP cannot
    map onto ours. Every layout is a row-major flat range per rank, so read one parameter's tensors whole
    (host memory for one parameter at a time) and keep this rank's range of each."""
    stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for name, param in model.named_parameters():
        info = access.shard_info(param)
        targets = {f"model.{name}": access.local_shard(param)}
        targets |= {f"optim.{name}.{key}": t for key, t in optim_state.get(name, {}).items()}
        missing = [key for key in targets if key not in stored]
        if missing:
            raise CheckpointError(f"{directory} holds no {missing[0]}; it was not written for this model and method")
        whole = {key: torch.empty(stored[key].size, dtype=stored[key].properties.dtype) for key in targets}
        dcp.load(whole, checkpoint_id=str(directory), no_dist=True)
        for key, target in targets.items():
            flat = whole[key].reshape(-1)
            if target.numel() == info.numel and flat.numel() == info.global_numel:
                target.copy_(flat[info.flat_start:info.flat_start + info.numel].view_as(target))
            elif target.numel() == flat.numel():
                target.copy_(flat.view_as(target))
            else:
                raise CheckpointError(f"{directory}: {key} holds {flat.numel()} values where this run's shard "
                                      f"needs {target.numel()} of {info.global_numel}")


class Stateful(Protocol):
    """torch's `Stateful` protocol: what must survive a restart."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def optimizer_keys(core: TrainingCore) -> list[str]:
    """The slots of every optimizer of `core`: which parameters (and experts' parts) have state."""
    return [key for optimizer in core.optimizers for key in optimizer.names]


STATE_KEYS = ("step", "world_size", "engine", "config", "optim_params", "sampler", "loss_scaler", "last_grad_norm",
              "skipped_steps")
"""What every step checkpoint's state file holds (besides the entries of the run's own `states`)."""


class Checkpointer:
    """Step checkpoints of one run: the core's model and optimizer shards, its own state (sampler, loss
    scaler, step counters) and any further `states` (the CLI's data position), saved atomically and loaded
    only into a run they continue.

    `write_meta(tmp)` (rank 0) adds files beside the shards: the CLI's HF config and tokenizer."""

    def __init__(self, core: TrainingCore, config: Config, states: dict[str, Stateful] | None = None,
                 write_meta: Any = None) -> None:
        self.core = core
        self.config = config
        self.states = states or {}
        self.write_meta = write_meta
        self.is_main = core.runtime.is_main
        self.pending: tuple[Future, Path, Path, dict[str, Any]] | None = None
        """A checkpoint being written in the background: (its digests' future, tmp, final, state)."""
        self.writer_group: Any = None
        self.hasher: ThreadPoolExecutor | None = None

    def save(self, final: Path, step: int, background: bool = False) -> Path:
        """Write the checkpoint of the run after `step` optimizer steps to `final`, atomically: in `final`.tmp,
        which one rename publishes once every rank's files, the state, checksums and marker are written. A
        write that fails on any rank (a full disk, an I/O error, a quota) raises CheckpointWriteError on every
        rank and leaves the checkpoints written before as they were.

        `background`: each rank copies its shards to host memory and a thread writes them while training goes
        on; `finish_pending` (the next save, the end of the run) waits for it and publishes the checkpoint."""
        self.finish_pending()
        tmp = final.with_name(final.name + ".tmp")
        core = self.core
        state = {"step": step, "world_size": core.runtime.world_size, "engine": core.engine.name,
                 "config": self.config.to_dict(), "optim_params": optimizer_keys(core), **core.state_dict(),
                 **{name: s.state_dict() for name, s in self.states.items()}}
        errors = agree_on_errors(attempt(lambda: self._begin(tmp)) if self.is_main else None)
        if errors:
            raise self._failed(final, tmp, errors)
        if background:
            layout = core.engine.checkpoint_state(core.optimizer_state())
            written = dcp.async_save(layout, checkpoint_id=str(tmp), process_group=self._writer_group())
            self.pending = (self._background().submit(_written_share, written, tmp), tmp, final, state)
            return final
        try:
            save_shards(core.engine, tmp, core.optimizer_state())
        except CheckpointException as e:  # every rank gets it when any rank's write failed
            raise self._failed(final, tmp, _shard_write_errors(e)) from None
        self._publish(tmp, final, state)
        return final

    def finish_pending(self) -> Path | None:
        """Wait for a checkpoint being written in the background, then publish it (collective); its path."""
        if self.pending is None:
            return None
        future, tmp, final, state = self.pending
        self.pending = None
        try:
            share = future.result()
        except CheckpointException as e:
            raise self._failed(final, tmp, _shard_write_errors(e)) from None
        self._publish(tmp, final, state, share)
        return final

    def _writer_group(self) -> Any:
        """A gloo group of every rank for the background writer's collectives, apart from training's."""
        if self.writer_group is None:
            self.writer_group = dist.new_group(backend="gloo")
        return self.writer_group

    def _background(self) -> ThreadPoolExecutor:
        """The thread that waits for a background checkpoint's write and then hashes this rank's share of it."""
        if self.hasher is None:
            self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lisa-dist-checksums")
        return self.hasher

    def _publish(self, tmp: Path, final: Path, state: dict[str, Any], share: dict[str, dict] | None = None) -> None:
        """Every rank's shards are in `tmp`: hash them (unless this rank's `share` of the digests is given), then
        rank 0 completes and publishes the checkpoint."""
        shares = gather_objects(share if share is not None else _digests(tmp))
        errors = agree_on_errors(attempt(lambda: self._complete(tmp, final, state, shares)) if self.is_main else None)
        if errors:
            raise self._failed(final, tmp, errors)

    def _begin(self, tmp: Path) -> None:
        """Rank 0: a fresh `tmp`, with the files beside the shards."""
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if self.write_meta is not None:
            self.write_meta(tmp)

    @staticmethod
    def _complete(tmp: Path, final: Path, state: dict[str, Any], shares: list[dict[str, dict]]) -> None:
        """Rank 0, every rank's files written: the state, the checksums, the marker, then one rename."""
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1))
        digests = {name: digest for share in shares for name, digest in share.items()}
        digests[STATE_FILE] = file_digest(tmp / STATE_FILE)
        _write_synced(tmp / MANIFEST, json.dumps(digests, indent=1, sort_keys=True))
        _write_synced(tmp / COMPLETE_MARKER, "ok\n")
        publish(tmp, final)

    def _failed(self, final: Path, tmp: Path, errors: list[str]) -> CheckpointWriteError:
        """The error every rank raises for a failed save (collective: the checkpoint's size is summed), after
        rank 0 removed what was written of it."""
        layout = self.core.engine.checkpoint_state(self.core.optimizer_state())
        needed = sum(gather_objects(_local_bytes(layout)))
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()  # every rank reports the failure once the partial directory is gone
        usage = shutil.disk_usage(final.parent) if final.parent.exists() else None
        # torch.save's writer (DCP's for tensors) reports a full disk as "file write failed", without the errno
        full = ": less than it needs, the file system is full" if usage and usage.free < needed else ""
        free = f", {usage.free / 2**30:.2f} GiB free on its file system{full}" if usage else ""
        return CheckpointWriteError(
            f"could not write the checkpoint {final}: {'; '.join(errors[:4])}. The checkpoints written before it "
            f"are untouched. It needs about {needed / 2**30:.2f} GiB ({needed} bytes of shards{free}); free space, "
            "or set save_errors=continue to keep training and try again at the next save")

    def load(self, directory: Path, checked: bool = False) -> int:
        """Continue from `directory`; returns its step. Everything is checked before any shard is read (its
        files against their checksums unless `checked`: `newest_intact` chose it)."""
        state = read_state(directory, checked)
        missing = [k for k in (*STATE_KEYS, *self.states) if k not in state]
        if missing:
            raise CheckpointError(f"{directory}: {STATE_FILE} lacks {', '.join(missing)}")
        check_resume_compatible(state["config"], self.config)
        core = self.core
        try:
            core.load_state_dict(state)
            for name, stateful in self.states.items():
                stateful.load_state_dict(state[name])
        except CheckpointError as e:
            raise CheckpointError(f"{directory}: {e}") from None
        if sorted(optimizer_keys(core)) != sorted(state["optim_params"]):
            raise CheckpointError(f"{directory}: optimizer state covers different parameters than this run trains")
        load_shards(core.engine, directory, core.optimizer_state(), written_by=state["engine"])
        for optimizer in core.optimizers:
            optimizer.after_load()
        return int(state["step"])
