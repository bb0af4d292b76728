"""Checkpoint checksums on 2 gloo ranks (FSDP2): every file a checkpoint holds is recorded with its sha256; one
byte flipped in rank 1's shard of the newest checkpoint is named before anything loads (resume=PATH stops,
`lisa-dist export` stops), and resume=auto says so, falls back to the checkpoint before it and ends with the
uninterrupted run's weights."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from lisa_dist import checkpoint as ckpt
from lisa_dist.checksums import MANIFEST, file_digest
from lisa_dist.config import load_config
from lisa_dist.errors import CheckpointError
from tests.helpers import COMMON, REPO, assert_same_final, metrics, run_distributed, start_trainer

SHARD = "__1_0.distcp"


def _config(out: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*COMMON, "train.dtype=fp32", "max_steps=6", "save_every=3",
                                                        f"output_dir={out}", *extra])


def flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _jobs(rank: int, world_size: int, root: str) -> dict:
    straight, damaged = Path(root) / "straight", Path(root) / "damaged"
    start_trainer(_config(straight)).fit()
    if rank == 0:
        shutil.copytree(straight / "checkpoints", damaged / "checkpoints")
        shutil.copy(straight / "metrics.jsonl", damaged / "metrics.jsonl")
        shard = damaged / "checkpoints" / "step_6" / SHARD
        flip_one_byte(shard, shard.stat().st_size // 2)
    import torch.distributed as dist

    dist.barrier()
    result = {}
    try:
        start_trainer(_config(damaged, f"resume={damaged / 'checkpoints' / 'step_6'}")).fit()
    except CheckpointError as e:
        result["explicit"] = str(e)
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        start_trainer(_config(damaged, "resume=auto")).fit()
    result["auto"] = said.getvalue()
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("checksums")
    return root, run_distributed(_jobs, 2, root=str(root))


def test_every_file_of_a_checkpoint_is_recorded_with_its_checksum(runs):
    root, _ = runs
    directory = root / "straight" / "checkpoints" / "step_3"
    recorded = json.loads((directory / MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert sorted(recorded) == [name for name in on_disk if name not in (MANIFEST, ckpt.COMPLETE_MARKER)]
    assert {"__0_0.distcp", SHARD, ".metadata", ckpt.STATE_FILE, "hf/config.json"} <= set(recorded)
    for name, digest in recorded.items():
        assert file_digest(directory / name) == digest, name


def test_a_flipped_byte_is_named_before_loading_and_resume_auto_falls_back_to_the_intact_checkpoint(runs):
    root, results = runs
    for result in results:  # both ranks stop with the same message: rank 1 found it, rank 0 was told
        assert f"step_6 is damaged: {SHARD}: sha256 differs from the one recorded when it was written" in \
            result["explicit"]
    damaged = root / "damaged"
    assert f"{damaged / 'checkpoints' / 'step_6'} is damaged ({SHARD}: sha256 differs" in results[0]["auto"]
    assert "trying the one before" in results[0]["auto"] and "is damaged" not in results[1]["auto"]
    # resume=auto skipped step_6, resumed from step_3 and set the damaged one aside
    assert [step for step, _ in ckpt.complete_checkpoints(damaged)] == [3, 6]
    assert [p.name.split(".")[0] for p in (damaged / "checkpoints" / "abandoned").iterdir()] == ["step_6"]
    assert [r["step"] for r in metrics(damaged)] == [1, 2, 3, 4, 5, 6]
    assert_same_final(root / "straight", damaged)


def test_export_refuses_a_damaged_checkpoint_naming_the_file(runs, tmp_path):
    root, _ = runs
    abandoned = next((root / "damaged" / "checkpoints" / "abandoned").iterdir())
    with pytest.raises(CheckpointError, match=f"is damaged: {SHARD}: sha256 differs"):
        ckpt.export_checkpoint(abandoned, tmp_path / "export")
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "straight" / "checkpoints" / "step_3", truncated)
    (truncated / ".metadata").write_bytes((truncated / ".metadata").read_bytes()[:-1])
    (truncated / "hf" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: \d+ bytes, \d+ when written; hf/config.json: missing"):
        ckpt.export_checkpoint(truncated, tmp_path / "export2")
