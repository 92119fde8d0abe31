"""Costs of cutting measured by the proxy (hwprune.search.sensitivity) and the measured finish (search.finish)."""
from types import SimpleNamespace

import optuna
import pytest
import torch
from torch import nn

from hwprune.policy import Policy, keep_units
from hwprune.search.sensitivity import TIE, group_levels, measure_sensitivity, monotone


class TwoBranch(nn.Module):
    """Two hidden groups of 16 units side by side; branch a's output weights are zero: its units carry nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(4, 16), nn.Linear(16, 3)
        self.b1, self.b2 = nn.Linear(4, 16), nn.Linear(16, 3)
        with torch.no_grad():
            self.a2.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


def test_a_group_whose_units_carry_no_signal_costs_nothing():
    from hwprune.apply import apply_policy
    from hwprune.space import build_space

    torch.manual_seed(0)
    model = TwoBranch().eval()
    x = torch.randn(256, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # the dense model's own answers: any real change of its outputs costs loss
    groups = [(g.name, g.units) for g in build_space(model, x[:2], []).groups]
    assert sorted(n for n, _ in groups) == ["a1", "b1"]
    calls = []

    def score(keep, formats):
        calls.append(dict(keep))
        pruned = apply_policy(model, Policy(dict(keep), dict(formats), 1), x[:2])
        with torch.no_grad():
            return -float(nn.functional.cross_entropy(pruned(x), y))

    grid = (0.125, 0.25, 0.5, 0.75, 1.0)
    sens = measure_sensitivity(score, groups, grid, {"b2": ["fp32", "int8"]}, multiple=1)
    for r in grid:  # a: nothing but the tie-breaker (a share of units dropped times TIE)
        assert sens.keep["a1"][r] == pytest.approx(TIE * (16 - keep_units(r, 16, 1)) / 16, abs=1e-9)
    costs_b = [sens.keep["b1"][r] for r in grid]
    assert costs_b[0] > 0.05 and costs_b[-1] == 0.0  # cutting b to 2 of 16 units changes the answers
    assert costs_b == sorted(costs_b, reverse=True)  # never cheaper for keeping fewer units
    assert sens.formats["b2"]["fp32"] == 0.0 and sens.formats["b2"]["int8"] >= 0.0
    assert sens.evaluations == len(calls) == 1 + 2 * (len(grid) - 1) + 1  # dense, each width but the whole, int8


def test_levels_interpolation_and_monotone():
    assert group_levels((0.0625, 0.125, 0.25, 0.5, 1.0), 32, 8) == [(8, 0.0625), (16, 0.5), (32, 1.0)]
    assert monotone([0.5, 0.7, -0.1, 0.2, 0.0]) == [0.7, 0.7, 0.2, 0.2, 0.0]
    seen = []

    def score(keep, formats):
        seen.append(keep)
        return -(1.0 - keep.get("g", 1.0))  # the cost is the share cut

    grid = tuple(k / 64 for k in range(1, 65))
    sens = measure_sensitivity(score, [("g", 64)], grid, {}, multiple=1, max_levels=5)
    assert len(seen) == 1 + 4 and len(sens.measured["g"]) == 5  # 4 widths evaluated + the dense one
    for r in grid:  # linear in between: interpolation is exact here
        assert sens.keep["g"][r] == pytest.approx(1 - r + TIE * (1 - r), abs=1e-6)


def _finish_ctx(n_finish=3):
    spec = SimpleNamespace(finish=n_finish, target="cpu", threads=1, runtime="eager", grow=False)
    # timings of one policy that never differ (45 pairs): the search's drift is 0, each timing's own noise decides
    return SimpleNamespace(spec=spec, limit_ms=1.0, budget_ms=1.05, speed_factor=1.0, measure_factor=1.0, dense_ms=2.0,
                           timings={"quiet": [1.0] * 10})


def _study(points):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat in points:
        study.add_trial(optuna.trial.create_trial(values=[acc, lat], user_attrs={
            "policy": Policy({"g": lat / 2}, {}).to_dict()}))
    return study


def test_the_measured_finish_drops_a_trial_a_timer_puts_over_budget():
    from hwprune.search.finish import finish
    from hwprune.search.rundir import best_point, front

    ctx = _finish_ctx()
    study = _study([(0.95, 0.9), (0.93, 0.8), (0.90, 0.7), (0.99, 1.2)])  # the last is over the priced limit
    timer_saw = []

    def timer(c, cands):
        timer_saw.extend(n for n, _ in cands)
        return {0: 0.60, 1: 0.50, 2: 0.40}  # trial 0: 0.60 x 2 ms = 1.2 ms, over the 1.05 ms budget

    lines = []
    got = finish(ctx, study, lines.append, timer)
    assert timer_saw == [0, 1, 2, 1, 2]  # the best three within the limit, best first; those that met, again
    assert got["dropped"] == [0] and [r["verdict"] for r in got["timed"]] == ["over", "met", "met"]
    assert got["timed"][1]["measured_ms"] == pytest.approx(1.0)
    assert study.user_attrs["finish"]["dropped"] == [0] and "over the budget as measured" in lines[-2]
    assert got["confirmed"] == {"timed_again": [1, 2], "dropped": []} and "all still within" in lines[-1]
    trials = study.get_trials()
    pts = front(trials, ctx.limit_ms)
    assert best_point(pts).number == 0  # without the finish: the best-scoring point
    assert best_point(pts, got["dropped"], trials, ctx.limit_ms).number == 1  # with it: the best one that met
    from hwprune.export import pick_trial

    assert pick_trial(trials, "best", ctx.limit_ms, study.user_attrs["finish"]["dropped"]).number == 1

    def broken(c, cands):
        raise RuntimeError("no timer here")

    lines.clear()
    assert finish(ctx, _study([(0.9, 0.9)]), lines.append, broken) is None and "could not time" in lines[0]
    assert finish(_finish_ctx(0), _study([(0.9, 0.9)]), lines.append, timer) is None  # --finish 0: nothing


def test_the_finish_takes_only_clear_margins_and_times_further_trials_until_one_meets():
    """A trial under the budget by less than 2 standard errors of its ratio (or 1%) is 'marginal': a later
    measurement may well miss, so it is never the best point; while none of the best three clearly meets the
    budget, the next three are timed."""
    from hwprune.search.finish import finish

    ctx = _finish_ctx()  # budget 1.05 ms on the table's scale, dense 2 ms
    study = _study([(0.97, 0.9), (0.96, 0.9), (0.95, 0.9), (0.94, 0.8), (0.93, 0.7), (0.92, 0.6), (0.91, 0.5)])
    batches = []

    def timer(c, cands):
        batches.append([n for n, _ in cands])
        return {0: (0.52, 0.001), 1: (0.515, 0.02), 2: (0.53, 0.01), 3: (0.52, 0.002), 4: (0.45, 0.01),
                5: (0.40, 0.01), 6: (0.3, 0.01)}

    got = finish(ctx, study, lambda m: None, timer)
    # 0: 1.04 ms, 1% under (the floor): marginal; 1: 1.03 ms, under by 1.9% < 2 x 2%: marginal; 2: over
    assert batches == [[0, 1, 2], [3, 4, 5], [4, 5]]  # none met in the first batch: the next one; 6 never
    # timed; the two that met, timed again
    assert [r["verdict"] for r in got["timed"]] == ["marginal", "marginal", "over", "marginal", "met", "met"]
    assert got["dropped"] == [0, 1, 2, 3] and got["best"] == 4


def _grow_ctx():
    """test_knapsack's repair toy (price = 10 * keep per group + 5 ms for L) with what the finish reads."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_knapsack import _repair_ctx

    ctx, _ = _repair_ctx(int8_loss=2.0)
    ctx.spec = SimpleNamespace(channel_multiple=1, finish=2, grow=True, target="cpu", threads=1, runtime="eager")
    ctx.limit_ms, ctx.budget_ms, ctx.speed_factor, ctx.measure_factor, ctx.dense_ms = 15.0, 20.0, 1.0, 1.0, 25.0
    ctx.predictor = SimpleNamespace(price=lambda p: SimpleNamespace(latency_ms=ctx.price_ms(p), macs=100),
                                    table=SimpleNamespace(batch_size=1))
    ctx.task = SimpleNamespace(metric="accuracy", show=lambda v: v)
    return ctx


