import copy

import pytest
import torch

from hwprune import apply_policy, build_model, build_space, deploy_cpu, uniform_policy
from hwprune.apply.formats import FormatSim, fake_quant_act, fake_quant_weight


@pytest.mark.parametrize("fmt,levels", [("int8", 256), ("int4", 16)])
def test_weight_fake_quant_is_per_row_symmetric(fmt, levels):
    w = torch.randn(6, 40)
    q = fake_quant_weight(w, fmt)
    qmax = levels // 2 - 1
    for r in range(6):
        scale = w[r].abs().max() / qmax
        k = q[r] / scale  # integer grid, within [-qmax-1, qmax]
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.round().abs().max() <= qmax + 1
        assert (q[r] - w[r]).abs().max() <= scale / 2 + 1e-6
    assert len(torch.unique(q[0])) <= levels


def test_activation_fake_quant_per_tensor():
    x = torch.randn(4, 10) * 3
    q = fake_quant_act(x)
    scale = x.abs().max() / 127
    assert (q - x).abs().max() <= scale / 2 + 1e-6 and len(torch.unique(q)) <= 256


def test_formats_change_outputs_by_the_expected_amount():
    m = build_model("cnn1d").eval()
    x = torch.randn(8, 1, 40)
    s = build_space(m, x)
    with torch.no_grad():
        ref = m(x)
    err = {}
    for fmt in ("fp16", "bf16", "int8", "int4"):
        q = apply_policy(m, uniform_policy(s, 1.0, fmt), x).eval()
        assert all(isinstance(q.get_submodule(l.name), FormatSim) for l in s.layers)
        with torch.no_grad():
            err[fmt] = float((q(x) - ref).abs().max() / ref.abs().max())
    assert 0 < err["fp16"] < err["bf16"] < err["int4"] and err["int8"] < err["int4"]
    assert err["fp16"] < 1e-3 and err["int4"] < 0.5


def test_gradients_pass_through_simulated_formats():
    m = build_model("lstm", (6, 2), 3, {"hidden_size": 8})
    x = torch.randn(4, 6, 2)
    q = apply_policy(m, uniform_policy(build_space(m, x), 1.0, "int8"), x).train()
    q(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())


def test_deploy_cpu_uses_real_int8_kernels_for_linear_and_rnn():
    m = build_model("gru", (10, 4), 5, {"hidden_size": 16, "num_layers": 2}).eval()
    x = torch.randn(4, 10, 4)
    q = apply_policy(m, uniform_policy(build_space(m, x), 1.0, "int8"), x).eval()
    sim = q(x)
    real, report = deploy_cpu(copy.deepcopy(q))
    assert report.real == {"rnn.layers.0": "int8", "rnn.layers.1": "int8", "fc": "int8"}
    assert report.simulated == {}
    from torch.ao.nn.quantized import dynamic as qd

    assert isinstance(real.fc, qd.Linear) and isinstance(real.rnn.layers[0], qd.GRU)
    assert (real(x) - sim).abs().max() < 0.05 * sim.abs().max()
    real.rnn.flatten_parameters()  # models call it on their RNN in every forward (SpeechBrain): a no-op in int8
    torch.testing.assert_close(real(x), real(x))


def test_a_dynamic_int8_rnn_keeps_flatten_parameters_through_save_and_load(tmp_path):
    """torch's dynamic int8 LSTM/GRU lack nn.RNNBase.flatten_parameters(), which SpeechBrain's wrappers call in
    every forward: the CRDNN's search failed with ''GRU' object has no attribute 'flatten_parameters''. The
    quantized modules hwprune makes have it (a no-op: the weights are packed), and keep it after torch.save/load."""
    from torch.ao.nn.quantized import dynamic as qd

    from hwprune._compat.ao import quantize_dynamic_int8

    for rnn in (torch.nn.GRU(4, 8, batch_first=True), torch.nn.LSTM(4, 8, batch_first=True)):
        q = quantize_dynamic_int8(rnn.eval())
        assert isinstance(q, (qd.GRU, qd.LSTM))
        x = torch.randn(2, 5, 4)
        before = q(x)[0]
        q.flatten_parameters()
        torch.save(q, tmp_path / "q.pt")
        back = torch.load(tmp_path / "q.pt", weights_only=False)
        back.flatten_parameters()
        torch.testing.assert_close(back(x)[0], before)


def test_deploy_cpu_reports_what_stays_simulated():
    m = build_model("cnn1d").eval()
    x = torch.randn(2, 1, 40)
    q = apply_policy(m, uniform_policy(build_space(m, x), 1.0, "int8"), x)
    _, report = deploy_cpu(q)
    assert report.simulated == {"features.0": "int8", "features.3": "int8", "features.6": "int8"}
    assert set(report.real) == {"fc1", "fc"}


class _StateByClass(torch.nn.Module):
    """OpenNMT-py's decoder: it keeps its state as a tuple and unwraps it only ``if isinstance(self.rnn, nn.GRU)``;
    neither a simulated GRU nor torch's int8 GRU is an nn.GRU, so the model fails with either on that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.GRU(4, 8, batch_first=True)
        self.dec = torch.nn.GRU(4, 8, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        _, h = self.enc(x)
        state = (h,)
        out, _ = self.dec(x, state[0]) if isinstance(self.dec, torch.nn.GRU) else self.dec(x, state)  # LINE
        return self.fc(out[:, -1])


def test_formats_the_model_cannot_run_with_are_refused_per_layer_with_the_users_line():
    import inspect

    from hwprune.device.deploy import format_refusals
    from hwprune.device.targets import get_target

    m = _StateByClass().eval()
    x = torch.randn(4, 5, 4)
    menus = {"enc": ["fp32", "int8", "bf16"], "dec": ["fp32", "int8", "bf16"], "fc": ["fp32", "int8"]}
    got = format_refusals(m, x, menus, get_target("cpu"))
    assert set(got) == {"dec"} and set(got["dec"]) == {"int8", "bf16"}  # the encoder and the head keep theirs
    line = next(i for i, s in enumerate(inspect.getsourcelines(_StateByClass.forward)[0]) if "# LINE" in s)
    line += inspect.getsourcelines(_StateByClass.forward)[1]
    assert f"test_formats.py:{line}" in got["dec"]["int8"] and "AttributeError" in got["dec"]["int8"]
    torch.testing.assert_close(m(x), _StateByClass.forward(m, x))  # the user's model is left as it was


def test_the_predictor_leaves_refused_formats_off_the_menus():
    from hwprune.latency import Predictor, analyze_layers
    from hwprune.latency.table import Entry, LatencyTable

    m = _StateByClass().eval()
    x = torch.randn(4, 5, 4)
    layers = analyze_layers(m, x, [], 1)
    table = LatencyTable(fingerprint={}, batch_size=4)
    full = {g.name: g.units for g in layers.space.groups}
    pred_fused = Predictor(table, layers, "k").fused
    for form in layers.layers:  # int8 measured faster than fp32 for every layer
        for fmt, us in (("fp32", 10.0), ("int8", 5.0)):
            table.entries[form.config(full, 4, fmt, pred_fused).key] = Entry(us, 0.0, 10)
    pred = Predictor(table, layers, "k")
    assert all(menu == ["fp32", "int8"] for menu in pred.menus().values())
    pred.refused = {"dec": {"int8": "why"}}
    assert pred.menu("dec") == ["fp32"] and pred.menu("fc") == ["fp32", "int8"]
