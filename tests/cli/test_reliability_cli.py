"""A killed rank under torchrun --max-restarts, a crash in the middle of a save, a stopped peer, exact resume
of the learning-rate schedule and fp16 loss scale, and resuming on another world size or engine."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from lisa_dist import checkpoint as ckpt
from scripts.soak import worker_pids
from tests.helpers import (COMMON, ENV, REPO, ZERO3, assert_same_final, assert_same_training, free_port, lisa_dist,
                           metrics, torchrun, torchrun_command)

FP32 = ["train.dtype=fp32", "max_steps=6", "save_every=3"]


def wait_for(condition: Callable[[], bool], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def logged(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def steps_logged(out: Path) -> int:
    return len(logged(out))


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


# FSDP2's restart is the two-node test's below (each agent restarts its rank, resume=auto, same weights); one
# agent restarting both of its ranks is run here on ZeRO-3, whose engine is built again in the restarted ranks.
def test_a_killed_rank_restarts_from_the_last_checkpoint_and_ends_with_the_same_weights(zero3_run, tmp_path):
    run = zero3_run
    out, log = tmp_path / "killed", tmp_path / "torchrun.log"
    job = start(torchrun_command(f"output_dir={out}", *FP32, "resume=auto", *ZERO3,
                                 options=("--max-restarts=1",)), log)
    wait_for(lambda: steps_logged(out) >= 4)  # past the step-3 checkpoint, inside step 5
    before = logged(out)[3]
    os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    # the restarted ranks resumed from step 3 and logged step 4 again (its timings differ)
    wait_for(lambda: logged(out)[3:4] not in ([], [before]))
    print(f"\nkill -9 to the restarted job's first step: {time.monotonic() - killed_at:.1f} s")
    assert job.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("lisa-dist: 1200 training sequences") == 2, text[-3000:]  # rank 0 started twice
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [r["loss"] for r in metrics(run)]
    assert_same_final(out, run)


def test_a_killed_rank_on_one_of_two_nodes_restarts_both_and_ends_with_the_same_weights(run, tmp_path):
    """Two torchrun agents (c10d rendezvous, one rank each) as two nodes: each agent counts its own restarts,
    and the store outlives the rendezvous round, so the restarted ranks must agree on fresh store keys."""
    out, endpoint, run_id = tmp_path / "two_nodes", f"127.0.0.1:{free_port()}", f"restart{free_port()}"
    nodes = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                    "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                    "--rdzv_id", run_id, "--max-restarts", "1", "-m", "lisa_dist", "train",
                    str(REPO / "configs" / "tiny.yaml"), *COMMON, f"output_dir={out}", *FP32, "resume=auto"],
                   tmp_path / f"node{node}.log") for node in (0, 1)]
    wait_for(lambda: steps_logged(out) >= 4)
    (victim,) = worker_pids(nodes[1].pid).values()
    os.kill(victim, signal.SIGKILL)
    for node in nodes:
        assert node.wait(timeout=240) == 0, (tmp_path / "node0.log").read_text()[-3000:]
    assert (tmp_path / "node0.log").read_text().count("lisa-dist: 1200 training sequences") == 2
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(run)]
    assert_same_final(out, run)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole_and_resume_skips_the_partial_one(run, tmp_path):
    out = tmp_path / "crashed"
    crashed = subprocess.run(torchrun_command(f"output_dir={out}", *FP32, entry=(str(REPO / "tests" / "cli" /
                                                                                      "crash_in_save.py"),)),
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0
    partial = out / "checkpoints" / "step_6.tmp"
    assert partial.is_dir() and any(partial.iterdir()) and not ckpt.is_complete(partial)
    assert not (out / "checkpoints" / "step_6").exists() and not (out / "final").exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step_3"
    exported, reference = tmp_path / "exported", tmp_path / "reference"
    ckpt.export_checkpoint(out / "checkpoints" / "step_3", exported)
    ckpt.export_checkpoint(run / "checkpoints" / "step_3", reference)
    a, b = load_file(exported / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = torchrun(f"output_dir={out}", *FP32, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final(out, run)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]


def test_a_kill_during_an_asynchronous_save_leaves_the_previous_checkpoint_whole(run, tmp_path):
    """async_save=true: rank 1 dies while its background writer writes the step-6 checkpoint; step 3 (written in
    the background and published at the next save) is whole and resumes to the reference run's weights."""
    out = tmp_path / "crashed"
    crashed = subprocess.run(torchrun_command(f"output_dir={out}", *FP32, "async_save=true",
                                              entry=(str(REPO / "tests" / "cli" / "crash_in_async_save.py"),)),
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0
    partial = out / "checkpoints" / "step_6.tmp"
    assert partial.is_dir() and not ckpt.is_complete(partial) and not (out / "final").exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step_3"
    assert ckpt.damage(out / "checkpoints" / "step_3") == []
    resumed = torchrun(f"output_dir={out}", *FP32, "async_save=true", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final(out, run)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]


TIMEOUT_S = 20  # long enough that start-up skew between ranks stays under it on a busy 2-core machine running two tests


def test_a_stopped_peer_ends_the_job_after_the_collective_timeout_with_a_message(tmp_path):
    out, log = tmp_path / "stopped", tmp_path / "torchrun.log"
    job = start(torchrun_command(f"output_dir={out}", "max_steps=50", f"engine.timeout_s={TIMEOUT_S}"), log)
    wait_for(lambda: steps_logged(out) >= 2)
    pids = worker_pids(job.pid)
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: exited(pids[0]), timeout=60)
        waited = time.monotonic() - stopped_at
        print(f"\nSIGSTOP of rank 1 to rank 0's exit with engine.timeout_s={TIMEOUT_S}: {waited:.1f} s")
    finally:
        os.kill(pids[1], signal.SIGCONT)
    assert job.wait(timeout=120) != 0
    text = log.read_text()
    assert "lisa-dist: error: rank 0: a collective with the other ranks failed (Timed out waiting" in text, text[-3000:]
    assert f"a peer rank died or did not answer within engine.timeout_s={TIMEOUT_S} s" in text
    # gloo's clock starts when rank 0 enters the collective, possibly a little before the stop
    assert TIMEOUT_S - 1 <= waited < TIMEOUT_S + 30



def test_a_two_rank_checkpoint_resumes_in_one_process(run, tmp_path):
    out = tmp_path / "one"
    result = lisa_dist("train", str(REPO / "configs" / "tiny.yaml"), *COMMON, f"output_dir={out}", *FP32,
                       f"resume={run / 'checkpoints' / 'step_3'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(run, out, 3)


def test_a_one_process_checkpoint_resumes_on_two_ranks_of_either_engine(run, tmp_path):
    one = tmp_path / "one"
    result = lisa_dist("train", str(REPO / "configs" / "tiny.yaml"), *COMMON, f"output_dir={one}",
                       "train.dtype=fp32", "max_steps=3", "save_every=3")
    assert result.returncode == 0, result.stderr[-3000:]
    for engine in ("fsdp2", "zero3"):
        out = tmp_path / engine
        resumed = torchrun(f"output_dir={out}", *FP32, f"engine.name={engine}",
                           f"resume={one / 'checkpoints' / 'step_3'}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_training(run, out, 3)