def _u_study(ctx, points):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, keep in points:
        pol = Policy(keep, {})
        study.add_trial(optuna.trial.create_trial(
            values=[acc, ctx.price_ms(pol)], user_attrs={"policy": pol.to_dict()},
            params={"u:a": [0.25, 0.5, 0.75, 1.0].index(keep["a"]), "u:b": [0.25, 0.5, 0.75, 1.0].index(keep["b"]),
                    "fmt:L": "fp32"},
            distributions={"u:a": IntDistribution(0, 3), "u:b": IntDistribution(0, 3),
                           "fmt:L": CategoricalDistribution(["fp32", "int8"])}))
    return study


def test_the_finish_grows_the_best_into_measured_headroom_and_keeps_it_only_within_the_budget():
    """The best trial (15 ms priced) measures half the dense model (12.5 of a 20 ms budget): it is filled up to the
    price that maps onto the budget less 3% (b first: it recovers 4 per notch), timed again, fine-tuned once more
    and added as 'finish-grown', feasible by measurement though priced over the limit; where the grown policy
    measures too close to the budget, nothing is added."""
    from hwprune.search.finish import finish
    from hwprune.search.rundir import best_point, front

    ctx = _grow_ctx()
    for grown_ratio, kept in ((0.72, True), (0.79, False)):
        study = _u_study(ctx, [(0.90, {"a": 0.5, "b": 0.5}), (0.85, {"a": 0.25, "b": 0.5})])
        trained = []

        def timer(c, cands):
            return {n: ((grown_ratio, 0.01) if n == -1 else (0.5, 0.01)) for n, _ in cands}

        def trainer(c, pol, seed):
            trained.append(pol)
            return 0.97

        lines = []
        got = finish(ctx, study, lines.append, timer, trainer)
        g = got["grown"]
        assert g["from_trial"] == 0 and g["policy"]["keep"] == {"a": 0.75, "b": 1.0}  # priced 22.5 <= 23.28
        assert g["price_limit_ms"] == pytest.approx(15.0 * 20.0 * 0.97 / 12.5)
        trials = study.get_trials()
        if kept:
            assert g["trial"] == 2 and trials[2].user_attrs["seed"] == "finish-grown" and len(trained) == 1
            assert trials[2].values == [0.97, 22.5] and 2 in got["met"]
            pick = best_point(front(trials, ctx.limit_ms), got["dropped"], trials, ctx.limit_ms, got["met"])
            assert pick.number == 2  # priced over the limit, measured within the budget: the best point
            assert best_point(front(trials, ctx.limit_ms)).number == 0  # by price alone it would not count
        else:
            assert g["trial"] is None and len(trials) == 2 and not trained and any("too close" in m for m in lines)


