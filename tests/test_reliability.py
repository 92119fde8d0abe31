"""Kill -9 mid-search and resume: nothing completed is lost or repeated (issue 6, local backend)."""
import csv
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_search import DATA, MLP3, tables  # noqa: F401 - the fixture is used by name


def _rows(path):
    try:
        return list(csv.DictReader(open(path)))
    except FileNotFoundError:
        return []


@pytest.mark.e2e  # ~70 s of subprocess searches: the slow tier (make test-e2e; CI runs it)
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


def _search_cmd(tables, out, *extra, model=MLP3, trials=6, steps=400):
    return [sys.executable, "-m", "hwprune", "search", "--model", model, "--data", DATA, "--target", "cpu",
            "--budget", "100%", "--batch-size", "4", "--tables", str(tables), "--finetune-steps", str(steps),
            "--sampler", "random", "--early-stop-margin", "0", "--out", str(out), "--trials", str(trials), "--json",
            *extra]


def _wait_for(pred, proc, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        assert proc.poll() is None, f"ended before {what}: " + proc.stderr.read().decode()[-800:]
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_failing_trials_are_contained_and_counted(tables, tmp_path):  # noqa: F811
    """Out-of-memory and NaN trials fail with their reasons in trials.csv; the search still ends with what it asked."""
    from test_search import FLAKY

    out = tmp_path / "run"
    # plain random samples (no screen, one seed, the dense model within the limit: nothing filled or repaired):
    # the failing widths must come up among them
    proc = subprocess.run(_search_cmd(tables, out, "--screen", "0", "--seed-trials", "1", "--budget-margin", "0", model=FLAKY, trials=6,
                                      steps=30), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-800:]
    s = json.loads(proc.stdout)
    rows = _rows(out / "trials.csv")
    failed = [r for r in rows if r["state"] == "FAIL"]
    oom = [r for r in failed if r["error"].startswith("out of memory: OutOfMemoryError: CUDA out of memory")]
    nan = [r for r in failed if "training loss became nan" in r["error"]]
    print(f"{len(rows)} trials: {s['complete']} complete, {len(oom)} out of memory, {len(nan)} NaN")
    assert oom and nan and len(oom) + len(nan) == len(failed)  # every failure has its reason
    assert s["trials"] == 6 and s["complete"] == 6 and s["failed"] == len(failed)
    assert sum(1 for line in proc.stderr.splitlines() if re.match(r"hwprune: trial \d+ failed: ", line)) == len(failed)
    assert sum(1 for line in proc.stderr.splitlines() if re.match(r"hwprune: trial \d+ done ", line)) == 6


@pytest.mark.e2e  # over 15 s here: the slow tier (make test-e2e; CI runs it)
def test_two_processes_share_one_study(tables, tmp_path):  # noqa: F811
    """Two searches on the same journal both contribute; no trial lost, repeated or failed; the count is kept."""
    out = tmp_path / "run"
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c")}
    cmd = _search_cmd(tables, out, trials=8, steps=600)
    a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: len(_rows(out / "trials.csv")) >= 1, a, "the first trial")
    b = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    (_, ea), (_, eb) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (ea.decode()[-500:], eb.decode()[-500:])
    rows = _rows(out / "trials.csv")
    owners = {r["owner"].rsplit(":", 1)[1] for r in rows if r["state"] == "COMPLETE"}
    print(f"{len(rows)} trials; by process: " +
          ", ".join(f"{p}: {sum(1 for r in rows if r['owner'].endswith(':' + p))}" for p in sorted(owners)))
    assert owners == {str(a.pid), str(b.pid)}  # both contributed
    assert [r for r in rows if r["state"] != "COMPLETE"] == []  # neither failed the other's running trial
    assert 8 <= len(rows) <= 9  # the asked count; a simultaneous last start may add one
    assert sorted(int(r["trial"]) for r in rows) == list(range(len(rows)))


