"""Records as users have them: JSON lines, a JSON array, parquet, or a `datasets.save_to_disk` directory.

Each record comes with where it is (`file:line` or `file[index]`), so a malformed one is reported against
its place before any process group starts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lisa_dist.errors import DataError
from lisa_dist.extras import require_extra

Record = tuple[str, dict[str, Any]]
"""(where, record)."""


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif not path.is_file():
        raise DataError(f"{path}: file not found; expected a JSON-lines, JSON or parquet file or a "
                        "datasets.save_to_disk directory")
    elif path.suffix == ".parquet":
        records = _read_parquet(path)
    else:
        records = _read_json(path)
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); expected a JSON-lines or JSON file") from None
    if text.lstrip().startswith("["):
        return _json_array(path, text)
    records = []
    # Split on "\n" only: str.splitlines would also break on U+2028, which JSON strings may contain.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno}); "
                            "expected one JSON object per line") from None
        records.append(_as_record(f"{path}:{line_number}", record))
    return records


def _json_array(path: Path, text: str) -> list[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno}); expected a "
                        "JSON array of objects") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
    return [_as_record(f"{path}[{index}]", item) for index, item in enumerate(items)]


def _as_record(where: str, record: Any) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def _read_parquet(path: Path) -> list[Record]:
    require_extra("datasets", f"reading {path}")
    import datasets

    try:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as error:  # pyarrow raises its own types for a damaged file
        raise DataError(f"{path}: cannot read it as parquet ({type(error).__name__}: {error})") from None
    return [(f"{path}[{index}]", row) for index, row in enumerate(table)]


def _read_saved_dataset(path: Path) -> list[Record]:
    require_extra("datasets", f"reading {path}")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError as error:
        raise DataError(f"{path}: a directory that is not a datasets.save_to_disk dataset ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {', '.join(dataset)}); point "
                            "data.path at the split's directory")
        path, dataset = path / "train", dataset["train"]
    return [(f"{path}[{index}]", row) for index, row in enumerate(dataset)]


def content_digest(path: str | Path) -> str:
    """A digest of the data's bytes (every file of a directory, by relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        for chunk in _chunks(file):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(file: Path, size: int = 1 << 22) -> Iterator[bytes]:
    with file.open("rb") as f:
        while chunk := f.read(size):
            yield chunk
