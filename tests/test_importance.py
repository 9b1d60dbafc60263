"""Each metric against its formula, on numbers small enough to check by hand."""

import torch

from selfpruner.calibration import ChannelStats
from selfpruner.importance import column_scores

# W is [out=2, in=3]; activations of the 3 input channels over 4 tokens
W = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 0.5]])
X = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 2.0], [1.0, 0.0, 2.0], [1.0, 2.0, 2.0]])
STATS = ChannelStats(total=X.double().sum(0), total_sq=(X.double() ** 2).sum(0), count=4)


def test_magnitude():
    # sum_i |W_ij|: [1+3, 2+0, 0.5+0.5]
    assert column_scores(W, None, "magnitude").tolist() == [4.0, 2.0, 1.0]


def test_wanda_sp():
    # ||x_j||_2 = [2, sqrt(8), 4]
    expected = [4.0 * 2.0, 2.0 * 8**0.5, 1.0 * 4.0]
    torch.testing.assert_close(column_scores(W, STATS, "wanda-sp"), torch.tensor(expected, dtype=torch.float64))


def test_flap():
    # unbiased variances: channel 0 constant -> 0; channel 1 {0,2,0,2} -> 4/3; channel 2 -> 0
    # squared column norms: [10, 4, 0.5]
    expected = [0.0, 4 / 3 * 4.0, 0.0]
    torch.testing.assert_close(column_scores(W, STATS, "flap"), torch.tensor(expected, dtype=torch.float64))


def test_channel_stats():
    torch.testing.assert_close(STATS.mean, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(STATS.norm, torch.tensor([2.0, 8**0.5, 4.0], dtype=torch.float64))
