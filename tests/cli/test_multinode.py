"""Two nodes on one machine train exactly like one node with the same world size: two torchrun agents
(`launch/torchrun.sh --nnodes 2`) on loopback and in two network namespaces joined by a veth pair, for
both engines; the sbatch script under a stand-in srun; the deepspeed launcher's no-ssh multi-node path."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import COMMON, ENV, REPO, ZERO3, assert_same_final, free_port, metrics

# The session's reference runs (tests/cli/conftest.py: `run`, and `zero3_run` under the deepspeed launcher)
# are one node of 2 ranks with these settings; every multi-node run here must reproduce them.
RUN = [*COMMON, "max_steps=6", "save_every=3", "train.dtype=fp32"]
ENGINE = {"fsdp2": [], "zero3": ZERO3}
TINY = str(REPO / "configs" / "tiny.yaml")
NODE_ENV = {**ENV, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}


def _wait_all(commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for cmd in commands]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def one_node(run, zero3_run):
    """The reference for each engine: one node of 2 ranks."""
    return {"fsdp2": run, "zero3": zero3_run}


def assert_same_as_one_node(out, reference) -> None:
    two, one = metrics(out), metrics(reference)
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["active_layers"] for r in two] == [r["active_layers"] for r in one]
    assert len(two[0]["peak_mem_gib_per_rank"]) == 2
    assert (out / "checkpoints" / "step_3" / "COMPLETE").is_file()
    assert_same_final(out, reference)


# FSDP2's two torchrun.sh agents on loopback are the sbatch test's run (slurm.sbatch execs launch/torchrun.sh on
# each node), so loopback runs ZeRO-3 here; the namespace test runs both engines where it can make namespaces.
@pytest.mark.parametrize("engine", ["zero3"])
def test_two_torchrun_nodes_of_one_rank_equal_one_node_of_two(tmp_path, one_node, engine):
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two_nodes"
    _wait_all([["bash", str(REPO / "launch" / "torchrun.sh"), "--nnodes", "2", "--node-rank", str(node), "--nproc",
                "1", "--endpoint", endpoint, TINY, *RUN, *ENGINE[engine], f"output_dir={out}"]
               for node in (0, 1)], {**NODE_ENV, "RDZV_ID": f"test_{engine}_{free_port()}"})
    assert_same_as_one_node(out, one_node[engine])


def test_the_sbatch_script_starts_one_agent_per_node(tmp_path, one_node):
    """launch/slurm.sbatch run as sbatch would, with srun and scontrol replaced by local stand-ins."""
    out = tmp_path / "slurm"
    fake = REPO / "tests" / "cli" / "fake_slurm"
    env = {**NODE_ENV, "PATH": f"{fake}:{NODE_ENV['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": str(free_port()), "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(REPO),
           "MASTER_PORT": str(free_port())}
    (result,) = _wait_all([["bash", str(REPO / "launch" / "slurm.sbatch"), TINY, *RUN, f"output_dir={out}"]], env)
    assert result.stderr.count("lisa-dist: training done") == 2
    assert_same_as_one_node(out, one_node["fsdp2"])


def test_the_deepspeed_launcher_with_a_hostfile_and_no_ssh(tmp_path, one_node):
    """Each "node" runs `deepspeed --hostfile H --no_ssh --node_rank N`; the ssh/pdsh fan-out is not run here."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "deepspeed", str(free_port())
    _wait_all([[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, "--module",
                "lisa_dist", "train", TINY, *RUN, *ZERO3, f"output_dir={out}"] for node in (0, 1)],
              NODE_ENV)
    assert_same_as_one_node(out, one_node["zero3"])


@pytest.fixture(scope="module")
def namespaces():
    """Two network namespaces, each a "node" with its own address on a veth link (needs root and `ip`)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag, subnet = f"ld{os.getpid() % 100000}", f"10.231.{os.getpid() % 250}"
    nodes = [(f"{tag}n{i}", f"{tag}v{i}", f"{subnet}.{i + 1}") for i in (0, 1)]
    setup = [["ip", "netns", "add", nodes[0][0]], ["ip", "netns", "add", nodes[1][0]],
             ["ip", "link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1]]]
    for ns, ifname, addr in nodes:
        setup += [["ip", "link", "set", ifname, "netns", ns],
                  ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname],
                  ["ip", "-n", ns, "link", "set", ifname, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        for cmd in setup:
            made = subprocess.run(cmd, capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"cannot make network namespaces here: {' '.join(cmd)}: {made.stderr.strip()}")
        yield nodes
    finally:
        for ns, _, _ in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_two_nodes_in_separate_network_namespaces_equal_one_node(tmp_path, one_node, namespaces, engine):
    """Each agent sees only its own veth address, so the rendezvous, the workers' process group and gloo
    all cross a real (virtual) link instead of loopback."""
    out, port = tmp_path / "namespaces", free_port()
    endpoint = f"{namespaces[0][2]}:{port}"
    commands = [["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={ifname}", "bash",
                 str(REPO / "launch" / "torchrun.sh"), "--nnodes", "2", "--node-rank", str(node), "--nproc", "1",
                 "--endpoint", endpoint, "--local-addr", addr, "--rdzv-conf", f"is_host={int(node == 0)}", TINY, *RUN,
                 *ENGINE[engine], f"output_dir={out}"]
                for node, (ns, ifname, addr) in enumerate(namespaces)]
    _wait_all(commands, {**NODE_ENV, "RDZV_ID": f"netns_{engine}_{port}"})
    assert_same_as_one_node(out, one_node[engine])
