"""Choosing rates in one process: a plain loop (no lisa_dist engine, no ranks) fine-tunes the base model by full
AdamW, by LISA (uniform draws) with or without a state-free rule for the layers not drawn, by AdaLomo alone or
by LoRA (the benchmark's peft loop), and prints exact match on held-out and training words per seed. The rules
are lisa_dist's own (`optim.rules`); each interval the drawn layers get a fresh AdamW state, the embeddings,
final norm and head keep theirs. It runs twice as fast as the benchmark's 2-rank runs, so a rate sweep fits in
minutes.

    .venv/bin/python -m benchmarks.quality.sweep --task strings --method lisa --inactive signsgd --factor 1
    .venv/bin/python -m benchmarks.quality.sweep --task creatures --method full --seeds 0 1
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import transformers

from benchmarks.quality.methods import BUDGETS, GAMMA, INTERVAL
from benchmarks.quality.pretrain import TASKS, BaseModel, pretrain
from benchmarks.quality.run import GLOBAL_BATCH, REPO, SEQ_LEN, WARMUP
from benchmarks.quality.score import exact_match
from benchmarks.quality.task import write_jsonl
from lisa_dist.config import OptimConfig
from lisa_dist.data import GlobalBatches, build_sequences, load_examples
from lisa_dist.data.sequences import SequenceSet
from lisa_dist.optim.rules import AdaLomo, Sgd, SignSgd, UpdateRule
from lisa_dist.optim.shard_info import ShardInfo


def _rule(name: str) -> UpdateRule | None:
    c = OptimConfig()
    return {"none": None, "sgd": Sgd(0.0, 0.0, fused=True), "signsgd": SignSgd(),
            "adalomo": AdaLomo((c.adalomo_eps[0], c.adalomo_eps[1]), c.adalomo_decay_rate,
                               c.adalomo_clip_threshold, 0.0)}[name]


class RuleApplier:
    """A state-free rule on whole tensors (one process: a parameter is its own shard), its state and step
    count per parameter."""

    def __init__(self, rule: UpdateRule) -> None:
        self.rule, self.states, self.steps = rule, {}, {}

    @torch.no_grad()
    def apply(self, params: list[torch.nn.Parameter], lr: float) -> None:
        for p in params:
            shard = ShardInfo(tuple(p.shape), 0, p.numel(), lambda t: None)
            state = self.states.setdefault(id(p), self.rule.init_state(p.data.view(-1), shard))
            self.steps[id(p)] = self.steps.get(id(p), 0) + 1
            self.rule.update(p.data.view(-1), p.grad.reshape(-1).clone(), state, self.steps[id(p)], lr, shard)


def _loss(model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)


def _schedule(step: int, steps: int) -> float:
    """The benchmark's schedule: linear warm-up, cosine down to a tenth."""
    return min(1.0, (step + 1) / WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))


def finetune_lora(base, train_path, args: argparse.Namespace, seed: int) -> transformers.PreTrainedModel:
    """LoRA through the benchmark's own peft loop (`lora.py`), merged."""
    from benchmarks.quality.lora import train_lora

    out = REPO / "runs" / f"quality_sweep_{args.task}" / f"lora_seed{seed}"
    train_lora(base, train_path, out, seed, args.steps, args.lr, SEQ_LEN, GLOBAL_BATCH, GLOBAL_BATCH, WARMUP, 0.1)
    return transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)


def finetune(base, sequences: SequenceSet, args: argparse.Namespace, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layers = model.model.layers
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    always = torch.optim.AdamW([p for p in model.parameters() if id(p) not in in_layers], lr=args.lr,
                               weight_decay=0.0)
    rule = _rule("adalomo" if args.method == "adalomo" else args.inactive)
    applier = RuleApplier(rule) if rule else None
    batches = GlobalBatches(sequences, GLOBAL_BATCH, GLOBAL_BATCH, rank=0, world_size=1, seed=seed)
    draws, active, drawn = random.Random(seed), list(range(len(layers))), None
    for step in range(args.steps):
        if args.method == "lisa" and step % INTERVAL == 0:
            active = draws.sample(range(len(layers)), GAMMA)
            for i, layer in enumerate(layers):
                layer.requires_grad_(i in active or applier is not None)
            drawn = None
        if drawn is None:
            drawn = torch.optim.AdamW([p for i in active for p in layers[i].parameters()], lr=args.lr,
                                      weight_decay=0.0)
        scale = _schedule(step, args.steps)
        _loss(model, batches.micro_batches(step)[0]).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        if args.method == "adalomo":
            applier.apply([p for p in model.parameters()], args.lr * scale)
        else:
            for optimizer in (drawn, always):
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * scale
                optimizer.step()
            if applier:
                applier.apply([p for i, layer in enumerate(layers) if i not in active for p in layer.parameters()],
                              args.lr * args.factor * scale)
        model.zero_grad(set_to_none=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="strings")
    parser.add_argument("--method", choices=["full", "lisa", "adalomo", "lora"], default="lisa")
    parser.add_argument("--inactive", choices=["none", "sgd", "signsgd", "adalomo"], default="none",
                        help="with --method lisa: the rule for the layers not drawn")
    parser.add_argument("--factor", type=float, default=1.0, help="the inactive rule's rate over --lr")
    parser.add_argument("--lr", type=float, default=None, help="default the task's AdamW rate (BUDGETS)")
    parser.add_argument("--steps", type=int, default=None, help="default the task's budget (BUDGETS)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args(argv)
    budget = BUDGETS[args.task]
    args.lr, args.steps = args.lr or budget.adamw, args.steps or budget.steps
    torch.set_num_threads(1)
    base = pretrain(BaseModel(task=args.task), REPO / "benchmarks" / "quality" / ".cache")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    train_rows, held_rows = TASKS[args.task].task_splits()
    path = write_jsonl(REPO / "runs" / f"quality_sweep_{args.task}" / "train.jsonl", train_rows)
    sequences = build_sequences(load_examples(path, tokenizer), SEQ_LEN, tokenizer.pad_token_id, pack=False)
    start, scores = time.perf_counter(), []
    for seed in args.seeds:
        if args.method == "lora":
            model = finetune_lora(base, path, args, seed)
        else:
            model = finetune(base, sequences, args, seed)
        scores.append((exact_match(model, tokenizer, held_rows), exact_match(model, tokenizer, train_rows[:200])))
    print(f"{args.task} {args.method} inactive={args.inactive} x{args.factor} lr {args.lr} steps {args.steps} seeds "
          f"{args.seeds}: held-out {', '.join(f'{100 * h:.1f}' for h, _ in scores)} % | training words "
          f"{', '.join(f'{100 * t:.0f}' for _, t in scores)} % | {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
