"""Depth: blocks dropped whole, with hand-worked shapes, the rest of the model's function preserved, and prices
that follow the model without them."""
import json

import pytest
import torch
from torch import nn

from hwprune import Policy, apply_policy, build_model, build_space, prepare_model
from hwprune.errors import HwpruneError
from hwprune.latency.layers import analyze_layers
from test_search import tables  # noqa: F401 - the fixture is used by name


class Block(nn.Module):
    """A residual block with an identity shortcut (or, with ``stride`` 2, a projection: not droppable)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (self.proj(x) if self.proj is not None else x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stage1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.stage2 = nn.Sequential(Block(8, 16, stride=2), Block(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stage2(self.stage1(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _randomized(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_only_blocks_that_keep_their_input_shape_are_offered():
    m = _randomized(Tiny())
    space = build_space(m, torch.randn(2, 3, 8, 8))
    assert [(b.name, b.kind) for b in space.blocks] == [("stage1.0", "block"), ("stage1.1", "block"),
                                                        ("stage2.1", "block")]
    assert space.blocks[0].layers == ("stage1.0.conv1", "stage1.0.conv2")
    # stage2.0 (a stride-2 projection shortcut: its output is not its input's shape) is never offered
    assert "stage2.0" not in {b.name for b in space.blocks}
    assert space.to_dict()["blocks"][2] == {"name": "stage2.1", "kind": "block",
                                            "layers": ("stage2.1.conv1", "stage2.1.conv2")}
    bare = build_space(m, torch.randn(2, 3, 8, 8), blocks=False)  # the same groups, no block checked
    assert bare.blocks == [] and bare.groups == space.groups and bare.layers == space.layers


def test_a_dropped_residual_block_leaves_the_rest_of_the_model_as_it_was():
    m = _randomized(Tiny())
    x = torch.randn(3, 3, 8, 8)
    out = apply_policy(m, Policy(drop=("stage1.1",)), x).eval()
    assert isinstance(out.stage1[1], nn.Identity)
    with torch.no_grad():  # by hand: the dense model's modules with stage1.1 skipped
        want = m.fc(m.stage2(m.stage1[0](torch.relu(m.stem(x)))).mean((2, 3)))
        assert torch.allclose(out(x), want, atol=1e-6)
    n_dense = sum(p.numel() for p in m.parameters())
    block = 2 * 8 * 8 * 9 + 4 * 8  # two 3x3 convs 8->8 without bias, two BatchNorms
    assert sum(p.numel() for p in out.parameters()) == n_dense - block


def test_drop_and_width_pruning_together_hand_worked_shapes_and_prices_follow():
    """stage1.0 dropped, every group at half: the stem and the stream keep 4 channels, the remaining blocks' inner
    convs 4 (stage1.1) and 8 of 16 (stage2); the layer forms the predictor prices give the same dims."""
    m = _randomized(Tiny())
    x = torch.randn(2, 3, 8, 8)
    space = build_space(m, x)
    pol = Policy({g.name: 0.5 for g in space.groups}, {}, channel_multiple=1, drop=("stage1.0",))
    out = apply_policy(m, pol, x).eval()
    assert out.stem.out_channels == 4 and out.stage1[1].conv1.in_channels == 4
    assert out.stage1[1].conv1.out_channels == 4 and out.stage2[0].conv1.out_channels == 8
    assert out.fc.in_features == 8 and tuple(out(x).shape) == (2, 5)
    widths = pol.widths(space)  # what export and apply report: a group inside the dropped block has none
    assert widths["stage1.0.conv1"] == 0 and widths["stage1.1.conv1"] == 4 and widths["stage2.0.conv1"] == 8
    layers = analyze_layers(m, x, [], 1)
    got = dict(layers.configs(pol, 2))
    assert "stage1.0.conv1" not in got and "stage1.0.conv2" not in got and len(got) == len(layers.layers) - 2
    mods = dict(out.named_modules())
    for name, cfg in got.items():
        mod = mods[name]
        assert (cfg.cin, cfg.cout) == ((mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d)
                                       else (mod.in_features, mod.out_features)), name


def test_a_dropped_rnn_layer_feeds_the_next_layer_with_the_previous_ones_output():
    """A 3-layer LSTM (hidden 16): layer 1 dropped, layer 2 reads layer 0's output; by hand, the same as running
    the dense model's layers 0 and 2 in a row. With layer 0 at half width, layer 2's input is 8 (and the
    predictor's forms say so)."""
    m = build_model("lstm", (12, 4), 10, {"num_layers": 3, "hidden_size": 16}).eval()
    x = torch.randn(3, 12, 4)
    space = build_space(m, x)
    assert [(b.name, b.kind) for b in space.blocks] == [("rnn.layers.1", "rnn-layer"), ("rnn.layers.2", "rnn-layer")]
    out = apply_policy(m, Policy(drop=("rnn.layers.1",)), x).eval()
    assert out.rnn.num_layers == 2 and len(out.rnn.layers) == 3  # the place is kept: names stay stable
    dense = prepare_model(m)
    with torch.no_grad():
        h, _ = dense.rnn.layers[0](x)
        h, _ = dense.rnn.layers[2](h)
        assert torch.allclose(out.rnn(x)[0], h, atol=1e-6)
        assert tuple(out(x).shape) == (3, 10)
    pol = Policy({"rnn.layers.0": 0.5}, {}, channel_multiple=1, drop=("rnn.layers.1",))
    cut = apply_policy(m, pol, x).eval()
    assert cut.rnn.layers[0].hidden_size == 8 and cut.rnn.layers[2].input_size == 8
    assert tuple(cut(x).shape) == (3, 10)
    got = dict(analyze_layers(m, x, [], 1).configs(pol, 3))
    assert (got["rnn.layers.2"].cin, got["rnn.layers.2"].cout) == (8, 16) and "rnn.layers.1" not in got


def test_a_model_that_counts_its_layers_is_not_offered_a_drop():
    class Counts(nn.Module):  # reads the final state as exactly 3 layers: dropping one breaks it
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(8, 8, num_layers=3, batch_first=True)
            self.fc = nn.Linear(24, 4)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.fc(h.transpose(0, 1).reshape(x.shape[0], 24))

    m = Counts().eval()
    assert build_space(m, torch.randn(2, 5, 8)).blocks == []


def test_drop_in_a_policy_file_round_trips_and_bad_names_are_one_line_errors(tmp_path):
    pol = Policy({"stem": 0.5}, {}, 8, drop=("stage1.1", "stage1.0", "stage1.1"))
    assert pol.drop == ("stage1.0", "stage1.1")
    d = pol.to_dict()
    assert d["drop"] == ["stage1.0", "stage1.1"] and Policy.from_dict(json.loads(json.dumps(d))) == pol
    assert "drop" not in Policy({"stem": 0.5}).to_dict()  # policies without depth are written as before
    with pytest.raises(HwpruneError, match="'drop' must be a list"):
        Policy.from_dict({**d, "drop": "stage1.0"})
    m = _randomized(Tiny())
    space = build_space(m, torch.randn(2, 3, 8, 8))
    with pytest.raises(HwpruneError, match=r"drops block 'stage2.0', which the model cannot drop \(droppable"):
        Policy(drop=("stage2.0",)).validate(space)


def test_the_refusal_paragraph_says_what_reaches_the_budget_from_measured_numbers():
    from hwprune.search.floor import WayOut, floor_paragraph

    w = WayOut("eager", 1, 0.30, floor=0.41, depth=0.27, blocks=7, rounds=7,
               runtimes={"compile": {"not_measured": "compiling takes minutes"},
                         "onnxruntime": {"dense": 0.52, "smallest": 0.22},
                         "openvino": {"not_measured": "the openvino runtime needs the Python package 'openvino'"}},
               batches=[(2, 0.36), (4, 0.29), (8, 0.2)])
    text = floor_paragraph(w)
    assert "\n" not in text and text.startswith("What would reach the budget (30% of the dense model in eager at "
                                                 "batch 1)")
    assert "the smallest policy runs 41%" in text
    assert "with all 7 droppable block(s) dropped as well (search with --depth) 27% -- within the budget" in text
    assert ("onnxruntime: dense 52%, smallest policy with its blocks dropped (fp32) 22% -- within the budget "
            "(--runtime onnxruntime)") in text
    assert "compile: not measured (compiling takes minutes)" in text
    assert "at batch 4 the smallest policy with its blocks dropped takes 29% of the dense model's time per item at " \
        "batch 1, within the budget per item (--batch-size 4)" in text
    none = floor_paragraph(WayOut("eager", 16, 0.10, floor=0.6, blocks=0, rounds=7, batches=[(32, 0.5), (256, 0.4)]))
    assert "depth: no block of this model can be dropped" in none
    assert "no batch up to 256 brings the smallest policy within the budget per item (40% at batch 256)" in none
    assert "within the budget" not in none.replace("within the budget per item (40%", "")


def test_a_search_with_depth_reaches_a_budget_below_the_floor_of_channel_pruning(tables, tmp_path):  # noqa: F811
    """mlp3 at batch 4 on the synthetic table (entries MACs/100 + 1 us, int8 0.6 times fp32's work): its smallest
    widths price 22% of dense in int8, so 15% is refused without depth; with --depth its middle Linear (32 -> 32, a shape-keeping child of its
    Sequential) may go, and every point the search reports fits the limit, the best one without that layer."""
    from conftest import run_cli
    from test_search import DATA, MLP3

    args = ("search", "--model", MLP3, "--data", DATA, "--target", "cpu", "--budget", "15%", "--batch-size", "4",
            "--tables", str(tables), "--finetune-steps", "3", "--json", "--finish", "0")  # priced, not timed: 15% of a
    env = {"HWPRUNE_CACHE": str(tmp_path / "cache")}  # launch-bound tiny MLP is never met as measured
    flat = run_cli(*args, "--no-way-out", "--trials", "2", "--out", str(tmp_path / "flat"), env=env)
    assert flat.returncode == 2, flat.stderr[-3000:]
    assert "cannot be met" in flat.stderr and "22% of the dense" in flat.stderr
    deep = run_cli(*args, "--depth", "--trials", "4", "--out", str(tmp_path / "deep"), env=env)
    assert deep.returncode == 0, deep.stderr
    s = json.loads(deep.stdout)
    assert "depth: 1 block(s) may be dropped (2)" in deep.stderr
    assert s["pareto"] and all(p["predicted_latency_ms"] <= s["limit_ms"] + 1e-9 for p in s["pareto"])
    best = json.loads((tmp_path / "deep" / "best_policy.json").read_text())
    assert best.get("drop") == ["2"] and s["best"]["predicted_latency_ms"] <= s["limit_ms"] + 1e-9
    run = json.loads((tmp_path / "deep" / "run.json").read_text())
    assert run["identity"]["depth"] is True
    exp = run_cli("export", str(tmp_path / "deep"), "--trial", "best", "--finetune-steps", "2", "--repeats", "3",
                  "--trust-code", "--json", env=env)
    assert exp.returncode == 0, exp.stderr


def test_the_paragraph_of_a_search_with_depth_does_not_offer_depth_again():
    from hwprune.search.floor import WayOut, floor_paragraph

    text = floor_paragraph(WayOut("eager", 1, 0.2, floor=0.27, blocks=2, rounds=7, searched_depth=True))
    assert "the smallest policy (its blocks dropped: --depth) runs 27%" in text and "search with --depth" not in text


def test_inspect_lists_the_droppable_blocks_and_apply_drops_them(tmp_path, capsys):
    from hwprune.cli import main
    from test_search import MLP3

    assert main(["inspect", "--model", MLP3, "--input-shape", "4"]) == 0
    out = capsys.readouterr().out
    assert "1 droppable blocks (depth; 'drop' in a policy, --drop in apply): 2 (block: 2)" in out
    assert main(["apply", "--model", MLP3, "--input-shape", "4", "--uniform", "1.0", "--drop", "2",
                 "--out", str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", MLP3, "--input-shape", "4", "--uniform", "1.0", "--drop", "0",
                 "--out", str(tmp_path / "x.pt")]) == 2  # Linear(4, 32) changes the width: not droppable
    assert "policy drops block '0', which the model cannot drop (droppable blocks: 2)" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_both_export_schedules_end_in_the_structure_load_pruned_rebuilds(schedule):
    """The gradual schedule drops the blocks first and cuts the widths in stages: it ends in the same modules and
    shapes as pruning the dense model once (what load_pruned rebuilds the artifact on)."""
    from torch.utils.data import TensorDataset

    from hwprune.apply import prune_model
    from hwprune.export import finetune_policy

    m = _randomized(Tiny())
    x = torch.randn(8, 3, 8, 8)
    train = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,)))
    space = build_space(m, x)
    pol = Policy({g.name: 0.5 for g in space.groups}, {}, channel_multiple=1, drop=("stage1.1", "stage2.1"))
    got = finetune_policy(m, pol, x, train, 4, schedule=schedule, stages=2, batch_size=8)
    want = prune_model(m, pol, x)
    assert {k: tuple(v.shape) for k, v in got.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in want.state_dict().items()}
    assert isinstance(got.stage1[1], nn.Identity) and isinstance(got.stage2[1], nn.Identity)
