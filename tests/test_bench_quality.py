"""bench/search_quality.py --quick: the comparison runs end to end and its numbers are consistent."""
import json
import os
import statistics
import subprocess
import sys

from conftest import ROOT
from test_search import DATA, MLP3, tables  # noqa: F401 - the fixture is used by name

METHODS = {"hwprune", "knapsack", "uniform", "tp-global", "fastnas", "random", "flops"}


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
        f = r["final"]
        assert len(f["test"]) == 2 and f["mean"] == statistics.mean(f["test"])
        assert abs(f["std"] - statistics.stdev(f["test"])) < 1e-12
        assert r["met_budget"] == (f["ratio"] <= 0.9) and f["ratio"] > 0 and f["rounds"] == 5
    if "policy" in cell["uniform"]:  # chosen by measurement: the scan's ratio met the budget
        assert cell["uniform"]["scan_ratio"] <= 0.9
    if "model" in cell["tp-global"]:  # Torch-Pruning's own pruner, its ratio bisected on measured latency
        trace = dict(cell["tp-global"]["bisection"])
        assert trace[cell["tp-global"]["model"][1]] <= 0.9
    if "trials" in cell["random"]:
        [csv_path] = work.glob("*-90-random/trials.csv")
        assert cell["random"]["trials"] == 3
        assert "uniform-" not in csv_path.read_text()  # random search: no uniform seeds
    md = js.with_suffix(".md").read_text()
    assert "## Verdicts" in md and "mlp3" in md and "hwprune best or tied in" in md
