"""The training loop: same code for every engine, method and launcher."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from lisa_dist import checkpoint as ckpt
from lisa_dist.accelerate_config import AccelerateSettings
from lisa_dist.config import Config, ConfigError, check_world_size
from lisa_dist.data import GlobalBatches, SequenceSet, build_sequences, load_examples
from lisa_dist.distributed import (Runtime, all_gather_floats, all_reduce_sum, as_peer_failure, init_distributed,
                                   shutdown, verify_same_across_ranks)
from lisa_dist.engines.base import Engine, create_engine, engine_class, trainable_named_parameters
from lisa_dist.env import LaunchEnv, read_launch_env
from lisa_dist.memory import GIB, StorageTracker
from lisa_dist.models import set_trainable_layers
from lisa_dist.models.build import ModelSource, check_against_model, check_weights, resolve_model_source
from lisa_dist.optim import ShardedOptimizer, lr_at, make_rule
from lisa_dist.optim.fused import GradHooks
from lisa_dist.rundir import MetricsWriter, check_output_dir, check_resume_compatible, clear_previous_run
from lisa_dist.sampler import LayerSampler
from lisa_dist.scalars import item, real_tensors
from lisa_dist.steps import FusedStep, NonFiniteStepsError, PostBackwardStep


def prepare(config: Config, world_size: int, check_output: bool = True,
            shapes_only: bool = False) -> tuple[ModelSource, SequenceSet]:
    """Everything that can fail on user input, done before a process group exists.

    `shapes_only` (`estimate`): the data only has to give sequences of the right length, so a dataset
    smaller than one global batch is repeated instead of refused."""
    check_world_size(config, world_size)
    engine_class(config.engine.name).check_config(config, world_size)
    source = resolve_model_source(config)
    meta_model = check_against_model(config, source.hf_config)
    if not shapes_only:
        check_weights(source, meta_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.tokenizer_dir)
    if len(tokenizer) > source.hf_config.vocab_size:
        raise ConfigError(f"tokenizer in {source.tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                          f"vocab_size {source.hf_config.vocab_size}")
    examples = load_examples(config.data.path, tokenizer, config.data.format)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError(f"the tokenizer in {source.tokenizer_dir} has neither a pad token nor an eos token to pad "
                          "sequences with; set pad_token in its tokenizer_config.json")
    sequences = build_sequences(examples, config.data.seq_len, pad_id, config.data.pack)
    if shapes_only:
        sequences = sequences.repeated_to(config.train.global_batch_size)
    GlobalBatches(sequences, config.train.global_batch_size, config.train.micro_batch_size, 0, world_size, config.seed)
    if check_output:
        check_output_dir(config)
    return source, sequences


class Trainer:
    def __init__(self, config: Config, runtime: Runtime, source: ModelSource, sequences: SequenceSet,
                 engine: Engine | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.source = source
        self.output_dir = Path(config.output_dir)
        self.engine = engine or create_engine(config, runtime)
        self.model, self.parts = self.engine.build(source)
        self.model.train()
        self.sampler = LayerSampler(self.parts.num_layers, config.lisa.gamma, config.lisa.interval, config.seed,
                                    config.lisa.layer_weights, config.method)
        self.optimizer = ShardedOptimizer(make_rule(config.optim), self.engine,
                                          host=runtime.host_device if config.optim.offload_state else None)
        self.stepper = self._make_stepper()
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.batches = GlobalBatches(sequences, config.train.global_batch_size, config.train.micro_batch_size,
                                     runtime.rank, runtime.world_size, config.seed)
        self.active_layers: tuple[int, ...] | None = None
        self.tracker = StorageTracker() if runtime.device.type == "cpu" else None

    def _make_stepper(self) -> PostBackwardStep | FusedStep:
        hooks = GradHooks(self.optimizer, dict(self.model.named_parameters()), self.engine.register_grad_hook)
        args = (self.config, self.runtime, self.engine, self.model, self.optimizer, hooks)
        return FusedStep(*args) if self.optimizer.rule.fused else PostBackwardStep(*args)

    def set_active_layers(self, active: tuple[int, ...]) -> None:
        """Flip requires_grad so frozen layers compute no weight gradients, then resize optimizer state."""
        lisa = self.config.lisa
        set_trainable_layers(self.parts, active, lisa.train_embeddings, lisa.train_norm, lisa.train_head)
        self.optimizer.set_trainable(trainable_named_parameters(self.model))
        self.active_layers = active

    def _maybe_switch(self, step: int) -> None:
        if self.active_layers is not None and not self.sampler.is_switch(step):
            return
        active = self.sampler.active_layers(step)
        verify_same_across_ranks(f"the active layers for step {step}", list(active))
        if active != self.active_layers:
            self.set_active_layers(active)

    def train_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        self._maybe_switch(step)
        with real_tensors():
            micro_batches = self.batches.micro_batches(step)
        local_targets = sum(item((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        local_tokens = sum(item(b["attention_mask"].sum()) for b in micro_batches)
        global_targets, global_tokens = all_reduce_sum([local_targets, local_tokens], self.runtime.device)
        lr = lr_at(self.config.optim, step, self.config.max_steps)
        outcome = self.stepper.run(step, micro_batches, max(global_targets, 1.0), lr)
        self.skipped_steps += int(outcome.skipped)
        (total_loss,) = all_reduce_sum([outcome.loss_sum], self.runtime.device)
        elapsed = time.perf_counter() - start
        record = {"step": step + 1, "loss": total_loss / max(global_targets, 1.0), "lr": lr, "active_layers": sorted(self.active_layers),
                  "grad_norm": outcome.grad_norm, "tokens": int(global_tokens), "tokens_per_s": global_tokens / elapsed,
                  "step_time_s": elapsed, "skipped": outcome.skipped, "skipped_steps": self.skipped_steps,
                  "nonfinite_grad_shards": outcome.nonfinite_shards, "backward_passes": outcome.backward_passes}
        if self.config.train.dtype == "fp16":
            record["loss_scale"] = self.stepper.scaler.scale
        return record

    def _measured_step(self, step: int) -> dict[str, Any]:
        self.engine.reset_peak_memory()
        if self.tracker is None:
            record = self.train_step(step)
            peak = self.engine.peak_memory_bytes() or 0
        else:
            self.tracker.track(self.engine.resident_tensors())
            self.tracker.track(t for s in self.optimizer.state_dict().values() for t in s.values())
            self.tracker.reset_peak()
            with self.tracker:
                record = self.train_step(step)
            peak = self.tracker.peak
        per_rank = all_gather_floats([peak, self.optimizer.state_bytes()], self.runtime.device)
        record["peak_mem_gib"] = max(p for p, _ in per_rank) / GIB
        record["peak_mem_gib_per_rank"] = [p / GIB for p, _ in per_rank]
        record["optim_state_gib"] = max(s for _, s in per_rank) / GIB
        return record

    def trainer_state(self, step: int) -> dict[str, Any]:
        self.sampler.step = step
        return {"step": step, "sampler": self.sampler.state_dict(),
                "data": self.batches.state_dict(), "world_size": self.runtime.world_size,
                "engine": self.engine.name, "config": self.config.to_dict(),
                "optim_params": self.optimizer.names, "loss_scaler": self.stepper.scaler.state_dict(),
                "last_grad_norm": getattr(self.stepper, "last_grad_norm", None), "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips}

    def save(self, step: int) -> Path:
        final = ckpt.step_dir(self.output_dir, step)
        tmp = ckpt.begin_save(self.output_dir, step, self.runtime.is_main)
        if self.runtime.is_main:
            ckpt.write_hf_meta(tmp, self._export_config(), self.source.tokenizer_dir, self.source.weights_dir)
        self.engine.save(tmp, self.optimizer.state_dict())
        ckpt.finish_save(tmp, final, self.trainer_state(step), self.runtime.is_main)
        return final

    def resume_from(self, directory: Path) -> int:
        state = ckpt.read_state(directory)
        check_resume_compatible(state["config"], self.config)
        step = int(state["step"])
        try:
            self.sampler.load_state_dict(state["sampler"])
            self.batches.load_state_dict(state["data"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{directory}: {e}") from None
        self.set_active_layers(self.sampler.active_layers(step))
        if sorted(self.optimizer.names) != sorted(state["optim_params"]):
            raise ckpt.CheckpointError(f"{directory}: optimizer state covers different parameters than this run trains")
        self.engine.load(directory, self.optimizer.state_dict(), written_by=state["engine"])
        self.optimizer.after_load()
        self.stepper.scaler.load_state_dict(state["loss_scaler"])
        if isinstance(self.stepper, FusedStep):
            self.stepper.last_grad_norm = state["last_grad_norm"]
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        return step

    def _export_config(self) -> transformers.PretrainedConfig:
        hf_config = self.source.hf_config.__class__.from_dict(self.source.hf_config.to_dict())
        hf_config.dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[self.config.train.dtype]
        return hf_config

    def save_final(self) -> Path:
        state_dict = self.engine.full_state_dict()
        out = self.output_dir / "final"
        if self.runtime.is_main:
            ckpt.save_hf_model(state_dict, self._export_config(), self.source.tokenizer_dir, out,
                               self.source.weights_dir)
        torch.distributed.barrier()
        return out

    def fit(self) -> None:
        start_step = self._resume()
        progress = self._progress(start_step)
        metrics = MetricsWriter(self.output_dir)
        if self.runtime.is_main:
            metrics.keep_until(start_step)
            for moved in ckpt.set_aside_newer(self.output_dir, start_step):
                print(f"lisa-dist: resuming from step {start_step}: moved the later checkpoint to {moved}",
                      file=sys.stderr)
        for step in range(start_step, self.config.max_steps):
            record = self._measured_step(step)
            if self.runtime.is_main:
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", layers=record["active_layers"][:8])
                    progress.update(1)
            self._count_nonfinite(step, record["skipped"] or record["nonfinite_grad_shards"] > 0)
            done = step + 1
            if self.config.save_every and done % self.config.save_every == 0:
                self.save(done)
                if self.runtime.is_main and self.config.save_total_limit:
                    ckpt.prune(self.output_dir, self.config.save_total_limit)
        if progress is not None:
            progress.close()
        self.save_final()

    def _resume(self) -> int:
        """The step to start from. Ranks first agree on the data and on the checkpoint, since a rank that
        failed alone inside the collective load would leave the others waiting for engine.timeout_s."""
        verify_same_across_ranks("the training data (seed, global batch, sequences fingerprint)",
                                 self.batches.state_dict())
        resume, directory = self.config.resume, None
        if resume is not None:
            directory = ckpt.latest_checkpoint(self.output_dir) if resume == "auto" else Path(resume)
        verify_same_across_ranks("the checkpoint to resume from", directory and str(directory))
        return self.resume_from(directory) if directory is not None else 0

    def _count_nonfinite(self, step: int, nonfinite: bool) -> None:
        """Stop once `train.max_consecutive_skips` steps in a row met a non-finite loss or gradient."""
        self.consecutive_skips = self.consecutive_skips + 1 if nonfinite else 0
        limit = self.config.train.max_consecutive_skips
        if not limit or self.consecutive_skips < limit:
            return
        last = ckpt.latest_checkpoint(self.output_dir)
        kept = f"the last checkpoint, {last}, is intact" if last else "no step checkpoint had been written"
        raise NonFiniteStepsError(
            f"steps {step + 2 - self.consecutive_skips} to {step + 1}: {self.consecutive_skips} steps in a row "
            f"met a non-finite loss or gradient (train.max_consecutive_skips={limit}); their non-finite values "
            f"changed no weight and {kept}. Lower optim.lr, check the data, or train in bf16/fp32 rather than fp16")

    def _progress(self, start_step: int) -> Any:
        if not (self.runtime.is_main and self.config.progress_bar and self.runtime.env.is_tty):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.max_steps, initial=start_step, desc="train", unit="step")


def run_training(config: Config, env: LaunchEnv | None = None, launcher: AccelerateSettings | None = None) -> Path:
    env = env or read_launch_env()
    if launcher is not None:
        launcher.check_world_size(config.train.global_batch_size, config.train.micro_batch_size, env.world_size)
    source, sequences = prepare(config, env.world_size)
    try:
        runtime = init_distributed(env, config.engine.timeout_s)
        verify_same_across_ranks("the run configuration", config.to_dict())
        if runtime.is_main:
            if launcher is not None and launcher.config:
                applied = ", ".join(f"{k}={v}" for k, v in launcher.config.items())
                print(f"lisa-dist: from the accelerate config file: {applied}", file=sys.stderr)
            clear_previous_run(config)
            print(f"lisa-dist: {len(sequences)} training sequences of {config.data.seq_len} tokens"
                  f"{f' ({sequences.num_dropped} dropped: no response token left)' if sequences.num_dropped else ''}",
                  file=sys.stderr)
        torch.distributed.barrier()
        trainer = Trainer(config, runtime, source, sequences)
        trainer.fit()
        return Path(config.output_dir)
    except RuntimeError as e:
        failure = as_peer_failure(e, env.rank, config.engine.timeout_s)
        if failure is None:
            raise
        raise failure from e
    finally:
        shutdown()
