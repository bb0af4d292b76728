"""Tokenized data kept on disk, keyed by the data's bytes, the tokenizer, the format and the field mapping,
so a restarted run (or the next run on the same data) does not tokenize again."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lisa_dist.data.formats import TokenizedExample, Tokenizer, tokenize_records
from lisa_dist.data.records import content_digest, read_records
from lisa_dist.errors import ConfigError

CACHE_VERSION = 1
"""Incremented whenever tokenization changes what it produces for the same inputs."""


def load_examples(path: str | Path, tokenizer: Tokenizer, fmt: str = "auto",
                  fields: Mapping[str, str] | None = None) -> list[TokenizedExample]:
    return tokenize_records(read_records(path), tokenizer, fmt, fields)


class TokenizedCache:
    """Examples read from the cache, or tokenized and kept until `write` (called once the run's other
    checks passed, so a refused run leaves nothing in its output directory)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.pending: dict[Path, list[TokenizedExample]] = {}
        self.hits: list[Path] = []

    def load(self, path: str | Path, tokenizer: Tokenizer, fmt: str,
             fields: Mapping[str, str] | None) -> list[TokenizedExample]:
        key = json.dumps([CACHE_VERSION, content_digest(path), tokenizer_fingerprint(tokenizer), fmt,
                          dict(fields or {})])
        file = self.cache_dir / f"tokenized-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
        examples = _read(file) if file.is_file() else None
        if examples is not None:
            self.hits.append(file)
            return examples
        examples = load_examples(path, tokenizer, fmt, fields)
        self.pending[file] = examples
        return examples

    def write(self) -> None:
        for file, examples in self.pending.items():
            _write(file, examples)
        self.pending = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the token ids: the tokenizer's full definition, its chat template, its special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "bos_token", None)]
    digest.update(json.dumps([template, special], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _write(file: Path, examples: list[TokenizedExample]) -> None:
    payload = {"version": CACHE_VERSION,
               "lengths": torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64),
               "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
               "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64)}
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, file)  # ranks writing the same file at once each replace it whole
    except OSError as error:
        raise ConfigError(f"data.cache_dir {file.parent} is not writable: {error.strerror or error}") from None


def _read(file: Path) -> list[TokenizedExample] | None:
    """None for a file this version cannot use (older format, damaged): it is made again."""
    try:
        payload = torch.load(file, weights_only=True)
    except Exception:  # a torn or foreign file: tokenize again rather than fail the run
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        return None
    ends = payload["lengths"].cumsum(0).tolist()
    ids, labels = payload["input_ids"].tolist(), payload["labels"].tolist()
    starts = [0, *ends[:-1]]
    return [TokenizedExample(input_ids=ids[s:e], labels=labels[s:e]) for s, e in zip(starts, ends)]
