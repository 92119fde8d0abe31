"""A real cluster on one machine: a PostgreSQL study storage, and a two-node Ray cluster with a node killed.

PostgreSQL listens on 127.0.0.1 only. Ray is given 127.0.0.1 addresses, but its servers bind every interface
and register the machine's own IP (Ray resolves loopback addresses to it, and a worker node cannot join a
head started with --node-ip-address 127.0.0.1 here). Everything started is stopped at the end (bounded waits
everywhere). Skipped, with the reason, where the PostgreSQL server binaries or Ray are missing.
"""
import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_search import DATA, MLP, tables  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


_PG: dict = {}  # the running server's stop and start, for the outage test


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server in a temporary directory on a loopback port; yields its URL (database 'hwprune')."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's 'postgresql' package")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'hwprune[postgres]')")
    import tempfile

    # not under pytest's temporary folder: its parents are private to this user, and the server may run as another
    d = Path(tempfile.mkdtemp(prefix="hwprune-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the 'postgres' user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = d / "data", _free_port()
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", "hwprune", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(d / "server.log"), "-w", "-t", "60",
                              "-o", f"-p {port} -k {d} -h 127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=90)
    start = as_user + [pg_ctl, "-D", str(data), "-l", str(d / "server.log"), "-w", "-t", "60",
                       "-o", f"-p {port} -k {d} -h 127.0.0.1", "start"]
    _PG["stop"] = lambda: subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                                                    "stop"], check=True, capture_output=True, timeout=60)
    _PG["start"] = lambda: subprocess.run(start, check=True, capture_output=True, timeout=90)
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="hwprune", dbname="postgres", autocommit=True) as con:
            con.execute("CREATE DATABASE hwprune")
        yield f"postgresql://hwprune@127.0.0.1:{port}/hwprune"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def _search(tables, out, *extra, trials=6, steps=40, storage=None, study=None):  # noqa: F811
    cmd = [sys.executable, "-m", "hwprune", "search", "--model", MLP, "--data", DATA, "--target", "cpu",
           "--budget", "90%", "--batch-size", "4", "--tables", str(tables), "--finetune-steps", str(steps),
           "--trials", str(trials), "--out", str(out), "--json", "--early-stop-margin", "0", *extra]
    if storage:
        cmd += ["--storage", storage, "--study", study or "cluster"]
    return cmd


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path))) if path.exists() else []


