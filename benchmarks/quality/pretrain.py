"""The benchmark's base model: a small LLaMA (or a Mixtral of the same widths) pre-trained from scratch on the
generated corpus, in one process.

It uses the bundled tiny model's byte-level tokenizer. The result is cached under the cache directory by
a digest of everything that shapes it, so later runs (and every method and seed) start from the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from benchmarks.quality import strings, task

from lisa_dist.assets import TINY_MODEL_DIR

TASKS = {"creatures": task, "strings": strings}
"""Each task family's module: `corpus(count, seed)` for pre-training, `task_splits()` for fine-tuning."""


@dataclass(frozen=True)
class BaseModel:
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    documents: int = 6000
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    seed: int = 0
    task: str = "creatures"
    """Whose pre-training corpus: `creatures` (task.py) or `strings` (strings.py)."""
    experts: int = 0
    """Routed experts per layer, each `intermediate_size` wide (a Mixtral); 0 for a dense LLaMA."""
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    """The load-balancing loss in pre-training and fine-tuning (Mixtral's default 0.02 halved: 8 small experts)."""


QUICK_BASE = BaseModel(documents=400, steps=40, batch_size=8, seq_len=64)
# Top 2 of 8 experts half the dense width: a token passes through the dense model's MLP width.
MOE_BASE = BaseModel(experts=8, intermediate_size=176)
QUICK_MOE_BASE = dataclasses.replace(QUICK_BASE, experts=8, intermediate_size=176)


def model_config(spec: BaseModel, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PretrainedConfig:
    shape = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
             "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
             "num_key_value_heads": spec.num_key_value_heads, "vocab_size": len(tokenizer),
             "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if not spec.experts:
        return transformers.LlamaConfig(**shape)
    return transformers.MixtralConfig(**shape, num_local_experts=spec.experts, num_experts_per_tok=spec.top_k,
                                      output_router_logits=True, router_aux_loss_coef=spec.router_aux_loss_coef)


def _digest(spec: BaseModel) -> str:
    tokenizer = (TINY_MODEL_DIR / "tokenizer.json").read_bytes()
    sources = b"".join((Path(__file__).parent / name).read_bytes()
                       for name in ("pretrain.py", "task.py", "strings.py"))
    text = json.dumps(asdict(spec), sort_keys=True).encode() + tokenizer + sources
    return hashlib.sha256(text).hexdigest()[:12]


def _packed(tokenizer: transformers.PreTrainedTokenizerBase, spec: BaseModel) -> torch.Tensor:
    ids: list[int] = []
    for text in TASKS[spec.task].corpus(spec.documents, spec.seed):
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(ids) // spec.seq_len
    return torch.tensor(ids[:rows * spec.seq_len]).view(rows, spec.seq_len)


def pretrain(spec: BaseModel, cache_dir: Path, log: bool = True) -> Path:
    """The pre-trained model's directory (written once per spec)."""
    out = cache_dir / f"base-{_digest(spec)}"
    if (out / "model.safetensors").exists():
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a reduction's order follows the thread count: one base whatever the machine's
    try:
        _train(spec, out, log)
    finally:
        torch.set_num_threads(threads)
    return out


def _train(spec: BaseModel, out: Path, log: bool) -> None:
    torch.manual_seed(spec.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    data = _packed(tokenizer, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(spec.seed)
    start = time.perf_counter()
    for step in range(spec.steps):
        lr = spec.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (spec.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log and (step % 50 == 0 or step == spec.steps - 1):
            print(f"pretrain step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
