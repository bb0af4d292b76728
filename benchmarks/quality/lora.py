"""LoRA through peft, the baseline users compare against: the same data, global batches, steps and schedule
as the lisa-dist runs, in one process (the whole model, as every DDP rank would hold it)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import peft
import torch
import transformers

from lisa_dist.config import OptimConfig
from lisa_dist.data import GlobalBatches, build_sequences, load_examples
from lisa_dist.sizing.memory import StorageTracker
from lisa_dist.optim.schedule import lr_at

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(base: Path, train_path: Path, out: Path, seed: int, steps: int, lr: float, seq_len: int,
               global_batch: int, micro_batch: int, warmup: int, min_lr_ratio: float, rank: int = 8) -> dict:
    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules=TARGETS))
    sequences = build_sequences(load_examples(train_path, tokenizer), seq_len, tokenizer.pad_token_id, pack=False)
    batches = GlobalBatches(sequences, global_batch, micro_batch, rank=0, world_size=1, seed=seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = OptimConfig(lr=lr, warmup_steps=warmup, schedule="cosine", min_lr_ratio=min_lr_ratio)
    times, peak, rows = [], 0, []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(schedule, step, steps)
        tracker = StorageTracker()
        tracker.track([*model.parameters(), *(t for s in optimizer.state.values() for t in s.values())])
        tracker.reset_peak()
        start = time.perf_counter()
        with tracker:
            micro = batches.micro_batches(step)
            targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            total = 0.0
            for b in micro:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                         ignore_index=-100, reduction="sum")
                (loss / targets).backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        peak = max(peak, tracker.peak)
        rows.append({"step": step + 1, "loss": total / targets})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "final", safe_serialization=True)
    tokenizer.save_pretrained(out / "final")
    return {"peak_mib": peak / 2 ** 20, "step_s": statistics.median(times[1:] or times),
            "trainable": sum(p.numel() for p in trainable)}
