"""Precision regions: where casts go, that the deployed model runs exactly those, and how they are priced."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hwprune import Policy, build_model
from hwprune.apply.formats import apply_formats
from hwprune.device.deploy import deploy
from hwprune.device.kernels import RegionLayer, dtype_sources, plan_regions
from hwprune.latency import Entry, LatencyTable, Predictor, analyze_layers, get_target
from hwprune.latency.table import key_format
from hwprune.space import prepare_model, quant_layers

BF = torch.bfloat16


class CountCasts(TorchDispatchMode):
    """Counts the dtype conversions a forward pass really runs (aten._to_copy between float dtypes)."""

    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and "dtype" in kwargs and args[0].dtype != kwargs["dtype"]:
            self.casts.append((args[0].dtype, kwargs["dtype"], args[0].numel()))
        return out


def resnet():
    torch.manual_seed(0)
    m = build_model("resnet20", (1, 28, 28), 10).eval()
    for mod in m.modules():  # non-trivial BN statistics, so a wrong dtype in BN would show
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def plan_for(model, example, fmts):
    names = [q.name for q in quant_layers(model)]
    src = dtype_sources(model, example, names)
    return plan_regions({n: BF for n in fmts}, src), src


def test_resnet20_all_bf16_casts_only_at_the_ends():
    m, x = resnet(), torch.randn(4, 1, 28, 28)
    names = [q.name for q in quant_layers(m)]
    plan, src = plan_for(m, x, names)
    assert src.output == ("fc",) and len(src.followers) == 21  # 19 BN after the convs + 2 in the downsamples
    assert plan.cast_in == {"conv1": (torch.float32, BF)} and plan.cast_out == {"fc": (BF, torch.float32)}
    assert all(d == BF for d in plan.followers.values()) and len(plan.followers) == 21


def test_resnet20_one_fp32_conv_splits_regions_at_the_residual_adds():
    """All bf16 but layer2.0.conv2: by hand, casts at conv1 (in), layer2.0.conv2 (bf16->fp32), and every layer
    whose input mixes that fp32 block output with bf16 through the residual adds (torch promotes to fp32):
    layer2.1.conv1, layer2.2.conv1, layer3.0.conv1 and layer3.0.downsample.0 (fp32->bf16); fc out. 7 casts."""
    m, x = resnet(), torch.randn(4, 1, 28, 28)
    names = [q.name for q in quant_layers(m)]
    plan, _ = plan_for(m, x, [n for n in names if n != "layer2.0.conv2"])
    f32 = torch.float32
    assert plan.cast_in == {"conv1": (f32, BF), "layer2.0.conv2": (BF, f32), "layer2.1.conv1": (f32, BF),
                            "layer2.2.conv1": (f32, BF), "layer3.0.conv1": (f32, BF),
                            "layer3.0.downsample.0": (f32, BF)}
    assert plan.cast_out == {"fc": (BF, f32)} and plan.casts == 7
    assert "layer2.0.bn2" not in plan.followers and plan.followers["layer2.0.bn1"] == BF

    # the deployed model runs exactly these 7 casts, BN in its region's dtype, and computes what fp32 computes
    fmts = {n: "bf16" for n in names if n != "layer2.0.conv2"}
    dep, rep = deploy(apply_formats(copy.deepcopy(m), fmts), "cpu", x)
    assert rep.regions == "regions" and rep.casts == 7
    assert dep.layer2[0].bn1.weight.dtype == BF and dep.layer2[0].bn2.weight.dtype == torch.float32
    with torch.no_grad(), CountCasts() as cc:
        y = dep(x)
    assert len(cc.casts) == 7 and y.dtype == torch.float32
    ref = m(x).detach()
    assert float((y - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_islands_without_an_example_cast_twice_per_layer():
    m, x = resnet(), torch.randn(2, 1, 28, 28)
    fmts = {"layer1.0.conv1": "bf16", "layer1.0.conv2": "bf16"}
    dep, rep = deploy(apply_formats(copy.deepcopy(m), fmts), "cpu")
    assert rep.regions.startswith("islands") and rep.casts == 4
    with torch.no_grad(), CountCasts() as cc:
        dep(x)
    assert len(cc.casts) == 4
    # with the graph: the two convs (and bn1, bn2 between/after them) form one region, cast in once; the
    # residual add then reads the bf16 branch and the fp32 shortcut and writes fp32 (promotion, no cast kernel)
    dep2, rep2 = deploy(apply_formats(copy.deepcopy(m), fmts), "cpu", x)
    with torch.no_grad(), CountCasts() as cc2:
        dep2(x)
    assert rep2.casts == len(cc2.casts) == 1 and cc2.casts[0][:2] == (torch.float32, BF)
    assert dep2.layer1[0].bn2.weight.dtype == BF


def test_two_layer_gru_region_and_fp32_classifier():
    m = build_model("gru", (12, 3), 4, {"num_layers": 2, "hidden_size": 16}).eval()
    prepare_model(m)
    x = torch.randn(3, 12, 3)
    plan, src = plan_for(m, x, ["rnn.layers.0", "rnn.layers.1"])
    assert src.inputs["rnn.layers.1"] == ("rnn.layers.0",) and src.inputs["fc"] == ("rnn.layers.1",)
    assert plan.cast_in == {"rnn.layers.0": (torch.float32, BF), "fc": (BF, torch.float32)} and not plan.cast_out
    dep, rep = deploy(apply_formats(copy.deepcopy(m), {"rnn.layers.0": "bf16", "rnn.layers.1": "bf16"}), "cpu", x)
    assert isinstance(dep.rnn.layers[1], RegionLayer) and dep.rnn.layers[1].out_dtype is None
    with torch.no_grad(), CountCasts() as cc:
        y = dep(x)
    assert len(cc.casts) == 2 and y.dtype == torch.float32


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def hand_table(casts="regions"):
    rows = {"linear|i4|o16|x-|b2|bias|fp32|+relu": 10.0, "linear|i4|o16|x-|b2|bias|bf16|+relu": 6.0,
            "linear|i16|o3|x-|b2|bias|fp32": 5.0, "linear|i16|o3|x-|b2|bias|bf16": 4.0,
            "cast|fp32>bf16|n4|b2": 0.5, "cast|bf16>fp32|n16|b2": 0.75, "cast|bf16>fp32|n3|b2": 0.25}
    fp = get_target("cpu", threads=1).fingerprint()
    return LatencyTable(fp, 2, {k: Entry(v, v / 10, 5) for k, v in rows.items()}, casts=casts)


@pytest.mark.parametrize("formats,expected", [
    ({}, 10.0 + 5.0),
    ({"0": "bf16"}, 0.5 + 6.0 + 0.75 + 5.0),  # cast in, bf16 layer, cast back before the fp32 layer
    ({"0": "bf16", "2": "bf16"}, 0.5 + 6.0 + 4.0 + 0.25),  # one region: cast in, cast the output back
    ({"2": "bf16"}, 10.0 + 0.0 + 4.0 + 0.25),  # the fp32->bf16 cast at n16 is not in the table: see below
])
def test_transitions_priced_from_cast_entries(formats, expected):
    layers = analyze_layers(mlp(), torch.randn(2, 4))
    table = hand_table()
    pol = Policy({}, formats, 1)
    if formats == {"2": "bf16"}:
        with pytest.raises(Exception, match=r"fp32->bf16 cast at layer '2'.*cast\|fp32>bf16\|n16\|b2"):
            Predictor(table, layers, "k").price(pol)
        # --allow-missing: the nearest measured size of the same pair (n4: 0.5 us), scaled by 16/4
        p = Predictor(table, layers, "k", allow_missing=True).price(pol)
        assert p.layer_sum_us == pytest.approx(expected + 0.5 * 16 / 4)
        assert p.estimated == ["cast|fp32>bf16|n16|b2"]
        return
    p = Predictor(table, layers, "k").price(pol, by_layer=True)
    assert p.layer_sum_us == pytest.approx(expected)
    # an older islands table's bf16 entries include their casts: nothing is added
    old = Predictor(hand_table("islands"), layers, "k").price(pol)
    assert old.layer_sum_us == pytest.approx(sum(
        {"0": {"fp32": 10.0, "bf16": 6.0}, "2": {"fp32": 5.0, "bf16": 4.0}}[n][formats.get(n, "fp32")] for n in "02"))


def test_islands_table_is_upgraded_before_profiling_into_it(tmp_path):
    t = hand_table("islands")
    t.models["k"] = {"calibration": [{"policy": Policy({}, {"0": "bf16"}, 1).to_dict(), "measured_us": 9.0},
                                     {"policy": Policy({}, {}, 1).to_dict(), "measured_us": 15.0}]}
    t.save(tmp_path / "b2.json")
    back = LatencyTable.load(tmp_path / "b2.json")
    assert back.casts == "islands"
    assert back.upgrade_casts() == 2  # the two bf16 layer entries go; casts, fp32 entries and fp32 calibration stay
    assert sorted(key_format(k) for k in back.entries if not k.startswith("cast")) == ["fp32", "fp32"]
    assert [s["measured_us"] for s in back.models["k"]["calibration"]] == [15.0]
    new = hand_table("regions")
    new.save(tmp_path / "c.json")
    t.save(tmp_path / "c.json")  # an islands writer merging into a regions file: its bf16 timings do not enter
    assert LatencyTable.load(tmp_path / "c.json").entries["linear|i4|o16|x-|b2|bias|bf16|+relu"].median_us == 6.0


class MatmulAfter(nn.Module):
    """A forward with a raw fp32 matmul after a layer: a bf16 activation would not multiply with it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.w = nn.Parameter(torch.randn(5, 3))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.fc(x) @ self.w)


