"""bench/search_quality.py --quick: the comparison runs end to end and its numbers are consistent."""
import json
import os
import statistics
import subprocess
import sys

from conftest import ROOT
from test_search import DATA, MLP3, tables  # noqa: F401 - the fixture is used by name

METHODS = {"hwprune", "hwprune-fp32", "hwprune-depth", "knapsack", "uniform", "tp-global", "fastnas", "random", "flops"}


def test_search_quality_quick(tables, tmp_path):  # noqa: F811
    res, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, "bench/search_quality.py", "--quick", "--rows", f"{MLP3}|{DATA}||20",
                           "--tables", str(tables), "--batch-size", "4", "--budgets", "0.9", "--results", str(res),
                           "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-1500:]
    [js] = res.glob("search_quality_*.json")
    assert js.with_suffix(".md").exists() and js.with_suffix(".png").exists()
    row = json.loads(js.read_text())["rows"][0]
    cell = row["budgets"]["0.9"]
    assert set(cell) == METHODS
    for method, r in cell.items():
        if "final" not in r:
            assert r.get("infeasible") or r.get("unsupported"), (method, r)
            continue
        if "runs" in r:  # a search: one run per search seed (--quick: 1), its sample the finals of runs in budget
            met = [x for x in r["runs"] if x.get("met_budget")]
            assert r["misses"] == sum(1 for x in r["runs"] if "final" in x and not x["met_budget"])
            assert r["final"]["test"] == [v for x in met for v in x["final"]["test"]] or not met
            assert "finetunes" in r["runs"][0] and r["runs"][0]["finetunes"]["steps_each"] == 20
            r = r["runs"][0]
        f = r["final"]
        assert len(f["test"]) == 2 and f["mean"] == statistics.mean(f["test"])
        assert abs(f["std"] - statistics.stdev(f["test"])) < 1e-12
        assert r["met_budget"] == (f["ratio"] <= 0.9) and f["ratio"] > 0 and f["rounds"] == 5
    if "policy" in cell["uniform"]:  # chosen by measurement: the scan's ratio met the budget
        assert cell["uniform"]["scan_ratio"] <= 0.9
    if "model" in cell["tp-global"]:  # Torch-Pruning's own pruner, its ratio bisected on measured latency
        trace = dict(cell["tp-global"]["bisection"])
        assert trace[cell["tp-global"]["model"][1]] <= 0.9
    if "trials" in cell["random"]["runs"][0]:
        [csv_path] = work.glob("*-90-random-s0/trials.csv")
        assert cell["random"]["runs"][0]["trials"] == 3
        assert "uniform-" not in csv_path.read_text()  # random search: no uniform seeds
    md = js.with_suffix(".md").read_text()
    assert "## Verdicts" in md and "mlp3" in md and "hwprune without a loss in" in md


def test_verdicts_by_welchs_t():
    """A win needs |t| >= 2 and a difference of at least two test items; no point loses to a point."""
    sys.path.insert(0, str(ROOT / "bench"))
    from search_quality import verdict, welch

    row = {"direction": "max", "metric": "accuracy", "test_items": 1000}
    pt = lambda xs: {"final": {"test": xs, "mean": statistics.mean(xs)}, "met_budget": True}  # noqa: E731
    assert verdict(row, pt([0.90, 0.91, 0.92]), pt([0.80, 0.81, 0.82]))[0] == "win"
    assert verdict(row, pt([0.80, 0.81, 0.82]), pt([0.90, 0.91, 0.92]))[0] == "loss"
    assert verdict(row, pt([0.80, 0.90, 0.85]), pt([0.82, 0.88, 0.84]))[0] == "tie"  # |t| < 2
    assert verdict(row, pt([0.9001] * 3), pt([0.9] * 3))[0] == "tie"  # constant, but under two items
    assert verdict(row, pt([0.9]), {"infeasible": "x"})[0] == "win"
    assert verdict(row, {"infeasible": "x"}, pt([0.9]))[0] == "loss"
    from scipy.stats import ttest_ind

    a, b = [0.9, 0.91, 0.93, 0.9], [0.88, 0.9, 0.87]
    assert abs(welch(a, b) - ttest_ind(a, b, equal_var=False).statistic) < 1e-12
    low = {"direction": "min", "metric": "perplexity"}  # lower is better
    assert verdict(low, pt([4.0, 4.1, 4.05]), pt([5.0, 5.1, 5.05]))[0] == "win"


def test_a_peers_knob_is_bisected_past_its_own_limit_as_well_as_past_the_budget():
    """FastNAS refuses a FLOPs constraint beyond its search space (5% here): the knob is bisected between the last
    value that ran (10%, too slow) and the refused one, and the most pruning that runs and fits is taken."""
    sys.path.insert(0, str(ROOT / "bench"))
    from search_quality import _search_knob

    def measure(pct):  # ratio falls with the FLOPs share; the peer cannot go below 7%
        if pct < 7.0:
            raise ValueError("NOT all constraints can be satisfied")
        return 0.25 + pct / 100

    measure.frac = 0.33  # fits at pct <= 8
    got = _search_knob(measure, [90.0, 50.0, 10.0, 5.0], 6)
    assert 7.0 <= got["knob"] <= 8.0 and measure(got["knob"]) <= 0.33
    assert any(isinstance(r, str) for _, r in got["trace"])  # the refusal is in the trace
    measure.frac = 0.30  # nothing the peer can build fits: no point, after bisecting its limit
    assert _search_knob(measure, [90.0, 50.0, 10.0, 5.0], 6)["knob"] is None
    measure.frac = 0.80  # the usual case: bisected between the last too-slow value and the first that fits
    got = _search_knob(measure, [90.0, 50.0, 10.0, 5.0], 6)
    assert 50.0 < got["knob"] <= 55.0 and measure(got["knob"]) <= 0.80
