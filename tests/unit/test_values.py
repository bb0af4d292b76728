"""`Values` reads tensors as they are; `sizing.shapes.ShapesOnly` stands in for tensors without values, and
nothing outside the sizing package (and `_compat`, which names torch's symbols) knows about fake tensors."""

import itertools
import re

import torch

from lisa_dist._compat import FakeTensorMode, is_fake
from lisa_dist.sampler import Strategy
from lisa_dist.sizing.shapes import (LargestUnits, ShapesOnly, UnitSize, draw_elements, heaviest_draw,
                                     rank_trained_elements)
from lisa_dist.values import READ
from tests.helpers import REPO

FAKE_AWARE = re.compile(r"\b(is_fake|FakeTensorMode|unset_fake_temporarily)\b|import (ShapesOnly|LargestUnits)")


def test_only_the_sizing_package_and_compat_name_fake_tensors():
    package = REPO / "lisa_dist"
    outside = [path.relative_to(REPO) for path in package.rglob("*.py")
               if "sizing" not in path.relative_to(package).parts and path.name != "_compat.py"
               and FAKE_AWARE.search(path.read_text())]
    assert outside == []


def test_read_gives_the_values():
    t = torch.tensor([1.5, -2.0])
    assert READ.item(t.sum()) == -0.5 and READ.item(3) == 3.0
    assert READ.items(t) == [1.5, -2.0]
    strategy = Strategy(4, 2, seed=0)
    assert READ.sampling(strategy, [1, 2, 3, 4]) is strategy


def test_shapes_only_reads_stand_ins_for_fake_tensors_and_values_for_real_ones():
    values = ShapesOnly()
    with FakeTensorMode(allow_non_fake_inputs=True):  # as `estimate` runs it
        fake = torch.ones(3)
        assert is_fake(fake)
        assert values.item(fake.sum()) == 1.0 and values.item(fake.sum(), stand_in=0.0) == 0.0
        assert values.items(fake, stand_in=0.0) == [0.0, 0.0, 0.0]
        with values.real_tensors():
            real = torch.arange(3)
            total = real.sum()
        assert not is_fake(real) and not is_fake(total)
        assert values.item(total) == 3.0 and values.items(real) == [0, 1, 2]
        assert values.read_sum_over_ranks(fake) == [0.0, 0.0, 0.0]
    # no process group needed
    assert values.read_sum_over_ranks(torch.tensor([2.0, 0.5])) == [2.0, 0.5]
    assert not values.has_data


def _layers(sizes: list[int]) -> list[UnitSize]:
    return [UnitSize(size, str(u), size) for u, size in enumerate(sizes)]


def test_shapes_only_trains_the_largest_units_preferring_the_inner_draw():
    inner = Strategy(6, 2, seed=3)
    sizes = [10, 10, 10, 10, 5, 5]
    largest = LargestUnits(inner, _layers(sizes))
    for interval in range(20):
        drawn = inner.choose(interval)
        chosen = largest.choose(interval)
        assert all(sizes[u] == 10 for u in chosen)
        # units of the largest size that the inner strategy drew are kept
        assert {u for u in drawn if sizes[u] == 10} <= set(chosen)
    same_size = LargestUnits(Strategy(6, 2, seed=3), _layers([7] * 6))
    assert all(same_size.choose(i) == inner.choose(i) for i in range(20))


# Two MoE layers: a rest of 30 elements, then 4 experts of 10 (stacks of 40) each.
EXPERT_UNITS = [UnitSize(30, "0", 30), *(UnitSize(10, "0.experts", 40, e) for e in range(4)),
                UnitSize(30, "1", 30), *(UnitSize(10, "1.experts", 40, e) for e in range(4))]


def test_the_heaviest_draw_of_experts_opens_every_layers_stacks_first():
    """An expert of an untouched layer brings its 40 stacked gradient elements, more than a rest's 30; a second
    expert of the layer brings none, so the rests come next; ties go to expert 0 (rank 0's) of the last layer."""
    assert heaviest_draw(EXPERT_UNITS, 1) == (6,)
    assert heaviest_draw(EXPERT_UNITS, 2) == (1, 6)
    assert heaviest_draw(EXPERT_UNITS, 4) == (0, 1, 5, 6)
    assert heaviest_draw(EXPERT_UNITS, 5) == (0, 1, 5, 6, 7)
    assert draw_elements(EXPERT_UNITS, (0, 1, 5, 6, 7)) == (30 + 10 + 30 + 10 + 10, 30 + 40 + 30 + 40)
    # every other draw of 4 holds at most as many elements with gradients, then trained
    best = draw_elements(EXPERT_UNITS, heaviest_draw(EXPERT_UNITS, 4))
    assert all(draw_elements(EXPERT_UNITS, other) <= best for other in itertools.combinations(range(10), 4))


def test_a_ranks_trained_elements_hold_its_share_of_the_rest_and_whole_experts():
    """On 2 ranks each holds 2 of a layer's 4 experts whole: drawn experts count whole, at most 2 per layer."""
    assert rank_trained_elements(EXPERT_UNITS, (0, 5), 2) == (30, 0)
    assert rank_trained_elements(EXPERT_UNITS, (1, 6), 2) == (0, 20)
    assert rank_trained_elements(EXPERT_UNITS, (1, 2, 3, 4), 2) == (0, 20)
    assert rank_trained_elements(EXPERT_UNITS, (0, 1, 2, 3), 2) == (15, 20)
    assert rank_trained_elements(EXPERT_UNITS, (1, 2, 3), 4) == (0, 10)
