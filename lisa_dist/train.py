"""The training loop: same code for every engine, method and launcher."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from lisa_dist import checkpoint as ckpt
from lisa_dist.accelerate_config import AccelerateSettings
from lisa_dist.config import Config
from lisa_dist.core import TrainingCore
from lisa_dist.data import (GlobalBatches, SequenceSet, TokenizedCache, TokenizedExample, build_sequences,
                            split_held_out)
from lisa_dist.distributed import (Runtime, all_gather_floats, as_peer_failure, init_distributed, shutdown,
                                   verify_same_across_ranks)
from lisa_dist.engines import engine_class
from lisa_dist.engines.interfaces import MemoryProbe
from lisa_dist.env import LaunchEnv, read_launch_env
from lisa_dist.errors import CheckpointWriteError, ConfigError, Preempted
from lisa_dist.evaluate import Evaluator
from lisa_dist.models.build import ModelSource, check_against_model, check_weights, resolve_model_source
from lisa_dist.optim import lr_at
from lisa_dist.preempt import PreemptionNotice, stop_message
from lisa_dist.progress import Reporter, check_trackers
from lisa_dist.rundir import MetricsWriter, check_output_dir, clear_previous_run
from lisa_dist.sizing.memory import GIB, StorageTracker
from lisa_dist.validation import check_world_size


def prepare(config: Config, world_size: int, check_output: bool = True, read_weights: bool = True,
            fill_batch: bool = False) -> tuple[ModelSource, SequenceSet, SequenceSet | None]:
    """Everything that can fail on user input, done before a process group exists: the model source, the
    training sequences and the held-out ones (None without data.eval_path or data.eval_fraction).

    For `estimate`, which reads no weights (`read_weights=False`) and only needs sequences of the right
    length: `fill_batch` repeats a dataset smaller than one global batch instead of refusing it."""
    check_world_size(config, world_size)
    engine_class(config.engine.name).check_config(config, world_size)
    check_trackers(config)
    source = resolve_model_source(config)
    meta_model = check_against_model(config, source.hf_config)
    if read_weights:
        check_weights(source, meta_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.tokenizer_dir)
    if len(tokenizer) > source.hf_config.vocab_size:
        raise ConfigError(f"tokenizer in {source.tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                          f"vocab_size {source.hf_config.vocab_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError(f"the tokenizer in {source.tokenizer_dir} has neither a pad token nor an eos token to pad "
                          "sequences with; set pad_token in its tokenizer_config.json")
    cache = TokenizedCache(Path(config.data.cache_dir or Path(config.output_dir) / "data_cache"))
    examples, eval_examples = _examples(config, tokenizer, cache)
    sequences = build_sequences(examples, config.data.seq_len, pad_id, config.data.pack)
    eval_sequences = None
    if eval_examples is not None:
        eval_sequences = build_sequences(eval_examples, config.data.seq_len, pad_id, config.data.pack)
    if fill_batch:
        sequences = sequences.repeated_to(config.train.global_batch_size)
    GlobalBatches(sequences, config.train.global_batch_size, config.train.micro_batch_size, 0, world_size, config.seed)
    if check_output:
        check_output_dir(config)
        cache.write()
    return source, sequences, eval_sequences


def _examples(config: Config, tokenizer: Any,
              cache: TokenizedCache) -> tuple[list[TokenizedExample], list[TokenizedExample] | None]:
    """The training examples and the held-out ones."""
    data = config.data
    examples = cache.load(data.path, tokenizer, data.format, data.fields)
    if data.eval_fraction:
        return split_held_out(examples, data.eval_fraction, config.seed)
    return examples, cache.load(data.eval_path, tokenizer, data.format, data.fields) if data.eval_path else None


class Trainer:
    """`lisa-dist train`'s loop around the training core: the data order, metrics, step checkpoints, resume."""

    def __init__(self, config: Config, runtime: Runtime, source: ModelSource, sequences: SequenceSet,
                 eval_sequences: SequenceSet | None = None, core: TrainingCore | None = None) -> None:
        """`core`: one built elsewhere (`estimate` builds it on tensors without values)."""
        self.config = config
        self.runtime = runtime
        self.source = source
        self.output_dir = Path(config.output_dir)
        self.core = core or TrainingCore.build(config, runtime, source,
                                               last_checkpoint=lambda: ckpt.latest_checkpoint(self.output_dir))
        self.batches = GlobalBatches(sequences, config.train.global_batch_size, config.train.micro_batch_size,
                                     runtime.rank, runtime.world_size, config.seed)
        self.evaluator = None
        if eval_sequences is not None:
            self.evaluator = Evaluator(eval_sequences, config.train.global_batch_size, config.train.micro_batch_size,
                                       config.eval_max_batches, runtime.rank, runtime.world_size)
        self.tracker = StorageTracker() if runtime.device.type == "cpu" else None
        self.checkpointer = ckpt.Checkpointer(self.core, config, states={"data": self.batches},
                                              write_meta=self._write_meta)
        self.notice = PreemptionNotice(config.preempt)
        self.stop_signal = 0
        """A preemption signal some rank received by the end of the last step (every rank reads the same)."""

    def train_step(self, step: int) -> dict[str, Any]:
        with self.core.values.real_tensors():
            micro_batches = self.batches.micro_batches(step)
        lr = lr_at(self.config.optim, step, self.config.max_steps)
        record = self.core.step(step, micro_batches, lr).record()
        record["skipped_steps"] = self.core.skipped_steps
        return record

    def _measured_step(self, step: int) -> dict[str, Any]:
        probe: MemoryProbe = self.core.engine
        probe.reset_peak_memory()
        if self.tracker is None:
            record = self.train_step(step)
            peak = probe.peak_memory_bytes() or 0
        else:
            self.tracker.track(self.core.memory_tensors())
            self.tracker.reset_peak()
            with self.tracker:
                record = self.train_step(step)
            peak = self.tracker.peak
        state = sum(optimizer.state_bytes() for optimizer in self.core.optimizers)
        per_rank = all_gather_floats([peak, state, float(self.notice.received)], self.runtime.device)
        self.stop_signal = int(max(signum for _, _, signum in per_rank))
        record["peak_mem_gib"] = max(p for p, _, _ in per_rank) / GIB
        record["peak_mem_gib_per_rank"] = [p / GIB for p, _, _ in per_rank]
        record["optim_state_gib"] = max(s for _, s, _ in per_rank) / GIB
        return record

    def save(self, step: int, background: bool = False) -> Path:
        return self.checkpointer.save(ckpt.step_dir(self.output_dir, step), step, background)

    def _save_and_prune(self, step: int, retry_later: bool = True) -> Path | None:
        """The checkpoint of `step` (in the background with async_save, unless no later save comes), then
        pruning; None when it could not be written and save_errors=continue (and `retry_later`)."""
        self._finish_pending_save(retry_later)
        try:
            saved = self.save(step, background=self.config.async_save and retry_later)
        except CheckpointWriteError as e:
            self._save_failed(e, retry_later)
            return None
        if self.runtime.is_main and self.config.save_total_limit:
            ckpt.prune(self.output_dir, self.config.save_total_limit)
        return saved

    def _finish_pending_save(self, retry_later: bool = True) -> None:
        """Publish the checkpoint async_save is writing, once written (collective)."""
        try:
            self.checkpointer.finish_pending()
        except CheckpointWriteError as e:
            self._save_failed(e, retry_later)

    def _save_failed(self, error: CheckpointWriteError, retry_later: bool) -> None:
        """Raise `error`, unless save_errors=continue and another save comes: then say so and go on."""
        if not (retry_later and self.config.save_errors == "continue"):
            raise error
        if self.runtime.is_main:
            print(f"lisa-dist: {error}; training goes on (save_errors=continue)", file=sys.stderr)

    def _stop(self, step: int, saved: Path | None) -> None:
        """After a preemption signal: the checkpoint of `step` (unless this step's periodic one was just
        started), written before anything else, then `Preempted`, whose exit status asks for a requeue."""
        self._finish_pending_save(retry_later=False)
        saved = saved or self._save_and_prune(step, retry_later=False)
        raise Preempted(stop_message(self.stop_signal, f"step {step} of {self.config.max_steps}", str(saved),
                                     self.notice.exit_code, "resume=auto"), self.notice.exit_code)

    def _write_meta(self, directory: Path) -> None:
        ckpt.write_hf_meta(directory, self._export_config(), self.source.tokenizer_dir, self.source.weights_dir)

    def _export_config(self) -> transformers.PretrainedConfig:
        hf_config = self.source.hf_config.__class__.from_dict(self.source.hf_config.to_dict())
        hf_config.dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[self.config.train.dtype]
        return hf_config

    def save_final(self) -> Path:
        self._finish_pending_save()
        state_dict = self.core.engine.full_state_dict()
        out = self.output_dir / "final"
        write = functools.partial(ckpt.save_hf_model, state_dict, self._export_config(), self.source.tokenizer_dir,
                                  out, self.source.weights_dir)
        errors = ckpt.agree_on_errors(ckpt.attempt(write) if self.runtime.is_main else None)
        if errors:
            raise CheckpointWriteError(f"could not write the final model to {out}: {'; '.join(errors)}; the step "
                                       "checkpoints are untouched (lisa-dist export turns the newest into a model)")
        return out

    def evaluate(self, step: int) -> dict[str, Any]:
        """The metrics.jsonl row of an evaluation after `step` optimizer steps."""
        assert self.evaluator is not None, "no held-out data (data.eval_path or data.eval_fraction)"
        return self.evaluator.run(self.core, step).record()

    def _evaluation_due(self, done: int) -> bool:
        every = self.config.eval_every
        return self.evaluator is not None and (done == self.config.max_steps or bool(every and done % every == 0))

    def fit(self) -> None:
        with self.notice:
            self._fit()

    def _fit(self) -> None:
        start_step = self._resume()
        is_main = self.runtime.is_main
        reporter = Reporter(self.config, is_main, self.runtime.env.is_tty, start_step)
        metrics = MetricsWriter(self.output_dir)
        if is_main:
            metrics.keep_until(start_step)
            for moved in ckpt.set_aside_newer(self.output_dir, start_step):
                print(f"lisa-dist: resuming from step {start_step}: moved the later checkpoint to {moved}",
                      file=sys.stderr)
        try:
            for step in range(start_step, self.config.max_steps):
                record = self._measured_step(step)
                if is_main:
                    metrics.write(record)
                    reporter.step(record)
                self.core.raise_if_stalled(step)
                done = step + 1
                if self._evaluation_due(done):
                    evaluation = self.evaluate(done)
                    if is_main:
                        metrics.write(evaluation)
                        reporter.evaluation(evaluation)
                saved = None
                if self.config.save_every and done % self.config.save_every == 0:
                    saved = self._save_and_prune(done)
                if self.stop_signal and done < self.config.max_steps:
                    self._stop(done, saved)
        finally:
            reporter.close()
        self.save_final()

    def _resume(self) -> int:
        """The step to start from. Ranks first agree on the data and on the checkpoint, since a rank that
        failed alone inside the collective load would leave the others waiting for engine.timeout_s."""
        verify_same_across_ranks("the training data (seed, global batch, sequences fingerprint)",
                                 self.batches.state_dict())
        resume, directory = self.config.resume, None
        if resume is not None:
            directory = ckpt.newest_intact(self.output_dir) if resume == "auto" else Path(resume)
        verify_same_across_ranks("the checkpoint to resume from", directory and str(directory))
        return self.checkpointer.load(directory, checked=resume == "auto") if directory is not None else 0


def run_training(config: Config, env: LaunchEnv | None = None, launcher: AccelerateSettings | None = None) -> Path:
    env = env or read_launch_env()
    if launcher is not None:
        launcher.check_world_size(config.train.global_batch_size, config.train.micro_batch_size, env.world_size)
    source, sequences, eval_sequences = prepare(config, env.world_size)
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
        trainer = Trainer(config, runtime, source, sequences, eval_sequences)
        trainer.fit()
        return Path(config.output_dir)
    except RuntimeError as e:
        failure = as_peer_failure(e, env.rank, config.engine.timeout_s)
        if failure is None:
            raise
        raise failure from e
    finally:
        shutdown()
