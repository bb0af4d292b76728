"""LISA's schedule: which units (decoder layers, or their attention and MLP blocks) train in each interval.

Every draw comes from the interval's own generator, seeded by (seed, interval index), on probabilities that
every rank holds identically: fixed ones (`uniform`, `weights`), ones measured once at the start and
reduced over ranks (`outlier`), or running statistics the core reduces at every step (`grad_norm`).
`cyclic` draws no probabilities: each cycle of ceil(N / gamma) intervals visits every unit once.
The statistics are state: `state_dict` carries them, so a resumed run draws exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.randomness import derived_seed

STRATEGIES = ("uniform", "weights", "outlier", "routing", "grad_norm", "cyclic")


def _generator(seed: int, *where: object) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed("sampler", seed, *where))


def draw(probabilities: torch.Tensor, gamma: int, seed: int, interval_index: int) -> tuple[int, ...]:
    """`gamma` distinct units, without replacement, proportionally to `probabilities` (float64)."""
    chosen = torch.multinomial(probabilities, gamma, replacement=False, generator=_generator(seed, interval_index))
    return tuple(sorted(chosen.tolist()))


def sample_active_layers(seed: int, interval_index: int, num_layers: int, gamma: int,
                         weights: list[float] | None = None) -> tuple[int, ...]:
    """Choose `gamma` of `num_layers` layers without replacement, proportionally to `weights` (uniform if None)."""
    if not 1 <= gamma <= num_layers:
        raise ConfigError(f"lisa.gamma must be between 1 and the number of sampled units ({num_layers}), got {gamma}")
    return draw(_weight_probabilities(num_layers, gamma, weights), gamma, seed, interval_index)


def _weight_probabilities(num_units: int, gamma: int, weights: list[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.ones(num_units, dtype=torch.float64)
    if len(weights) != num_units:
        raise ConfigError(f"lisa.layer_weights has {len(weights)} entries but the model has {num_units} sampled units")
    probs = torch.tensor(weights, dtype=torch.float64)
    if (probs < 0).any() or int((probs > 0).sum()) < gamma:
        raise ConfigError(f"lisa.layer_weights needs at least gamma={gamma} positive weights, got {weights}")
    return probs


class Strategy:
    """Fixed probabilities (`uniform`, `weights`); the adaptive strategies override what they change."""

    name = "uniform"
    needs_calibration = False
    needs_grad_norms = False

    def __init__(self, num_units: int, gamma: int, seed: int, weights: list[float] | None = None) -> None:
        self.num_units, self.gamma, self.seed = num_units, gamma, seed
        self.weights = weights
        self.fixed = _weight_probabilities(num_units, gamma, weights)

    def probabilities(self) -> torch.Tensor:
        return self.fixed

    def choose(self, interval_index: int) -> tuple[int, ...]:
        return draw(self.probabilities(), self.gamma, self.seed, interval_index)

    def observe(self, grad_sq: dict[int, float]) -> None:
        """The squared gradient norms of the units the last step trained (reduced over ranks)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WeightsStrategy(Strategy):
    name = "weights"


def _mixed(scores: list[float], uniform_mix: float) -> torch.Tensor:
    """Scores normalized to probabilities, mixed with uniform so every unit keeps uniform_mix / N."""
    values = torch.tensor(scores, dtype=torch.float64)
    total = float(values.sum())
    n = len(scores)
    shares = values / total if total > 0 and math.isfinite(total) else torch.full((n,), 1.0 / n, dtype=torch.float64)
    return (1 - uniform_mix) * shares + uniform_mix / n


