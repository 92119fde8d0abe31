"""Fused blocks: which operators join a layer's epilogue, how they rebuild, and how tables key and price them."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwprune.device.kernels import RegionLayer
from hwprune.latency import LatencyTable, Predictor, analyze_layers, get_target
from hwprune.latency.epilogue import build_epilogue, trace_epilogues
from hwprune.latency.layers import LayerConfig
from hwprune.latency.profiler import build_block, layer_configs
from hwprune.latency.table import Entry
from hwprune.models import build_model
from hwprune.policy import Policy


def _posts(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[str, ...]]:
    layers = analyze_layers(model, example)
    return {f.name: f.base.post for f in layers.layers}


def test_builtin_epilogues_stop_at_merges_and_the_output():
    posts = _posts(build_model("resnet20", (3, 32, 32)), torch.randn(2, 3, 32, 32))
    assert posts["conv1"] == ("bn", "relu")
    assert posts["layer1.0.conv1"] == ("bn", "relu")
    assert posts["layer1.0.conv2"] == ("bn", "add", "relu")  # the identity shortcut's sum, then the block's ReLU
    # with a downsample shortcut the sum is the shortcut's (it arrives last): each sum is in one block only
    assert posts["layer2.0.conv2"] == ("bn",)
    assert posts["layer2.0.downsample.0"] == ("bn", "add", "relu")
    assert posts["layer3.2.conv2"] == ("bn", "add", "relu", "aavgpool.o1x1")  # the pool's flatten is a view
    assert posts["fc"] == ()  # feeds the output
    posts = _posts(build_model("cnn1d", (1, 40)), torch.randn(2, 1, 40))
    assert posts == {"features.0": ("bn", "relu"), "features.3": ("bn", "relu"), "features.6": ("bn", "relu"),
                     "fc1": ("relu",), "fc": ()}
    posts = _posts(build_model("mobilenetv2", (3, 32, 32)), torch.randn(2, 3, 32, 32))
    assert posts["features.18.0"] == ("bn", "relu6", "aavgpool.o1x1")  # the flatten after the pool is a view
    assert posts["features.1.conv.3"] == ("bn",)
    assert posts["features.3.conv.6"] == ("bn", "add")  # x + conv(x): the inverted residual
    assert posts["features.2.conv.6"] == ("bn",)  # no shortcut (stride 2)
    assert sum(p.count("add") for p in posts.values()) == 10


class Functional(nn.Module):
    """Functional ops, in-place ops, a branch with two consumers, a PReLU and eval dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.act = nn.PReLU(8)
        self.fc = nn.Linear(8 * 2 * 2, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = F.max_pool2d(F.relu(self.bn(self.a(x)), inplace=True), 2)  # functional relu + pool
        if x.shape[-1] > 1:  # data-independent control flow: the path taken is traced
            y = self.b(x).relu_()
        y = F.avg_pool2d(y, kernel_size=2, stride=2)
        z = self.c(y)  # z has two consumers: no epilogue
        z = z + torch.sigmoid(z)
        w = self.act(self.d(z))  # PReLU is not in the vocabulary: ends the chain
        w = F.adaptive_avg_pool2d(w, 2)
        h = F.dropout(torch.flatten(self.fc(torch.flatten(w, 1)), 1), 0.5, training=self.training)
        return self.head(torch.tanh(h))


def test_functional_and_inplace_ops_and_chain_ends():
    posts = _posts(Functional(), torch.randn(2, 3, 16, 16))
    assert posts["a"] == ("bn", "relu", "maxpool.k2x2.s2x2.p0x0")
    assert posts["b"] == ("relu", "avgpool.k2x2.s2x2.p0x0")
    assert posts["c"] == ()
    assert posts["d"] == ()
    assert posts["fc"] == ("tanh",)  # flatten and eval dropout pass through
    assert posts["head"] == ()


class TwoBranches(nn.Module):
    """Two convs summed in place, a sum with a broadcast operand, and a sum of a tensor with itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.bias = nn.Parameter(torch.zeros(8, 1, 1))

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.a(x)
        y += self.b(x)  # in place; b's output arrives last: b's block holds the sum
        y = torch.relu(y)
        z = self.c(y) + self.bias  # broadcast (8,1,1): not a residual sum
        w = self.d(z)
        return w + w  # one tensor twice: not a residual sum


def test_a_residual_sum_joins_the_branch_that_arrives_last_and_only_same_shape_sums():
    posts = _posts(TwoBranches(), torch.randn(2, 4, 8, 8))
    assert posts == {"a": (), "b": ("add", "relu"), "c": (), "d": ()}


def test_a_rebuilt_residual_adds_a_fixed_operand_made_before_timing():
    from hwprune.latency.epilogue import Residual

    target = get_target("cpu")
    cfg = LayerConfig("conv2d", 8, 8, 2, kernel=(3, 3), stride=(1, 1), padding=(1, 1), extent=(6, 6),
                      post=("bn", "add", "relu"))
    mod, x = build_block(cfg, target)
    res = mod[1][1]
    assert isinstance(res, Residual) and res.other is not None and res.other.shape == (2, 8, 6, 6)
    other = res.other.clone()
    with torch.no_grad():
        y = mod(x)
        want = torch.relu(mod[1][0](mod[0](x)) + other)
    assert torch.equal(y, want) and torch.equal(res.other, other)  # the operand stays what it was
    assert LayerConfig.from_key(cfg.key) == cfg


def test_a_layer_called_twice_and_a_failing_trace_get_no_epilogue():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return torch.relu(self.fc(torch.relu(self.fc(x))))

    m = Shared()
    assert trace_epilogues(m, torch.randn(2, 8), {"fc": "linear"}, {"fc": 8}) == {"fc": ()}

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):  # type: ignore[no-untyped-def]
            raise RuntimeError("no")

    assert trace_epilogues(Broken(), torch.randn(2, 8), {"fc": "linear"}, {"fc": 8}) is None


def test_batchnorm_joins_only_over_the_layers_channels():
    class PerStep(nn.Module):
        """A Linear over (N, T, C) then a BatchNorm1d over T == C by coincidence: not the layer's channels."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.head(torch.relu(self.bn(self.fc(x))))

    assert trace_epilogues(PerStep(), torch.randn(2, 6, 4), {"fc": "linear", "head": "linear"},
                           {"fc": 6, "head": 2}) == {"fc": (), "head": ()}
    flat = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    assert trace_epilogues(flat, torch.randn(2, 4), {"0": "linear", "3": "linear"},
                           {"0": 6, "3": 2}) == {"0": ("bn", "relu"), "3": ()}


def test_rebuilt_epilogue_computes_what_the_model_computes():
    torch.manual_seed(0)
    m = Functional().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    epi = build_epilogue(("bn", "relu", "maxpool.k2x2.s2x2.p0x0"), "conv2d", 8)
    epi[0].load_state_dict(m.bn.state_dict())
    with torch.no_grad():
        want = F.max_pool2d(F.relu(m.bn(m.a(x))), 2)
        got = epi(m.a(x))
    assert got.shape == (2, 8, 8, 8)
    assert torch.equal(got, want)
    one_d = build_epilogue(("bn", "gelu", "avgpool.k3.s2.p1", "aavgpool.o5"), "conv1d", 6)
    assert isinstance(one_d[0], nn.BatchNorm1d) and one_d[0].num_features == 6
    assert one_d(torch.randn(2, 6, 40)).shape == (2, 6, 5)
    with pytest.raises(ValueError, match="unknown epilogue"):
        build_epilogue(("softmax",), "linear", 4)


def test_block_keys_round_trip_and_differ_from_bare_layers():
    cfg = LayerConfig("conv2d", 8, 16, 4, kernel=(3, 3), stride=(1, 1), padding=(1, 1), extent=(8, 8),
                      post=("bn", "relu", "maxpool.k2x2.s2x2.p0x0"))
    assert cfg.key.endswith("|fp32|+bn+relu+maxpool.k2x2.s2x2.p0x0")
    assert LayerConfig.from_key(cfg.key) == cfg
    assert cfg.bare().key == cfg.key.rsplit("|", 1)[0]
    assert LayerConfig.from_key(cfg.bare().key) == cfg.bare()


def test_block_runs_epilogue_in_the_layers_output_dtype():
    target = get_target("cpu")
    cfg = LayerConfig("conv2d", 8, 16, 2, fmt="bf16", kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                      extent=(8, 8), post=("bn", "relu", "maxpool.k2x2.s2x2.p0x0"))
    mod, x = build_block(cfg, target)
    assert isinstance(mod[0], RegionLayer) and x.dtype == torch.bfloat16
    assert mod[1][0].weight.dtype == torch.bfloat16  # the BatchNorm runs in the region's dtype
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 16, 4, 4)
    bare, _ = build_block(cfg.bare(), target)
    assert isinstance(bare, RegionLayer)


