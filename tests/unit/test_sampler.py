from collections import Counter

import pytest
import torch

from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.sampler import LayerSampler, sample_active_layers


def test_same_inputs_same_choice_and_exactly_gamma_distinct_layers():
    for interval in range(50):
        first = sample_active_layers(7, interval, 32, 4)
        assert first == sample_active_layers(7, interval, 32, 4)
        assert len(set(first)) == 4 and list(first) == sorted(first)
        assert all(0 <= i < 32 for i in first)


def test_seed_and_interval_change_the_choice():
    choices = {sample_active_layers(0, i, 32, 2) for i in range(30)}
    assert len(choices) > 20
    assert [sample_active_layers(0, i, 32, 2) for i in range(10)] != [sample_active_layers(1, i, 32, 2) for i in range(10)]


def test_global_rng_is_neither_used_nor_disturbed():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample_active_layers(3, 5, 16, 3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert sample_active_layers(3, 5, 16, 3) == a


def test_uniform_sampling_is_close_to_uniform():
    num_layers, gamma, trials = 8, 2, 4000
    counts = Counter(i for t in range(trials) for i in sample_active_layers(0, t, num_layers, gamma))
    expected = trials * gamma / num_layers
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(num_layers))
    assert chi2 < 24.3  # 99.9th percentile of chi-square with 7 degrees of freedom


def test_weights_bias_the_choice_and_zero_weight_is_never_chosen():
    weights = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 8.0]
    counts = Counter(i for t in range(2000) for i in sample_active_layers(0, t, 8, 2, weights))
    assert counts[0] == 0
    assert counts[7] > 2.5 * max(counts[i] for i in range(1, 7))


@pytest.mark.parametrize("gamma", [0, 9])
def test_gamma_out_of_range_is_an_error(gamma):
    with pytest.raises(ConfigError, match="lisa.gamma"):
        sample_active_layers(0, 0, 8, gamma)


def test_weights_of_wrong_length_are_an_error():
    with pytest.raises(ConfigError, match="layer_weights"):
        sample_active_layers(0, 0, 8, 2, [1.0] * 7)


def test_schedule_switches_every_interval_and_full_is_all_layers():
    sampler = LayerSampler(num_layers=8, gamma=2, interval=5, seed=0)
    assert [s for s in range(20) if sampler.is_switch(s)] == [0, 5, 10, 15]
    assert all(sampler.active_layers(s) == sampler.active_layers(5) for s in range(5, 10))
    full = LayerSampler(num_layers=8, gamma=2, interval=5, seed=0, method="full")
    assert full.active_layers(3) == tuple(range(8)) and not full.is_switch(0)


def test_state_dict_round_trip_and_mismatch_error():
    sampler = LayerSampler(num_layers=8, gamma=2, interval=5, seed=0)
    sampler.step = 12
    state = sampler.state_dict()
    other = LayerSampler(num_layers=8, gamma=2, interval=5, seed=0)
    other.load_state_dict(state)
    assert other.step == 12 and other.active_layers(12) == sampler.active_layers(12)
    with pytest.raises(CheckpointError, match="seed"):
        LayerSampler(num_layers=8, gamma=2, interval=5, seed=1).load_state_dict(state)