class OutlierStrategy(Strategy):
    """OwLore: units with more outlier weights (|W_ij| * ||X_j|| above `threshold` times their unit's mean)
    are drawn more often. The ratios are measured once, on the first step's batches (`calibrate`)."""

    name = "outlier"
    needs_calibration = True

    def __init__(self, num_units: int, gamma: int, seed: int, uniform_mix: float) -> None:
        super().__init__(num_units, gamma, seed)
        self.uniform_mix = uniform_mix
        self.ratios: list[float] | None = None

    def calibrate(self, ratios: list[float]) -> None:
        assert len(ratios) == self.num_units, "one outlier ratio per unit"
        self.ratios = [float(r) for r in ratios]
        self.needs_calibration = False

    def probabilities(self) -> torch.Tensor:
        assert self.ratios is not None, "calibrate before the first draw"
        return _mixed(self.ratios, self.uniform_mix)

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": self.ratios}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("ratios") is not None:
            self.calibrate(state["ratios"])


class RoutingStrategy(OutlierStrategy):
    """ESFT's affinity: an expert is drawn by its share of the training tokens its layer's router sends it,
    measured once on the first step's batches (`calibrate`). Scores: an expert's is its share times its layer's
    expert count (1 each under an even load); each layer's rest, and each layer without experts, scores 1, as
    under uniform. Mixed with uniform by lisa.uniform_mix."""

    name = "routing"