def test_results_are_written_from_the_study_as_it_is_when_the_lock_is_taken(tmp_path):
    """The CI failure of stop 27: a process that read the study while another's proposal was still waiting wrote
    trials.csv after the other had finished it, so the file showed a WAITING trial. trials.csv is now read and
    written under one lock: a writer that waited for the lock writes what the study holds then."""
    import threading
    from types import SimpleNamespace

    import optuna

    from hwprune.search.rundir import results_lock
    from hwprune.search.trial import Progress
    from hwprune.tasks import get_task

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"x": 1})
    progress = Progress(tmp_path, SimpleNamespace(limit_ms=1.0, task=get_task(None)), 2, 0, lambda m: None)
    t = study.ask()
    t.suggest_int("x", 0, 3)
    study.tell(t, [0.5, 0.5])
    study.enqueue_trial({"x": 2})  # another process's proposal, waiting to be asked
    with results_lock(tmp_path):  # that process writes its results now
        writer = threading.Thread(target=progress.trial_ended, args=(study, 0))
        writer.start()
        time.sleep(0.5)  # the writer waits for the lock (a wrong one writes its earlier read meanwhile)
        t2 = study.ask()  # the other process asks its proposal and finishes it
        t2.suggest_int("x", 0, 3)
        study.tell(t2, [0.6, 0.4])
    writer.join(timeout=30)
    progress.close()
    assert [(r["trial"], r["state"]) for r in _rows(tmp_path / "trials.csv")] == [("0", "COMPLETE"), ("1", "COMPLETE")]


@pytest.mark.e2e
def test_kill_9_ray_search_then_resume(tables, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c")}
    cmd = _search_cmd(tables, out, "--backend", "ray", "--workers", "2", trials=6, steps=1500)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _wait_for(lambda: len([r for r in _rows(out / "trials.csv") if r["state"] == "COMPLETE"]) >= 2, proc,
              "two completed trials", timeout=240)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (Ray's processes)
    proc.wait()
    before = [r for r in _rows(out / "trials.csv") if r["state"] == "COMPLETE"]
    assert 2 <= len(before) < 6
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                           start_new_session=True)
    assert again.returncode == 0, again.stderr[-800:]
    rows = _rows(out / "trials.csv")
    by_number = {r["trial"]: r for r in rows}
    for r in before:
        assert by_number[r["trial"]] == r
    interrupted = [r for r in rows if r["state"] == "FAIL"]
    assert all(r["error"] == "interrupted (process ended mid-trial)" for r in interrupted)
    print(f"ray: killed after {len(before)} complete; {len(interrupted)} interrupted; {len(rows)} trials in all")
    assert len([r for r in rows if r["state"] == "COMPLETE"]) == 6 and len(interrupted) <= 2
    assert sorted(int(r["trial"]) for r in rows) == list(range(len(rows)))


@pytest.mark.e2e  # ~20 s: a real profile killed mid-way
def test_interrupted_profile_leaves_a_valid_partial_table(tmp_path):
    """kill -9 mid-profile: the table on disk parses and holds what was measured; the next run completes it."""
    from hwprune.latency import LatencyTable

    tables = tmp_path / "tables"
    # chunks of ~1 s of rounds (each saved when done): the kill lands as soon as the first is on disk, whatever the
    # machine's speed (no sleep-timed kill)
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c"), "HWPRUNE_ROUND_SECONDS": "1"}
    cmd = [sys.executable, "-m", "hwprune", "profile", "--target", "cpu", "--model", "cnn1d", "--input-shape",
           "1,40", "--batch-size", "256", "--tables", str(tables), "--repeats", "10"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: list(tables.rglob("b256.json")), proc, "the first save")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    path = next(tables.rglob("b256.json"))
    partial = LatencyTable.load(path)  # valid JSON, every entry a measured latency
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-800:]
    line = next(x for x in again.stderr.splitlines() if "layer configurations;" in x)
    total, have = int(line.split()[0]), int(line.split(";")[1].split()[0])
    print(f"profile killed with {len(partial.entries)} of {total} entries saved; the rerun measured the rest")
    assert have == len(partial.entries) and 0 < have < total
    full = LatencyTable.load(path)
    assert len(full.entries) == total and all(full.entries[k] == v for k, v in partial.entries.items())
    assert any(m.get("calibration") for m in full.models.values())
