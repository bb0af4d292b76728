"""The one place that reads the launcher's environment (torchrun, deepspeed, accelerate, SLURM, a plain process)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from lisa_dist.errors import LaunchError


ACCELERATE_PREFIXES = ("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")


@dataclass(frozen=True, slots=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    """`torchrun`, `deepspeed`, `accelerate`, `slurm` or `single`."""
    master_addr: str | None = None
    master_port: int | None = None
    is_tty: bool = False
    """Whether stderr is a terminal (for the progress bar)."""
    accelerate: tuple[tuple[str, str], ...] = ()
    """The settings `accelerate launch` passed from its config file (ACCELERATE_*, FSDP_*, PARALLELISM_CONFIG_*
    variables), sorted; `lisa_dist.accelerate_config` turns them into run configuration."""
    agent_store: bool = False
    """torchrun: the agent hosts the rendezvous store (rank 0 must not start one)."""

    @property
    def is_distributed(self) -> bool:
        """Whether ranks meet at a rendezvous (a world of one starts its own process group)."""
        return self.launcher != "single" and self.world_size > 1


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    is_tty = sys.stderr.isatty()

    def num(key: str, default: int | None = None) -> int:
        value = env.get(key)
        if value is None:
            if default is None:
                raise LaunchError(f"launcher environment is missing {key}")
            return default
        try:
            return int(value)
        except ValueError:
            raise LaunchError(f"launcher environment variable {key}={value!r} is not an integer") from None

    # `accelerate launch` always passes the mixed-precision setting; it starts ranks through torchrun.
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env
    accelerate = (tuple(sorted((k, v) for k, v in env.items() if k.startswith(ACCELERATE_PREFIXES)))
                  if launched_by_accelerate else ())
    if "RANK" in env and "WORLD_SIZE" in env:
        if launched_by_accelerate:
            launcher = "accelerate"
        else:
            launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        world_size = num("WORLD_SIZE")
        return LaunchEnv(
            rank=num("RANK"), world_size=world_size, local_rank=num("LOCAL_RANK", 0),
            local_world_size=num("LOCAL_WORLD_SIZE", world_size), launcher=launcher,
            master_addr=env.get("MASTER_ADDR"), master_port=num("MASTER_PORT", 29500), is_tty=is_tty,
            accelerate=accelerate, agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    if "SLURM_PROCID" in env and num("SLURM_NTASKS", 1) > 1:
        return LaunchEnv(
            rank=num("SLURM_PROCID"), world_size=num("SLURM_NTASKS"), local_rank=num("SLURM_LOCALID", 0),
            local_world_size=num("SLURM_NTASKS_PER_NODE", 1), launcher="slurm",
            master_addr=env.get("MASTER_ADDR"), master_port=num("MASTER_PORT", 29500), is_tty=is_tty)
    # `accelerate launch` with one process runs the script directly, without torchrun's variables.
    return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                     launcher="accelerate" if launched_by_accelerate else "single", is_tty=is_tty,
                     accelerate=accelerate)


def export_rank_variables(env: LaunchEnv) -> None:
    """Set the torchrun-style rank variables a library reads from the environment (DeepSpeed's zero.Init
    reads LOCAL_RANK) where the launcher did not: a plain process, SLURM's srun."""
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                       ("LOCAL_WORLD_SIZE", env.local_world_size)):
        os.environ.setdefault(key, str(value))
