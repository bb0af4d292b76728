"""The attempt token: ranks of one attempt agree on it although the store still holds a dead attempt's keys."""

import datetime
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist

from lisa_dist.distributed import _attempt_token
from lisa_dist.env import LaunchEnv

WORLD = 3


def _attempt(store: dist.Store) -> list[str]:
    timeout = datetime.timedelta(seconds=20)
    envs = [LaunchEnv(rank=r, world_size=WORLD, local_rank=r, local_world_size=WORLD, launcher="torchrun",
                      master_addr="127.0.0.1", master_port=1, agent_store=True) for r in range(WORLD)]
    with ThreadPoolExecutor(WORLD) as pool:
        return list(pool.map(lambda env: _attempt_token(store, env, timeout), envs))


def test_each_attempt_agrees_on_a_token_no_earlier_attempt_used():
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=20))
    first = _attempt(store)
    store.append("lisa_dist/hellos", "nonce-of-a-rank-that-died-after-announcing,")
    second = _attempt(store)
    third = _attempt(store)
    for tokens in (first, second, third):
        assert len(set(tokens)) == 1
    assert len({first[0], second[0], third[0]}) == 3
