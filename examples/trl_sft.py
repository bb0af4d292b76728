"""TRL's SFTTrainer with lisa_dist: one class line, the rest of the script as TRL documents it.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/trl_sft.py --out runs/sft_lisa
    accelerate launch --config_file configs/accelerate/zero3.yaml examples/trl_sft.py --data tokens --packing --batch 1
    python examples/trl_sft.py --vanilla --train-layers 2,5      # TRL alone, those decoder layers trained

`--data text` is prompt/completion text (TRL tokenizes it and trains on the completions only); `--data
tokens` is pre-tokenized rows of equal length with a `completion_mask`. `--record FILE` writes each logged
step (loss, gradient norm, active layers) and, with `--eval`, the final evaluation loss: what the tests check.
"""

import argparse
import json
import os
import sys

import datasets
import torch
import transformers
from trl import SFTConfig, SFTTrainer

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from lisa_dist.distributed import shutdown
from lisa_dist.hf import LisaDistTrainer


class LisaSFT(LisaDistTrainer, SFTTrainer):
    pass


def text_rows(count: int) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in TINY_ALPACA.read_text().splitlines()[:count]]
    return [{"prompt": f"{r['instruction']} {r['input']}".strip() + "\n", "completion": r["output"]} for r in rows]


def token_rows(count: int, length: int, prompt: int) -> list[dict[str, list[int]]]:
    ids = torch.randint(3, 512, (count, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row.tolist(), "completion_mask": [0] * prompt + [1] * (length - prompt)} for row in ids]


class Record(transformers.TrainerCallback):
    def __init__(self, trainer: transformers.Trainer, path: str) -> None:
        self.trainer, self.path = trainer, path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and "loss" in logs:
            core = getattr(self.trainer, "core", None)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "loss": logs["loss"], "grad_norm": logs["grad_norm"],
                                    "active_layers": sorted(core.active_layers) if core else None,
                                    "optim_state": sorted(core.optimizer.names) if core else None}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/trl_sft")
    parser.add_argument("--data", default="text", choices=["text", "tokens"])
    parser.add_argument("--packing", action="store_true", help="SFTConfig.packing (best-fit, padding-free rows)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optim", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--batch", type=int, default=2, help="per_device_train_batch_size")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--loss-type", default="nll", choices=["nll", "dft"],
                        help="SFTConfig.loss_type (dft: SFT computes its own loss)")
    parser.add_argument("--vanilla", action="store_true", help="TRL's SFTTrainer alone (the reference)")
    parser.add_argument("--train-layers", default=None,
                        help="with --vanilla: the decoder layers to train (the others frozen), as LISA's draw")
    parser.add_argument("--eval", action="store_true", help="evaluate on the training rows after training")
    parser.add_argument("--record", default=None)
    cli = parser.parse_args()

    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    rows = text_rows(8) if cli.data == "text" else token_rows(8, length=10, prompt=4)
    dataset = datasets.Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=cli.out, max_steps=cli.steps,
        per_device_train_batch_size=cli.batch, per_device_eval_batch_size=cli.batch,
        gradient_accumulation_steps=cli.accumulation, learning_rate=cli.lr, lr_scheduler_type="constant",
        optim="sgd" if cli.vanilla and cli.optim == "sgd" else "adamw_torch", max_grad_norm=1.0,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, data_seed=0, use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_checkpointing=False, completion_only_loss=True, loss_type=cli.loss_type,
        packing=cli.packing, max_length=20 if cli.packing else 1024, dataset_num_proc=None)
    if cli.vanilla:
        if cli.train_layers is not None:
            trained = {int(i) for i in cli.train_layers.split(",")}
            for index, layer in enumerate(model.model.layers):
                layer.requires_grad_(index in trained)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tokenizer)
    else:
        trainer = LisaSFT(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                          processing_class=tokenizer,
                          lisa_dist={"method": "lisa", "lisa": {"gamma": 2, "interval": cli.steps},
                                     "optim": {"name": cli.optim}})
    if cli.record:
        trainer.add_callback(Record(trainer, cli.record))
    trainer.train()
    if cli.eval:
        metrics = trainer.evaluate()
        if cli.record and int(os.environ.get("RANK", "0")) == 0:
            with open(cli.record, "a") as f:
                f.write(json.dumps({"eval_loss": metrics["eval_loss"]}) + "\n")
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
