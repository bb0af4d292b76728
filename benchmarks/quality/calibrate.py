"""Can the task tell methods apart? A plain one-process AdamW loop (no lisa_dist) fine-tunes the base model
fully, and with only a fixed pair of layers trainable, and prints exact match on training and held-out
questions against chance. A task is fit for the benchmark when full fine-tuning is well above chance on
held-out questions within the benchmark's step budget.

    .venv/bin/python -m benchmarks.quality.calibrate [--steps 150] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import transformers

from benchmarks.quality.pretrain import BaseModel, pretrain
from benchmarks.quality.run import GLOBAL_BATCH, REPO, SEQ_LEN
from benchmarks.quality.score import exact_match
from benchmarks.quality.task import COLOURS, HOMES, split, task_splits, world, write_jsonl
from lisa_dist.data import GlobalBatches, build_sequences, load_examples

QUIZ = "Q: {name}, colour? A:"
LAYER_SETS = {"full": None, "layers 0-1": [0, 1], "layers 3-4": [3, 4], "layers 6-7": [6, 7]}


def finetune(base, tokenizer, train_path, layers: list[int] | None, steps: int, lr: float):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if layers is not None:
        for i, layer in enumerate(model.model.layers):
            layer.requires_grad_(i in layers)
    sequences = build_sequences(load_examples(train_path, tokenizer), SEQ_LEN, tokenizer.pad_token_id, pack=False)
    batches = GlobalBatches(sequences, GLOBAL_BATCH, GLOBAL_BATCH, rank=0, world_size=1, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        (batch,) = batches.micro_batches(step)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@torch.no_grad()
def base_completes(base, tokenizer, prompt: str, names: list[str]) -> float:
    """The share of `names` whose colour the base model gives when completing `prompt` (NAME filled in)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    facts, known = world(), 0
    for name in names:
        text = prompt.format(name=name)
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        known += tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith(facts[name][0])
    return known / len(names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    base = pretrain(BaseModel(), REPO / "benchmarks" / "quality" / ".cache")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    train_rows, held_rows = task_splits()
    train_path = write_jsonl(REPO / "runs" / "quality_calibrate" / "train.jsonl", train_rows)
    chance = (1 / len(COLOURS) + 1 / len(HOMES)) / 2
    held, trained = split()
    print(f"chance on held-out questions: {100 * chance:.1f} %; the base model completes 'The NAME is' with the "
          f"colour for {100 * base_completes(base, tokenizer, 'The {name} is', held):.0f} % of the held-out "
          f"creatures, and a quiz 'Q: NAME, colour? A:' for {100 * base_completes(base, tokenizer, QUIZ, held):.0f} "
          f"% of them (never quizzed) and {100 * base_completes(base, tokenizer, QUIZ, trained):.0f} % of the "
          f"quizzed ones", flush=True)
    for name, layers in LAYER_SETS.items():
        start = time.perf_counter()
        model = finetune(base, tokenizer, train_path, layers, args.steps, args.lr)
        print(f"{name}: training questions {100 * exact_match(model, tokenizer, train_rows):.1f} %, held-out "
              f"{100 * exact_match(model, tokenizer, held_rows):.1f} % ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
