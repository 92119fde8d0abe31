"""Your device, not ours (issue 12): tables profiled on demand, cheap checks first, budgets kept, concurrent use.

The end-to-end tests fake this machine's CPU (a subprocess whose fingerprint function is replaced) so that
no committed table matches it, whatever machine runs the suite.
"""
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli
from test_search import DATA, MLP, MLP3, _search, tables  # noqa: F401 - the fixture is used by name

from hwprune import HwpruneError
from hwprune.latency import LatencyTable, get_target, resolve_table, table_path
from hwprune.latency.table import Entry

FAKE_CPU = "Test CPU 9000 (not a real machine)"
# python -c prelude: this process's CPU is FAKE_CPU with AVX2/FMA only, then the CLI runs as usual
FAKE = ("import sys, hwprune.device.targets as t; "
        f"t._cpu_model_and_flags = lambda: ({FAKE_CPU!r}, ['avx2', 'fma']); "
        "from hwprune.cli import main; sys.exit(main(sys.argv[1:]))")


def _fake_cli(*args, env):
    clean = {k: v for k, v in os.environ.items() if k != "HWPRUNE_TABLES"}
    return subprocess.run([sys.executable, "-c", FAKE, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, **env}, timeout=900)


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.exists() else []


@pytest.fixture(scope="module")
def random_cnn1d(tmp_path_factory):
    """A cnn1d state dict (random init): the on-demand test needs no trained model, only its structure."""
    from hwprune.models import build_model

    p = tmp_path_factory.mktemp("w") / "cnn1d.pt"
    torch.manual_seed(0)
    torch.save(build_model("cnn1d", (1, 40), 10, {}).state_dict(), p)
    return p


