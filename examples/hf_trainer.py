"""A plain Hugging Face Trainer script, switched to lisa_dist by one class and one argument.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/hf_trainer.py --out runs/hf_lisa
    accelerate launch --config_file configs/accelerate/zero3.yaml examples/hf_trainer.py --optim adalomo
    torchrun --nproc_per_node 2 examples/hf_trainer.py --method full --optim lomo
    torchrun --nproc_per_node 2 examples/hf_trainer.py --save-steps 5 --resume runs/hf_trainer/checkpoint-5

`--record FILE` writes, per optimizer step, the active layers, the parameters holding optimizer state and
the number of in-backward (fused) updates: what the tests check.
"""

import argparse
import json
import os
import sys

import torch
import transformers

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.data import build_sequences, load_examples
from lisa_dist.distributed import shutdown
from lisa_dist.hf import LisaDistTrainer


class Record(transformers.TrainerCallback):
    def __init__(self, trainer: LisaDistTrainer, path: str) -> None:
        self.trainer, self.path = trainer, path

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        core = self.trainer.core
        if core.runtime.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step + 1, "active_layers": sorted(core.active_layers),
                                    "optim_state": sorted(core.optimizer.names),
                                    "fused_updates": len(core.stepper.hooks.seen),
                                    "grad_norm": self.trainer.last_result.grad_norm,
                                    "tokens": self.trainer.last_result.tokens,
                                    "expert_tokens": self.trainer.last_result.expert_tokens,
                                    "dtype": core.config.train.dtype,
                                    "checkpointing": core.config.model.activation_checkpointing}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/hf_trainer")
    parser.add_argument("--model", default=str(TINY_MODEL_DIR), help="a Hugging Face model directory")
    parser.add_argument("--method", default="lisa", choices=["lisa", "full"])
    parser.add_argument("--optim", default="adamw", choices=["adamw", "sgd", "lomo", "adalomo"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step over all ranks")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per rank and forward (default: the global batch split over the ranks)")
    parser.add_argument("--adam-epsilon", type=float, default=1e-8, help="TrainingArguments.adam_epsilon (adamw)")
    parser.add_argument("--adalomo-eps1", type=float, default=1e-30, help="lisa_dist optim.adalomo_eps[0]")
    parser.add_argument("--engine", default=None, choices=["fsdp2", "zero3"],
                        help="lisa_dist engine.name (default: from the accelerate config file, else fsdp2)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="TrainingArguments.label_smoothing_factor (the Trainer then computes the loss)")
    parser.add_argument("--bf16", action="store_true", help="TrainingArguments.bf16 (lisa_dist: train.dtype=bf16)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="TrainingArguments.gradient_checkpointing (lisa_dist: model.activation_checkpointing)")
    parser.add_argument("--lisa-dist-bf16-checkpointing", action="store_true",
                        help="the same two settings given to lisa_dist= instead")
    parser.add_argument("--save-steps", type=int, default=0, help="write checkpoint-N/ every this many steps")
    parser.add_argument("--resume", default=None, help="a checkpoint-N/ directory to continue from, exactly")
    parser.add_argument("--record", default=None)
    cli = parser.parse_args()

    tokenizer = transformers.AutoTokenizer.from_pretrained(cli.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.float32)
    sequences = build_sequences(load_examples(TINY_ALPACA, tokenizer), seq_len=48, pad_id=tokenizer.eos_token_id,
                                pack=False)
    dataset = [{"input_ids": sequences.input_ids[i], "labels": sequences.labels[i],
                "attention_mask": sequences.attention_mask[i]} for i in range(len(sequences))]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    micro_batch = cli.micro_batch or cli.global_batch // world_size
    args = transformers.TrainingArguments(
        output_dir=cli.out, max_steps=cli.steps, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=cli.global_batch // (micro_batch * world_size),
        learning_rate=cli.lr, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="steps" if cli.save_steps else "no", save_steps=cli.save_steps or 500, seed=0, data_seed=0,
        max_grad_norm=1.0, adam_epsilon=cli.adam_epsilon, label_smoothing_factor=cli.label_smoothing,
        dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
        bf16=cli.bf16, gradient_checkpointing=cli.gradient_checkpointing)
    settings = {"train": {"dtype": "bf16"}, "model": {"activation_checkpointing": True}} \
        if cli.lisa_dist_bf16_checkpointing else {}
    trainer = LisaDistTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        lisa_dist={"method": cli.method, "lisa": {"gamma": 2, "interval": 2},
                   "optim": {"name": cli.optim, "adalomo_eps": [cli.adalomo_eps1, 1e-3]},
                   **({"engine": {"name": cli.engine}} if cli.engine else {}), **settings})
    if cli.record:
        trainer.add_callback(Record(trainer, cli.record))
    trainer.train(resume_from_checkpoint=cli.resume)
    trainer.save_model(cli.out)


if __name__ == "__main__":
    main()
    # Leave as `lisa-dist train` does: with the process group destroyed and the output flushed, exit without the
    # interpreter's teardown, where a communication library's C++ threads sometimes abort ("terminate called
    # without an active exception") a run that has finished, reporting it as failed.
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