def _wait(cond, proc, what: str, timeout: float = 240, poll: float = 0.5) -> None:
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stderr.read().decode()[-800:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


@pytest.mark.e2e
def test_two_drivers_on_one_postgresql_study_keep_every_trial(postgres, tables, tmp_path):  # noqa: F811
    """Two local-backend drivers, one PostgreSQL study: every trial kept once, numbers unique, both contributed;
    then a driver killed with SIGKILL mid-search and a new one resumed: the completed trials are unchanged."""
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c")}
    out = tmp_path / "run"
    t0 = time.time()
    # trials long enough (~1.5 s each here) that the second driver, started after the first trial, joins in time
    cmd = _search(tables, out, trials=8, steps=2500, storage=postgres, study="two-drivers")
    a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(lambda: len(_rows(out / "trials.csv")) >= 1, a, "the first trial")
    b = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    (_, ea), (_, eb) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (ea.decode()[-600:], eb.decode()[-600:])
    import optuna

    study = optuna.load_study(study_name="two-drivers", storage=postgres)
    trials = study.get_trials(deepcopy=False)
    owners = {t.user_attrs.get("owner", "").rsplit(":", 1)[-1] for t in trials if t.state.name == "COMPLETE"}
    print(f"PostgreSQL, two drivers: {len(trials)} trials in {time.time() - t0:.1f} s; by process: " +
          ", ".join(f"{p}: {sum(1 for t in trials if t.user_attrs.get('owner', '').endswith(':' + p))}"
                    for p in sorted(owners)))
    assert owners == {str(a.pid), str(b.pid)}
    assert [t for t in trials if t.state.name != "COMPLETE"] == []
    assert 8 <= len(trials) <= 9 and sorted(t.number for t in trials) == list(range(len(trials)))
    assert "secret" not in (out / "run.json").read_text()

    # kill -9 a driver mid-search, resume from a new one: completed trials unchanged, the count reached
    out2 = tmp_path / "run2"
    cmd2 = _search(tables, out2, trials=6, steps=1500, storage=postgres, study="resume")
    c = subprocess.Popen(cmd2, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(lambda: sum(r["state"] == "COMPLETE" for r in _rows(out2 / "trials.csv")) >= 2, c, "two trials")
    c.send_signal(signal.SIGKILL)
    c.wait(timeout=30)
    before = {t.number: (t.values, t.params) for t in
              optuna.load_study(study_name="resume", storage=postgres).get_trials(deepcopy=False)
              if t.state.name == "COMPLETE"}
    d = subprocess.run(cmd2, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert d.returncode == 0, d.stderr[-800:]
    after = optuna.load_study(study_name="resume", storage=postgres).get_trials(deepcopy=False)
    assert {n: (t.values, t.params) for t in after for n in [t.number] if n in before} == before
    done = [t for t in after if t.state.name == "COMPLETE"]
    interrupted = [t for t in after if t.state.name == "FAIL"]
    print(f"PostgreSQL resume: {len(before)} complete before the kill, {len(done)} after; {len(interrupted)} "
          f"interrupted trial(s) failed with: {[t.user_attrs.get('error') for t in interrupted]}")
    assert len(done) == 6 and all(t.user_attrs.get("error") for t in interrupted)
    assert not [t for t in after if t.state.name == "RUNNING"]


@pytest.mark.e2e
def test_a_storage_outage_of_a_few_seconds_is_ridden_out(postgres, tables, tmp_path):  # noqa: F811
    """The PostgreSQL server stopped (immediate shutdown: connections cut) for 3 s mid-search, then started again:
    the search says so once, reconnects, and ends with every asked trial, none failed or left running."""
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c")}
    out = tmp_path / "run"
    # trials of ~0.5 s here: the remaining ones outlast the outage even on a machine several times faster (CI once
    # finished all 10 trials of 100 steps before the server was down, and the test saw no outage)
    cmd = _search(tables, out, trials=12, steps=800, storage=postgres, study="outage")
    a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(lambda: sum(r["state"] == "COMPLETE" for r in _rows(out / "trials.csv")) >= 2, a, "two trials", poll=0.1)
    _PG["stop"]()
    done = sum(r["state"] == "COMPLETE" for r in _rows(out / "trials.csv"))
    assert done < 12, f"the search had finished its trials ({done}) before the database was stopped: no outage met"
    time.sleep(3)
    _PG["start"]()
    o, e = a.communicate(timeout=600)
    assert a.returncode == 0, e.decode()[-800:]
    import optuna

    trials = optuna.load_study(study_name="outage", storage=postgres).get_trials(deepcopy=False)
    print(f"outage of 3 s: {len(trials)} trials, states {sorted({t.state.name for t in trials})}")
    assert sum(t.state.name == "COMPLETE" for t in trials) == 12 and not [t for t in trials if t.state.name in
                                                                          ("FAIL", "RUNNING")]
    assert e.decode().count("the study's database did not answer") == 1


class RayNode:
    """A ``ray start`` node of a local cluster, in its own process group so it can be killed alone."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node and a second node joining it, on 127.0.0.1, one CPU each; yields (address, head, second)."""
    pytest.importorskip("ray.tune")
    if not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the 'ray' command is not installed beside this Python")
    port = _free_port()
    # no token authentication (Ray 2.60 turns it on where ~/.ray/auth_token exists): every process the same
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"]
    head = RayNode(["--head", "--port", str(port), "--num-cpus", "1",
                    "--resources", '{"head_node": 1}', *common], env)
    addr = f"127.0.0.1:{port}"
    second = None
    try:
        import ray

        def nodes_up(n: int) -> bool:
            probe = subprocess.run([sys.executable, "-c", (
                "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))"), addr], capture_output=True, text=True,
                timeout=120, env=env)
            return probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == [str(n)]

        _wait(lambda: nodes_up(1), head.proc, "the head node", timeout=120)
        second = RayNode(["--address", addr, "--num-cpus", "1",
                          "--resources", '{"second_node": 1}', *common[:2], "--disable-usage-stats"], env)
        _wait(lambda: nodes_up(2), second.proc, "the second node", timeout=120)
        yield addr, head, second
    finally:
        for node in (second, head):
            if node is not None:
                node.kill()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def _running_nodes(run: Path) -> set[str]:
    """The nodes the study's running trials run on (read from the run's journal, as another process writes it)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    if not (run / "study.journal").exists():
        return set()
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
             if not s.study_name.endswith(":seeds")]  # the seeds' claim marker
    if not names:
        return set()
    study = optuna.load_study(study_name=names[0], storage=storage)
    return {t.user_attrs["node"] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("node")}


@pytest.mark.e2e
def test_ray_search_on_two_nodes_then_one_node_killed(ray_cluster, tables, tmp_path):  # noqa: F811
    """Trials run on both nodes (recorded per trial); killing the second node mid-search fails its running
    trial(s) with a reason, and the search still finishes the asked trials on the head node."""
    addr, head, second = ray_cluster
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path / "c"), "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "run"
    t0 = time.time()
    first = subprocess.run(_search(tables, out, "--backend", "ray", "--ray-address", addr, "--workers", "2",
                                   trials=4, steps=200),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-1500:]
    rows = [r for r in _rows(out / "trials.csv") if r["state"] == "COMPLETE" and not r["duplicate_of"]]
    nodes = {r["node"] for r in rows}
    print(f"Ray, two nodes: {len(rows)} fine-tuned trials in {time.time() - t0:.1f} s; per node: "
          + ", ".join(f"{n}: {sum(r['node'] == n for r in rows)}" for n in sorted(nodes)))
    assert len(nodes) == 2 and all(n for n in nodes)

    # the same search, longer fine-tunes, and the second node killed while it holds a trial
    out2 = tmp_path / "run2"
    t1 = time.time()
    # ~8 s per fine-tune: once a trial has finished, the second node is killed as soon as the study shows running
    # trials on both nodes (each trial's node is in the study from its start), whatever the machine's speed
    proc = subprocess.Popen(_search(tables, out2, "--backend", "ray", "--ray-address", addr, "--workers", "2",
                                    trials=5, steps=8000),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(lambda: len(_rows(out2 / "trials.csv")) >= 1, proc, "a finished trial", timeout=300)
    _wait(lambda: len(_running_nodes(out2)) == 2, proc, "running trials on both nodes", timeout=300)
    second.kill()
    killed_at = time.time() - t1
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-1500:]
    rows = _rows(out2 / "trials.csv")
    done = [r for r in rows if r["state"] == "COMPLETE"]
    failed = [r for r in rows if r["state"] == "FAIL"]
    print(f"Ray, second node killed at {killed_at:.1f} s: {len(done)} complete, {len(failed)} failed "
          f"({[r['error'][:80] for r in failed]}); per node: "
          + ", ".join(f"{n or '?'}: {sum(r['node'] == n for r in done)}" for n in sorted({r['node'] for r in done}))
          + f"; total {time.time() - t1:.1f} s")
    assert failed and len(done) == 5 and all(r["error"] for r in failed)  # the kill hit a running trial
    assert sorted(int(r["trial"]) for r in rows) == list(range(len(rows)))  # none lost, none counted twice
    assert not [r for r in rows if r["state"] == "RUNNING"]
