"""Final-state heads: models that read h_n / (h_n, c_n) are pruned consistently, or refused in words."""
import json

import pytest
import torch
from torch import nn

from conftest import ASSETS, run_cli
from test_prune import _kill_units
from hwprune import HwpruneError, Policy
from hwprune.apply import apply_policy
from hwprune.space import build_space, prepare_model


class StateHeads(nn.Module):
    """out, (h, c) = lstm(x): a head on h_n of the last layer and one on c_n of the first layer."""

    def __init__(self, layers=2, cell="lstm"):
        super().__init__()
        self.cell = cell
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(3, 12, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(12, 5)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        out, state = self.rnn(x)
        h, c = state if self.cell == "lstm" else (state, state)
        return self.fc(torch.relu(h[-1])) + self.fc2(c[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_heads_are_groups_and_dead_units_prune_without_changing_outputs(cell):
    m = prepare_model(StateHeads(2, cell)).eval()
    x = torch.randn(4, 7, 3)
    space = build_space(m, x)
    layers = {g.name: set(g.layers) for g in space.groups}
    assert layers == {"rnn.layers.0": {"rnn.layers.0", "rnn.layers.1", "fc2"},
                      "rnn.layers.1": {"rnn.layers.1", "fc"}}
    dead = {"rnn.layers.0": [1, 5, 9, 10], "rnn.layers.1": [0, 3, 4, 11]}
    _kill_units(m, dead, {"rnn.layers.0": [m.fc2]})  # h_n[-1] -> fc (the last layer's reader), c_n[0] -> fc2
    p = apply_policy(m, Policy({"rnn.layers.0": 8 / 12, "rnn.layers.1": 8 / 12}, channel_multiple=1), x).eval()
    assert [l.hidden_size for l in p.rnn.layers] == [8, 8] and p.fc.in_features == p.fc2.in_features == 8
    assert torch.allclose(p(x), m(x), atol=1e-5, rtol=0)
    # different sizes per layer: h_n becomes one (batch, hidden) tensor per layer, and h[-1] / c[0] still read
    # the last / first layer
    q = apply_policy(m, Policy({"rnn.layers.0": 8 / 12, "rnn.layers.1": 10 / 12}, channel_multiple=1), x).eval()
    assert [l.hidden_size for l in q.rnn.layers] == [8, 10] and q(x).shape == (4, 5)


def test_single_layer_gru_hn_head_through_the_cli(tmp_path):
    model, data = f"{ASSETS / 'user_model.py'}:gru_hn", f"{ASSETS / 'user_model.py'}:make_seq_data"
    ins = run_cli("inspect", "--model", model, "--data", data, "--json")
    assert ins.returncode == 0, ins.stderr
    assert [(g["name"], g["layers"]) for g in json.loads(ins.stdout)["groups"]] == [("rnn", ["rnn", "fc"])]
    ap = run_cli("apply", "--model", model, "--data", data, "--uniform", "0.5", "--json")
    assert ap.returncode == 0, ap.stderr
    s = json.loads(ap.stdout)
    # GRU 1->16 and fc 16->3 at 8 units: 3*(8*1 + 8*8 + 2*8) + (8*3 + 3)
    assert s["params_after"] == 3 * (8 + 64 + 16) + 27
    nothing = run_cli("apply", "--model", model, "--data", data, "--uniform", "0.5", "--exclude", "rnn")
    assert nothing.returncode == 2 and nothing.stderr.strip().splitlines() == [
        "hwprune: error: nothing to prune: the model has no prunable group (excluded: rnn); "
        "remove layers from --exclude, or check 'hwprune inspect'"]


class BiCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(torch.cat((h[-2], h[-1]), dim=1))


class WholeState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(h.permute(1, 0, 2).flatten(1))


def test_both_directions_of_the_final_state_concatenated_are_one_reader_of_two_copies():
    """[h_n[-2] | h_n[-1]] -> fc: a hidden unit is in both directions, so fc keeps columns j and 8 + j."""
    from hwprune.apply import prune_model
    from hwprune.policy import Policy

    space = build_space(BiCat(), torch.randn(2, 5, 3))
    assert [(g.name, g.units, g.layers) for g in space.groups] == [("rnn", 8, ("rnn", "fc"))]
    pruned = prune_model(BiCat(), Policy({"rnn": 0.5}, channel_multiple=1), torch.randn(2, 5, 3))
    assert pruned.rnn.hidden_size == 4 and pruned.fc.in_features == 8
    assert pruned(torch.randn(2, 5, 3)).shape == (2, 2)


@pytest.mark.parametrize("model,needles", [
    (WholeState, ["layer 'rnn': its final state h_n is used by a '.permute()' call", "--exclude rnn"]),
])
def test_what_cannot_be_followed_is_named_in_words(model, needles):
    """Such a layer is kept whole (not a group) with the reason in words; the rest would still be searched."""
    space = build_space(model(), torch.randn(2, 5, 3))
    assert "rnn" not in {g.name for g in space.groups}
    msg = space.kept["rnn"]
    assert "%" not in msg and "call_function" not in msg and "\n" not in msg  # no fx node dump
    for n in needles:
        assert n in msg, msg


def test_crnn_convolutions_and_gru_are_all_groups_and_dead_units_prune_without_changing_outputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("um_crnn", ASSETS / "user_model.py")
    um = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(um)
    torch.manual_seed(0)
    m = um.crnn().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (m.b1, m.b2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 1, 8, 20)
    space = build_space(m, x)
    assert [(g.name, g.kind, g.units, g.layers) for g in space.groups] == [
        ("c1", "channels", 16, ("c1", "b1", "c2")), ("c2", "channels", 24, ("c2", "b2", "rnn")),
        ("rnn", "hidden", 32, ("rnn", "fc"))]
    d1, d2, dr = [0, 3, 5, 8, 9, 12, 14, 15], [1, 2, 6, 7, 10, 13, 17, 18, 20, 21, 22, 23], list(range(0, 32, 2))
    with torch.no_grad():
        for conv, bn, dead in ((m.c1, m.b1, d1), (m.c2, m.b2, d2)):
            conv.weight[dead] = 0
            conv.bias[dead] = 0
            bn.weight[dead] = 0
            bn.bias[dead] = 0  # the channel is 0 after BN and ReLU: whatever reads it sees nothing
        H = 32
        rows = [g * H + u for g in range(3) for u in dr]
        for pname, p in m.rnn.named_parameters():
            p[rows] = 0
            if pname.startswith("weight_hh"):
                p[:, dr] = 0
    keep = Policy({"c1": 0.5, "c2": 0.5, "rnn": 0.5}, channel_multiple=1)
    p = apply_policy(m, keep, x).eval()
    assert (p.c1.out_channels, p.b1.num_features, p.c2.in_channels, p.c2.out_channels, p.b2.num_features) == \
        (8, 8, 8, 12, 12)
    assert p.rnn.input_size == 12 * 4 and p.rnn.hidden_size == 16 and p.fc.in_features == 32
    assert torch.allclose(p(x), m(x), atol=1e-5, rtol=0)
    # the GRU reads each kept channel's 4 rows: channel-major columns c*4 + h
    live2 = [c for c in range(24) if c not in d2]
    cols = [c * 4 + h for c in live2 for h in range(4)]
    live_r = [u for u in range(32) if u not in dr]
    rows = [g * 32 + u for g in range(3) for u in live_r]
    assert torch.equal(p.rnn.weight_ih_l0, m.rnn.weight_ih_l0[rows][:, cols])


def test_crnn_through_the_cli():
    model, data = f"{ASSETS / 'user_model.py'}:crnn", f"{ASSETS / 'user_model.py'}:make_image_data"
    ins = run_cli("inspect", "--model", model, "--data", data, "--json")
    assert ins.returncode == 0, ins.stderr
    assert [g["name"] for g in json.loads(ins.stdout)["groups"]] == ["c1", "c2", "rnn"]
    ap = run_cli("apply", "--model", model, "--data", data, "--uniform", "0.5", "--finetune-steps", "3", "--json")
    assert ap.returncode == 0, ap.stderr
    s = json.loads(ap.stdout)
    # multiples of 8: c1 16->8 (+BN 8), c2 24->16 (12 rounds to 16; +BN 16), GRU (16*4)->16 bidirectional, fc 32->3
    gru = 2 * 3 * (16 * 64 + 16 * 16 + 2 * 16)
    assert s["params_after"] == (8 * 9 + 8) + 2 * 8 + (16 * 8 * 9 + 16) + 2 * 16 + gru + (32 * 3 + 3) == 9267
    assert 0 <= s["val_accuracy_after"] <= 1


class Flat(nn.Module):
    """out.reshape(-1, H) into the head and out.view(b * t, H) into another: reshapes that keep the features."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 12, batch_first=True)
        self.fc = nn.Linear(12, 5)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        b, t, h = out.shape
        y = self.fc(out.reshape(-1, h)) + self.fc2(torch.relu(out).contiguous().view(b * t, h))
        return y.view(b, t, 5)


class FlatFeatures(Flat):
    """out.reshape(b, t * H): the features merged with time, which is refused in words."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(7 * 12, 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.reshape(out.size(0), -1))


def test_reshapes_that_keep_the_last_dim_pass_the_units_and_dead_units_prune_without_changing_outputs():
    m = prepare_model(Flat()).eval()
    x = torch.randn(4, 7, 3)
    space = build_space(m, x)
    assert [(g.name, set(g.layers)) for g in space.groups] == [("rnn", {"rnn", "fc", "fc2"})]
    _kill_units(m, {"rnn": [0, 2, 7, 11]}, {"rnn": [m.fc2]})
    p = apply_policy(m, Policy({"rnn": 8 / 12}, channel_multiple=1), x).eval()
    assert p.rnn.hidden_size == 8 and p.fc.in_features == p.fc2.in_features == 8
    assert torch.allclose(p(x), m(x), atol=1e-5, rtol=0)
    flat = build_space(prepare_model(FlatFeatures()).eval(), x)
    assert not flat.groups and "a '.reshape()' call at test_rnn_heads.py:" in flat.kept["rnn"]