class GradNormStrategy(Strategy):
    """A running average of each unit's gradient norm, updated on the steps it trains; a unit not trained
    since keeps its estimate, one never trained counts as the largest estimate (so it is tried early)."""

    name = "grad_norm"
    needs_grad_norms = True

    def __init__(self, num_units: int, gamma: int, seed: int, uniform_mix: float, decay: float) -> None:
        super().__init__(num_units, gamma, seed)
        self.uniform_mix, self.decay = uniform_mix, decay
        self.estimates: list[float | None] = [None] * num_units

    def observe(self, grad_sq: dict[int, float]) -> None:
        for unit, sq in grad_sq.items():
            if not math.isfinite(sq):
                continue  # a skipped step's gradient says nothing about importance
            norm, old = math.sqrt(sq), self.estimates[unit]
            self.estimates[unit] = norm if old is None else self.decay * old + (1 - self.decay) * norm

    def probabilities(self) -> torch.Tensor:
        known = [e for e in self.estimates if e is not None]
        fill = max(known, default=1.0)
        return _mixed([fill if e is None else e for e in self.estimates], self.uniform_mix)

    def state_dict(self) -> dict[str, Any]:
        return {"estimates": list(self.estimates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimates = list(state["estimates"])


class CyclicStrategy(Strategy):
    """BAdam's block order: cycle c visits the units in an order (ascending, descending, or a permutation
    drawn per cycle), gamma at a time; when gamma does not divide N the cycle's last interval has fewer."""

    name = "cyclic"

    def __init__(self, num_units: int, gamma: int, seed: int, order: str) -> None:
        super().__init__(num_units, gamma, seed)
        self.order = order
        self.intervals_per_cycle = -(-num_units // gamma)

    def cycle_order(self, cycle: int) -> list[int]:
        if self.order == "ascending":
            return list(range(self.num_units))
        if self.order == "descending":
            return list(reversed(range(self.num_units)))
        return torch.randperm(self.num_units, generator=_generator(self.seed, "cycle", cycle)).tolist()

    def choose(self, interval_index: int) -> tuple[int, ...]:
        cycle, position = divmod(interval_index, self.intervals_per_cycle)
        return tuple(sorted(self.cycle_order(cycle)[position * self.gamma:(position + 1) * self.gamma]))


def make_strategy(lisa: Any, num_units: int, seed: int) -> Strategy:
    """The strategy `lisa` (a LisaConfig) names, over `num_units` sampled units."""
    if not 1 <= lisa.gamma <= num_units:
        raise ConfigError(f"lisa.gamma must be between 1 and the number of sampled units ({num_units}), "
                          f"got {lisa.gamma}")
    if lisa.strategy == "uniform":
        return Strategy(num_units, lisa.gamma, seed)
    if lisa.strategy == "weights":
        return WeightsStrategy(num_units, lisa.gamma, seed, lisa.layer_weights)
    if lisa.strategy == "outlier":
        return OutlierStrategy(num_units, lisa.gamma, seed, lisa.uniform_mix)
    if lisa.strategy == "routing":
        return RoutingStrategy(num_units, lisa.gamma, seed, lisa.uniform_mix)
    if lisa.strategy == "grad_norm":
        return GradNormStrategy(num_units, lisa.gamma, seed, lisa.uniform_mix, lisa.grad_norm_decay)
    if lisa.strategy == "cyclic":
        return CyclicStrategy(num_units, lisa.gamma, seed, lisa.cyclic_order)
    raise ConfigError(f"lisa.strategy must be one of {', '.join(STRATEGIES)}, got {lisa.strategy!r}")


class LayerSampler:
    """Tracks the schedule's position and the current interval's units; `full` training is the degenerate
    case of every unit always (`strategy` None)."""

    def __init__(self, num_units: int, interval: int, seed: int, strategy: Strategy | None, unit: str = "layer",
                 config_key: dict[str, Any] | None = None) -> None:
        if interval < 1:
            raise ConfigError(f"lisa.interval must be >= 1, got {interval}")
        self.num_units = num_units
        self.interval = interval
        self.seed = seed
        self.strategy = strategy
        self.unit = unit
        self.config_key = config_key or {}
        """The settings a resume must match (strategy options), beside those held here."""
        self.step = 0
        """The next optimizer step to run."""
        self.current: tuple[int, ...] | None = None
        self.current_interval: int | None = None

    @property
    def method(self) -> str:
        return "full" if self.strategy is None else "lisa"

    @property
    def gamma(self) -> int:
        return self.num_units if self.strategy is None else self.strategy.gamma

    def interval_index(self, step: int) -> int:
        return step // self.interval

    def is_switch(self, step: int) -> bool:
        """True on the first step of an interval, where the active set may change."""
        return self.strategy is not None and step % self.interval == 0

    def active_layers(self, step: int) -> tuple[int, ...]:
        """The units of `step`'s interval: the current ones, or a draw on the statistics as they are now."""
        if self.strategy is None:
            return tuple(range(self.num_units))
        index = self.interval_index(step)
        if index != self.current_interval:
            self.current, self.current_interval = self.strategy.choose(index), index
        return self.current

    def state_dict(self) -> dict[str, Any]:
        """The settings, position and statistics; `active_layers` are the units of the last step run."""
        strategy = self.strategy
        if strategy is None:
            self.current = self.active_layers(0)
        return {
            "method": self.method, "seed": self.seed, "num_layers": self.num_units, "gamma": self.gamma,
            "interval": self.interval, "weights": None if strategy is None else strategy.weights,
            "strategy": "uniform" if strategy is None else strategy.name, "unit": self.unit, **self.config_key,
            "step": self.step, "active_layers": None if self.current is None else list(self.current),
            "strategy_state": {} if strategy is None else strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        defaults = {"strategy": "weights" if state.get("weights") is not None else "uniform", "unit": "layer"}
        for key in ("method", "seed", "num_layers", "gamma", "interval", "weights", "strategy", "unit",
                    *self.config_key):
            theirs = state.get(key, defaults.get(key))
            if theirs != mine[key]:
                raise CheckpointError(
                    f"checkpoint was written with sampler {key}={theirs!r} but this run has {mine[key]!r}; "
                    "resuming would change the layer schedule")
        self.step = int(state["step"])
        self.current_interval = None
        if self.strategy is not None:
            self.strategy.load_state_dict(state.get("strategy_state", {}))
            if self.strategy.needs_grad_norms:  # drawn from statistics since updated: taken as recorded
                self.current = tuple(state["active_layers"])
                self.current_interval = self.interval_index(max(self.step - 1, 0))
        recorded = state["active_layers"]
        if recorded is not None and list(self.active_layers(max(self.step - 1, 0))) != list(recorded):
            raise CheckpointError("checkpoint's active layers do not match the recomputed schedule")
