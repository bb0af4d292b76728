import pytest


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The reference 2-rank FSDP2 run (fp32, 6 steps, checkpoints at 3 and 6) that resume, restart and
    resharding tests must reproduce."""
    from tests.cli.test_train_cli import torchrun

    out = tmp_path_factory.mktemp("cli") / "run"
    result = torchrun(f"output_dir={out}", "max_steps=6", "save_every=3", "train.dtype=fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    return out
