"""Interleaved rounds, the speed reference, and the timing failures that must not poison a table (issue 20)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from hwprune.latency import LatencyTable, analyze_layers
from hwprune.latency.layers import LayerConfig
from hwprune.latency.profiler import Failure, calibrate, profile_layers, try_prepare
from hwprune.latency.rounds import RoundPlan, measure_in_rounds
from hwprune.latency.speed import SpeedCheck, median_se_pct, speed_check
from hwprune.device.targets import CpuTarget
from hwprune.policy import Policy


class _Clock:
    """A machine whose speed drifts: every sample costs ``base * (1 + drift * calls so far)``."""

    def __init__(self, drift: float) -> None:
        self.calls, self.drift, self.log = 0, drift, []

    def item(self, name: str, base: float):
        def sample() -> float:
            self.calls += 1
            self.log.append(name)
            return base * (1 + self.drift * self.calls)
        return sample


def test_every_item_once_per_round_in_a_fresh_shuffled_order():
    clock = _Clock(0.0)
    items = {k: clock.item(k, 10.0) for k in "abcdef"}
    res = measure_in_rounds(items, RoundPlan(rounds=6, extra_rounds=0, seed=3))
    assert len(res.orders) == 6
    assert all(sorted(o) == list("abcdef") for o in res.orders)  # each round: every item exactly once
    assert len({tuple(o) for o in res.orders}) > 1  # reshuffled between rounds
    assert clock.log == list(itertools.chain.from_iterable(res.orders))  # samples taken in that order
    assert all(len(v) == 6 for v in res.samples.values())
    again = measure_in_rounds({k: _Clock(0.0).item(k, 1.0) for k in "abcdef"}, RoundPlan(rounds=6, extra_rounds=0,
                                                                                       seed=3))
    assert again.orders == res.orders  # seeded


def test_statistic_is_the_median_over_rounds():
    vals = iter([5.0, 1.0, 9.0, 3.0, 7.0])
    res = measure_in_rounds({"x": lambda: next(vals)}, RoundPlan(rounds=5, extra_rounds=0))
    t = res.timing("x")
    assert t.median_us == 5.0 and t.repeats == 5
    assert t.iqr_us == pytest.approx(8.0 - 2.0)  # statistics.quantiles (exclusive): q1 = 2, q3 = 8


def test_drift_moves_interleaved_items_alike_but_lands_in_sequential_ones():
    # three identical layers on a machine that slows by 0.5% per sample: one after the other, the medians sit at
    # calls 8, 23 and 38 (100 * (1 + 0.005 * call)): the last one 14% slower than the first; interleaved, all
    # three come out within 2% of each other
    clock = _Clock(0.005)
    seq = {}
    for k in "abc":
        seq[k] = measure_in_rounds({k: clock.item(k, 100.0)}, RoundPlan(rounds=15, extra_rounds=0)).timing(k).median_us
    assert seq == {"a": 104.0, "b": 111.5, "c": 119.0}
    clock = _Clock(0.005)
    res = measure_in_rounds({k: clock.item(k, 100.0) for k in "abc"}, RoundPlan(rounds=15, extra_rounds=0))
    med = [res.timing(k).median_us for k in "abc"]
    assert max(med) / min(med) < 1.02


def test_noisy_items_are_remeasured_with_the_reference_and_reported():
    calls = {"quiet": 0, "noisy": 0, "ref": 0}
    noisy_vals = itertools.cycle([50.0, 150.0, 100.0, 60.0, 140.0])

    def make(k):
        def sample():
            calls[k] += 1
            return next(noisy_vals) if k == "noisy" else 100.0 + (calls[k] % 2)
        return sample

    res = measure_in_rounds({k: make(k) for k in calls}, RoundPlan(rounds=5, extra_rounds=4, noisy_pct=10.0),
                            always=["ref"])
    assert res.remeasured == ["noisy"]  # quiet stays at its 5 rounds; the reference is never "re-measured"
    assert calls == {"quiet": 5, "noisy": 9, "ref": 9}  # the reference takes part in the extra rounds too
    assert res.noisy == ["noisy"]  # still above 10% after them: reported
    assert [len(o) for o in res.orders] == [3] * 5 + [2] * 4


def test_round_plan_refuses_nonsense():
    with pytest.raises(ValueError, match="rounds >= 1"):
        RoundPlan(rounds=0)


def test_speed_factor_applies_only_beyond_the_noise():
    # median standard error: 1.2533 * (spread / 1.349) / sqrt(n); 8% spread over 16 rounds -> 1.858%
    assert median_se_pct(8.0, 16) == pytest.approx(1.2533 * 8 / 1.349 / 4)
    quiet = SpeedCheck(1000.0, 8.0, 16, 1030.0, 8.0, 16)
    # noise: 2 * hypot(1.858, 1.858) = 5.26%; 3% slower is within it: prices are used as measured
    assert quiet.noise_pct == pytest.approx(2 * (2 ** 0.5) * 1.2533 * 8 / 1.349 / 4)
    assert not quiet.significant and quiet.factor == pytest.approx(1.03) and "within the noise" in quiet.line()
    slow = SpeedCheck(1000.0, 2.0, 16, 1250.0, 2.0, 16)
    assert slow.significant and slow.factor == pytest.approx(1.25)
    assert "25.0% slower" in slow.line() and "scaled by 1.250" in slow.line()
    fast = SpeedCheck(1000.0, 2.0, 16, 800.0, 2.0, 16)
    assert fast.factor == pytest.approx(0.8) and "20.0% faster" in fast.line()
    assert speed_check(None, [1.0]) is None and speed_check({"median_us": 1.0}, []) is None
    got = speed_check({"median_us": 100.0, "spread_pct": 1.0, "rounds": 10}, [200.0, 202.0, 198.0, 200.0])
    assert got.ratio == pytest.approx(2.0) and got.factor == pytest.approx(2.0)


def test_a_share_of_the_dense_latency_is_priced_where_the_speed_curve_puts_the_limit():
    """The dense model (1000 us at profiling) runs 0.8x now, the smallest policy (100 us) 0.6x: a policy priced
    p runs p * f(p) now, f interpolated in log-log between the anchors. A 30% budget (300 us) allows p * f(p) <=
    0.3 * 1000 * 0.8, so its limit on the table's scale is 240 / f(p), above 300 us where f(p) < 0.8; an absolute
    budget of 300 us allows p * f(p) <= 300; measured ratios compare with the share (factor 1) or, for the
    absolute budget, ratio * 1000 * 0.8 <= 300 (factor 0.8). A flat curve leaves a share unchanged."""
    import math

    from hwprune.latency.speed import SpeedCurve
    from hwprune.search.context import price_scale

    curve = SpeedCurve(SpeedCheck(1000.0, 1.0, 10, 800.0, 1.0, 10), SpeedCheck(100.0, 1.0, 10, 60.0, 1.0, 10))

    def f(p):  # by hand: log-linear between (100, 0.6) and (1000, 0.8)
        t = (math.log(p) - math.log(100)) / (math.log(1000) - math.log(100))
        return math.exp((1 - t) * math.log(0.6) + t * math.log(0.8))

    sf, mf = price_scale(curve, 0.3, relative=True)  # budget_ms 0.3 = 300 us
    p = 300.0 / sf  # the limit on the table's scale
    assert mf == 1.0 and p * f(p) == pytest.approx(0.3 * 1000 * 0.8, rel=1e-3) and p > 300.0
    sf, mf = price_scale(curve, 0.3, relative=False)
    p = 300.0 / sf
    assert mf == pytest.approx(0.8) and p * f(p) == pytest.approx(300.0, rel=1e-3)
    flat = SpeedCurve(SpeedCheck(1000.0, 1.0, 10, 800.0, 1.0, 10), SpeedCheck(100.0, 1.0, 10, 80.0, 1.0, 10))
    assert price_scale(flat, 0.3, relative=True) == (pytest.approx(1.0), 1.0)
    assert price_scale(SpeedCurve(SpeedCheck(1000.0, 1.0, 10, 800.0, 1.0, 10)), 0.3, relative=True)[0] == 1.0
    # the user's own dense model runs 0.95x the per-layer stack the table prices (rho): a share is of the user's
    # model, p * f(p) <= 0.3 * 0.95 * 1000 * 0.8; a measured ratio (to the user's model) of an absolute budget is
    # ratio * 0.95 * 1000 * 0.8 <= 300
    sf, mf = price_scale(curve, 0.3, relative=True, rho=0.95)
    p = 300.0 / sf
    assert mf == 1.0 and p * f(p) == pytest.approx(0.3 * 0.95 * 1000 * 0.8, rel=1e-3)
    assert price_scale(curve, 0.3, relative=False, rho=0.95)[1] == pytest.approx(0.8 * 0.95)
    # export's verdict: a share is judged against the dense model's time now (factor 0.8 whatever the policy's
    # price), an absolute budget at the policy's own factor (0.6 at the smallest policy's 100 us)
    assert curve.verdict_factor(100.0, share=True) == pytest.approx(0.8)
    assert curve.verdict_factor(100.0, share=False) == pytest.approx(0.6)


def test_a_speed_check_far_off_the_tables_scale_is_confirmed_by_the_median_of_three():
    """One check of the 2-layer LSTM at 30%, timed while another process ran, priced the share at the budget / 1.46
    and refused the search (its smallest policy measured 19% of dense at profiling). A factor more than 5% off 1
    is checked twice more and the median kept; within 5%, one check and no note."""
    from hwprune.latency.speed import SpeedCurve
    from hwprune.search.context import CONFIRM_FACTOR, confirmed_scale

    def curve(small_now):  # the dense model as profiled; the smallest policy (100 us then) at small_now
        return SpeedCurve(SpeedCheck(1000.0, 1.0, 10, 1000.0, 1.0, 10), SpeedCheck(100.0, 1.0, 10, small_now, 1.0, 10))

    later = iter([(curve(104.0), 1.0), (curve(107.0), 1.0)])
    calls = []

    def again():
        calls.append(1)
        return next(later)

    sf, mf, speed, _, note = confirmed_scale(curve(146.0), 1.0, again, 0.1, relative=True)  # the limit at 100 us
    assert len(calls) == 2 and sf == pytest.approx(1.07) and speed.small.now_us == 107.0 and mf == 1.0
    assert "budget / 1.460" in note and "1.040, 1.070, 1.460" in note and "the median kept" in note
    calls.clear()
    sf, _, _, _, note = confirmed_scale(curve(104.0), 1.0, again, 0.1, relative=True)
    assert sf == pytest.approx(1.04) and not calls and note == "" and CONFIRM_FACTOR == 0.05


def test_a_share_the_smallest_policy_meets_now_is_never_priced_under_it():
    """Three speed checks in a row priced the LSTM's 30% share at the budget / 1.599 and refused the search, while
    its smallest policy measured 0.21x of dense. Here the dense model runs as profiled (1000 us) and the smallest
    policy (100 us then) 160 us now, 0.16x of dense: a 30% share (its limit 110 us on the table's scale) is priced
    at the budget / 1.1, where the smallest policy's price (100 us) meets the limit, not / 1.6. Where the smallest
    policy misses the share now (400 us, 0.4x), the curve's factor stands."""
    from hwprune.latency.speed import SpeedCurve
    from hwprune.search.context import confirmed_scale

    def curve(small_now):
        return SpeedCurve(SpeedCheck(1000.0, 1.0, 10, 1000.0, 1.0, 10), SpeedCheck(100.0, 1.0, 10, small_now, 1.0, 10))

    sf, _, _, _, note = confirmed_scale(curve(160.0), 1.0, lambda: (curve(160.0), 1.0), 0.11, True, 0.3, 0.1)
    assert sf == pytest.approx(1.1) and "measures 0.160x your dense model now" in note and "/ 1.600" in note
    sf, _, _, _, note = confirmed_scale(curve(160.0), 1.0, lambda: (curve(160.0), 1.0), 0.11, True, 0.3, 0.105)
    assert sf == pytest.approx(0.11 / 0.105)  # the anchor priced above its measured time: its price is the floor
    sf, _, _, _, note = confirmed_scale(curve(400.0), 1.0, lambda: (curve(400.0), 1.0), 0.11, True, 0.3, 0.1)
    assert sf == pytest.approx(4.0) and "your dense model now" not in note
    sf, _, _, _, _ = confirmed_scale(curve(160.0), 1.0, lambda: (curve(160.0), 1.0), 0.11, False, None, 0.1)
    assert sf == pytest.approx(1.6)  # an absolute budget: the factor at the limit, as measured


def test_measured_ratios_are_taken_against_the_users_own_dense_model_not_the_split_stack():
    """The analysis splits a 2-layer GRU into one module per layer (every pruned model has that form); the dense
    model the gate and the finish compare with is the user's own, fused ``nn.GRU``, deployed, with the same output."""
    from types import SimpleNamespace

    from conftest import ASSETS
    from hwprune.factory import load_factory
    from hwprune.latency.profiler import deployed_for_timing
    from hwprune.search.context import user_dense
    from hwprune.space._rnnstack import RNNStack

    torch.manual_seed(0)
    model, x = load_factory(f"{ASSETS / 'user_model.py'}:gru2")().eval(), torch.randn(2, 5, 1)
    setup = SimpleNamespace(model=model, example=x)
    target = CpuTarget(threads=1)
    mine = user_dense(setup, target)
    split, _ = deployed_for_timing(model, Policy(channel_multiple=8), x, target, [], False)
    assert type(mine.rnn) is nn.GRU and mine.rnn.num_layers == 2 and mine is not model
    assert isinstance(split.rnn, RNNStack) and type(model.rnn) is nn.GRU  # the user's model is left as it was
    with torch.no_grad():
        assert torch.allclose(mine(x), split(x), atol=1e-6)


def test_dilation_and_same_padding_are_in_the_key_and_the_kernel():
    plain = LayerConfig("conv1d", 8, 8, 4, kernel=(3,), stride=(1,), padding=(2,), extent=(32,))
    dil = LayerConfig("conv1d", 8, 8, 4, kernel=(3,), stride=(1,), padding=(2,), extent=(32,), dilation=(2,))
    same = LayerConfig("conv1d", 8, 8, 4, kernel=(4,), stride=(1,), padding="same", extent=(32,))
    assert plain.key == "conv1d|i8|o8|k3|s1|p2|g1|x32|b4|bias|fp32"  # undilated keys as before
    assert dil.key == "conv1d|i8|o8|k3|s1|p2|d2|g1|x32|b4|bias|fp32" and same.key.split("|")[5] == "psame"
    for c in (plain, dil, same):
        assert LayerConfig.from_key(c.key) == c
    # output length by hand: (32 + 4 - 1*2 - 1) + 1 = 34 plain; (32 + 4 - 2*2 - 1) + 1 = 32 dilated; same: 32
    assert plain.out_extent() == (34,) and dil.out_extent() == (32,) and same.out_extent() == (32,)
    assert dil.macs() == 4 * 32 * 8 * 8 * 3 and plain.macs() == 4 * 34 * 8 * 8 * 3
    m, x = dil.build()
    assert m.dilation == (2,) and m(x).shape == (4, 8, 32)
    m, x = same.build()
    assert m.padding == "same" and m(x).shape == (4, 8, 32)

    class Tcn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(2, 16, 3, padding=2, dilation=2)
            self.b = nn.Conv1d(16, 16, 4, padding="same")
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.b(torch.relu(self.a(x))).mean(-1))

    layers = analyze_layers(Tcn(), torch.randn(2, 2, 20))
    keys = {f.name: f.base.key for f in layers.layers}
    assert "|p2|d2|g1|x20|" in keys["a"] and "|k4|s1|psame|g1|x20|" in keys["b"]


