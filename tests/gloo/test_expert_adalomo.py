"""AdaLomo over a mixture-of-experts layer's [experts, rows, cols] parameter: each expert is its own matrix
(factored statistics, RMS(update) and RMS(parameter) per expert, never across experts), whether the parameter
is whole, sharded by whole experts (FSDP2's dim-0 shards) or cut inside an expert (ZeRO-3's flat partitions),
against the same rule applied to each expert as a 2-D parameter in one process."""

import torch

from lisa_dist.optim.rules import AdaLomo
from lisa_dist.optim.shard_info import ShardInfo, local_shard_info
from tests.helpers import run_distributed

SHAPE = (3, 4, 5)  # 3 experts of 4 x 5
STEPS = 4
RULE = dict(eps=(1e-3, 1e-3), decay_rate=-0.8, clip_threshold=0.5, weight_decay=0.1)
# One flat cut per rank: whole experts (FSDP2: rank 0 holds experts 0-1) and a cut inside expert 1 (ZeRO-3).
CUTS = {"whole_experts": 40, "inside_an_expert": 27}


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    return start, torch.randn(SHAPE, generator=generator)


def _run(master: torch.Tensor, info: ShardInfo, grads: list[torch.Tensor]) -> torch.Tensor:
    rule = AdaLomo(RULE["eps"], RULE["decay_rate"], RULE["clip_threshold"], RULE["weight_decay"])
    state = rule.init_state(master, info)
    for step, grad in enumerate(grads, start=1):
        rule.update(master, grad.clone(), state, step, 1e-2, info)
    return master


def _reference() -> torch.Tensor:
    start, _ = _data(0)
    experts = []
    for e in range(SHAPE[0]):
        grads = [_data(step)[1][e] for step in range(1, STEPS + 1)]
        master = start[e].clone()
        experts.append(_run(master, local_shard_info(master), grads))
    return torch.stack(experts)


def _worker(rank: int, world_size: int) -> dict:
    from lisa_dist.distributed import in_place_sum

    torch.distributed.init_process_group("gloo")
    reduce_sum = in_place_sum(torch.device("cpu"))
    start, _ = _data(0)
    out = {"whole": _run(start.clone(), local_shard_info(start),
                         [_data(step)[1] for step in range(1, STEPS + 1)])}
    numel = start.numel()
    for name, cut in CUTS.items():
        lo, hi = (0, cut) if rank == 0 else (cut, numel)
        master = start.reshape(-1)[lo:hi].clone()
        info = ShardInfo(SHAPE, lo, hi - lo, reduce_sum)
        grads = [_data(step)[1].reshape(-1)[lo:hi] for step in range(1, STEPS + 1)]
        out[name] = _run(master, info, grads)
    return out


def test_each_expert_is_updated_as_its_own_matrix_whole_and_sharded():
    reference = _reference()
    ranks = run_distributed(_worker, 2)
    # Unsharded: the same operations on the same values per expert, bit for bit.
    assert torch.equal(ranks[0]["whole"], reference)
    for name in CUTS:
        sharded = torch.cat([ranks[0][name], ranks[1][name]]).view(SHAPE)
        # Sharded: each statistic is a sum of at most 20 positive fp32 terms taken in two parts and added
        # across ranks, a reordering worth at most 20 * 2^-24 relative; the update's factors combine at most
        # four such sums through rsqrt and sqrt, so every element is within 4 * 20 * 2^-24 of the reference
        # update (times lr * RMS, below 1e-1), well inside rtol 1e-5 on the weights.
        torch.testing.assert_close(sharded, reference, rtol=1e-5, atol=1e-7)
    moved = (reference - _data(0)[0]).abs().flatten(1).amax(1)
    assert (moved > 0).all(), "every expert moved"