def test_a_second_timing_drops_a_point_that_drifted_over_the_budget_and_the_next_best_is_picked():
    """Every trial that met is timed again at the end; its verdict is taken on the worse of the two: trial 0 (and
    the policy grown from it) measured within the budget the first time and over it the second, so the best point
    is trial 1, which met both times."""
    from hwprune.search.finish import finish
    from hwprune.search.rundir import best_point, front

    ctx = _grow_ctx()  # budget 20 ms on the table's scale, dense 25 ms: a ratio of 0.8
    study = _u_study(ctx, [(0.90, {"a": 0.5, "b": 0.5}), (0.85, {"a": 0.25, "b": 0.5})])
    calls = []

    def timer(c, cands):
        calls.append([n for n, _ in cands])
        second = len(calls) > 2
        return {n: ((0.72, 0.01) if n == -1 else (0.85 if second and n in (0, 2) else 0.5, 0.01)) for n, _ in cands}

    lines = []
    got = finish(ctx, study, lines.append, timer, lambda c, p, s: 0.97)
    assert calls == [[0, 1], [-1], [0, 1, 2]] and got["grown"]["trial"] == 2
    assert got["confirmed"]["dropped"] == [0, 2] and got["met"] == [1] and got["best"] == 1
    assert got["timed"][0]["verdict"] == "over" and got["timed"][0]["ratio_again"] == 0.85
    assert got["grown"]["verdict"] == "over" and set(got["dropped"]) == {0, 2}
    assert "dropped: 0, 2" in lines[-2] and "now trial 1" in lines[-1]
    trials = study.get_trials()
    assert best_point(front(trials, ctx.limit_ms), got["dropped"], trials, ctx.limit_ms, got["met"],
                      got["best"]).number == 1


