from collections import Counter

import pytest
import torch

from lisa_dist.config import LisaConfig
from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.sampler import LayerSampler, make_strategy, sample_active_layers


def _sampler(num_units: int = 8, interval: int = 5, seed: int = 0, full: bool = False, **lisa) -> LayerSampler:
    config = LisaConfig(**{"gamma": 2, **lisa})
    strategy = None if full else make_strategy(config, num_units, seed)
    return LayerSampler(num_units, interval, seed, strategy)


def test_same_inputs_same_choice_and_exactly_gamma_distinct_layers():
    for interval in range(50):
        first = sample_active_layers(7, interval, 32, 4)
        assert first == sample_active_layers(7, interval, 32, 4)
        assert len(set(first)) == 4 and list(first) == sorted(first)
        assert all(0 <= i < 32 for i in first)


def test_seed_and_interval_change_the_choice():
    choices = {sample_active_layers(0, i, 32, 2) for i in range(30)}
    assert len(choices) > 20
    assert ([sample_active_layers(0, i, 32, 2) for i in range(10)]
            != [sample_active_layers(1, i, 32, 2) for i in range(10)])


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
    sampler = _sampler()
    assert [s for s in range(20) if sampler.is_switch(s)] == [0, 5, 10, 15]
    assert all(sampler.active_layers(s) == sampler.active_layers(5) for s in range(5, 10))
    full = _sampler(full=True)
    assert full.active_layers(3) == tuple(range(8)) and not full.is_switch(0)


def test_state_dict_round_trip_and_mismatch_error():
    sampler = _sampler()
    sampler.active_layers(11)
    sampler.step = 12
    state = sampler.state_dict()
    other = _sampler()
    other.load_state_dict(state)
    assert other.step == 12 and other.active_layers(12) == sampler.active_layers(12)
    with pytest.raises(CheckpointError, match="seed"):
        _sampler(seed=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="strategy"):
        _sampler(strategy="cyclic").load_state_dict(state)


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
@pytest.mark.parametrize("num_units, gamma", [(8, 2), (7, 3)])
def test_cyclic_visits_every_unit_once_per_cycle(order, num_units, gamma):
    sampler = _sampler(num_units, interval=1, strategy="cyclic", cyclic_order=order, gamma=gamma)
    per_cycle = -(-num_units // gamma)
    cycles = [[sampler.active_layers(c * per_cycle + i) for i in range(per_cycle)] for c in range(3)]
    for cycle in cycles:
        assert sorted(u for chosen in cycle for u in chosen) == list(range(num_units))
        assert [len(chosen) for chosen in cycle] == [gamma] * (num_units // gamma) + (
            [num_units % gamma] if num_units % gamma else [])
    if order == "ascending":
        assert cycles[0][0] == tuple(range(gamma))
    if order == "descending":
        assert cycles[0][0] == tuple(range(num_units - gamma, num_units))
    if order == "random":
        assert cycles[0] != cycles[1] or cycles[1] != cycles[2]  # a new permutation each cycle
        assert cycles == [[_sampler(num_units, interval=1, strategy="cyclic", gamma=gamma).active_layers(
            c * per_cycle + i) for i in range(per_cycle)] for c in range(3)]


def test_weights_strategy_draws_as_layer_weights_always_did():
    weights = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 8.0]
    sampler = _sampler(strategy="weights", layer_weights=weights, interval=1)
    assert [sampler.active_layers(t) for t in range(50)] == [sample_active_layers(0, t, 8, 2, weights)
                                                             for t in range(50)]


def test_grad_norm_prefers_large_gradients_keeps_a_floor_and_tries_unseen_units_first():
    sampler = _sampler(strategy="grad_norm", uniform_mix=0.2, grad_norm_decay=0.5)
    strategy = sampler.strategy
    assert torch.allclose(strategy.probabilities(), torch.full((8,), 1 / 8, dtype=torch.float64))
    strategy.observe({0: 4.0, 1: 1.0})  # RMS 2 and 1; the six unseen units count as the largest, 2
    probs = strategy.probabilities()
    assert probs[0] == probs[2] > probs[1] and probs.sum().item() == pytest.approx(1.0, abs=1e-15)
    strategy.observe({0: 0.0, 2: float("nan")})  # a running average; a non-finite gradient is ignored
    assert strategy.estimates[:3] == [1.0, 1.0, None]
    strategy.observe({u: 0.0 for u in range(8)})
    strategy.observe({u: 0.0 for u in range(1, 8)})
    strategy.observe({u: 0.0 for u in range(1, 8)})
    probs = strategy.probabilities()
    assert probs.min().item() >= 0.2 / 8 and probs.argmax().item() == 0


def test_adaptive_statistics_resume_to_the_same_draws():
    """A resume restores the statistics: the next draws are those of the uninterrupted sampler."""
    for strategy, feed in (("grad_norm", lambda s, t: s.observe({u: float(u + t) for u in range(8)})),
                           ("outlier", lambda s, t: None)):
        sampler = _sampler(strategy=strategy, interval=2)
        if strategy == "outlier":
            sampler.strategy.calibrate([0.5, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.9])
        for t in range(5):
            sampler.active_layers(t)
            feed(sampler.strategy, t)
        sampler.step = 5
        resumed = _sampler(strategy=strategy, interval=2)
        resumed.load_state_dict(sampler.state_dict())
        assert resumed.active_layers(5) == sampler.active_layers(5)
        assert [resumed.active_layers(t) for t in range(6, 20)] == [sampler.active_layers(t) for t in range(6, 20)]


def test_outlier_probabilities_follow_the_ratios_with_the_uniform_floor():
    sampler = _sampler(strategy="outlier", uniform_mix=0.5)
    sampler.strategy.calibrate([3.0, 1.0, 0, 0, 0, 0, 0, 0])
    probs = sampler.strategy.probabilities().tolist()
    assert probs == pytest.approx([0.5 * 0.75 + 0.5 / 8, 0.5 * 0.25 + 0.5 / 8] + [0.5 / 8] * 6, abs=1e-15)


def test_a_checkpoint_from_before_strategies_loads_as_uniform_or_weights():
    state = _sampler().state_dict() | {"active_layers": None}
    for key in ("strategy", "unit", "strategy_state"):
        state.pop(key)
    _sampler().load_state_dict(state)
    with pytest.raises(CheckpointError, match="strategy='uniform' but this run has 'grad_norm'"):
        _sampler(strategy="grad_norm").load_state_dict(state)
