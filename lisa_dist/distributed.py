"""Process-group set-up and the cross-rank agreement checks every engine relies on."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lisa_dist.env import LaunchEnv
from lisa_dist.errors import LaunchError, PeerFailureError, RankDisagreementError


# How gloo and NCCL word a dead or silent peer (gloo raises plain RuntimeErrors).
_PEER_FAILURE_SIGNS = ("Timed out waiting", "Connection reset by peer", "Connection closed by peer",
                       "Connection refused", "Broken pipe", "collective operation timeout",
                       "NCCL communicator was aborted")


def as_peer_failure(error: RuntimeError, rank: int, timeout_s: int) -> PeerFailureError | None:
    """The user-facing error for a collective that a dead or stuck peer broke; None for any other error."""
    text = str(error)
    if not (isinstance(error, (dist.DistNetworkError, dist.DistStoreError))
            or any(sign in text for sign in _PEER_FAILURE_SIGNS)):
        return None
    cause = text.splitlines()[0] if text else type(error).__name__
    cause = cause.split("] ", 1)[-1][:200]
    return PeerFailureError(
        f"rank {rank}: a collective with the other ranks failed ({cause}): a peer rank died or did not answer "
        f"within engine.timeout_s={timeout_s} s; its own log says why. Under torchrun --max-restarts N with "
        "resume=auto the job restarts from the last complete checkpoint")


@dataclass(frozen=True, slots=True)
class Runtime:
    env: LaunchEnv
    device: torch.device
    host_device: torch.device = torch.device("cpu")
    """Where offloaded activations and optimizer state live (`estimate` uses meta to count them apart)."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


_started = False


def process_group_started() -> bool:
    """Whether this process ever started a process group (its communication threads may outlive it)."""
    return _started


def init_distributed(env: LaunchEnv, timeout_s: int) -> Runtime:
    """Start the default process group; a plain process gets a world of one so every path is the same."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    global _started
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if env.is_distributed:
            if env.master_addr is None:
                raise LaunchError(f"{env.launcher} launch without MASTER_ADDR: cannot reach the rendezvous")
            dist.init_process_group(backend, store=_rendezvous_store(env, timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        _started = True
    return Runtime(env=env, device=device)


def _rendezvous_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store, with keys private to this attempt (`_attempt_token`)."""
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=env.rank == 0 and not env.agent_store, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"lisa_dist/{_attempt_token(store, env, timeout)}/", store)


def _attempt_token(store: dist.Store, env: LaunchEnv, timeout: datetime.timedelta) -> str:
    """A name all ranks of this attempt agree on, and no earlier attempt used.

    torchrun keeps its store across `--max-restarts` restarts and rendezvous rounds, so keys of a dead
    attempt are still there (a restarted rank read the old gloo addresses and could not connect), and
    TORCHELASTIC_RESTART_COUNT is counted per node, so it can differ between nodes. Instead rank 0 draws a
    fresh token and hands it to each rank under a nonce that rank just drew, which no stale key can match.
    """
    hellos, joined = "lisa_dist/hellos", "lisa_dist/joined/"
    if env.rank != 0:
        nonce = uuid.uuid4().hex
        store.append(hellos, nonce + ",")
        token = store.get(f"lisa_dist/token/{nonce}").decode()  # waits up to the timeout for rank 0
        store.add(joined + token, 1)
        return token
    token, answered = uuid.uuid4().hex, set()
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(joined + token, 0) < env.world_size - 1:
        nonces = store.get(hellos).decode().split(",") if store.check([hellos]) else []
        for nonce in set(nonces) - answered - {""}:  # stale nonces of dead attempts are answered too: harmless
            store.set(f"lisa_dist/token/{nonce}", token)
            answered.add(nonce)
        if time.monotonic() > deadline:
            raise PeerFailureError(f"rank 0: only {store.add(joined + token, 0)} of {env.world_size - 1} other "
                                   "ranks reached the rendezvous within "
                                   f"engine.timeout_s={int(timeout.total_seconds())} s")
        time.sleep(0.05)
    return token


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def verify_same_across_ranks(what: str, value: Any) -> None:
    """Raise on every rank, naming the ranks, if `value` differs from rank 0's."""
    if dist.get_world_size() == 1 or dist.get_backend() == "fake":
        return
    gathered = gather_objects(value)
    reference = gathered[0]
    differing = [r for r, v in enumerate(gathered) if v != reference]
    if differing:
        details = "; ".join(f"rank {r}: {_difference(reference, gathered[r])}" for r in differing[:4])
        raise RankDisagreementError(f"ranks disagree on {what}: {details} (ranks {differing} differ from rank 0)")


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order."""
    world_size = dist.get_world_size()
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _difference(reference: Any, value: Any, prefix: str = "") -> str:
    """What `value` has where rank 0 has `reference`: the differing keys of nested dicts, else both reprs."""
    if isinstance(reference, dict) and isinstance(value, dict):
        keys = sorted(k for k in reference.keys() | value.keys() if reference.get(k) != value.get(k))
        return ", ".join(_difference(reference.get(k), value.get(k), f"{prefix}{k}.") for k in keys)
    name = prefix.rstrip(".")
    return f"{name + ' ' if name else ''}{value!r} where rank 0 has {reference!r}"


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values`, in rank order (one summed vector with each rank's slot filled)."""
    world_size, rank, width = dist.get_world_size(), dist.get_rank(), len(values)
    slots = [0.0] * (world_size * width)
    slots[rank * width:(rank + 1) * width] = values
    summed = all_reduce_sum(slots, device)
    return [summed[r * width:(r + 1) * width] for r in range(world_size)]


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's `value` (one collective and one host read)."""
    out = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` summed over every rank (a copy on `device`; `t` itself is left as it was)."""
    out = t.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def in_place_sum(device: torch.device, group: Any = None) -> Callable[[torch.Tensor], None]:
    """Sums a tensor over the ranks of `group` in place, through `device` when the tensor is elsewhere. With
    FSDP2's parameter offload a shard's statistics (AdaLomo's) are made in host memory; `init_distributed`
    gives CPU tensors a gloo backend, but a process group another launcher started (accelerate, the HF
    Trainer) may be NCCL alone, which reduces only device tensors."""
    def reduce_sum(t: torch.Tensor) -> None:
        if t.device == device:
            dist.all_reduce(t, group=group)
            return
        moved = t.to(device)
        dist.all_reduce(moved, group=group)
        t.copy_(moved)
    return reduce_sum


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_tensor(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> None:
    """`t` summed over every rank, in place (nothing to do in a process without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
