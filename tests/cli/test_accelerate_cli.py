"""`accelerate launch --config_file F -m lisa_dist train CONFIG.yaml` trains exactly like the session's
reference runs (tests/cli/conftest.py: torchrun for FSDP2, the deepspeed launcher for ZeRO-3) with the
settings the file implies, for both engines; a setting lisa_dist cannot honour stops before any work."""

import subprocess
import sys
from pathlib import Path

from lisa_dist.checkpoint import read_state
from tests.helpers import COMMON, ENV, REPO, accelerate_variant, assert_same_final, free_port, metrics

# The reference runs' settings. tiny.yaml sets train.dtype=bf16, so fp32 is set (a file's mixed_precision=no
# alone would contradict it).
RUN = ["max_steps=6", "save_every=3", "train.dtype=fp32"]


def accelerate_launch(config_file: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--main_process_port", str(free_port()), "-m", "lisa_dist", "train", str(REPO / "configs" / "tiny.yaml"),
           *COMMON, *args]
    return subprocess.run(cmd, cwd=REPO, env={**ENV, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert [r["active_layers"] for r in ma] == [r["active_layers"] for r in mb]
    assert_same_final(a, b)


def test_fsdp2_file_with_offload_and_checkpointing_trains_like_torchrun(tmp_path, run):
    """The reference is the plain torchrun run: offloaded parameter shards must compute the numbers of
    resident ones, and recomputed activations are those stored (tests/gloo/test_models_fsdp2.py), bit for bit."""
    config_file = accelerate_variant(tmp_path, "fsdp2.yaml", mixed_precision="no",
                                  fsdp_config__fsdp_offload_params=True,
                                  fsdp_config__fsdp_activation_checkpointing=True)
    launched = accelerate_launch(config_file, *RUN, f"output_dir={tmp_path / 'accelerate'}")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_run(tmp_path / "accelerate", run)
    config = read_state(tmp_path / "accelerate" / "checkpoints" / "step_3")["config"]
    assert config["engine"]["name"] == "fsdp2" and config["engine"]["offload_params"]
    assert config["model"]["activation_checkpointing"] and config["train"]["dtype"] == "fp32"


def test_zero3_file_trains_like_torchrun_with_its_deepspeed_json(tmp_path, zero3_run):
    """The reference is the deepspeed launcher's run with the same JSON (which trains like torchrun's:
    tests/cli/test_zero3_cli.py)."""
    config_file = accelerate_variant(tmp_path, "zero3.yaml", mixed_precision="no")
    launched = accelerate_launch(config_file, *RUN, f"output_dir={tmp_path / 'accelerate'}")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_run(tmp_path / "accelerate", zero3_run)
    config = read_state(tmp_path / "accelerate" / "checkpoints" / "step_3")["config"]
    assert config["engine"]["deepspeed_config"] == "configs/deepspeed/zero3.json"


def test_an_fsdp1_file_stops_before_any_work(tmp_path):
    config_file = accelerate_variant(tmp_path, "fsdp2.yaml", fsdp_config__fsdp_version=1)
    result = accelerate_launch(config_file, *RUN, f"output_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "lisa-dist: error: accelerate config: fsdp_config.fsdp_version=1 is not supported" in result.stderr
    assert not (tmp_path / "out").exists()
