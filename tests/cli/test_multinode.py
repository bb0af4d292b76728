"""Two torchrun agents (`launch/torchrun.sh --nnodes 2`) on loopback train exactly like one node with
the same world size, for both engines."""

import subprocess
import sys

import pytest

from tests.cli.test_train_cli import COMMON, ENV, REPO, assert_same_final, metrics, torchrun
from tests.helpers import free_port

RUN = [*COMMON, "max_steps=4", "save_every=2", "train.dtype=fp32"]


def _two_nodes(out, engine: str) -> list[subprocess.CompletedProcess]:
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**ENV, "PYTHON": sys.executable, "RDZV_ID": f"test_{engine}_{free_port()}", "DS_ACCELERATOR": "cpu"}
    agents = [subprocess.Popen(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "--nnodes", "2", "--node-rank", str(node), "--nproc", "1",
         "--endpoint", endpoint, str(REPO / "configs" / "tiny.yaml"), *RUN, f"engine.name={engine}",
         f"output_dir={out}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_two_nodes_of_one_rank_equal_one_node_of_two(tmp_path, engine):
    for result in _two_nodes(tmp_path / "two_nodes", engine):
        assert result.returncode == 0, result.stderr[-3000:]
    one_node = torchrun(*RUN[len(COMMON):], f"engine.name={engine}", f"output_dir={tmp_path / 'one_node'}")
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    two, one = metrics(tmp_path / "two_nodes"), metrics(tmp_path / "one_node")
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["active_layers"] for r in two] == [r["active_layers"] for r in one]
    assert len(two[0]["peak_mem_gib_per_rank"]) == 2
    assert (tmp_path / "two_nodes" / "checkpoints" / "step_2" / "COMPLETE").is_file()
    assert_same_final(tmp_path / "two_nodes", tmp_path / "one_node")
