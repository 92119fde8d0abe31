import pytest
import torch
from torch import nn

from hwprune import HwpruneError, build_model, build_space
from hwprune.models.cnn import MobileNetV2
from hwprune.space import RNNStack, prepare_model, quant_layers

SMALL_MBV2 = [(1, 16, 1, 1), (6, 24, 2, 2)]


def test_resnet20_groups_tie_residual_members():
    m = build_model("resnet20", (1, 28, 28))
    s = build_space(m, torch.randn(2, 1, 28, 28))
    # 9 blocks each own their inner conv; each stage's residual sum is one group
    assert len(s.groups) == 12
    stage1 = s.group("conv1")
    assert stage1.units == 16
    for b in range(3):
        assert f"layer1.{b}.conv2" in stage1.layers and f"layer1.{b}.bn2" in stage1.layers
    assert "layer2.0.conv1" in stage1.layers and "layer2.0.downsample.0" in stage1.layers  # consumers
    stage2 = next(g for g in s.groups if "layer2.0.downsample.0" in g.layers and g.units == 32)
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer3.0.conv1"} <= set(stage2.layers)
    inner = s.group("layer3.1.conv1")
    assert inner.units == 64 and set(inner.layers) == {"layer3.1.conv1", "layer3.1.bn1", "layer3.1.conv2"}
    assert all(g.name != "fc" for g in s.groups)  # the classifier's outputs are never pruned
    assert len(s.layers) == 22 and s.layers[-1].name == "fc"


def test_mobilenetv2_depthwise_tied_to_expansion():
    m = MobileNetV2(3, 10, cfg=SMALL_MBV2, last_channel=64)
    s = build_space(m, torch.randn(2, 3, 16, 16))
    units = {g.name: g.units for g in s.groups}
    assert units == {"features.0.0": 32, "features.1.conv.3": 16, "features.2.conv.0": 96,
                     "features.2.conv.6": 24, "features.3.conv.0": 144, "features.4.0": 64}
    # depthwise conv of block 2 sits in the group of the expansion conv that feeds it
    assert "features.2.conv.3" in s.group("features.2.conv.0").layers
    # the residual (block 3 adds to block 2's output) ties both projections
    assert "features.3.conv.6" in s.group("features.2.conv.6").layers
    # block 1 (t=1) has no expansion: its depthwise conv is tied to the stem
    assert "features.1.conv.0" in s.group("features.0.0").layers


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bi", [(1, False), (3, True)])
def test_rnn_each_layer_is_a_group(cell, layers, bi):
    m = build_model(cell, (10, 3), 5, {"num_layers": layers, "bidirectional": bi, "hidden_size": 16})
    s = build_space(m, torch.randn(2, 10, 3))
    names = [g.name for g in s.groups]
    if layers == 1:
        assert names == ["rnn"] and s.groups[0].layers == ("rnn", "fc")
    else:
        assert isinstance(m.rnn, (nn.LSTM, nn.GRU))  # the caller's model is left as it was (issue 35)
        assert names == ["rnn.layers.0", "rnn.layers.1", "rnn.layers.2"]  # named as prepare_model splits it
        prepare_model(m)
        assert isinstance(m.rnn, RNNStack)
        assert s.group("rnn.layers.1").layers == ("rnn.layers.1", "rnn.layers.2")
        assert s.group("rnn.layers.2").layers == ("rnn.layers.2", "fc")
    assert all(g.units == 16 and g.kind == "hidden" for g in s.groups)
    assert [q.op for q in quant_layers(m)] == [cell] * layers + ["linear"]


def test_exclude_removes_groups_touching_the_layer():
    m = build_model("resnet20", (1, 16, 16))
    s = build_space(m, torch.randn(2, 1, 16, 16), exclude=["layer1.1.conv2"])
    assert all("layer1.1.conv2" not in g.layers for g in s.groups)
    # it produces stage 1's residual channels and consumes layer1.1.conv1's: both groups go
    assert len(s.groups) == 10 and "conv1" not in [g.name for g in s.groups]
    assert "layer1.1.conv1" not in [g.name for g in s.groups] and s.excluded == ["layer1.1.conv2"]
    with pytest.raises(HwpruneError, match="'nope'"):
        build_space(m, torch.randn(2, 1, 16, 16), exclude=["nope"])


def test_rnn_final_state_consumer_is_a_state_consumer_of_the_group():
    class UsesHn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(3, 8, batch_first=True)
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.fc(h[-1])

    s = build_space(UsesHn(), torch.randn(2, 5, 3))
    assert [(g.name, g.units, g.layers) for g in s.groups] == [("rnn", 8, ("rnn", "fc"))]
    s = build_space(UsesHn(), torch.randn(2, 5, 3), exclude=["rnn"])
    assert s.groups == []


def test_input_that_does_not_fit_is_one_error():
    m = build_model("cnn1d")
    with pytest.raises(HwpruneError, match=r"input of shape \(1, 50\) does not fit"):
        build_space(m, torch.randn(2, 1, 50))


class _Concat(torch.nn.Module):
    """Two branches concatenated on channels, then one conv reading both."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.mix = torch.nn.Conv2d(24, 8, 1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(y.mean((2, 3)))


def test_concatenation_maps_each_branch_into_the_consumer():
    from hwprune import Policy, apply_policy

    m = _Concat().eval()
    x = torch.randn(2, 1, 6, 6)
    s = build_space(m, x)
    assert {g.name: g.units for g in s.groups} == {"a": 8, "b": 16, "mix": 8}
    assert "mix" in s.group("a").layers and "mix" in s.group("b").layers
    with torch.no_grad():
        m.b.weight.mul_(0.01)
        m.b.weight[[2, 11]] *= 1000.0
    p = apply_policy(m, Policy({"b": 2 / 16}, channel_multiple=1), x)
    assert p.mix.in_channels == 8 + 2
    # the consumer keeps its columns for branch a (0..7) and b's kept channels 2, 11 (offset 8)
    assert torch.equal(p.mix.weight, m.mix.weight[:, list(range(8)) + [8 + 2, 8 + 11]])