def test_near_ties_are_rescored_with_another_data_order_not_broken_toward_the_faster():
    """Two trials within two validation items of each other: both are fine-tuned once more (seed + 1) and the
    better mean wins, here the one that scored a little lower first; a clear winner is not re-scored."""
    from hwprune.search.finish import finish
    from hwprune.search.rundir import best_point, front

    ctx = _grow_ctx()
    ctx.spec.grow, ctx.val_items = False, 200  # two items: 0.01
    study = _u_study(ctx, [(0.900, {"a": 0.5, "b": 0.5}), (0.895, {"a": 0.25, "b": 0.5}),
                           (0.80, {"a": 0.25, "b": 0.25})])
    again = {0.5: 0.88, 0.25: 0.91}  # the second fine-tune, by a's keep ratio

    def trainer(c, pol, seed):
        assert seed == 1
        return again[pol.keep["a"]]

    lines = []
    got = finish(ctx, study, lines.append, lambda c, cands: {n: 0.5 for n, _ in cands}, trainer)
    assert [r["trial"] for r in got["rescored"]] == [0, 1] and got["best"] == 1
    assert got["rescored"][1]["mean"] == pytest.approx((0.895 + 0.91) / 2) and any("near-tie" in m for m in lines)
    trials = study.get_trials()
    assert best_point(front(trials, ctx.limit_ms), got["dropped"], trials, ctx.limit_ms, got["met"],
                      got["best"]).number == 1
    clear = _u_study(ctx, [(0.95, {"a": 0.5, "b": 0.5}), (0.90, {"a": 0.25, "b": 0.5})])
    got = finish(ctx, clear, lines.append, lambda c, cands: {n: 0.5 for n, _ in cands}, trainer)
    assert "rescored" not in got and got["best"] == 0


def test_the_finish_is_not_repeated_by_a_resume_that_ran_nothing_and_only_times_a_shared_study():
    from hwprune.search.finish import finish

    ctx = _grow_ctx()
    study = _u_study(ctx, [(0.90, {"a": 0.5, "b": 0.5}), (0.85, {"a": 0.25, "b": 0.5})])
    calls = []

    def timer(c, cands):
        calls.append([n for n, _ in cands])
        return {n: ((0.72, 0.01) if n == -1 else (0.5, 0.01)) for n, _ in cands}

    first = finish(ctx, study, lambda m: None, timer, lambda c, p, s: 0.97)
    assert first["grown"]["trial"] == 2 and first["after_trials"] == 2 and len(calls) == 3
    assert calls[2] == [0, 1, 2]  # the second timing: the trials that met and the grown one
    lines = []
    again = finish(ctx, study, lines.append, timer, lambda c, p, s: 0.97)  # nothing new: the same finish
    assert again == first and len(calls) == 3 and len(study.trials) == 3 and "as before" in lines[0]

    shared = _u_study(ctx, [(0.90, {"a": 0.5, "b": 0.5})])
    shared.add_trial(optuna.trial.create_trial(values=[0.8, 12.5], user_attrs={"owner": "otherhost:1", "policy": Policy(
        {"a": 0.25, "b": 0.25}, {}).to_dict()}))
    lines.clear()
    got = finish(ctx, shared, lines.append, timer, lambda c, p, s: 0.97)
    assert "grown" not in got and len(shared.trials) == 2 and got["best"] == 0
    assert any("times and drops only" in m for m in lines)


def test_bad_seed_trials_finish_costs_and_objective_are_one_line_errors():
    from hwprune.errors import HwpruneError
    from hwprune.search.spec import SearchSpec

    base = dict(model="cnn1d", data="mnist1d", budget="50%")
    for bad, want in (({"seed_trials": 0}, "seed_trials must be >= 1"), ({"finish": -1}, "finish >= 0"),
                      ({"costs": "flops"}, "unknown costs 'flops'; known: sensitivity, importance"),
                      ({"objective": "both"}, "unknown objective 'both'; known: metric, front")):
        with pytest.raises(HwpruneError, match=want):
            SearchSpec(**base, **bad).validate()


