"""LISA and LOMO/AdaLomo in an existing Hugging Face `Trainer` script: swap the class, add one argument.

    from lisa_dist.hf import LisaDistTrainer
    trainer = LisaDistTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                              lisa_dist={"method": "lisa", "lisa": {"gamma": 2, "interval": 5},
                                         "optim": {"name": "adalomo"}})
    trainer.train()

Launch it as before: torchrun, or `accelerate launch --config_file configs/accelerate/{fsdp2,zero3}.yaml`,
whose settings mean what they mean for `lisa-dist train`. lisa_dist, not accelerate, shards the model
(FSDP2 or ZeRO-3) and runs each optimizer step through the same training core as `lisa-dist train`
(`lisa_dist.core.TrainingCore`), so the guarantees of the CLI hold. The Trainer keeps the loop: data,
learning-rate schedule (TrainingArguments), logging, callbacks and saving; its checkpoints also hold
lisa_dist's sharded state, and `trainer.train(resume_from_checkpoint=...)` continues exactly.

TRL's `SFTTrainer` takes the class the same way, `class LisaSFT(LisaDistTrainer, SFTTrainer)`: SFT prepares,
packs and masks the data (completion-only or assistant-only labels), lisa_dist trains on its labels. TRL's
other trainers (DPO, GRPO, KTO, reward...) are refused before they start.
"""

from __future__ import annotations

import atexit
import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState

from lisa_dist import checkpoint as ckpt
from lisa_dist._compat import loss_is_scaled_for_accumulation
from lisa_dist.accelerate_config import read_accelerate_settings
from lisa_dist.config import Config, apply_implied, from_dict
from lisa_dist.core import StepResult, TrainingCore
from lisa_dist.data import IGNORE_INDEX
from lisa_dist.distributed import init_distributed, max_over_ranks, shutdown
from lisa_dist.engines import engine_class
from lisa_dist.env import LaunchEnv, read_launch_env
from lisa_dist.errors import CheckpointError, ConfigError, DataError
from lisa_dist.loss import logits_loss_sum
from lisa_dist.loss import loss_sum as token_loss_sum
from lisa_dist.models.build import check_architecture, check_model
from lisa_dist.preempt import PreemptionNotice, stop_message
from lisa_dist.steps import LossFn
from lisa_dist.validation import validate_training

STATE_DIR = "lisa_dist"
"""Where a Trainer checkpoint (`checkpoint-N/`) holds lisa_dist's sharded state."""
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Run settings a Trainer script sets elsewhere (mostly TrainingArguments); the same keys in `lisa_dist=`
# would be a second, ignored source, so they are refused by name.
SET_BY_THE_SCRIPT = {
    "seed": "TrainingArguments.seed", "max_steps": "TrainingArguments.max_steps",
    "output_dir": "TrainingArguments.output_dir", "overwrite": "TrainingArguments.output_dir",
    "save_every": "TrainingArguments.save_steps", "save_total_limit": "TrainingArguments.save_total_limit",
    "save_errors": "the Trainer's own checkpointing, which stops the run on a failed write",
    "async_save": "the Trainer's own checkpointing, which writes before training goes on",
    "resume": "trainer.train(resume_from_checkpoint=...)", "progress_bar": "TrainingArguments.disable_tqdm",
    "optim.lr": "TrainingArguments.learning_rate", "optim.weight_decay": "TrainingArguments.weight_decay",
    "optim.eps": "TrainingArguments.adam_epsilon", "optim.max_grad_norm": "TrainingArguments.max_grad_norm",
    "optim.betas": "TrainingArguments.adam_beta1/adam_beta2", "optim.warmup_steps": "TrainingArguments.warmup_steps",
    "optim.schedule": "TrainingArguments.lr_scheduler_type",
    "optim.min_lr_ratio": "TrainingArguments.lr_scheduler_kwargs",
    "train.global_batch_size": "TrainingArguments.per_device_train_batch_size x gradient_accumulation_steps x ranks",
    "train.micro_batch_size": "TrainingArguments.per_device_train_batch_size",
    "data": "the Trainer's train_dataset and data_collator",
    "eval_every": "TrainingArguments.eval_strategy and eval_steps", "eval_max_batches": "the Trainer's eval_dataset",
    "logging": "TrainingArguments.report_to and logging_steps",
    "model.path": "the model the script passes to the Trainer", "model.preset": "the model the script passes",
    "model.config": "the model the script passes", "model.num_layers": "the model the script passes",
    "model.tokenizer": "the Trainer's processing_class",
    "model.attn_implementation": "from_pretrained(..., attn_implementation=...) in the script",
    "model.experts_implementation": "from_pretrained(..., experts_implementation=...) in the script",
    "model.router_aux_loss_coef": "the model config's output_router_logits and router_aux_loss_coef (the model "
                                  "adds its router loss to the Trainer's loss)",
}


