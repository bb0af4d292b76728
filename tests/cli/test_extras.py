"""lisa_dist as `pip install lisa_dist` leaves it, without the `deepspeed` and `datasets` extras: nothing
imports them unless the run asks for ZeRO-3 or a parquet / `save_to_disk` dataset, a 2-rank FSDP2 run
trains and checkpoints without them, and a run that needs one is refused before start, naming the extra.

The extras are made absent by `sys.modules[name] = None` in a `sitecustomize` on the subprocesses' path:
`import` then raises ModuleNotFoundError and `importlib.util.find_spec` returns None, as for a package that
is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lisa_dist.assets import TINY_ALPACA, TINY_MODEL_DIR
from tests.helpers import REPO, free_port

EXTRAS = ("deepspeed", "datasets")
TINY = [str(REPO / "configs" / "tiny.yaml"), f"model.path={TINY_MODEL_DIR}", f"data.path={TINY_ALPACA}",
        "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "progress_bar=false"]


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process in which the extras are not installed."""
    site = tmp_path_factory.mktemp("no_extras")
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({EXTRAS!r}))\n")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


def run(command: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_cli_modules_import_neither_extra_even_where_installed():
    modules = ["lisa_dist.cli", "lisa_dist.train", "lisa_dist.sizing.estimate", "lisa_dist.sizing.plan",
               "lisa_dist.checkpoint", "lisa_dist.plots", "lisa_dist.engines.base", "lisa_dist.data"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXTRAS!r}))")
    result = run([sys.executable, "-c", code], {**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_a_two_rank_fsdp2_lisa_run_trains_and_checkpoints_without_the_extras(without_extras, tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  "-m", "lisa_dist", "train", *TINY, f"output_dir={out}", "max_steps=4", "save_every=2",
                  "train.dtype=fp32"], without_extras)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]


@pytest.mark.parametrize(("override", "extra"), [("engine.name=zero3", "deepspeed"),
                                                 ("data.path={parquet}", "datasets"),
                                                 ("data.path={saved}", "datasets")])
def test_a_run_needing_a_missing_extra_is_refused_before_start_naming_it(without_extras, tmp_path, override, extra):
    (tmp_path / "data.parquet").write_bytes(b"")
    (tmp_path / "saved").mkdir()
    setting = override.format(parquet=tmp_path / "data.parquet", saved=tmp_path / "saved")
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "lisa_dist", "train", *TINY, f"output_dir={out}", setting], without_extras)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"pip install 'lisa_dist[{extra}]'" in result.stderr
    assert setting.split("=")[0] in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_the_trainer_refuses_zero3_without_deepspeed_before_start(without_extras):
    code = f"""
import transformers
from lisa_dist.env import read_launch_env
from lisa_dist.errors import ConfigError
from lisa_dist.hf import trainer_config
model = transformers.AutoModelForCausalLM.from_pretrained({str(TINY_MODEL_DIR)!r})
args = transformers.TrainingArguments(output_dir="unused", report_to=[])
try:
    trainer_config(args, {{"engine": {{"name": "zero3"}}}}, model, read_launch_env())
except ConfigError as error:
    print(error)
"""
    result = run([sys.executable, "-c", code], without_extras)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine.name=zero3 needs deepspeed" in result.stdout and "lisa_dist[deepspeed]" in result.stdout
