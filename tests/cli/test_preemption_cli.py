"""Preemption under SLURM: launch/slurm.sbatch on two stand-in nodes gets SIGUSR1 (SLURM's `--signal=B:USR1@120`)
at a random moment of training; the ranks save a checkpoint and stop, the script requeues the job with the
stand-in scontrol, and the requeued job (SLURM_RESTART_COUNT=1, resume=auto added by the script) ends with the
uninterrupted run's final weights and every step logged once. Each rank's own handling (a signal to one rank,
during a save, both engines) is tests/gloo/test_preemption.py."""

import os
import random
import signal
import subprocess
import sys

from tests.cli.test_reliability_cli import steps_logged, wait_for
from tests.helpers import COMMON, ENV, REPO, assert_same_final, free_port, metrics

RUN = [*COMMON, "max_steps=6", "save_every=3", "train.dtype=fp32"]


def _sbatch_env(tmp_path, job_id: int, restarts: int) -> dict[str, str]:
    fake = REPO / "tests" / "cli" / "fake_slurm"
    return {**ENV, "PYTHON": sys.executable, "PATH": f"{fake}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
            "SLURM_NNODES": "2", "SLURM_JOB_ID": str(job_id), "SLURM_GPUS_ON_NODE": "1",
            "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": str(free_port()), "SLURM_RESTART_COUNT": str(restarts),
            "RDZV_ID": f"preempt_{free_port()}", "FAKE_SLURM_REQUEUED": str(tmp_path / "requeued")}


def test_the_sbatch_script_saves_on_slurms_signal_requeues_and_the_requeued_job_ends_with_the_same_weights(
        tmp_path, run):
    out, job_id = tmp_path / "slurm", free_port()
    sbatch = ["bash", str(REPO / "launch" / "slurm.sbatch"), str(REPO / "configs" / "tiny.yaml"), *RUN,
              f"output_dir={out}"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(sbatch, cwd=REPO, env=_sbatch_env(tmp_path, job_id, 0), stdout=log,
                             stderr=subprocess.STDOUT)
    after = random.Random(int.from_bytes(os.urandom(4))).randint(1, 4)
    wait_for(lambda: steps_logged(out) >= after)
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=240) != 0
    text = (tmp_path / "first.log").read_text()
    assert "lisa-dist: stopped: SIGTERM received; every rank stopped after step" in text, (after, text[-3000:])
    assert "lisa_dist: SIGUSR1 received, the ranks saved a checkpoint; requeueing job" in text
    assert (tmp_path / "requeued").read_text().split() == [str(job_id)]
    stopped = len(metrics(out))
    assert after <= stopped < 6 and (out / "checkpoints" / f"step_{stopped}" / "COMPLETE").is_file(), after

    again = subprocess.run(sbatch, cwd=REPO, env=_sbatch_env(tmp_path, job_id, 1), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(run)]
    assert_same_final(out, run)
