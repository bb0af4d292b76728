"""randomness.model_randomness: the global generator's draws inside follow (seed, step, rank); outside, the
generator is as it was."""

import torch

from lisa_dist.randomness import model_randomness

CPU = torch.device("cpu")


def _mask(seed: int, step: int, rank: int) -> torch.Tensor:
    with model_randomness(seed, step, rank, CPU):
        return torch.nn.functional.dropout(torch.ones(1000), 0.5)


def test_the_draws_follow_seed_step_and_rank_alone():
    first = _mask(0, 3, 1)
    torch.rand(7)  # whatever the global generator did before
    assert torch.equal(_mask(0, 3, 1), first)
    for other in (_mask(1, 3, 1), _mask(0, 4, 1), _mask(0, 3, 0)):
        assert not torch.equal(other, first)  # 1000 coin flips: equal with probability 2**-1000


def test_the_global_generator_is_left_as_it_was():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _mask(0, 0, 0)
    assert torch.equal(torch.rand(4), expected)