class _FlakyTarget(CpuTarget):
    """A CPU target whose kernels fail: ``once`` configurations the first time only, ``oserror`` ones with an OS
    error every time, ``refuse`` ones with the same kernel error every time."""

    def __init__(self, fail):
        super().__init__(threads=1)
        self.fail, self.seen = fail, {}

    def realize(self, module, fmt):
        cout = getattr(module, "out_features", 0)
        how = self.fail.get(cout)
        self.seen[cout] = self.seen.get(cout, 0) + 1
        if how == "once" and self.seen[cout] == 1:
            raise RuntimeError("sporadic driver hiccup")
        if how == "oserror":
            raise OSError(24, "Too many open files")
        if how == "refuse":
            raise RuntimeError("shape [4, 24] is not supported by this kernel")
        return super().realize(module, fmt)


def test_a_transient_failure_is_retried_and_never_stored_as_unsupported(tmp_path):
    cfg = lambda n: LayerConfig("linear", 8, n, 4)  # noqa: E731
    target = _FlakyTarget({16: "once", 32: "oserror", 24: "refuse"})
    assert not isinstance(try_prepare(cfg(16), target), Failure)  # failed once, passed on the retry
    got = try_prepare(cfg(32), target)
    assert isinstance(got, Failure) and not got.permanent and "Too many open files" in got.why
    got = try_prepare(cfg(24), target)
    assert isinstance(got, Failure) and got.permanent and "not supported" in got.why

    table = LatencyTable(target.fingerprint(), 4, path=tmp_path / "t.json")
    logs = []
    out = profile_layers(table, [cfg(8), cfg(32), cfg(24)], target, 2, logs.append)
    assert list(table.entries) == [cfg(8).key]
    assert list(table.unsupported) == [cfg(24).key]  # the refusal is permanent, the OS error is not
    assert cfg(32).key in out["failed"] and cfg(32).key not in table.unsupported
    assert any("left unmeasured (not marked unsupported" in m for m in logs)
    saved = LatencyTable.load(tmp_path / "t.json")
    assert cfg(32).key not in saved.unsupported and cfg(32).key not in saved.entries  # tried again next time