def test_the_finish_measures_on_only_while_a_verdict_is_open():
    """A sequential measurement: rounds go on only for a candidate whose verdict against the budget more rounds
    could change (not clearly under by 2 standard errors and 1%, yet within reach of it), up to the cap."""
    from hwprune.search.finish import sequential, undecided

    assert not undecided(0.29, 0.01, 0.30)  # allowed 0.30: under by 3.4% >= max(1%, 2 x 1%): met, decided
    assert undecided(0.29, 0.02, 0.30)  # under by 3.4% < 4%: not yet met, but 3.4% + 4% reaches 1%
    assert not undecided(0.298, 0.001, 0.30)  # under by 0.7% < the 1% floor: no precision makes it meet
    assert not undecided(0.40, 0.01, 0.30)  # over by 25% with 1% noise: clearly over
    assert undecided(0.31, 0.05, 0.30)  # over by 3%, but 2 x 5% noise reaches under the budget

    calls = []

    def measure(keys, so_far):
        calls.append(list(keys))
        return {0: [0.2] * 15, 1: [0.27, 0.31] * 7 + [0.29], 2: [0.4] * 15}

    out = sequential(lambda keys, s: {n: v for n, v in measure(keys, s).items() if n in keys}, [0, 1, 2], 0.30,
                     rounds=15, max_rounds=60)
    assert calls == [[0, 1, 2], [1], [1], [1]]  # the 0.29 +- 0.02 candidate alone, until 60 rounds
    assert out[0] == (0.2, 0.0) and out[2] == (0.4, 0.0) and out[1][0] == pytest.approx(0.29)
    # its error after 60 rounds: 1.25 x IQR / 1.35 / sqrt(60) / median, the IQR of the +-0.02 rounds
    ratios = sorted(([0.27, 0.31] * 7 + [0.29]) * 4)
    import statistics

    q = statistics.quantiles(ratios, n=4)
    assert out[1][1] == pytest.approx(1.25 * (q[2] - q[0]) / 1.35 / 60 ** 0.5 / 0.29)
    calls.clear()
    sequential(lambda keys, s: {n: v for n, v in measure(keys, s).items() if n in keys}, [0, 1, 2], 0.30,
               rounds=15, max_rounds=30)
    assert calls == [[0, 1, 2], [1]]  # the cap
    calls.clear()
    sequential(lambda keys, s: {n: v for n, v in measure(keys, s).items() if n in keys}, [0, 1, 2], 0.30,
               rounds=15, max_rounds=60, max_seconds=0.0)
    assert calls == [[0, 1, 2]]  # the time cap: the first pass always, no more


def test_the_second_timing_keeps_a_trial_whose_each_measurement_clears_the_margin_on_its_own_noise():
    """First 0.46x with 4% noise (under the 0.525x budget by 14% >= 8%), again 0.495x with 0.5% noise (under by
    6.1% >= 1%): both clear the margin, the trial is kept (the worse ratio with the other measurement's noise
    would not); again 0.52x (under by 1% < 2%): dropped."""
    from hwprune.search.finish import finish

    for again, kept in ((0.495, True), (0.52, False)):
        ctx = _finish_ctx()  # budget 1.05 ms on the table's scale, dense 2 ms: 0.525x
        study = _study([(0.95, 0.9)])
        timings = iter([{0: (0.46, 0.04)}, {0: (again, 0.005)}])
        ctx.spec.grow = False
        got = finish(ctx, study, lambda m: None, lambda c, cands: next(timings))
        assert got["confirmed"]["dropped"] == ([] if kept else [0]) and got.get("best") == (0 if kept else None)
        assert got["timed"][0]["ratio_again"] == again
        assert got["timed"][0]["verdict"] == ("met" if kept else "marginal")


def test_the_gate_shrinks_a_proposal_measured_over_the_budget_before_its_fine_tune():
    """A proposal timed at 0.6x of a 2 ms dense model (1.2 ms against a 1.05 ms budget) is repaired to its price
    x 1.05 / 1.03 / 1.2 (where the finish's two timings will pass: the budget less 3 x its 1% noise, at least 2%)
    and timed again; within then, it is
    trained; one still over is shrunk again, three timings at most; one timed clearly within is trained as it
    is; no gate without the finish, with --no-gate, on Ray."""
    from hwprune.search.finish import gate

    limits = []
    small = Policy({"g": 0.25}, {})

    def resize(policy, limit, up):
        limits.append(limit)
        return small, 3

    def timings(*ratios):
        it = iter(ratios)
        return lambda c, cands: {0: next(it)}

    ctx = _finish_ctx()
    ctx.spec.gate, ctx.spec.backend, ctx.fills = True, "local", True
    ctx.price_ms = lambda p: 0.9 if p is not small else 0.7
    ctx.settle = lambda p, log, grow=True, limit=None: (p, 0)
    big = Policy({"g": 0.5}, {})
    lines = []
    pol, info = gate(ctx, big, lines.append, timings((0.6, 0.01), (0.5, 0.01)), resize=resize)
    assert pol is small and limits == [pytest.approx(0.9 * 1.05 / 1.03 / 1.2)]  # to the budget less 3 x 1%
    assert info["verdict"] == "over" and info["shrunk"] == 3 and info["measured_ms"] == pytest.approx(1.2)
    assert info["after"]["ratio"] == 0.5
    assert "not clearly within the budget" in lines[-1] and "shrunk by 3" in lines[-1]
    limits.clear()
    pol, info = gate(ctx, big, lines.append, timings((0.6, 0.01), (0.6, 0.01), (0.6, 0.01), (0.1, 0)),
                     resize=resize)
    # a repair that cannot cut further (the same policy again) ends the gate: over, left to the finish
    assert pol is small and len(limits) == 2 and info["shrunk"] == 3 and info["after"]["ratio"] == 0.6
    assert info["final"] == "over"
    pol, info = gate(ctx, big, lines.append, timings((0.5, 0.01)), resize=resize)  # 1.0 ms x 1.02: within
    assert pol is big and info["verdict"] == "within" and info["shrunk"] == 0
    limits.clear()
    # 1.0 x 1.06 > 1.05: not clearly within
    pol, info = gate(ctx, big, lines.append, timings((0.5, 0.03), (0.5, 0.01)), resize=resize)
    assert pol is small and limits == [pytest.approx(0.9 * 1.05 / 1.09 / 1.0)]  # less 3 x 3%
    for change in ({"gate": False}, {"finish": 0}, {"backend": "ray"}):
        off = _finish_ctx()
        off.spec.gate, off.spec.backend, off.fills = True, "local", True
        vars(off.spec).update(change)
        assert gate(off, big, lines.append, timings((0.6, 0.01)), resize=resize) == (big, None)
    pol, info = gate(ctx, big, lines.append, lambda c, cands: (_ for _ in ()).throw(RuntimeError("no clock")),
                     resize=resize)
    assert (pol, info) == (big, None) and "could not time a proposal" in lines[-1]


