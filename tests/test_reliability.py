"""Kill -9 mid-search and resume: nothing completed is lost or repeated (issue 6, local backend)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT
from test_search import DATA, MLP3, tables  # noqa: F401 - the fixture is used by name


def _rows(path):
    try:
        return list(csv.DictReader(open(path)))
    except FileNotFoundError:
        return []


def test_kill_9_mid_search_then_resume(tables, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hwprune", "search", "--model", MLP3, "--data", DATA, "--target", "cpu",
           "--budget", "100%", "--batch-size", "4", "--tables", str(tables), "--finetune-steps", "400",
           "--sampler", "random", "--early-stop-margin", "0", "--out", str(out), "--trials", "6", "--json"]
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [r for r in _rows(out / "trials.csv") if r["state"] == "COMPLETE"]
        if len(done) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-500:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [r for r in _rows(out / "trials.csv") if r["state"] == "COMPLETE"]
    assert 2 <= len(before) < 6, "the search must be killed mid-run"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    s = json.loads(again.stdout)
    rows = _rows(out / "trials.csv")
    assert s["resumed"] and s["trials"] == 6
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 6
    by_number = {r["trial"]: r for r in rows}
    for r in before:  # every trial completed before the kill is still there, unchanged, and was not re-run
        assert by_number[r["trial"]] == r
    interrupted = [r for r in rows if r["state"] == "FAIL"]
    assert all(r["error"] == "interrupted (process ended mid-trial)" for r in interrupted)
    print(f"killed after {len(before)} complete; {len(interrupted)} interrupted; {len(rows)} trials in all")
    assert len(rows) == 6 + len(interrupted) and len(interrupted) <= 1
    assert sorted(int(r["trial"]) for r in rows) == list(range(len(rows)))  # no trial number twice


def test_every_trial_nan_stops_with_the_first_reason(tables, tmp_path):  # noqa: F811
    """Trials whose loss goes NaN/inf fail with the reason in trials.csv; when all fail the search stops, exit 2."""
    from test_search import _search

    proc = _search(tables, tmp_path / "r", tmp_path / "c", "--trials", "3", "--finetune-steps", "20",
                   "--lr", "1e30", model=MLP3)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hwprune: error: every trial failed; the first: HwpruneError: training loss became")
    rows = _rows(tmp_path / "r" / "trials.csv")
    assert rows and all(r["state"] == "FAIL" and "training loss became" in r["error"] for r in rows)
    assert len(rows) == 3  # stopped after the asked number of attempts, no endless retrying