def trainer_config(args: transformers.TrainingArguments, settings: Mapping[str, Any], model: nn.Module,
                   env: LaunchEnv) -> Config:
    """lisa_dist's configuration for a Trainer run: `settings` (config sections), the TrainingArguments,
    and the accelerate config file the script was launched with. Raises ConfigError on contradictions."""
    raw = copy.deepcopy(dict(settings))
    for key, where in SET_BY_THE_SCRIPT.items():
        section, _, name = key.rpartition(".")
        scope = raw.get(section) if section else raw
        if isinstance(scope, dict) and name in scope:
            raise ConfigError(f"lisa_dist={{...}} sets {key}: with the Trainer it comes from {where}")
    if not str(args.optim).split(".")[-1].lower().startswith("adamw_torch"):
        raise ConfigError(f"TrainingArguments.optim={args.optim}: the optimizer is lisa_dist's; choose it with "
                          "lisa_dist={'optim': {'name': 'adamw' | 'sgd' | 'lomo' | 'adalomo'}}")
    stored = DTYPE_NAMES.get(next(model.parameters()).dtype, "fp32")
    raw["seed"] = args.seed
    raw.setdefault("optim", {}).update(lr=args.learning_rate, weight_decay=args.weight_decay, eps=args.adam_epsilon,
                                       max_grad_norm=args.max_grad_norm, betas=[args.adam_beta1, args.adam_beta2])
    apply_implied(raw, implied_by_arguments(args), "TrainingArguments")
    launcher = read_accelerate_settings(dict(env.accelerate))
    if launcher.gradient_accumulation_steps not in (None, args.gradient_accumulation_steps):
        raise ConfigError(f"accelerate config: gradient_accumulation_steps={launcher.gradient_accumulation_steps} "
                          "contradicts TrainingArguments.gradient_accumulation_steps="
                          f"{args.gradient_accumulation_steps}")
    apply_implied(raw, launcher.config, "the accelerate config file")
    raw.setdefault("train", {}).setdefault("dtype", stored)
    config = from_dict(raw)
    validate_training(config)
    # before the process group starts: a missing extra, what this engine cannot run
    engine_class(config.engine.name).check_config(config, env.world_size)
    check_architecture(model.config)
    check_model(config, model)
    if config.engine.name == "zero3" and config.train.dtype != stored:
        raise ConfigError(f"engine zero3 trains the parameters in their stored dtype: the model is {stored} but "
                          f"train.dtype is {config.train.dtype}; load the model with that dtype")
    return config


# TrainingArguments flags whose meaning lisa_dist carries out itself: the Trainer gets a copy with them off, so
# it neither autocasts nor wraps the layers in checkpoints (or TRL's activation offloading) of its own.
TAKEN_OVER = ("bf16", "fp16", "gradient_checkpointing", "activation_checkpointing", "activation_offloading")


def implied_by_arguments(args: transformers.TrainingArguments) -> dict[str, Any]:
    """The lisa_dist settings that TrainingArguments' precision and checkpointing flags mean: `bf16` / `fp16`
    train in that dtype with fp32 masters for the trainable shards (`train.dtype`; fp16 with dynamic loss
    scaling); `gradient_checkpointing` (`activation_checkpointing` from transformers 5.24) is
    `model.activation_checkpointing`, which is non-reentrant; TRL's `activation_offloading` (SFTConfig) is
    `model.activation_offload`. Checkpointing options lisa_dist cannot honour are refused by name."""
    implied: dict[str, Any] = {}
    if getattr(args, "activation_offloading", False):
        implied["model.activation_offload"] = True
    if args.bf16 or args.fp16:
        implied["train.dtype"] = "bf16" if args.bf16 else "fp16"
    if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
        name = "activation_checkpointing_kwargs" if hasattr(args, "activation_checkpointing_kwargs") else \
            "gradient_checkpointing_kwargs"
        options = dict(getattr(args, name) or {})
        honoured = {"use_reentrant": False, "every_n_layers": 1, "offload": False}
        refused = sorted(k for k, v in options.items() if k not in honoured or v != honoured[k])
        if refused:
            raise ConfigError(f"TrainingArguments.{name} {', '.join(f'{k}={options[k]!r}' for k in refused)}: "
                              "lisa_dist checkpoints every decoder layer, non-reentrant, activations on the "
                              "device (model.activation_checkpointing; model.activation_offload offloads them)")
        implied["model.activation_checkpointing"] = True
    return implied


