import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lisa_dist.importance import InputNorms, _scores, outlier_ratios
from lisa_dist.optim.shard_info import ShardInfo
from tests.helpers import WholeShards


class _Partitions:
    """Shard access that cuts every weight into flat partitions at `cut` (ZeRO-3's layout: rows may be cut)."""

    def __init__(self, cut: int, part: int) -> None:
        self.cut, self.part = cut, part

    def _range(self, param):
        return (0, self.cut) if self.part == 0 else (self.cut, param.numel() - self.cut)

    def local_shard(self, param):
        start, numel = self._range(param)
        return param.data.reshape(-1)[start:start + numel]

    def shard_info(self, param):
        start, numel = self._range(param)
        return ShardInfo(tuple(param.shape), start, numel, lambda t: None)


@pytest.mark.parametrize("module", [nn.Linear(7, 5, bias=False), Conv1D(5, 7)])
def test_scores_of_cut_partitions_are_the_whole_matrix_scores(module):
    """|W_ij| * ||X_j|| with X_j the input feature: the column of a Linear, the row of a GPT-2 Conv1D."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7)
    norms = InputNorms([module], torch.device("cpu"))
    with norms.record():
        module(x)
    sum_sq = norms.sums[module]
    assert torch.allclose(sum_sq, x.double().pow(2).sum((0, 1)))
    weight = module.weight.detach()
    feature = sum_sq.sqrt().float()
    expected = (weight.abs() * (feature[None, :] if isinstance(module, nn.Linear) else feature[:, None])).reshape(-1)
    parts = [_scores(module, _Partitions(13, part), sum_sq) for part in (0, 1)]
    assert torch.equal(torch.cat(parts), expected)
    assert torch.equal(_scores(module, WholeShards(), sum_sq), expected)
    assert torch.equal(module.weight.detach(), weight)  # scoring never touches the weights


def test_padding_tokens_are_no_calibration_data():
    layer = nn.Linear(3, 2)
    norms = InputNorms([layer], torch.device("cpu"))
    x = torch.ones(1, 4, 3)
    x[0, 2:] = 100.0
    norms.mask = torch.tensor([[1, 1, 0, 0]])
    with norms.record():
        layer(x)
    assert norms.sums[layer].tolist() == [2.0, 2.0, 2.0]


def test_outlier_ratio_counts_scores_above_threshold_times_the_unit_mean():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 20.0]]))
    norms = InputNorms([layer], torch.device("cpu"))
    norms.sums[layer] = torch.ones(4, dtype=torch.float64)
    # scores 1 x7 and 20: mean 27/8 = 3.375; above 3 x mean (10.125): one weight of eight
    assert outlier_ratios([[layer]], WholeShards(), norms, 3.0, lambda t: t) == [1 / 8]
    assert outlier_ratios([[layer]], WholeShards(), norms, 6.0, lambda t: t) == [0.0]
