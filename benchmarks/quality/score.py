"""Held-out exact match by greedy decoding, with the prompt tokenized exactly as training tokenized it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from lisa_dist.data import format_alpaca_prompt


def prompt_ids(tokenizer: transformers.PreTrainedTokenizerBase, row: dict[str, str]) -> list[int]:
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + tokenizer.encode(format_alpaca_prompt(row["instruction"], row["input"]), add_special_tokens=False)


@torch.no_grad()
def exact_match(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase,
                rows: list[dict[str, str]], batch_size: int = 64, max_new_tokens: int = 24) -> float:
    """The share of `rows` whose greedy completion, up to the eos token, is exactly the output."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, r) for r in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, so every row continues from its last prompt token
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row, generated in zip(batch, out[:, width:].tolist()):
            if tokenizer.eos_token_id in generated:
                generated = generated[:generated.index(tokenizer.eos_token_id)]
            correct += tokenizer.decode(generated, skip_special_tokens=True).strip() == row["output"]
    return correct / len(rows)


def score_dir(model_dir: Path, rows: list[dict[str, str]]) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return exact_match(model, tokenizer, rows)
