"""Checksums of a step checkpoint's files: written with it (CHECKSUMS.json), checked before it is loaded, so
a file damaged on disk (a flipped bit on a network filesystem, a truncated copy) is named instead of loading
as wrong weights.

Each rank hashes the shard files it wrote (`__R_I.distcp`: rank R, still in its page cache); rank 0 the
rest. Checking spreads the files over the ranks the same way, by writer modulo the current world size."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

MANIFEST = "CHECKSUMS.json"
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")
_CHUNK = 8 << 20


def file_digest(path: Path) -> dict[str, int | str]:
    """sha256 and size of one file, read in chunks."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"sha256": sha.hexdigest(), "bytes": size}


def _hashed_by(name: str, world_size: int) -> int:
    """The rank that hashes `name` (a path relative to the checkpoint): a shard's writer, else rank 0."""
    match = _SHARD.fullmatch(name)
    return int(match.group(1)) % world_size if match else 0


def _files(directory: Path, skip: tuple[str, ...]) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                  and str(p.relative_to(directory)) not in skip)


def digest_share(directory: Path, rank: int, world_size: int, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Digests of the files of `directory` that `rank` hashes (every file but `skip`)."""
    return {name: file_digest(directory / name) for name in _files(directory, skip)
            if _hashed_by(name, world_size) == rank}


def check_share(directory: Path, rank: int, world_size: int) -> list[str]:
    """What is wrong with the files of `directory` that `rank` checks: each a file and what differs. A
    checkpoint without a manifest (written before checksums were kept) has nothing to check."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return []
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return [f"{MANIFEST}: unreadable ({e})"] if rank == 0 else []
    problems = []
    for name, digest in sorted(expected.items()):
        if _hashed_by(name, world_size) != rank:
            continue
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        found = file_digest(path)
        if found["bytes"] != digest["bytes"]:
            problems.append(f"{name}: {found['bytes']} bytes, {digest['bytes']} when written")
        elif found["sha256"] != digest["sha256"]:
            problems.append(f"{name}: sha256 differs from the one recorded when it was written")
    return problems