def _table(layers, fused: bool, calibrated: bool, blocks: str | None = None) -> LatencyTable:  # type: ignore[no-untyped-def]
    fp = {"target": "cpu"}
    entries = {}
    for _, c in layers.configs(Policy({}), 4, fused):
        entries[c.key] = Entry(100.0 if c.post else 10.0, 1.0, 3)
    t = LatencyTable(fp, 4, entries)
    if calibrated or blocks:
        t.models["m"] = {"grid": [1.0]}
    if calibrated:
        t.models["m"]["calibration"] = [{"policy": Policy({}).to_dict(), "measured_us": 500.0}]
    if blocks:
        t.models["m"]["blocks"] = blocks
    return t


def test_tables_price_blocks_for_new_models_and_bare_layers_for_older_ones():
    model = build_model("cnn1d", (1, 40))
    layers = analyze_layers(model, torch.randn(2, 1, 40))
    assert sum(1 for f in layers.layers if f.base.post) == 4
    # a model calibrated before blocks (no 'blocks' field): its bare-layer entries are what prices it
    old = _table(layers, fused=False, calibrated=True)
    assert not old.fused("m")
    assert Predictor(old, layers, "m").price(Policy({})).layer_sum_us == pytest.approx(50.0)
    # profiled since blocks: block entries (100 us each here) for the four layers with an epilogue
    new = _table(layers, fused=True, calibrated=True, blocks="fused")
    assert new.fused("m") and new.fused("not profiled yet")
    assert Predictor(new, layers, "m").price(Policy({})).layer_sum_us == pytest.approx(4 * 100.0 + 10.0)
    # an explicit 'layers' stamp is honoured before calibration (how a bare-layer table is profiled)
    assert not _table(layers, fused=False, calibrated=False, blocks="layers").fused("m")
    # the profiler measures block keys for a new model and bare keys for an older one
    target = get_target("cpu")
    fused_keys = {c.key for c in layer_configs(layers, (0.5, 1.0), target, 4, fused=True)}
    bare_keys = {c.key for c in layer_configs(layers, (0.5, 1.0), target, 4, fused=False)}
    assert any(k.endswith("+bn+relu") for k in fused_keys)
    assert not any("+" in k.rsplit("|", 1)[-1] for k in bare_keys if not k.startswith("cast"))
    assert len(fused_keys) == len(bare_keys)


