"""LISA and LOMO/AdaLomo in an existing Hugging Face `Trainer` script: swap the class, add one argument.

    from lisa_dist.hf import LisaDistTrainer
    trainer = LisaDistTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                              lisa_dist={"method": "lisa", "lisa": {"gamma": 2, "interval": 5},
                                         "optim": {"name": "adalomo"}})
    trainer.train()

Launch it as before: torchrun, or `accelerate launch --config_file configs/accelerate/{fsdp2,zero3}.yaml`,
whose settings mean what they mean for `lisa-dist train`. lisa_dist, not accelerate, shards the model
(FSDP2 or ZeRO-3), reduces gradients and owns the optimizer, so the guarantees of the CLI hold: optimizer
state only for the active layers' shards, frozen layers never written, and a fused (LOMO/AdaLomo) step that
raises if any trainable parameter's update did not run inside backward. The Trainer keeps the loop: data,
learning-rate schedule (TrainingArguments), logging, callbacks and saving the model.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from lisa_dist.accelerate_config import read_accelerate_settings
from lisa_dist.config import Config, ConfigError, apply_implied, from_dict, validate_training
from lisa_dist.distributed import all_reduce_sum, init_distributed, verify_same_across_ranks
from lisa_dist.engines.base import create_engine, trainable_named_parameters
from lisa_dist.env import LaunchEnv, read_launch_env
from lisa_dist.models import set_trainable_layers
from lisa_dist.optim import ShardedOptimizer, make_rule
from lisa_dist.optim.fused import GradHooks
from lisa_dist.optim.sharded import UpdateOptions
from lisa_dist.sampler import LayerSampler

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Run settings the TrainingArguments own; the same keys in `lisa_dist=` would be a second, ignored source.
OWNED_BY_ARGS = {"seed": "seed", "optim.lr": "learning_rate", "optim.weight_decay": "weight_decay",
                 "optim.eps": "adam_epsilon", "optim.max_grad_norm": "max_grad_norm", "optim.betas": "adam_beta1/2",
                 "optim.warmup_steps": "warmup_steps", "optim.schedule": "lr_scheduler_type",
                 "train.global_batch_size": "per_device_train_batch_size", "max_steps": "max_steps"}


def trainer_config(args: transformers.TrainingArguments, settings: Mapping[str, Any], model: nn.Module,
                   env: LaunchEnv) -> Config:
    """lisa_dist's configuration for a Trainer run: `settings` (config sections), the TrainingArguments,
    and the accelerate config file the script was launched with. Raises ConfigError on contradictions."""
    raw = copy.deepcopy(dict(settings))
    for key, arg in OWNED_BY_ARGS.items():
        section, _, name = key.rpartition(".")
        scope = raw.get(section) if section else raw
        if isinstance(scope, dict) and name in scope:
            raise ConfigError(f"lisa_dist={{...}} sets {key}: with the Trainer it comes from TrainingArguments.{arg}")
    if args.fp16 or args.bf16:
        raise ConfigError("TrainingArguments fp16/bf16 (autocast) is not used with lisa_dist: set "
                          "lisa_dist={'train': {'dtype': 'bf16'}} or mixed_precision in the accelerate file")
    if args.gradient_checkpointing:
        raise ConfigError("TrainingArguments.gradient_checkpointing: set lisa_dist={'model': "
                          "{'activation_checkpointing': True}} (lisa_dist applies it before sharding)")
    if not str(args.optim).split(".")[-1].lower().startswith("adamw_torch"):
        raise ConfigError(f"TrainingArguments.optim={args.optim}: the optimizer is lisa_dist's; choose it with "
                          "lisa_dist={'optim': {'name': 'adamw' | 'sgd' | 'lomo' | 'adalomo'}}")
    stored = DTYPE_NAMES.get(next(model.parameters()).dtype, "fp32")
    raw["seed"] = args.seed
    raw.setdefault("optim", {}).update(lr=args.learning_rate, weight_decay=args.weight_decay, eps=args.adam_epsilon,
                                       max_grad_norm=args.max_grad_norm, betas=[args.adam_beta1, args.adam_beta2])
    launcher = read_accelerate_settings(dict(env.accelerate))
    if launcher.gradient_accumulation_steps not in (None, args.gradient_accumulation_steps):
        raise ConfigError(f"accelerate config: gradient_accumulation_steps={launcher.gradient_accumulation_steps} "
                          f"contradicts TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps}")
    apply_implied(raw, launcher.config, "the accelerate config file")
    raw.setdefault("train", {}).setdefault("dtype", stored)
    config = from_dict(raw)
    validate_training(config)
    if config.engine.name == "zero3" and config.train.dtype != stored:
        raise ConfigError(f"engine zero3 trains the parameters in their stored dtype: the model is {stored} but "
                          f"train.dtype is {config.train.dtype}; load the model with that dtype")
    return config


class LisaDistOptimizer(torch.optim.Optimizer):
    """What the Trainer and its learning-rate scheduler see: one parameter group whose `lr` the scheduler
    sets. `step` applies lisa_dist's update after backward, or checks that the fused one ran inside it."""

    def __init__(self, trainer: LisaDistTrainer) -> None:
        super().__init__(list(trainer.model.parameters()), {"lr": trainer.lisa_config.optim.lr})
        self.trainer = trainer

    def step(self, closure: Any = None) -> None:
        self.trainer._optimizer_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are released by the step itself (fused: inside backward)."""


class LisaDistTrainer(transformers.Trainer):
    def __init__(self, *args: Any, lisa_dist: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        env = read_launch_env()
        self.lisa_config = trainer_config(self.args, lisa_dist or {}, self.model, env)
        c = self.lisa_config
        runtime = init_distributed(env, c.engine.timeout_s)
        self.engine = create_engine(c, runtime)
        self.model, self.parts = self.engine.adopt(self.model)
        self.model_wrapped = self.model
        # lisa_dist shards and reduces; accelerate must not wrap the model in DDP, FSDP or DeepSpeed as well.
        self.is_deepspeed_enabled = self.is_fsdp_enabled = False
        self.sampler = LayerSampler(self.parts.num_layers, c.lisa.gamma, c.lisa.interval, c.seed,
                                    c.lisa.layer_weights, c.method)
        self.sharded = ShardedOptimizer(make_rule(c.optim), self.engine,
                                        host=runtime.host_device if c.optim.offload_state else None)
        self.hooks = GradHooks(self.sharded, dict(self.model.named_parameters()), self.engine.register_grad_hook)
        self.active_layers: tuple[int, ...] | None = None
        self.last_grad_norm: float | None = None
        self.step_grad_norm: float | None = None
        """This step's norm, measured after its last backward."""
        self.fused_updates = 0
        """Parameters updated inside the last step's backward (fused optimizers)."""
        self._pass_open = False

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = LisaDistOptimizer(self)
        return self.optimizer

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        if resume_from_checkpoint is not None:
            raise ConfigError("resume_from_checkpoint: LisaDistTrainer saves model weights only; exact resume "
                              "(optimizer state, layer schedule) is `lisa-dist train ... resume=auto`")
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model, train_dataloader

    def _switch_layers(self, step: int) -> None:
        if self.active_layers is not None and not self.sampler.is_switch(step):
            return
        active = self.sampler.active_layers(step)
        verify_same_across_ranks(f"the active layers for step {step}", list(active))
        lisa = self.lisa_config.lisa
        set_trainable_layers(self.parts, active, lisa.train_embeddings, lisa.train_norm, lisa.train_head)
        self.sharded.set_trainable(trainable_named_parameters(self.model))
        self.active_layers = active

    def _options(self, clip_norm: float | None) -> UpdateOptions:
        max_norm = self.lisa_config.optim.max_grad_norm
        scale = 1.0
        if max_norm > 0 and clip_norm is not None and math.isfinite(clip_norm):
            scale = min(1.0, max_norm / (clip_norm + 1e-6))
        return UpdateOptions(lr=self.optimizer.param_groups[0]["lr"], grad_scale=scale,
                             clip_value=self.lisa_config.optim.clip_grad_value)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if not self._pass_open:  # the first micro-batch of an optimizer step
            self._switch_layers(self.state.global_step)
            fused = self.sharded.rule.fused
            # Fused: clipping by global norm uses the previous step's norm, as in `lisa-dist train`.
            self.hooks.begin_pass("apply" if fused else "accumulate",
                                  self._options(self.last_grad_norm) if fused else UpdateOptions(lr=0.0), guard=fused)
            self._pass_open = True
        self.hooks.final_micro_batch = self.accelerator.sync_gradients
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if not scaled and self.compute_loss_func is None:
            loss = loss / self.current_gradient_accumulation_steps
        self.engine.backward(loss)
        return loss.detach()

    def _measure(self) -> float:
        """The step's global gradient norm, once per step (the Trainer asks before it calls `step`)."""
        if self.step_grad_norm is None:
            if self.sharded.rule.fused:
                sq, _ = self.hooks.end_pass(self.model)  # raises if a trainable parameter missed its update
                self.fused_updates = len(self.hooks.seen)
            else:
                sq = self.sharded.grad_sq_sum()
            (total_sq,) = all_reduce_sum([float(sq)], self.engine.runtime.device)
            self.step_grad_norm = math.sqrt(total_sq)
        return self.step_grad_norm

    def _optimizer_step(self) -> None:
        norm = self._measure()
        if self.sharded.rule.fused:
            if math.isfinite(norm):
                self.last_grad_norm = norm
        else:
            if math.isfinite(norm):
                self.sharded.step(self._options(norm))
            self.sharded.zero_grad(self.model)
        self._pass_open = False
        self.step_grad_norm = None

    def _clip_grad_norm(self, model: nn.Module) -> None:
        """Clipping is part of lisa_dist's step (the Trainer's would see no gradients under ZeRO-3 or fused)."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> float:
        return self._measure()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A Hugging Face model directory from the full weights (gathered from every rank's shards)."""
        output_dir = output_dir or self.args.output_dir
        state = self.engine.full_state_dict()
        if self.engine.runtime.is_main:
            unwrapped = self.accelerator.unwrap_model(self.model)
            transformers.PreTrainedModel.save_pretrained(unwrapped, output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        torch.distributed.barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.engine.runtime.is_main:
            print("lisa-dist: Trainer checkpoints hold the model weights only; optimizer state and the layer "
                  "schedule are not saved (exact resume: `lisa-dist train ... resume=auto`)", file=sys.stderr)

    def _save_rng_state(self, output_dir: str) -> None:
        """Not saved: a Trainer checkpoint of this class cannot be resumed (see `_prepare_for_training`)."""