class _NoInt8(CpuTarget):
    """No int8 kernel for the wide layer: deploying int8 there leaves it simulated."""

    def realize(self, module, fmt):
        if fmt == "int8" and getattr(module, "out_features", 0) == 16:
            raise RuntimeError("no int8 kernel here")
        return super().realize(module, fmt)


def test_calibration_leaves_out_a_deploy_that_stays_simulated(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(2, 4)
    target = _NoInt8(threads=1)
    table = LatencyTable(target.fingerprint(), 2, path=tmp_path / "t.json")
    pols = [Policy({}, {}, 8), Policy({}, {"0": "int8"}, 8), Policy({}, {"2": "int8"}, 8)]
    logs = []
    n = calibrate(table, "k", model, x, pols, target, 2, [], logs.append, {})
    runs = table.models["k"]["calibration"]
    assert n == 2 and [r["policy"]["formats"] for r in runs] == [{}, {"2": "int8"}]
    assert any("left out (not fitted)" in m and "0:int8" in m for m in logs)
    ref = table.models["k"]["reference"]
    assert ref["rounds"] >= 2 and all(r["reference_us"] == ref["median_us"] for r in runs)
    assert json.loads((tmp_path / "t.json").read_text())["models"]["k"]["reference"] == ref  # saved with the table


def test_target_settings_are_restored_after_timing():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with CpuTarget(threads=1).settings():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # the process's own thread count is back
    finally:
        torch.set_num_threads(before)


def test_onednn_gets_a_kernel_cache_for_interleaved_rounds_unless_the_user_set_one(monkeypatch):
    """oneDNN's default cache (1024 kernels) overflows when ~20 MobileNetV3 policies are timed interleaved, and every
    call generates its kernels again (validate: 15% within +-10% instead of 100%). It reads the size once, from the
    environment: set for the command (the CLI, the API, a target's settings), put back after, the user's kept."""
    import os

    from hwprune.device.targets import PRIMITIVE_CACHE, kernel_cache

    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(var, raising=False)
    with CpuTarget(threads=1).settings():
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(PRIMITIVE_CACHE) and PRIMITIVE_CACHE >= 8192
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "2048")  # the user's, under oneDNN's older name
    with kernel_cache():
        assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    assert os.environ["DNNL_PRIMITIVE_CACHE_CAPACITY"] == "2048"


