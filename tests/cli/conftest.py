import pytest


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The reference 2-rank FSDP2 run (fp32, 6 steps, checkpoints at 3 and 6) that resume, restart and
    resharding tests must reproduce."""
    from tests.helpers import torchrun

    out = tmp_path_factory.mktemp("cli") / "run"
    result = torchrun(f"output_dir={out}", "max_steps=6", "save_every=3", "train.dtype=fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    (out.parent / "stderr.txt").write_text(result.stderr)
    return out


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory):
    """The same run on ZeRO-3 under the deepspeed launcher."""
    import os

    from tests.helpers import ZERO3, deepspeed_launcher

    os.environ["DS_ACCELERATOR"] = "cpu"
    out = tmp_path_factory.mktemp("z3") / "straight"
    result = deepspeed_launcher(f"output_dir={out}", "max_steps=6", *ZERO3)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
