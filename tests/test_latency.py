"""Latency tables, the predictor and the profiler."""
import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ASSETS, run_cli
from hwprune import HwpruneError, Policy, build_model
from hwprune.latency import (Entry, LatencyTable, LayerConfig, Predictor, analyze_layers, find_table, fit_linear,
                             get_target, table_path)
from hwprune.latency.validate import kendall_tau

MLP = f"{ASSETS / 'user_model.py'}:mlp"


def mlp_layers():
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    return analyze_layers(m, torch.randn(2, 4))


def five_row_table(batch=2, fp=None):
    """Entries for the MLP at 16 and 8 hidden units (its first layer a block with its ReLU), one in int8."""
    rows = {"linear|i4|o16|x-|b2|bias|fp32|+relu": 10.0, "linear|i4|o8|x-|b2|bias|fp32|+relu": 6.0,
            "linear|i16|o3|x-|b2|bias|fp32": 5.0, "linear|i8|o3|x-|b2|bias|fp32": 3.0,
            "linear|i16|o3|x-|b2|bias|int8": 2.0}
    fp = fp or get_target("cpu", threads=1).fingerprint()
    return LatencyTable(fp, batch, {k: Entry(v, v / 10, 5) for k, v in rows.items()})


def test_layer_forms_follow_flatten_bidirectional_and_depthwise():
    cnn = analyze_layers(build_model("cnn1d"), torch.randn(2, 1, 40))
    fc1 = next(f for f in cnn.layers if f.name == "fc1")
    assert fc1.terms["cin"] == {"features.6": 5} and fc1.consts["cin"] == 0  # flatten of 5 positions
    lstm = analyze_layers(build_model("lstm", (6, 3), 4, {"num_layers": 2, "bidirectional": True, "hidden_size": 16}),
                          torch.randn(2, 6, 3))
    l1 = next(f for f in lstm.layers if f.name == "rnn.layers.1")
    assert l1.terms["cin"] == {"rnn.layers.0": 2} and l1.terms["cout"] == {"rnn.layers.1": 1}
    assert l1.base.extent == (6,) and l1.base.bidirectional
    from hwprune.models.cnn import MobileNetV2
    mb = analyze_layers(MobileNetV2(3, 10, cfg=[(1, 16, 1, 1), (6, 24, 2, 2)], last_channel=64), torch.randn(2, 3, 16, 16))
    dw = next(f for f in mb.layers if f.name == "features.2.conv.3")
    assert dw.terms["groups"] == dw.terms["cin"] == dw.terms["cout"] == {"features.2.conv.0": 1}
    cfg = dw.config({g.name: g.units // 2 for g in mb.space.groups}, 4, "fp32")
    assert (cfg.cin, cfg.cout, cfg.groups) == (48, 48, 48)
    assert cfg.key == "conv2d|i48|o48|k3x3|s2x2|p1x1|g48|x16x16|b4|nobias|fp32|+bn+relu6"  # a fused block


def test_key_round_trip_and_macs_by_hand():
    c = LayerConfig("conv2d", 8, 16, 4, "bf16", (3, 3), (2, 2), (1, 1), 1, False, (10, 10))
    assert LayerConfig.from_key(c.key) == c
    assert c.macs() == 4 * 5 * 5 * 16 * 8 * 9
    g = LayerConfig("gru", 5, 7, 3, extent=(11,), bidirectional=True)
    assert g.macs() == 3 * 11 * 2 * 3 * 7 * (5 + 7) and LayerConfig.from_key("nonsense") is None


def test_table_round_trip(tmp_path):
    t = five_row_table()
    t.models["m"] = {"grid": [0.5, 1.0], "calibration": [{"policy": Policy().to_dict(), "measured_us": 20.0,
                                                          "iqr_us": 1.0}]}
    t.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back.entries == t.entries and back.models == t.models and back.fingerprint == t.fingerprint
    assert back.batch_size == 2


def test_five_row_table_priced_by_hand():
    layers = mlp_layers()
    t = five_row_table()
    p = Predictor(t, layers, "mlp")
    assert not p.calibrated
    assert p.price(Policy()).latency_us == 10.0 + 5.0
    assert p.price(Policy({"0": 0.5})).latency_us == 6.0 + 3.0
    assert p.price(Policy(formats={"2": "int8"})).latency_us == 10.0 + 2.0
    # calibrated: measured = 2 * layer sum + 10, exactly (no cost per output element)
    cal = [{"policy": Policy(k, f).to_dict(), "measured_us": 2 * s + 10, "iqr_us": 0.1}
           for k, f, s in (({}, {}, 15.0), ({"0": 0.5}, {}, 9.0), ({}, {"2": "int8"}, 12.0))]
    t.models["mlp"] = {"calibration": cal, "blocks": "fused"}
    p = Predictor(t, layers, "mlp")
    assert p.coef == pytest.approx((2.0, 0.0, 10.0), abs=1e-6)
    assert p.price(Policy({"0": 0.5})).latency_us == pytest.approx(28.0)
    assert p.menu("2", ["fp32", "bf16", "int8"]) == ["fp32", "int8"]  # int8 measured faster; bf16 not measured


def test_missing_configuration_is_named_or_estimated():
    t = five_row_table()
    t.entries.pop("linear|i8|o3|x-|b2|bias|fp32")
    with pytest.raises(HwpruneError, match=r"'linear\|i8\|o3\|x-\|b2\|bias\|fp32'"):
        Predictor(t, mlp_layers(), "mlp").price(Policy({"0": 0.5}))
    est = Predictor(t, mlp_layers(), "mlp", allow_missing=True).price(Policy({"0": 0.5}))
    assert est.estimated == ["linear|i8|o3|x-|b2|bias|fp32"]
    assert est.latency_us == pytest.approx(6.0 + 5.0 * 8 / 16)  # scaled from the i16 neighbour by MACs


def test_foreign_fingerprint_refused(tmp_path):
    here = get_target("cpu", threads=1)
    fp = {**here.fingerprint(), "cpu": "Some Other CPU", "torch": "2.4.0"}
    t = five_row_table(fp=fp)
    t.save(table_path(tmp_path, fp, 2))
    with pytest.raises(HwpruneError) as err:
        find_table(tmp_path, here, 2)
    assert "Some Other CPU" in str(err.value) and "2.4.0" in str(err.value) and "allow-foreign-table" in str(err.value)
    assert find_table(tmp_path, here, 2, allow_foreign=True).fingerprint["cpu"] == "Some Other CPU"
    with pytest.raises(HwpruneError, match="no cpu latency table for this machine .* at batch 7"):
        find_table(tmp_path, here, 7)


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s[: len(s) // 2], "not valid JSON"),
    (lambda s: s.replace('"median_us": 10.0', '"median_us": -1'), "median_us -1"),
    (lambda s: s.replace('"median_us": 10.0', '"median_us": NaN'), "median_us nan"),
    (lambda s: s.replace('"hwprune-latency-table/1"', '"something-else"'), "not a hwprune-latency-table/1"),
])
def test_corrupted_table_refused_with_its_path(tmp_path, mutate, needle):
    path = tmp_path / "t.json"
    five_row_table().save(path)
    path.write_text(mutate(path.read_text()))
    with pytest.raises(HwpruneError, match=needle) as err:
        LatencyTable.load(path)
    assert str(path) in str(err.value)


def test_calibration_recovers_a_known_linear_relation():
    rng = np.random.default_rng(0)
    x = rng.uniform(100, 1000, 20)
    y = 1.3 * x + 42 + rng.normal(0, 0.5, 20)
    a, b = fit_linear(x, y)
    assert a == pytest.approx(1.3, abs=0.005) and b == pytest.approx(42, abs=2)
    a, b = fit_linear(x, 0.9 * x - 30)  # a negative overhead is not physical: refit through 0
    assert b == 0.0 and a < 0.9


def test_calibration_recovers_layer_and_element_costs():
    from hwprune.latency.predictor import fit_nonneg

    rng = np.random.default_rng(1)
    layer_sum, elems = rng.uniform(100, 1000, 20), rng.uniform(1e4, 1e5, 20)
    y = 1.1 * layer_sum + 0.002 * elems + 15
    coef = fit_nonneg(np.stack([layer_sum, elems, np.ones(20)], 1), y)
    assert coef == pytest.approx([1.1, 0.002, 15], rel=1e-4)
    # a relation with a negative term is clipped at 0, never fitted negative
    coef = fit_nonneg(np.stack([layer_sum, elems, np.ones(20)], 1), 1.1 * layer_sum - 0.001 * elems + 200)
    assert (coef >= 0).all() and coef[1] == 0


def test_few_noisy_calibration_runs_never_price_every_policy_alike():
    """Three runs of a packed LSTM (layer sum, output elements, 1) whose noise made non-negative least squares
    drop the layer sum: three terms from three runs priced only output elements and a constant. Below 6 runs
    the fit is ``a * layer sum + b`` with ``a > 0``, so a smaller policy is priced lower."""
    from hwprune.latency.predictor import fit_calibration, fit_nonneg

    feats = np.array([[537.2, 49536.0, 1.0], [381.7, 12672.0, 1.0], [407.3, 24960.0, 1.0]])
    y = np.array([717.5, 496.9, 650.0])  # dense, keep 0.25, keep 0.5
    assert fit_nonneg(feats, y)[0] == 0.0  # the old fit: no weight on the layer sum
    a, c, b = fit_calibration(feats, y)
    assert a > 0 and c == 0.0 and a * 381.7 + b < a * 537.2 + b
    # with 6+ runs of a real three-term relation all three terms are fitted
    rng = np.random.default_rng(2)
    s, e = rng.uniform(100, 1000, 8), rng.uniform(1e4, 1e5, 8)
    assert fit_calibration(np.stack([s, e, np.ones(8)], 1), 1.1 * s + 0.002 * e + 15) == \
        pytest.approx((1.1, 0.002, 15), rel=1e-4)


def test_calibration_policies_are_distinct_and_on_the_grid():
    from hwprune.latency.profiler import calibration_policies

    layers = mlp_layers()  # one group of 16 units: at grid (0.5, 1.0) only 8 or 16 units exist
    pols = calibration_policies(layers, (0.5, 1.0), {"0": ["fp32"], "2": ["fp32"]}, 10)
    assert sorted(p.units(layers.space)["0"] for p in pols) == [8, 16]
    assert all(r in (0.5, 1.0) for p in pols for r in p.keep.values())
    default = calibration_policies(mlp_layers(), (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
                                   {"0": ["fp32", "int8"], "2": ["fp32", "int8"]}, 20)
    assert len({json.dumps([p.units(layers.space), p.formats], sort_keys=True) for p in default}) == len(default)
    # the corners a tight search reaches are measured: every layer in int8, at the smallest and the dense size
    corners = [p for p in default if p.formats == {"0": "int8", "2": "int8"}]
    assert sorted(p.units(layers.space)["0"] for p in corners) == [8, 16]


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_pricing_a_candidate_is_a_table_lookup_not_a_trace():
    """Pricing a ResNet-20 policy is cheap (a sum of table entries; ~0.1 ms here): the fastest of 50 calls under
    5 ms holds on a loaded machine, while pricing that re-traced or re-analysed the model (tens of ms) fails."""
    m = build_model("resnet20")
    layers = analyze_layers(m, torch.randn(2, 3, 32, 32))
    pol = Policy({g.name: 0.5 for g in layers.space.groups})
    t = LatencyTable({"target": "cpu"}, 16, {c.key: Entry(1.0, 0.1, 3) for _, c in layers.configs(pol, 16)})
    pred = Predictor(t, layers, "r")
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        pred.price(pol)
        times.append(time.perf_counter() - t0)
    assert min(times) < 5e-3


def test_profile_tiny_model_end_to_end_and_incremental(tmp_path):
    args = ["profile", "--target", "cpu", "--model", MLP, "--input-shape", "4", "--batch-size", "2",
            "--repeats", "2", "--grid", "0.5,1.0", "--calibration", "3", "--tables", str(tmp_path), "--json"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    # hidden 16 -> {8, 16}; layer 0: i4 x o{8,16}, layer 2: i{8,16} x o3; formats fp32, bf16, int8: 12 layer
    # entries; casts fp32<->bf16 of the inputs {4, 8, 16} (6) and bf16->fp32 of the output (3 elements): 7
    assert s["configurations"] == 19 and s["measured_now"] == 19
    t = LatencyTable.load(s["table"])
    casts = sorted(k for k in t.entries if k.startswith("cast|"))
    assert casts == ["cast|bf16>fp32|n16|b2", "cast|bf16>fp32|n3|b2", "cast|bf16>fp32|n4|b2", "cast|bf16>fp32|n8|b2",
                     "cast|fp32>bf16|n16|b2", "cast|fp32>bf16|n4|b2", "cast|fp32>bf16|n8|b2"]
    assert t.casts == "regions"
    # 2 rounds each, 1 more (half as many again) for an entry whose spread was over 10% (re-measured)
    assert len(t.entries) == 19 and all(e.median_us > 0 and e.repeats in (2, 3) for e in t.entries.values())
    assert t.fingerprint["threads"] == 1 and "profile" in t.command
    cal = t.models[s["model_key"]]["calibration"]
    # 8 or 16 hidden units, times whatever format measured faster than fp32: all distinct, none repeated
    what = {json.dumps([c["policy"]["keep"].get("0", 1.0), c["policy"]["formats"]], sort_keys=True) for c in cal}
    assert s["calibration_measured_now"] == len(cal) == len(what) and 2 <= len(cal) <= 3
    assert all(c["measured_us"] > 0 for c in cal)
    ref = t.models[s["model_key"]]["reference"]  # the dense model, timed in every calibration round
    assert ref["kind"] == "dense model" and ref["rounds"] >= 2 and ref["median_us"] > 0
    assert all(c["reference_us"] == ref["median_us"] for c in cal)
    assert t.models[s["model_key"]]["reference_layer_rounds"]["rounds"] >= 2
    again = json.loads(run_cli(*args).stdout)
    assert again["measured_now"] == 0 and again["calibration_measured_now"] == 0
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"format_version": 1, "keep": {"0": 0.5}, "formats": {"2": "int8"}}))
    pr = run_cli("predict", "--target", "cpu", "--model", MLP, "--input-shape", "4", "--batch-size", "2",
                 "--tables", str(tmp_path), "--policy", str(pol), "--by-layer", "--json")
    assert pr.returncode == 0, pr.stderr
    p = json.loads(pr.stdout)
    e = {k: v.median_us for k, v in t.entries.items()}
    assert p["layer_sum_ms"] * 1e3 == pytest.approx(e["linear|i4|o8|x-|b2|bias|fp32|+relu"] + e["linear|i8|o3|x-|b2|bias|int8"])
    assert [r["layer"] for r in p["by_layer"]] == ["0", "2"] and p["predicted_latency_ms"] > 0