@pytest.mark.e2e  # ~75 s: the demo's whole profile at batch 512, a search and an export in subprocesses
def test_unseen_machine_profiles_then_searches_and_exports(random_cnn1d, tmp_path):
    """The demo's spec on a machine no table matches: profiled on demand, searched, exported, exit 0."""
    cache = tmp_path / "cache"
    env = {"HWPRUNE_CACHE": str(cache)}
    out = tmp_path / "run"
    t0 = time.time()
    proc = _fake_cli("search", "--spec", "search/cnn1d-mnist1d-cpu.yaml", "--trials", "3", "--finetune-steps", "5",
                     "--weights", str(random_cnn1d), "--out", str(out), "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no cpu table for this machine" in proc.stderr and FAKE_CPU in proc.stderr
    profiled = re.search(r"measuring (\d+) layer configurations and up to 20 calibration runs, ~\d+ s", proc.stderr)
    assert profiled
    tables_made = list((cache / "tables").glob("cpu-*/b512.json"))
    assert len(tables_made) == 1  # the user's folder, not the repository's latency_tables/
    tbl = LatencyTable.load(tables_made[0])
    assert tbl.fingerprint["cpu"] == FAKE_CPU and tbl.fingerprint["flags"] == ["avx2", "fma"]
    layers = [k for k in tbl.entries if not k.startswith("cast|")]
    casts = {k.split("|")[1] for k in tbl.entries if k.startswith("cast|")}
    assert casts == {"fp32>bf16", "bf16>fp32"}  # + the casts of bf16 regions
    # the profile's grid (330 layer entries + casts), then what keep ratios off the grid needed, measured on demand
    on_demand = sum(int(n) for n in re.findall(r"measured (\d+) layer configuration\(s\)", proc.stderr))
    assert len(tbl.entries) == int(profiled.group(1)) + on_demand and len(layers) >= 330
    assert len(next(iter(tbl.models.values()))["calibration"]) == 20
    s = json.loads(proc.stdout)
    assert s["trials"] == 3 and s["table_fingerprint"]["cpu"] == FAKE_CPU
    # a share of the dense latency is priced where the speed curve, timed now, puts the limit (price_scale)
    run = json.loads((out / "run.json").read_text())
    assert s["limit_ms"] == pytest.approx(s["budget_ms"] / (1 + s["budget_margin"]) / run["speed_factor"])
    assert run["measure_factor"] == 1.0 and 0.5 < run["speed_factor"] < 2.0
    # each point priced within the limit, or grown by the gate into headroom it measured (its own limit)
    import csv

    rows = {r["trial"]: r for r in csv.DictReader(open(out / "trials.csv"))}
    assert s["pareto"] and all(rows[str(p["trial"])]["feasible"] == "True" for p in s["pareto"])

    again = _fake_cli("search", "--spec", "search/cnn1d-mnist1d-cpu.yaml", "--trials", "3", "--finetune-steps", "5",
                      "--weights", str(random_cnn1d), "--out", str(out), "--json", env=env)
    assert again.returncode == 0 and "measuring" not in again.stderr  # the table is found, not re-measured

    exp = _fake_cli("export", str(out), "--trust-code", "--finetune-steps", "3", "--repeats", "5", "--json", env=env)
    assert exp.returncode == 0, exp.stderr[-2000:]
    e = json.loads(exp.stdout)
    assert e["fingerprint_matches"] and e["measured_latency_ms"] > 0
    # the verdict is on the measurement at the table's speed (issue 20), not the raw one on a drifting machine
    assert e["over_budget"] == (e["measurement"]["adjusted_ms"] > e["budget_ms"])
    print(f"unseen machine: search+profile {time.time() - t0:.0f} s; export measured {e['measured_latency_ms']:.4f} "
          f"ms for a {e['budget_ms']:.4f} ms budget (margin {s['budget_margin']:.1%})")


def test_unseen_machine_with_no_profile_refuses_before_training(tmp_path):
    cache = tmp_path / "cache"
    proc = _fake_cli("search", "--spec", "search/cnn1d-mnist1d-cpu.yaml", "--trials", "2", "--no-profile",
                     "--out", str(tmp_path / "run"), env={"HWPRUNE_CACHE": str(cache)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hwprune: error: ") and "--no-profile" in last
    assert "was measured on another device" in last and "--allow-foreign-table" in last  # the shipped table
    assert _files(cache) == [] and not (tmp_path / "run").exists()  # nothing trained, profiled or claimed


def test_unreachable_budget_fails_before_any_training(tables, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    proc = _search(tables, tmp_path / "run", cache, "--trials", "2", "--budget", "1us", "--no-way-out")
    assert proc.returncode == 2, proc.stderr
    assert "cannot be met" in proc.stderr.strip().splitlines()[-1] and "training" not in proc.stderr
    assert _files(cache) == []  # no base model was trained or cached


def test_budget_margin_flag_and_message(tables, tmp_path):  # noqa: F811
    """--budget-margin prices candidates at most budget / (1 + margin); a margin that leaves no room says so."""
    proc = _search(tables, tmp_path / "run", tmp_path / "cache", "--trials", "2", "--budget-margin", "0.1")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["budget_margin"] == 0.1 and s["limit_ms"] == pytest.approx(s["budget_ms"] / 1.1)
    assert all(p["predicted_latency_ms"] <= s["limit_ms"] + 1e-9 for p in s["pareto"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["limit_ms"] == pytest.approx(s["limit_ms"]) and run["identity"]["budget_margin"] == 0.1
    tight = _search(tables, tmp_path / "run2", tmp_path / "cache", "--budget-margin", "0.7", "--no-way-out")
    assert tight.returncode == 2 and "less the 70.0% margin for prediction error; --budget-margin 0 prices up to " \
        "the budget itself) cannot be met" in tight.stderr
    bad = _search(tables, tmp_path / "run3", tmp_path / "cache", "--budget-margin", "1.5")
    assert bad.returncode == 2 and "budget_margin must be in [0, 1)" in bad.stderr


# --- every flag a message suggests exists on that command -------------------------------------------------

def _help(cmd):
    from hwprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[cmd].format_help()


def _suggested(message):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", message))


def test_flags_suggested_by_bad_input_messages_exist():
    from test_bad_input import ROWS

    checked = 0
    for row in ROWS:
        cmd, message, _ = row.values
        command = shlex.split(cmd)[1]
        for flag in _suggested(message):
            assert flag in _help(command), f"{command} has no {flag} (suggested by: {message})"
            checked += 1
    assert checked >= 2


def test_flags_suggested_by_table_refusals_exist(tmp_path):
    here = get_target("cpu", threads=1)
    fp = {**here.fingerprint(), "cpu": "Some Other CPU"}
    LatencyTable(fp, 4, {"linear|i4|o4|x-|b4|bias|fp32": Entry(1.0, 0.1, 3)}).save(table_path(tmp_path, fp, 4))
    messages = []
    for batch in (4, 5):  # a foreign table; no table at all
        with pytest.raises(HwpruneError) as err:
            resolve_table(here, batch, tables=tmp_path)
        messages.append(str(err.value))
    flags = set().union(*map(_suggested, messages))
    assert {"--no-profile", "--allow-foreign-table"} <= flags
    for cmd in ("search", "predict", "validate"):
        for flag in flags - {"--target", "--batch-size"}:
            assert flag in _help(cmd), f"{cmd} has no {flag}"
    # export measures on this machine or not: its own flag, not the table flag of the commands that price
    assert "--measure-here" in _help("export") and "--allow-foreign-table" not in _help("export")


# --- concurrent use ----------------------------------------------------------------------------------------

def test_two_saves_of_one_table_merge(tmp_path):
    fp = get_target("cpu", threads=1).fingerprint()
    path = table_path(tmp_path, fp, 4)
    a, b = LatencyTable(fp, 4, path=path), LatencyTable(fp, 4, path=path)
    a.entries["k1"] = Entry(1.0, 0.1, 3)
    a.models["m1"] = {"grid": [1.0], "calibration": [{"policy": {"format_version": 1, "keep": {}}, "measured_us": 5.0, "iqr_us": 0.1}]}
    b.entries["k2"] = Entry(2.0, 0.1, 3)
    b.models["m2"] = {"grid": [1.0], "calibration": [{"policy": {"format_version": 1, "keep": {"g": 0.5}}, "measured_us": 7.0, "iqr_us": 0.1}]}
    a.save()
    b.save()  # the last writer used to win and drop k1/m1
    disk = LatencyTable.load(path)
    assert set(disk.entries) == {"k1", "k2"} and set(disk.models) == {"m1", "m2"}
    a.entries["k3"] = Entry(3.0, 0.1, 3)
    a.save()
    assert set(LatencyTable.load(path).entries) == {"k1", "k2", "k3"}


def test_two_profile_processes_on_one_table_keep_both(tmp_path):
    """Two real 'hwprune profile' processes, two models, one device and batch: neither loses its entries."""
    cmd = lambda model: [sys.executable, "-m", "hwprune", "profile", "--target", "cpu", "--model", model,  # noqa: E731
                         "--data", DATA, "--batch-size", "4", "--tables", str(tmp_path), "--grid", "0.5,1.0",
                         "--calibration", "3", "--repeats", "3", "--json"]
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen(cmd(m), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in (MLP, MLP3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    summaries = [json.loads(o[0]) for o in outs]
    assert summaries[0]["table"] == summaries[1]["table"]
    disk = LatencyTable.load(summaries[0]["table"])
    assert {s["model_key"] for s in summaries} <= set(disk.models)
    for s in summaries:
        assert len(disk.models[s["model_key"]]["calibration"]) == s["calibration_measured_now"] >= 2
    for s in summaries:  # every configuration each process measured is in the file
        assert s["configurations"] <= len(disk.entries)
    files = [p.name for p in next(iter(tmp_path.glob("cpu-*"))).iterdir()]
    assert "b4.json" in files and not [f for f in files if f.endswith(".tmp")]


def _inject_running(run, owner, heartbeat):
    """A RUNNING trial in the run's study, owned by ``owner`` (another host), last renewed at ``heartbeat``."""
    from hwprune.search.controller import open_study
    from hwprune.search.spec import SearchSpec

    info = json.loads((run / "run.json").read_text())
    study = open_study(run, SearchSpec(**info["spec"]), load_only=True)
    t = study.ask()
    study._storage.set_trial_user_attr(t._trial_id, "owner", owner)
    study._storage.set_trial_user_attr(t._trial_id, "heartbeat", heartbeat)
    return t.number


def test_a_crashed_hosts_trial_is_failed_as_stale_and_a_live_one_waited_for(tables, tmp_path):  # noqa: F811
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert _search(tables, run, cache, "--trials", "2").returncode == 0
    stale = _inject_running(run, "crashed-host:4242", time.time() - 3600)
    live = _inject_running(run, "live-host:77", time.time() + 3600)  # renewed "now" for the whole test
    proc = _search(tables, run, cache, "--trials", "4")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    rows = {int(r["trial"]): r for r in __import__("csv").DictReader(open(run / "trials.csv"))}
    assert rows[stale]["state"] == "FAIL" and rows[stale]["error"].startswith("stale: no heartbeat from crashed-host")
    assert rows[live]["state"] == "RUNNING"  # another host still renews it: not failed, and counted as running
    assert s["trials"] == 3  # 4 asked: 3 finished here + the live host's running one


def test_heartbeat_renews_this_processes_running_trials(tmp_path):
    import optuna

    from hwprune.search.controller import Heartbeat, stale_for
    from hwprune.search.trial import OWNER, RUNNING

    study = optuna.create_study(directions=["maximize", "minimize"])
    mine, other = study.ask(), study.ask()
    RUNNING[id(mine)] = mine  # as propose registers the trials this process runs
    mine.set_user_attr("owner", OWNER)
    mine.set_user_attr("heartbeat", time.time() - 500)
    other.set_user_attr("owner", "elsewhere:1")
    other.set_user_attr("heartbeat", time.time() - 500)
    try:
        assert Heartbeat(study, 60).beat() == 1
    finally:
        RUNNING.pop(id(mine), None)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert stale_for(by_number[mine.number], 120) is None and stale_for(by_number[other.number], 120) > 400


def test_storage_password_is_in_no_file_of_the_run(tables, tmp_path, monkeypatch):  # noqa: F811
    """run.json, trials.csv, the front, logs and the Ray trial parameters never hold the storage password."""
    import hwprune.search.controller as controller
    from hwprune.search import SearchSpec, run_search
    from hwprune.search.ray_backend import _portable_spec

    url = "postgresql://user:secret@db.example:5432/studies"
    real_open = controller.open_study

    def journal_instead(out, spec, load_only=False):  # no PostgreSQL here: the study goes to a journal file
        return real_open(out, SearchSpec(**{**vars(spec), "storage": None}), load_only)

    monkeypatch.setattr(controller, "open_study", journal_instead)
    monkeypatch.setattr(controller, "check_storage", lambda out, spec: None)  # nor its early reachability check
    monkeypatch.setattr(controller, "claim_seeds", lambda out, spec: True)  # nor the seeds' claim in it
    monkeypatch.setattr(controller, "check_study_prices", lambda out, spec, ctx, now: None)  # nor the prices' record
    out = tmp_path / "run"
    spec = SearchSpec(model=MLP, data=DATA, budget="80%", batch_size=4, tables=str(tables), finetune_steps=2,
                      trials=2, out=str(out), storage=url)
    logs = []
    summary = run_search(spec, logs.append)
    assert summary["complete"] == 2
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not [p for p in files if b"secret" in p.read_bytes()]
    assert "secret" not in " ".join(logs) and "secret" not in json.dumps(summary, default=str)
    assert json.loads((out / "run.json").read_text())["spec"]["storage"] == "postgresql://user:***@db.example:5432/studies"
    assert _portable_spec(spec)["storage"] == "postgresql://user:***@db.example:5432/studies"
    assert spec.storage == url  # the driver itself keeps the real URL

    from hwprune.search.controller import run_spec

    info = json.loads((out / "run.json").read_text())
    with pytest.raises(HwpruneError, match="pass --storage with the full URL"):
        run_spec(info)
    assert run_spec(info, url).storage == url
    with pytest.raises(HwpruneError) as err:
        real_open(out, spec)  # the real storage: unreachable here, and the message masks the password
    assert "secret" not in str(err.value)


def test_write_atomic_leaves_the_umask_alone(tmp_path, monkeypatch):
    from hwprune._io import _FILE_MODE, write_atomic

    def no_umask(*a):
        raise AssertionError("write_atomic changed the process umask")

    monkeypatch.setattr(os, "umask", no_umask)
    write_atomic(tmp_path / "f.json", "{}")
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == _FILE_MODE
    current = int(next(line for line in open("/proc/self/status") if line.startswith("Umask:")).split()[1], 8)
    assert _FILE_MODE == 0o666 & ~current


def test_export_warns_when_measured_over_budget(tables, tmp_path):  # noqa: F811
    """The synthetic table prices microseconds; the real forward pass takes longer: over budget as measured, said
    so with the raw and the speed-adjusted figures. The table stores no reference, so its dense calibration run is
    the reference, and the verdict is judged at the table's speed: over the budget when the adjusted figure is,
    else "within it at the table's speed". Which of the two depends on how launch-bound this machine runs the
    pruned tiny MLP (CI saw it at 76% of the dense model against an 80% budget), so both are checked, each against
    its own numbers."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert _search(tables, run, cache, "--trials", "2").returncode == 0
    proc = run_cli("export", str(run), "--trust-code", "--finetune-steps", "2", "--repeats", "3", "--json",
                   env={"HWPRUNE_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    m = s["measurement"]
    assert s["measured_latency_ms"] == m["median_ms"] > s["budget_ms"]
    assert m["machine_drift_pct"] == pytest.approx(100 * (m["dense_now_ms"] / m["dense_at_profile_ms"] - 1))
    assert m["adjusted_ms"] == pytest.approx(m["median_ms"] / m["speed_factor"])
    assert s["over_budget"] is (m["adjusted_ms"] > s["budget_ms"])
    line = r"hwprune: warning: measured [\d.]+ ms, [\d.]+ ms at the table's speed \(factor [\d.]+\); budget [\d.]+ ms " \
           r"\(predicted [\d.]+ ms\): "
    report = (run / f"export-trial{s['trial']}-oneshot" / "report.md").read_text()
    if s["over_budget"]:
        assert re.search(line + r"over the budget by [\d.]+% at the speed", proc.stderr), proc.stderr[-2000:]
        assert "**Over budget:**" in report
    else:
        assert re.search(line + r"over the budget as measured, within it at the table's speed", proc.stderr)
        assert "**Over budget as measured, within it at the table's speed:**" in report


def test_a_stacked_rnn_trained_by_the_search_exports(tmp_path):
    """Cheap checks first must not change what is trained: a 2-layer GRU the search trains (the analysis splits
    its stack) is cached with its own keys, so export (a fresh model) loads it."""
    from conftest import ASSETS

    gru, seq = f"{ASSETS / 'user_model.py'}:gru2", f"{ASSETS / 'user_model.py'}:make_seq_data"
    cache, run = tmp_path / "cache", tmp_path / "run"
    env = {"HWPRUNE_CACHE": str(cache)}
    proc = run_cli("search", "--model", gru, "--data", seq, "--budget", "50ms", "--batch-size", "4", "--trials", "2",
                   "--finetune-steps", "3", "--out", str(run), "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-1500:]
    weights = list(cache.glob("*.pt"))
    assert len(weights) == 1 and "rnn.weight_ih_l1" in torch.load(weights[0], weights_only=True)
    exp = run_cli("export", str(run), "--trust-code", "--finetune-steps", "2", "--repeats", "3", "--json", env=env)
    assert exp.returncode == 0, exp.stderr[-1500:]
    assert json.loads(exp.stdout)["measured_latency_ms"] > 0


def test_a_table_at_this_machines_path_with_another_setup_is_not_used(tmp_path):
    """Same folder name, different fingerprint (e.g. another allocator): never priced with, never overwritten."""
    from hwprune.latency import ProfileJob, analyze_layers
    from hwprune.resolve import resolve

    here = get_target("cpu", threads=1)
    fp = here.fingerprint()
    other = {**fp, "malloc": "default"}  # not part of the folder name
    path = table_path(tmp_path, fp, 4)
    LatencyTable(other, 4, {"linear|i4|o16|x-|b4|bias|fp32": Entry(1.0, 0.1, 3)}).save(path)
    before = path.read_bytes()
    s = resolve(MLP, DATA, use_cache=False)
    layers = analyze_layers(s.model, s.example)
    with pytest.raises(HwpruneError, match="was measured on another device .*malloc"):
        resolve_table(here, 4, layers, "k", tables=tmp_path)
    job = ProfileJob(s.model, s.example, layers, "k", tuple(s.input_shape))
    with pytest.raises(HwpruneError, match="holds a table of another setup of this device .*malloc.*move it away"):
        resolve_table(here, 4, layers, "k", tables=tmp_path, profile=job)
    assert path.read_bytes() == before