def test_a_model_that_cannot_run_regions_falls_back_to_islands_and_says_why():
    m, x = MatmulAfter().eval(), torch.randn(4, 6)
    dep, rep = deploy(apply_formats(copy.deepcopy(m), {"fc": "bf16", "out": "bf16"}), "cpu", x)
    assert rep.regions.startswith("islands (the model does not run with regions:") and rep.casts == 4
    assert dep(x).dtype == torch.float32
    assert float((dep(x) - m(x)).abs().max()) < 0.05 * float(m(x).abs().max())


class InPlaceInput(nn.Module):
    """Changes its input in place: a forward that would fail if the input required grad."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        x.mul_(0.5)
        return self.b(torch.relu(self.a(x)))


def test_the_graph_comes_from_the_parameters_so_in_place_input_changes_still_plan():
    m = InPlaceInput().eval()
    src = dtype_sources(m, torch.randn(2, 6), ["a", "b"])
    assert src is not None and src.inputs == {"a": (), "b": ("a",)} and src.output == ("b",)
    assert all(p.requires_grad for p in m.parameters())  # restored
    dep, rep = deploy(apply_formats(copy.deepcopy(m), {"a": "bf16", "b": "bf16"}), "cpu", torch.randn(2, 6))
    assert rep.regions == "regions" and rep.casts == 2


class InPlaceResidual(nn.Module):
    """torchvision's residual: ``result = block(x); result += x``. In place, the sum keeps the block's dtype."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        r = self.b(h)
        r += h
        return self.c(r)


def test_an_in_place_sum_keeps_its_first_operands_dtype_so_the_next_layer_casts():
    m, x = InPlaceResidual().eval(), torch.randn(4, 6)
    src = dtype_sources(m, x, ["a", "b", "c"])
    assert src is not None and src.inputs == {"a": (), "b": ("a",), "c": ("b",)}  # not ("a", "b"): r += h is b's
    dep, rep = deploy(apply_formats(copy.deepcopy(m), {"b": "bf16"}), "cpu", x)
    assert rep.regions == "regions" and rep.casts == 2  # into b, and out of it before c
    assert float((dep(x) - m(x)).abs().max()) < 0.05 * float(m(x).abs().max())