def for_the_trainer(args: transformers.TrainingArguments, env: LaunchEnv) -> transformers.TrainingArguments:
    """A copy of `args` with the `TAKEN_OVER` flags off and the mixed precision the launcher alone sets."""
    trainer_args = copy.copy(args)
    for name in TAKEN_OVER:
        if getattr(trainer_args, name, None):
            setattr(trainer_args, name, False)
    trainer_args.mixed_precision = dict(env.accelerate).get("ACCELERATE_MIXED_PRECISION", "no")
    return trainer_args


# TRL's trainers lisa_dist runs: SFT's batches are a causal LM's labelled tokens. The others train on
# preference pairs, generations or rewards, with reference or reward models outside lisa_dist's sharding.
TRL_TRAINERS = ("SFTTrainer",)


def _trl_trainer(cls: type) -> type | None:
    """The TRL trainer class `cls` derives from, if any (found without importing trl)."""
    return next((base for base in cls.__mro__ if base.__module__.split(".")[0] == "trl"
                 and issubclass(base, transformers.Trainer) and base.__name__ != "_BaseTrainer"), None)


def refuse_unsupported_trainer(cls: type) -> None:
    """Before any work: a TRL trainer other than SFTTrainer is refused by name."""
    trl_trainer = _trl_trainer(cls)
    if trl_trainer is not None and trl_trainer.__name__ not in TRL_TRAINERS:
        raise ConfigError(f"{cls.__name__} derives from TRL's {trl_trainer.__name__}, which lisa_dist does not run: "
                          "its batches are not a causal LM's labelled tokens, and its reference or reward model "
                          "would run outside lisa_dist's sharding; LisaDistTrainer mixes into transformers.Trainer "
                          "and TRL's SFTTrainer")


class LisaDistOptimizer(torch.optim.Optimizer):
    """What the Trainer and its learning-rate scheduler see: one parameter group whose `lr` the scheduler
    sets. The update itself is the core's, run in `LisaDistTrainer.training_step`."""

    def __init__(self, trainer: LisaDistTrainer) -> None:
        super().__init__(list(trainer.model.parameters()), {"lr": trainer.lisa_config.optim.lr})

    def step(self, closure: Any = None) -> None:
        """The step already ran with the last micro-batch (its result is `LisaDistTrainer.last_result`)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are released by the step itself (fused: inside backward)."""