def test_no_best_point_when_the_finish_passes_over_every_feasible_trial(tmp_path):
    """Every feasible trial timed over the budget: no point is called best (not the best-scoring dropped one),
    export --trial best says so in one line, and no best_policy.json is left from an earlier end of the run."""
    from hwprune.errors import HwpruneError
    from hwprune.export import pick_trial
    from hwprune.search.finish import finish
    from hwprune.search.rundir import best_point, front, write_front

    ctx = _finish_ctx()
    study = _study([(0.95, 0.9), (0.93, 0.8)])
    got = finish(ctx, study, lambda m: None, lambda c, cands: {n: 0.6 for n, _ in cands})  # 1.2 ms > 1.05 ms
    trials = study.get_trials()
    assert got["dropped"] == [0, 1] and "best" not in got
    pts = front(trials, ctx.limit_ms)
    assert best_point(pts).number == 0  # by price alone
    assert best_point(pts, got["dropped"], trials, ctx.limit_ms, got["met"]) is None
    with pytest.raises(HwpruneError, match="no best point: its measured finish timed every feasible trial over"):
        pick_trial(trials, "best", ctx.limit_ms, got["dropped"], got["met"])
    assert pick_trial(trials, "1", ctx.limit_ms, got["dropped"]).number == 1  # by number: still exportable
    (tmp_path / "best_policy.json").write_text("{}")
    assert write_front(tmp_path, pts, 1.05, None, False) is None and not (tmp_path / "best_policy.json").exists()
    assert (tmp_path / "pareto.csv").exists()


def test_the_finish_judges_timings_by_how_far_apart_timings_of_one_policy_are():
    """The drift of one timing is 1.4826 x the median |log difference| / sqrt 2 over the pairs of timings of one
    policy (None under 3 pairs). Three trials the gate timed at 0.40x that the finish times at 0.48, 0.45 and
    0.44x (0.5% noise each) drift by 12%: each is under the 0.525x budget on its own noise, yet not by 2 x 12%, so
    none is called met; without the gate's timings the same timings meet it."""
    import json
    import math

    from hwprune.search.finish import drift, finish

    steps = {"p": [1.0, math.exp(0.04)], "q": [1.0, math.exp(-0.04)], "r": [1.0, math.exp(0.04)]}
    assert drift(steps) == pytest.approx(1.4826 * 0.04 / math.sqrt(2))
    assert drift({"p": [1.0, 1.1]}) is None and drift({"p": [1.0, 1.1, 1.2]}) is not None  # 1 pair; 3 pairs
    for gated in (True, False):
        ctx = _finish_ctx()
        ctx.timings = {}
        study = optuna.create_study(directions=["maximize", "minimize"])
        for acc, g in ((0.95, 0.4), (0.94, 0.41), (0.93, 0.42)):
            pol = Policy({"g": g}, {})
            if gated:  # what the gate measured before the fine-tune
                ctx.timings[json.dumps(pol.to_dict(), sort_keys=True)] = [0.40]
            study.add_trial(optuna.trial.create_trial(values=[acc, 0.9], user_attrs={"policy": pol.to_dict()}))
        times = {0: (0.48, 0.005), 1: (0.45, 0.005), 2: (0.44, 0.005)}
        got = finish(ctx, study, lambda m: None, lambda c, cands: {n: times[n] for n, _ in cands})
        if gated:
            assert got["drift"]["noise"] == pytest.approx(1.4826 * math.log(0.45 / 0.40) / math.sqrt(2), abs=1e-4)
            assert got["met"] == [] and got.get("best") is None
        else:  # the finish's and the second timing's pairs agree: no drift, own noise
            assert got["drift"]["noise"] == 0.0 and got.get("best") == 0


