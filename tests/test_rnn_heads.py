"""Final-state heads: models that read h_n / (h_n, c_n) are pruned consistently, or refused in words."""
import json

import pytest
import torch
from torch import nn

from conftest import ASSETS, run_cli
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


def _kill(model, dead):
    """Zero every weight that writes the dead units, and every weight that reads them (next layer, heads)."""
    mods = dict(model.named_modules())
    names = sorted(dead)
    with torch.no_grad():
        for i, name in enumerate(names):
            rnn = mods[name]
            H, G = rnn.hidden_size, (4 if isinstance(rnn, nn.LSTM) else 3)
            rows = [g * H + u for g in range(G) for u in dead[name]]
            for pname, p in rnn.named_parameters():
                p[rows] = 0
                if pname.startswith("weight_hh"):
                    p[:, dead[name]] = 0
            readers = [mods[names[i + 1]]] if i + 1 < len(names) else []
            readers += [model.fc] if i == len(names) - 1 else []
            readers += [model.fc2] if i == 0 else []
            for r in readers:
                for pname, p in r.named_parameters():
                    if pname == "weight" or pname.startswith("weight_ih"):
                        p[:, dead[name]] = 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_heads_are_groups_and_dead_units_prune_without_changing_outputs(cell):
    m = prepare_model(StateHeads(2, cell)).eval()
    x = torch.randn(4, 7, 3)
    space = build_space(m, x)
    layers = {g.name: set(g.layers) for g in space.groups}
    assert layers == {"rnn.layers.0": {"rnn.layers.0", "rnn.layers.1", "fc2"},
                      "rnn.layers.1": {"rnn.layers.1", "fc"}}
    dead = {"rnn.layers.0": [1, 5, 9, 10], "rnn.layers.1": [0, 3, 4, 11]}
    _kill(m, dead)
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


@pytest.mark.parametrize("model,needles", [
    (BiCat, ["the 8 features of", "a call to cat()"]),
    (WholeState, ["layer 'rnn': its final state h_n is used by a '.permute()' call", "--exclude rnn"]),
])
def test_what_cannot_be_followed_is_named_in_words(model, needles):
    with pytest.raises(HwpruneError) as err:
        build_space(model(), torch.randn(2, 5, 3))
    msg = str(err.value)
    assert "%" not in msg and "call_function" not in msg and "\n" not in msg  # no fx node dump
    for n in needles:
        assert n in msg, msg
