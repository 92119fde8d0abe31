"""The cheap screen: BatchNorm re-estimation by hand, and the proxy's ranking where the answer is known."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hwprune.policy import Policy
from hwprune.search.screen import Screen, rank_correlation, recalibrate_batchnorm
from hwprune.space import build_space
from hwprune.tasks import get_task


def test_batchnorm_re_estimation_is_the_plain_average_over_the_batches():
    """Running mean = mean of the per-batch means, running var = mean of the unbiased per-batch variances
    (equal batches, cumulative average); dropout stays off, modes and momentum come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.ReLU()).eval()
    bn = model[2]
    bn.running_mean.fill_(7.0)  # stale statistics of a model before pruning
    batches = [(torch.randn(8, 2, 10) * (i + 1), torch.zeros(8)) for i in range(3)]
    assert recalibrate_batchnorm(model, batches) == 1
    with torch.no_grad():
        acts = [model[0](x) for x, _ in batches]  # what reaches the BatchNorm with dropout off
    means = torch.stack([a.mean((0, 2)) for a in acts]).mean(0)
    var = torch.stack([a.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for a in acts]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert not model.training and not bn.training and bn.momentum == 0.1


def _known_mlp():
    """Hidden units 0-3 carry the four features of the label (``x0 + x1 > x2 + x3``, inputs in [0, 1]); units
    4-7 are near-dead (tiny weights, no output weight). L1 importance keeps 0-3 first, x0 and x2 (one for, one
    against) before x1 and x3."""
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.zero_()
        w = torch.tensor([4.0, 3.0, 3.5, 2.5])  # L1 order: x0, then x2 (against), x1, x3
        m[0].weight[:4] = torch.diag(w)
        m[0].weight[4:] = 0.01
        m[2].weight.zero_()
        m[2].bias.zero_()
        m[2].weight[1, :4] = torch.tensor([8.0, 8.0, -8.0, -8.0]) / w
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > x[:, 2] + x[:, 3]).long()
    data = SimpleNamespace(train=TensorDataset(x[:256], y[:256]), val=TensorDataset(x[256:], y[256:]))
    setup = SimpleNamespace(model=m, example=x[:2], task=get_task("classification"), data=data)
    spec = SimpleNamespace(exclude=[], importance="l1", finetune_steps=0, seed=0, lr=1e-3, train_batch_size=64,
                           device="cpu")
    return setup, spec


def test_proxy_ranks_policies_where_the_answer_is_known():
    """Keeping the four carrying units (0.5) is the dense function: same proxy; keeping two (0.25: x0 - x2)
    loses half the evidence: a clearly lower proxy; keeping one (x0 alone), lower still."""
    setup, spec = _known_mlp()
    group = build_space(setup.model, setup.example).groups[0].name
    screen = Screen(setup, spec, [], steps=0)
    score = {r: screen.score(Policy({group: r}, channel_multiple=1)) for r in (1.0, 0.5, 0.25, 0.125)}
    assert score[0.5] == pytest.approx(score[1.0], abs=1e-6)
    assert score[1.0] > score[0.25] + 0.05 > score[0.125] + 0.05
    assert rank_correlation([score[r] for r in (0.5, 0.25, 0.125)], [0.9, 0.7, 0.5])["spearman"] == 1.0


def test_rank_correlation_needs_three_distinct_pairs():
    assert rank_correlation([1.0, 2.0], [1.0, 2.0]) is None
    assert rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    got = rank_correlation([3.0, 2.0, 1.0, 0.0], [0.1, 0.4, 0.3, 0.2])
    assert got["spearman"] == pytest.approx(-0.2) and got["kendall"] == pytest.approx(0.0)  # by hand: d = 3,-1,-1,-1; 3 of 6 pairs concordant