def test_when_no_timed_trial_clearly_meets_the_budget_the_best_is_shrunk_into_it():
    """Both trials measure 0.79x of the dense model against a 0.80x budget with 1% noise: neither is clearly
    within. The best (a and b at a half, 15 ms priced) is repaired to 15 x 19.4 / 19.75 ms (the budget less 3%,
    as it measured): a down a notch (the cheapest cut per loss), timed at 0.55x, fine-tuned once more and added as
    'finish-shrunk', the best point; without --grow nothing is moved and there is no best point."""
    from hwprune.search.finish import finish

    for grow in (True, False):
        ctx = _grow_ctx()
        ctx.spec.grow = grow
        study = _u_study(ctx, [(0.90, {"a": 0.5, "b": 0.5}), (0.85, {"a": 0.75, "b": 0.25})])
        ratios = {0: (0.79, 0.01), 1: (0.79, 0.01), -1: (0.55, 0.01), 2: (0.55, 0.01)}
        trained = []
        got = finish(ctx, study, lambda m: None, lambda c, cands: {n: ratios[n] for n, _ in cands},
                     lambda c, pol, seed: trained.append(pol) or 0.88)
        assert [r["verdict"] for r in got["timed"]] == ["marginal", "marginal"]
        if not grow:
            assert got.get("best") is None and not trained
            continue
        g = got["grown"]
        assert g["move"] == "shrunk" and g["from_trial"] == 0 and g["policy"]["keep"] == {"a": 0.25, "b": 0.5}
        assert g["price_limit_ms"] == pytest.approx(15.0 * 19.4 / 19.75)
        assert study.trials[2].user_attrs["seed"] == "finish-shrunk" and got["best"] == 2 and len(trained) == 1


def test_a_marginal_best_trial_that_scores_clearly_above_those_that_met_is_shrunk_into_the_budget():
    """Trial 0 (0.90) measures 0.79x of a 0.80x budget, not clearly within; trial 1 (0.85) clearly meets. 0.90 is
    more than a near-tie above 0.85: trial 0 is shrunk into the budget and fine-tuned (0.88), and being the best
    that met, it is the best point. Where the marginal trial is only a near-tie above (0.851), nothing moves."""
    from hwprune.search.finish import finish

    for lead, moved in ((0.90, True), (0.851, False)):
        ctx = _grow_ctx()
        ctx.spec.grow, ctx.val_items = True, 1000  # a near-tie: two items, 0.002
        study = _u_study(ctx, [(lead, {"a": 0.5, "b": 0.5}), (0.85, {"a": 0.75, "b": 0.25})])
        ratios = {0: (0.79, 0.01), 1: (0.5, 0.01), -1: (0.55, 0.01), 2: (0.55, 0.01)}
        got = finish(ctx, study, lambda m: None, lambda c, cands: {n: ratios[n] for n, _ in cands},
                     lambda c, pol, seed: 0.88)
        if moved:
            assert got["grown"]["move"] == "shrunk" and got["grown"]["from_trial"] == 0 and got["best"] == 2
        else:  # trial 1, the best that met, is grown into its headroom instead (0.5x of 0.8x)
            assert got["grown"]["move"] == "grown" and got["grown"]["from_trial"] == 1 and got["best"] == 2


def test_when_the_second_timing_leaves_no_trial_the_best_is_shrunk_on_its_worse_timing_and_timed_again():
    """The only trial meets at 0.77x of a 0.80x budget (1% noise), then measures 0.79x the second time: not
    clearly within, dropped. Rather than no point, it is shrunk on the worse timing (15 x 19.4 / 19.75 ms: a down
    a notch), fine-tuned (trial 1), timed again at 0.55x, and is the best point; one that then measures over
    leaves no point."""
    from hwprune.search.finish import finish

    for last, kept in ((0.55, True), (0.81, False)):
        ctx = _grow_ctx()
        study = _u_study(ctx, [(0.90, {"a": 0.5, "b": 0.5})])
        seen = {0: iter([0.77, 0.79]), -1: iter([0.55]), 1: iter([last])}
        got = finish(ctx, study, lambda m: None,
                     lambda c, cands: {n: (next(seen[n]), 0.01) for n, _ in cands}, lambda c, pol, seed: 0.87)
        assert got["confirmed"]["dropped"] == [0]
        r = got["rescued"]
        assert r["move"] == "shrunk" and r["policy"]["keep"] == {"a": 0.25, "b": 0.5} and r["trial"] == 1
        assert r["ratio_again"] == last and got.get("best") == (1 if kept else None)
        assert (1 in got["met"]) == kept and (1 in got["dropped"]) != kept


