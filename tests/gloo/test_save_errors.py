"""A checkpoint that cannot be written, on 2 gloo ranks (FSDP2): "No space left on device" injected into one
rank's shard write (each rank in turn, and rank 1's background writer with async_save) and into rank 0's state
file, and a real full file system (a 1 MiB tmpfs, where the test can mount one). Every rank stops with one
error naming the file and the space a checkpoint needs; the checkpoint before stays whole and loads; no partial
directory is left. With save_errors=continue the run trains on and the next save succeeds."""

import contextlib
import io
import subprocess
from pathlib import Path

import pytest

from lisa_dist import checkpoint as ckpt
from lisa_dist.config import load_config
from lisa_dist.errors import CheckpointWriteError
from tests.helpers import COMMON, REPO, failing_writes, metrics, run_distributed, start_trainer


def _config(out: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*COMMON, "train.dtype=fp32", "max_steps=4", "save_every=2",
                                                        f"output_dir={out}", *extra])


def _run(out: Path, *extra: str) -> dict:
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            start_trainer(_config(out, *extra)).fit()
    except CheckpointWriteError as e:
        return {"error": str(e), "said": said.getvalue()}
    return {"error": None, "said": said.getvalue()}


def _jobs(rank: int, world_size: int, root: str) -> dict:
    results = {}
    for name, failing_rank, where, extra in (("shard0", 0, "shard", ()), ("shard1", 1, "shard", ()),
                                             ("state", 0, "state", ()), ("async1", 1, "shard", ("async_save=true",))):
        out = Path(root) / name
        with failing_writes(rank, failing_rank, where, step=4):
            results[name] = _run(out, *extra)
        results[name]["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    with failing_writes(rank, 1, "shard", step=2):
        results["continue"] = _run(Path(root) / "continue", "save_errors=continue")
    results["continue"]["checkpoints"] = sorted(p.name for p in (Path(root) / "continue" / "checkpoints").iterdir())
    # the checkpoint before the failed one loads
    results["resumed"] = _run(Path(root) / "shard1", "resume=auto", "max_steps=3")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("save_errors")
    return root, run_distributed(_jobs, 2, root=str(root))


@pytest.mark.parametrize("name, failing", [("shard0", "rank 0"), ("shard1", "rank 1"), ("state", "rank 0"),
                                           ("async1", "rank 1")])  # async1: rank 1's background writer
def test_a_failed_write_stops_every_rank_naming_the_file_and_leaves_the_previous_checkpoint(runs, name, failing):
    root, results = runs
    written = {"shard0": "__0_0.distcp", "shard1": "__1_0.distcp", "async1": "__1_0.distcp"}.get(name, ckpt.STATE_FILE)
    for result in results:
        error = result[name]["error"]
        assert error is not None and f"could not write the checkpoint {root / name / 'checkpoints' / 'step_4'}: " \
            f"{failing}: " in error and f"step_4.tmp/{written}: No space left on device" in error, error
        assert "The checkpoints written before it are untouched. It needs about" in error
        assert " bytes of shards" in error
        assert result[name]["checkpoints"] == ["step_2"]  # no step_4, no step_4.tmp
    assert ckpt.damage(root / name / "checkpoints" / "step_2") == []


def test_the_checkpoint_before_a_failed_one_resumes(runs):
    root, results = runs
    assert all(result["resumed"]["error"] is None for result in results)
    assert [r["step"] for r in metrics(root / "shard1")][-1] == 3


def test_save_errors_continue_trains_on_and_the_next_save_succeeds(runs):
    root, results = runs
    assert "No space left on device. The checkpoints written before it are untouched" in results[0]["continue"]["said"]
    assert "training goes on (save_errors=continue)" in results[0]["continue"]["said"]
    for result in results:
        assert result["continue"]["error"] is None and result["continue"]["checkpoints"] == ["step_4"]
    assert [r["step"] for r in metrics(root / "continue")] == [1, 2, 3, 4]
    assert (root / "continue" / "final" / "model.safetensors").is_file()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _on_small_disk(rank: int, world_size: int, out: str, cache: str) -> dict:
    return _run(Path(out), f"data.cache_dir={cache}")


def test_a_full_file_system_stops_the_run_at_its_first_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        results = run_distributed(_on_small_disk, 2, out=str(disk / "run"), cache=str(tmp_path / "cache"))
        for result in results:
            # the failing write's own words vary with where the disk filled (torch.save's writer drops the errno)
            assert f"could not write the checkpoint {disk / 'run' / 'checkpoints' / 'step_2'}: " in result["error"]
            assert "GiB free on its file system: less than it needs, the file system is full" in result["error"]
        assert not (disk / "run" / "checkpoints").exists() or \
            list((disk / "run" / "checkpoints").iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)
