"""Pruned models against hand-computed shapes, and function preservation."""
import pytest
import torch
from torch import nn

from hwprune import Policy, apply_policy, build_model, build_space, prepare_model, uniform_policy
from hwprune.measure import count_params
from hwprune.models.cnn import MobileNetV2
from hwprune.models.rnn import RNNClassifier

SMALL_MBV2 = [(1, 16, 1, 1), (6, 24, 2, 2)]


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model


@pytest.mark.parametrize("name,shape,args", [
    ("cnn1d", (1, 40), {}), ("resnet20", (1, 16, 16), {}), ("mobilenetv2", (3, 16, 16), {"width_mult": 0.5}),
    ("lstm", (12, 4), {"num_layers": 3, "bidirectional": True, "hidden_size": 16}),
    ("gru", (12, 4), {"num_layers": 2, "hidden_size": 16}),
])
def test_keep_all_fp32_is_the_dense_model(name, shape, args):
    m = _randomize_bn(build_model(name, shape, 10, args)).eval()
    x = torch.randn(3, *shape)
    s = build_space(m, x)
    out = apply_policy(m, uniform_policy(s, 1.0), x).eval()
    assert torch.allclose(out(x), m(x), atol=1e-6, rtol=0)
    assert count_params(out) == count_params(m)


def cnn1d_params(c1, c2, c3, h, cin=1, n=5, classes=10):
    return (cin * c1 * 5 + 2 * c1 + c1 * c2 * 5 + 2 * c2 + c2 * c3 * 5 + 2 * c3
            + c3 * n * h + h + h * classes + classes)


def test_cnn1d_pruned_counts():
    m = build_model("cnn1d")
    x = torch.randn(2, 1, 40)
    s = build_space(m, x)
    assert count_params(m) == cnn1d_params(32, 64, 64, 128)
    p = apply_policy(m, Policy({"features.0": 0.5, "features.3": 0.25, "features.6": 0.75, "fc1": 0.5}), x)
    assert [p.features[i].out_channels for i in (0, 3, 6)] == [16, 16, 48]
    assert p.fc1.in_features == 48 * 5 and p.fc1.out_features == 64 and p.fc.in_features == 64
    assert count_params(p) == cnn1d_params(16, 16, 48, 64)
    assert p(x).shape == (2, 10)
    assert s.group("fc1").units == 128


def resnet20_params(cin, a, b, c, inner, classes=10):
    """Stem a; stage widths a, b, c; inner[k] is block k's conv1 width (9 blocks)."""
    total = cin * a * 9 + 2 * a
    widths, prev = [a, b, c], a
    for st, w in enumerate(widths):
        for blk in range(3):
            m = inner[3 * st + blk]
            cin_blk = prev if blk == 0 else w
            total += cin_blk * m * 9 + 2 * m + m * w * 9 + 2 * w
            if blk == 0 and st > 0:
                total += cin_blk * w + 2 * w  # 1x1 projection shortcut + BN
        prev = w
    return total + c * classes + classes


def test_resnet20_pruned_counts_and_residuals():
    m = build_model("resnet20", (1, 16, 16))
    x = torch.randn(2, 1, 16, 16)
    assert count_params(m) == resnet20_params(1, 16, 32, 64, [16] * 3 + [32] * 3 + [64] * 3)
    s = build_space(m, x)
    keep = {g.name: 0.5 for g in s.groups}
    keep["layer3.2.conv1"] = 0.25
    p = apply_policy(m, Policy(keep), x)
    inner = [8] * 3 + [16] * 3 + [32, 32, 16]
    assert count_params(p) == resnet20_params(1, 8, 16, 32, inner)
    for stage, w in ((p.layer1, 8), (p.layer2, 16), (p.layer3, 32)):
        for blk in stage:  # every member of a residual sum has the same width
            assert blk.conv2.out_channels == blk.bn2.num_features == w
            if blk.downsample is not None:
                assert blk.downsample[0].out_channels == w
    assert p.conv1.out_channels == 8 and p.fc.in_features == 32 and p.fc.out_features == 10
    assert p(x).shape == (2, 10)


def mbv2_params(s, p, h1, r, h2, e, classes=10):
    return (3 * s * 9 + 2 * s
            + s * 9 + 2 * s + s * p + 2 * p
            + p * h1 + 2 * h1 + h1 * 9 + 2 * h1 + h1 * r + 2 * r
            + r * h2 + 2 * h2 + h2 * 9 + 2 * h2 + h2 * r + 2 * r
            + r * e + 2 * e + e * classes + classes)