@pytest.mark.parametrize("args,needles", [
    (["--target", "tpu"], ["--target: invalid choice: 'tpu'", "choose from 'cpu', 'cuda', 'arm'"]),
    (["--target", "arm"], ["--emulate", "x86_64"]),
])
def test_bad_latency_input(tmp_path, args, needles):
    proc = run_cli("profile", "--model", MLP, "--input-shape", "4", "--tables", str(tmp_path), *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_target_without_gpu_is_one_line(tmp_path):
    proc = run_cli("profile", "--model", MLP, "--input-shape", "4", "--target", "cuda", "--tables", str(tmp_path))
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_arm_emulated_table_is_marked(tmp_path):
    proc = run_cli("profile", "--model", MLP, "--input-shape", "4", "--batch-size", "2", "--repeats", "2",
                   "--grid", "0.5,1.0", "--calibration", "2", "--target", "arm", "--emulate", "--tables",
                   str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["fingerprint"]["emulated"] is True and s["fingerprint"]["engine"] == "qnnpack"
    assert "emulated" in s["table"] and s["configurations"] == 8  # arm offers fp32 and int8 for Linear


def test_a_layer_fed_by_eight_groups_is_enumerated_by_its_widths_not_their_product():
    """The fuse conv reads 8 branches of 32 channels: 4 unit options each on the default grid (multiples of 8),
    4**8 = 65,536 combinations, but only the 25 input widths 64, 72, ..., 256 (times its 4 output widths)."""
    from hwprune.latency.profiler import DEFAULT_GRID, layer_configs, reachable_dims
    from hwprune.models import build_model

    m = build_model(f"{ASSETS / 'user_model.py'}:concat8", (1, 8, 8))
    layers = analyze_layers(m, torch.randn(2, 1, 8, 8))
    fuse = next(f for f in layers.layers if f.name == "fuse")
    assert len(fuse.terms["cin"]) == 8
    dims = reachable_dims(layers, fuse, DEFAULT_GRID)
    assert sorted({d[0] for d in dims}) == list(range(64, 257, 8)) and sorted({d[1] for d in dims}) == [8, 16, 24, 32]
    assert len(dims) == 25 * 4
    configs = layer_configs(layers, DEFAULT_GRID, get_target("cpu"), 4)
    fuse_fp32 = [c for c in configs if c.op == "conv2d" and c.kernel == (1, 1) and c.fmt == "fp32"]
    assert len(fuse_fp32) == 100
    # every policy the search can build prices from entries the enumeration holds
    keys = {c.key for c in configs}
    import random

    rng = random.Random(0)
    for _ in range(50):
        pol = Policy({g.name: rng.choice(DEFAULT_GRID) for g in layers.space.groups})
        assert all(c.key in keys for _, c in layers.configs(pol, 4))


def test_pruning_headroom_warns_when_pruning_barely_changes_measured_time():
    layers = mlp_layers()
    t = five_row_table()
    run = lambda keep, us, fmts=None: {"policy": Policy(keep, fmts or {}).to_dict(), "measured_us": us}  # noqa: E731
    t.models["mlp"] = {"blocks": "fused", "calibration": [
        run({}, 100.0), run({"0": 0.5}, 97.0), run({"0": 0.25}, 95.0), run({}, 20.0, {"2": "int8"})]}
    p = Predictor(t, layers, "mlp")
    assert p.pruning_headroom() == (0.25, pytest.approx(0.95))  # the int8 run is not a pruning-only point
    note = p.headroom_note(2)
    assert note and "keeping 25% of every group measured 95% of the dense model's time at batch 2" in note
    t.models["mlp"]["calibration"][2]["measured_us"] = 40.0
    assert Predictor(t, layers, "mlp").headroom_note(2) is None
    t.models["mlp"]["calibration"] = t.models["mlp"]["calibration"][1:]  # no dense run: nothing to compare
    assert Predictor(t, layers, "mlp").pruning_headroom() is None