class LisaDistTrainer(transformers.Trainer):
    def __init__(self, *args: Any, lisa_dist: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        refuse_unsupported_trainer(type(self))
        env = read_launch_env()
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        if given is not None:
            if "args" in kwargs:
                kwargs["args"] = for_the_trainer(given, env)
            else:
                args = (args[0], for_the_trainer(given, env), *args[2:])
        super().__init__(*args, **kwargs)
        implied_by_default = implied_by_arguments(self.args) if given is None else {}
        if implied_by_default:
            raise ConfigError(f"{type(self).__name__}: the arguments it made by default imply "
                              f"{', '.join(implied_by_default)}; pass args= explicitly, so that "
                              "lisa_dist takes those flags over before the Trainer starts")
        self.lisa_config = trainer_config(given or self.args, lisa_dist or {}, self.model, env)
        self._token_loss = self._computes_token_loss()
        if not self._token_loss and self.lisa_config.train.loss_chunk_tokens:
            raise ConfigError("train.loss_chunk_tokens computes lisa_dist's own token loss, but this Trainer "
                              "computes its own (compute_loss override, compute_loss_func, label smoothing, "
                              "or SFTConfig.loss_type other than 'nll'); unset one of them")
        if not self._token_loss and _trl_trainer(type(self)) and self.lisa_config.engine.name == "zero3":
            raise ConfigError("engine zero3 with SFTTrainer's own loss (loss_type='dft', compute_loss_func, label "
                              "smoothing, a compute_loss override or an MoE auxiliary loss): SFT reads "
                              "lm_head.weight outside the head's forward, where ZeRO-3 has not gathered it; use "
                              "engine fsdp2, or the plain loss_type='nll'")
        runtime = init_distributed(env, self.lisa_config.engine.timeout_s)
        # The script ends by returning, not through the CLI's immediate exit: tear the process group down while
        # the interpreter is whole, not in its static destructors, where communication threads can abort it.
        atexit.register(shutdown)
        self.core = TrainingCore.adopt(self.lisa_config, runtime, self.model,
                                       last_checkpoint=self._last_checkpoint)
        self.checkpointer = ckpt.Checkpointer(self.core, self.lisa_config)
        self.model = self.model_wrapped = self.core.model
        # lisa_dist shards and reduces; accelerate must not wrap the model in DDP, FSDP or DeepSpeed as well.
        self.is_deepspeed_enabled = self.is_fsdp_enabled = False
        self.last_result: StepResult | None = None
        """The last optimizer step's outcome (loss, grad norm, active layers, skipped)."""
        self._micro_batches: list[dict[str, Any]] = []
        self.notice = PreemptionNotice(self.lisa_config.preempt)
        self.stopped: tuple[int, int] | None = None
        """(step, signal) after a preemption signal stopped training; None otherwise."""
        self.add_callback(_PreemptionCallback(self))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `train`; after a preemption signal (lisa_dist's preempt.signals) it saved the step
        every rank agreed on as checkpoint-N and the process exits with preempt.exit_code."""
        with self.notice:
            output = super().train(*args, **kwargs)
        if self.stopped is not None:
            step, signum = self.stopped
            said = stop_message(signum, f"step {step}", f"checkpoint-{step} in {self.args.output_dir}",
                                self.notice.exit_code, "resume_from_checkpoint=True")
            print(f"lisa-dist: stopped: {said}", file=sys.stderr)
            raise SystemExit(self.notice.exit_code)
        return output

    def _computes_token_loss(self) -> bool:
        """Whether this Trainer's loss is the mean cross-entropy of the labelled tokens, which lisa_dist then
        computes itself (honouring train.loss_chunk_tokens, reading the head through the engine): the plain
        Trainer's, and SFTTrainer's `loss_type='nll'`, without an MoE model's router loss."""
        if self.compute_loss_func is not None or self.args.label_smoothing_factor > 0:
            return False
        if getattr(self.model.config, "output_router_logits", False):
            return False  # the model adds its router load-balancing loss to the loss the Trainer computes
        owner = next(c for c in type(self).__mro__ if c is not LisaDistTrainer and "compute_loss" in vars(c))
        if owner is transformers.Trainer:
            return True
        return owner is _trl_trainer(type(self)) and owner.__name__ == "SFTTrainer" and \
            getattr(self.args, "loss_type", "nll") == "nll" and not getattr(self, "aux_loss_enabled", False)

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = LisaDistOptimizer(self)
        return self.optimizer

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """The Trainer's preparation without accelerate's wrapping: lisa_dist already sharded the model.
        On resume, `_load_from_checkpoint` has restored lisa_dist's state; here the scheduler follows."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps)
        self._micro_batches = []  # none left over from an earlier train() that stopped mid-step
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model, train_dataloader

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Collects the micro-batches of one optimizer step; with the last, the core runs the whole step
        (switching, forward/backward, update, clipping, non-finite handling) as `lisa-dist train` does.
        Returns the step's mean token loss on the last micro-batch and 0 before it, so the Trainer's
        logged loss (summed over micro-batches) is the step's."""
        if "labels" not in inputs:
            raise DataError("LisaDistTrainer: a training batch has no 'labels' (the collator must give them)")
        self._micro_batches.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        micro_batches, self._micro_batches = self._micro_batches, []
        step = self.state.global_step
        loss_fn = self._loss_fn(num_items_in_batch, len(micro_batches))
        self.last_result = self.core.step(step, micro_batches, self.optimizer.param_groups[0]["lr"], loss_fn)
        self.core.raise_if_stalled(step)
        return torch.tensor(self.last_result.loss, device=self.args.device)

    def _loss_fn(self, num_items_in_batch: Any, num_micro_batches: int) -> LossFn:
        """The Trainer's own loss when the script customizes it; otherwise lisa_dist's (which honours
        train.loss_chunk_tokens), given every input the collator produced."""
        core = self.core
        if self._token_loss:
            chunk = self.lisa_config.train.loss_chunk_tokens
            return lambda batch, _: token_loss_sum(core.model, core.parts.head, batch, chunk, core.runtime.device,
                                                   model_inputs=_model_inputs(batch))
        scaled = loss_is_scaled_for_accumulation(self, num_items_in_batch)

        def trainer_loss(batch: dict[str, Any], global_targets: torch.Tensor) -> torch.Tensor:
            device = core.runtime.device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with self.compute_loss_context_manager():
                loss = self.compute_loss(core.model, inputs, num_items_in_batch=num_items_in_batch)
            if not scaled:
                loss = loss / num_micro_batches
            # `loss` is what the Trainer would backpropagate on each rank (gradients then averaged over the
            # ranks); the core backpropagates a summed token loss times world size / global_targets.
            return loss * (global_targets / core.runtime.world_size)

        return trainer_loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Evaluation's loss (training steps run in the core): with the token loss, lisa_dist's, so that it is
        computed as in training on either engine; otherwise the Trainer's."""
        if not self._token_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        device, labels = self.core.runtime.device, inputs["labels"]
        targets = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
        if return_outputs:
            model_inputs = {key: inputs[key] for key in _model_inputs(inputs)}
            outputs = model(**model_inputs, use_cache=False)
            loss_sum = logits_loss_sum(outputs.logits, labels.to(device))
        else:
            loss_sum = token_loss_sum(model, self.core.parts.head, inputs, self.lisa_config.train.loss_chunk_tokens,
                                      device, model_inputs=_model_inputs(inputs))
        loss = loss_sum / torch.as_tensor(targets, device=device).clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.core.engine.after_forward_only()  # release what a backward would have released

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """Clipping is part of the core's step (the Trainer's would see no gradients under ZeRO-3 or fused)."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> float:
        return self.last_result.grad_norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A Hugging Face model directory from the full weights (gathered from every rank's shards)."""
        output_dir = output_dir or self.args.output_dir
        state = self.core.engine.full_state_dict()
        if self.core.runtime.is_main:
            unwrapped = self.accelerator.unwrap_model(self.model)
            transformers.PreTrainedModel.save_pretrained(unwrapped, output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        torch.distributed.barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Beside the Trainer's scheduler (and the optimizer's one learning rate): lisa_dist's sharded state,
        model and optimizer shards, sampler, loss scaler, under `checkpoint-N/lisa_dist/`."""
        super()._save_optimizer_and_scheduler(output_dir)
        self.checkpointer.save(Path(output_dir) / STATE_DIR, self.state.global_step)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """`trainer.train(resume_from_checkpoint=...)`: the shards, optimizer state and layer schedule of
        the step the checkpoint was written at, so the run continues exactly."""
        directory = Path(resume_from_checkpoint)
        state_dir = directory / STATE_DIR
        if not ckpt.is_complete(state_dir):
            raise CheckpointError(f"{directory} holds no lisa_dist state ({STATE_DIR}/): it was written with "
                                  "save_only_model=True, by another Trainer, or was cut short; resume from a "
                                  "checkpoint LisaDistTrainer saved, or start anew")
        step = self.checkpointer.load(state_dir)
        recorded = TrainerState.load_from_json(str(directory / TRAINER_STATE_NAME)).global_step
        if step != recorded:
            raise CheckpointError(f"{directory}: lisa_dist state is of step {step}, the Trainer's of step {recorded}")


def _model_inputs(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """Every entry a collator gives but the labels: masks, position ids, and a packed row's sequence lengths."""
    return tuple(key for key in batch if key != "labels")


class _PreemptionCallback(transformers.TrainerCallback):
    """At each step's end, the ranks agree whether any got a preemption signal (one all-reduce of a number);
    if so, the Trainer saves this step and stops (`LisaDistTrainer.train` then exits)."""

    def __init__(self, trainer: LisaDistTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: transformers.TrainingArguments, state: TrainerState,
                    control: transformers.TrainerControl, **kwargs: Any) -> None:
        trainer = self.trainer
        signum = int(max_over_ranks(float(trainer.notice.received), trainer.core.runtime.device))
        if signum and state.global_step < state.max_steps:
            trainer.stopped = (state.global_step, signum)
            control.should_save = control.should_training_stop = True