def test_speed_curve_interpolates_between_the_smallest_policy_and_the_dense_model():
    from hwprune.latency.profiler import REFERENCE
    from hwprune.latency.speed import SMALLEST, SpeedCurve, smallest_reference, speed_curve
    from hwprune.latency.table import LatencyTable

    dense = SpeedCheck(1000.0, 2.0, 10, 900.0, 2.0, 10)  # 0.9 at 1000 us
    small = SpeedCheck(100.0, 2.0, 10, 60.0, 2.0, 10)  # 0.6 at 100 us
    curve = SpeedCurve(dense, small)
    assert curve.factor_at(1000.0) == pytest.approx(0.9) and curve.factor_at(100.0) == pytest.approx(0.6)
    # halfway in log latency (316 us): the geometric mean of the two factors
    assert curve.factor_at(1000 ** 0.5 * 100 ** 0.5) == pytest.approx((0.9 * 0.6) ** 0.5)
    assert curve.factor_at(5000.0) == pytest.approx(0.9) and curve.factor_at(10.0) == pytest.approx(0.6)  # held
    assert SpeedCurve(dense).factor_at(100.0) == pytest.approx(0.9)  # one anchor: one factor
    assert "smallest policy measures 0.0600 ms now" in curve.line()

    low = {"keep": {"g": 0.25}, "formats": {}, "channel_multiple": 8, "format_version": 1}
    table = LatencyTable({"target": "cpu"}, 4, models={"k": {
        "reference": {"median_us": 1000.0, "spread_pct": 2.0, "rounds": 10}, "smallest": low,
        "calibration": [{"policy": {"keep": {}, "formats": {}, "channel_multiple": 8}, "measured_us": 990.0},
                        {"policy": low, "measured_us": 100.0, "iqr_us": 4.0}]}})
    pol, ref = smallest_reference(table, "k")
    assert pol == low and ref["median_us"] == 100.0 and ref["spread_pct"] == pytest.approx(4.0)
    got = speed_curve(table, "k", {REFERENCE: [900.0] * 5, SMALLEST: [60.0] * 5})
    assert got.factor_at(100.0) == pytest.approx(0.6) and got.factor_at(1000.0) == pytest.approx(0.9)
    assert speed_curve(table, "nope", {REFERENCE: [1.0]}) is None