def test_table_refuses_an_unknown_blocks_value(tmp_path):
    import json

    from hwprune.errors import HwpruneError

    t = LatencyTable({"target": "cpu"}, 4, path=tmp_path / "t.json")
    t.models["m"] = {"grid": [1.0], "blocks": "fused"}
    t.save()
    data = json.loads((tmp_path / "t.json").read_text())
    data["models"]["m"]["blocks"] = "kernels"
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(HwpruneError, match="blocks 'kernels'; expected 'fused' or 'layers'"):
        LatencyTable.load(tmp_path / "t.json")


def test_blocks_measure_the_epilogue_cost():
    """A block with a BatchNorm + ReLU epilogue takes longer than its bare layer (the work the bare table missed).
    Both are timed in the same interleaved rounds, so a machine slowing down meanwhile slows both alike (timed one
    after the other, a loaded machine once measured the block at 1.13x its bare layer)."""
    from hwprune.latency.profiler import measure_rounds, prepare_config, round_plan

    target = get_target("cpu")
    target.setup()
    cfg = LayerConfig("conv1d", 8, 8, 64, kernel=(1,), stride=(1,), padding=(0,), extent=(512,),
                      post=("bn", "relu", "bn", "relu"))
    res = measure_rounds({"bare": lambda: prepare_config(cfg.bare(), target)[0],
                          "block": lambda: prepare_config(cfg, target)[0]}, target, round_plan(15))
    bare, block = res.timing("bare").median_us, res.timing("block").median_us
    print(f"bare {bare:.1f} us, block {block:.1f} us: {block / bare:.2f}x")
    assert block > 1.2 * bare
