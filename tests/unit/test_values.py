"""`Values` reads tensors as they are; `sizing.shapes.ShapesOnly` stands in for tensors without values, and
nothing outside the sizing package (and `_compat`, which names torch's symbols) knows about fake tensors."""

import re

import torch

from lisa_dist._compat import FakeTensorMode, is_fake
from lisa_dist.sampler import Strategy
from lisa_dist.sizing.shapes import LargestUnits, ShapesOnly
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


def test_shapes_only_trains_the_largest_units_preferring_the_inner_draw():
    inner = Strategy(6, 2, seed=3)
    sizes = [10, 10, 10, 10, 5, 5]
    largest = ShapesOnly().sampling(inner, sizes)
    assert isinstance(largest, LargestUnits)
    for interval in range(20):
        drawn = inner.choose(interval)
        chosen = largest.choose(interval)
        assert all(sizes[u] == 10 for u in chosen)
        # units of the largest size that the inner strategy drew are kept
        assert {u for u in drawn if sizes[u] == 10} <= set(chosen)
    same_size = ShapesOnly().sampling(Strategy(6, 2, seed=3), [7] * 6)
    assert all(same_size.choose(i) == inner.choose(i) for i in range(20))