def test_mobilenetv2_pruned_counts():
    m = MobileNetV2(3, 10, cfg=SMALL_MBV2, last_channel=64)
    x = torch.randn(2, 3, 16, 16)
    assert count_params(m) == mbv2_params(32, 16, 96, 24, 144, 64)
    s = build_space(m, x)
    p = apply_policy(m, uniform_policy(s, 0.5), x)
    # 32->16, 16->8, 96->48, 24->16 (12 rounds up to two multiples of 8), 144->72, 64->32
    assert count_params(p) == mbv2_params(16, 8, 48, 16, 72, 32)
    dw = p.features[2].conv[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 48
    assert p(x).shape == (2, 10)


def _kill_units(model, dead, state_readers=None):
    """Zero every weight that reads or writes the dead units of each recurrent layer (``state_readers``: layer ->
    modules reading its final state, one direction, besides the next layer or ``model.fc``)."""
    mods = dict(model.named_modules())
    names = sorted(dead)
    with torch.no_grad():
        for i, name in enumerate(names):
            rnn = mods[name]
            H, G = rnn.hidden_size, (4 if isinstance(rnn, nn.LSTM) else 3)
            D = 2 if rnn.bidirectional else 1
            rows = [g * H + u for g in range(G) for u in dead[name]]
            cols = [d * H + u for d in range(D) for u in dead[name]]
            for pname, p in rnn.named_parameters():
                p[rows] = 0
                if pname.startswith("weight_hh"):
                    p[:, dead[name]] = 0
            consumer = mods[names[i + 1]] if i + 1 < len(names) else model.fc
            for reader, idx in [(consumer, cols)] + [(m, dead[name]) for m in (state_readers or {}).get(name, [])]:
                for pname, p in reader.named_parameters():
                    if pname == "weight" or pname.startswith("weight_ih"):
                        p[:, idx] = 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("bi", [False, True])
def test_rnn_pruning_dead_units_preserves_function(cell, layers, bi):
    H = 12
    m = prepare_model(RNNClassifier(cell, 3, 5, hidden_size=H, num_layers=layers, bidirectional=bi)).eval()
    names = ["rnn"] if layers == 1 else [f"rnn.layers.{k}" for k in range(layers)]
    dead = {n: [(k + 1) % H, (k + 5) % H, (k + 9) % H] for k, n in enumerate(names)}
    _kill_units(m, dead)
    x = torch.randn(4, 7, 3)
    p = apply_policy(m, Policy({n: 9 / 12 for n in names}, channel_multiple=1), x).eval()
    assert torch.allclose(p(x), m(x), atol=1e-5, rtol=0)
    D = 2 if bi else 1
    mods = dict(p.named_modules())
    for k, n in enumerate(names):
        assert mods[n].hidden_size == 9
        assert mods[n].input_size == (3 if k == 0 else 9 * D)
    assert p.fc.in_features == 9 * D
    # the kept units are the live ones, with their weights untouched
    first = dict(m.named_modules())[names[0]]
    live = [u for u in range(H) if u not in dead[names[0]]]
    assert torch.equal(mods[names[0]].weight_hh_l0[:9], first.weight_hh_l0[live][:, live])


def test_l1_keeps_the_largest_channels():
    m = build_model("cnn1d").eval()
    x = torch.randn(2, 1, 40)
    with torch.no_grad():
        m.features[0].weight.mul_(0.01)
        m.features[0].weight[[3, 17, 30]] *= 1000.0  # clearly the largest outputs of conv 0
    p = apply_policy(m, Policy({"features.0": 3 / 32}, channel_multiple=1), x)
    assert torch.equal(p.features[0].weight, m.features[0].weight[[3, 17, 30]])
    assert torch.equal(p.features[3].weight, m.features[3].weight[:, [3, 17, 30]])


@pytest.mark.parametrize("importance", ["l2", "taylor", "activation"])
def test_other_importances_make_the_same_shapes(importance):
    m = build_model("gru", (10, 2), 4, {"hidden_size": 16, "num_layers": 2})
    x, y = torch.randn(8, 10, 2), torch.randint(0, 4, (8,))
    p = apply_policy(m, Policy({"rnn.layers.0": 0.5, "rnn.layers.1": 0.25}, channel_multiple=1), x,
                     importance=importance, batches=[(x, y)])
    assert [l.hidden_size for l in p.rnn.layers] == [8, 4] and p(x).shape == (8, 4)


@pytest.mark.parametrize("importance", ["l2", "taylor", "activation"])
def test_cnn_importances_choose_by_their_criterion(importance):
    m = build_model("cnn1d").eval()
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    with torch.no_grad():  # channels 5 and 9 of conv 0 dominate by weight, gradient and activation
        m.features[0].weight.mul_(0.01)
        m.features[0].weight[[5, 9]] *= 1000.0
    p = apply_policy(m, Policy({"features.0": 2 / 32}, channel_multiple=1), x, importance=importance,
                     batches=[(x, y)])
    assert torch.equal(p.features[0].weight, m.features[0].weight[[5, 9]])