def test_calibration_runs_of_two_sessions_fit_on_one_speed_scale(tmp_path):
    """A run measured in a later session (the dense model took 2000 us in its rounds, against the stored 1000 us)
    is fitted at the reference's speed: halved. Runs of an older table without a reference are measured again."""
    from hwprune.latency.predictor import Predictor
    from hwprune.latency.table import Entry

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(2, 4)
    layers = analyze_layers(model, x)
    dense = {"format_version": 1, "keep": {}, "formats": {}, "channel_multiple": 8}
    half = {"format_version": 1, "keep": {"0": 0.5}, "formats": {}, "channel_multiple": 8}
    table = LatencyTable({"target": "cpu"}, 2, models={"k": {
        "blocks": "fused", "reference": {"median_us": 1000.0, "spread_pct": 1.0, "rounds": 10},
        "calibration": [{"policy": dense, "measured_us": 1000.0, "reference_us": 1000.0},
                        {"policy": half, "measured_us": 1200.0, "reference_us": 2000.0},
                        {"policy": half, "measured_us": 7.0}]}})  # an older run merged back: not on the scale
    for c in layers.configs(Policy({}, {}, 8), 2) + layers.configs(Policy({"0": 0.5}, {}, 8), 2):
        table.entries[c[1].key] = Entry(10.0, 0.1, 3)
    assert list(Predictor(table, layers, "k")._y) == [1000.0, 600.0]  # the run without reference_us left out

    target = CpuTarget(threads=1)
    old = LatencyTable(target.fingerprint(), 2, path=tmp_path / "t.json",
                       models={"k": {"calibration": [{"policy": half, "measured_us": 5.0}]}})
    logs = []
    calibrate(old, "k", model, x, [Policy({}, {}, 8), Policy.from_dict(half)], target, 2, [], logs.append, {})
    runs = old.models["k"]["calibration"]
    assert len(runs) == 2 and all("reference_us" in r for r in runs)  # the old 5 us run is gone, re-measured
    assert any("no speed reference (an older table): measuring them again" in m for m in logs)


def test_round_seconds_override_is_checked(monkeypatch):
    from hwprune import HwpruneError
    from hwprune.latency.profiler import ROUND_SECONDS, _round_seconds

    assert _round_seconds() == ROUND_SECONDS
    monkeypatch.setenv("HWPRUNE_ROUND_SECONDS", "2.5")
    assert _round_seconds() == 2.5
    for bad in ("abc", "0", "-3"):
        monkeypatch.setenv("HWPRUNE_ROUND_SECONDS", bad)
        with pytest.raises(HwpruneError, match=f"HWPRUNE_ROUND_SECONDS='{bad}' is not a positive number"):
            _round_seconds()