def test_the_drift_is_taken_from_timings_minutes_apart_where_there_are_enough():
    """Back-to-back timings of one policy agree to 1%, timings a minute apart differ by 6%: with three pairs a
    minute or more apart, the drift is theirs (what a later measurement will see); with fewer, every pair counts."""
    import math

    from hwprune.search.finish import drift

    near = {f"p{i}": [(0.0, 1.0), (1.0, math.exp(0.01))] for i in range(5)}  # 5 pairs a second apart
    far = {f"q{i}": [(0.0, 1.0), (60.0, math.exp(0.06))] for i in range(3)}  # 3 pairs a minute apart
    assert drift({**near, **far}) == pytest.approx(1.4826 * 0.06 / math.sqrt(2))
    two = {f"q{i}": v for i, v in enumerate(list(far.values())[:2])}
    assert drift({**near, **two}) == pytest.approx(1.4826 * 0.01 / math.sqrt(2))  # median of 7: a near pair


def test_the_trial_shrunk_into_the_budget_is_the_best_within_reach_not_the_best_far_over():
    """Against a 0.5x budget: 0.94 measured 0.56x (12% over), 0.93 measured 0.52x, 0.92 measured 0.47x: the best
    within 10% over is shrunk (0.93); with every candidate far over, the one measured lowest."""
    from hwprune.search.finish import _to_shrink

    ctx = SimpleNamespace(dense_ms=2.0)
    trials = [SimpleNamespace(number=n, values=[acc, 0.0]) for n, acc in enumerate((0.94, 0.93, 0.92))]
    assert _to_shrink(ctx, trials, {0: 0.56, 1: 0.52, 2: 0.47}, allowed=1.0).number == 1
    assert _to_shrink(ctx, trials, {0: 0.60, 1: 0.58, 2: 0.62}, allowed=1.0).number == 1
    assert _to_shrink(ctx, [], {}, allowed=1.0) is None


def test_a_rescue_first_times_the_next_trials_and_shrinks_the_best_only_when_it_can_beat_them():
    """Only the best trial is timed by the finish (finish = 1): 0.77x then 0.79x of a 0.80x budget, dropped. The
    next trial, never timed, is then timed twice (0.60x both times, clearly within): the fallback. Trial 0 (0.90)
    scores more than a near-tie above it (0.85), so it is shrunk into the budget and fine-tuned: scoring 0.84, the
    fallback stays the best point; scoring 0.88, the shrunk trial is. Where the best is only a near-tie above the
    fallback (0.851), nothing is shrunk and nothing more is fine-tuned."""
    from hwprune.search.finish import finish

    for lead, shrunk_score, best in ((0.90, 0.84, 1), (0.90, 0.88, 2), (0.851, None, 1)):
        ctx = _grow_ctx()
        ctx.spec.finish, ctx.val_items = 1, 1000  # a near-tie: two items, 0.002
        study = _u_study(ctx, [(lead, {"a": 0.5, "b": 0.5}), (0.85, {"a": 0.25, "b": 0.5})])
        seen = {0: iter([0.77, 0.79]), 1: iter([0.60, 0.60]), -1: iter([0.55]), 2: iter([0.55])}
        trained = []
        got = finish(ctx, study, lambda m: None,
                     lambda c, cands: {n: (next(seen[n]), 0.01) for n, _ in cands},
                     lambda c, pol, seed: trained.append(pol) or shrunk_score)
        assert got["confirmed"]["dropped"] == [0]
        assert [(r["trial"], r["ratio_first"], r["verdict"]) for r in got["fallback"]] == [(1, 0.6, "met")]
        assert got["best"] == best and 1 in got["met"]
        assert len(trained) == (0 if shrunk_score is None else 1)
        if shrunk_score is not None:
            assert got["rescued"]["from_trial"] == 0 and got["rescued"]["verdict"] == "met"
