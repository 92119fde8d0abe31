"""Safe to load, safe to share (issue 35): artifacts and run directories run no code they name, secrets of a
storage URL never reach run.json."""
import json

import pytest
import torch
from torch import nn

from hwprune.apply import apply_policy, load_pruned, save_pruned
from hwprune.errors import HwpruneError
from hwprune.policy import Policy
from test_search import tables  # noqa: F401 - the fixture is used by name


def _evil(tmp_path):
    """A user module that leaves a mark when it is imported and when its factory is called."""
    mark = tmp_path / "PWNED"
    src = tmp_path / "evil.py"
    src.write_text(f"open({str(mark)!r}, 'a').write('imported\\n')\n"
                   f"import torch\n"
                   f"def build(**kw):\n"
                   f"    open({str(mark)!r}, 'a').write('called\\n')\n"
                   f"    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),"
                   f" torch.nn.Linear(8 * 6 * 6, 3))\n")
    return mark, f"{src}:build"


def _dense():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def _artifact(path, ref, args=None):
    dense, x = _dense(), torch.randn(2, 1, 8, 8)
    policy = Policy({"0": 0.5}, channel_multiple=1)
    pruned = apply_policy(dense, policy, x)
    save_pruned(path, pruned, policy, ref, args or {}, (1, 8, 8), 3, (), {}, x)
    return dense, pruned, x


def test_a_hostile_artifact_runs_nothing(tmp_path):
    """os:system named by the file, with the command as its model_args: refused before anything is called."""
    mark = tmp_path / "PWNED"
    _artifact(tmp_path / "p.pt", "os:system", {"command": f"echo PWNED > {mark}"})
    with pytest.raises(HwpruneError, match=r"names user code \(model 'os:system'\).*trust_code=True"):
        load_pruned(tmp_path / "p.pt")
    assert not mark.exists()


def test_a_user_model_artifact_loads_only_when_the_caller_names_the_model(tmp_path):
    mark, ref = _evil(tmp_path)
    dense, pruned, x = _artifact(tmp_path / "p.pt", ref)
    with pytest.raises(HwpruneError, match="names user code"):
        load_pruned(tmp_path / "p.pt")
    assert not mark.exists()  # not even imported
    back, meta = load_pruned(tmp_path / "p.pt", model=dense)  # the caller's own dense model: nothing imported
    assert not mark.exists() and meta["model"] == ref
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned.eval()(x), atol=0, rtol=0)
    back2, _ = load_pruned(tmp_path / "p.pt", trust_code=True)  # trusted: the file's reference is built
    assert mark.read_text() == "imported\ncalled\n"
    assert back2[0].out_channels == 4


def test_a_damaged_artifact_is_one_line(tmp_path):
    torch.save({"format": "hwprune-pruned-model/1", "model": "resnet20"}, tmp_path / "p.pt")
    with pytest.raises(HwpruneError, match="damaged or foreign"):
        load_pruned(tmp_path / "p.pt")


def _hostile_run(tmp_path, **refs):
    from hwprune.search.spec import SearchSpec

    run = tmp_path / "run"
    run.mkdir()
    spec = SearchSpec(**{"model": "cnn1d", "data": "mnist1d", "budget": "50%", **refs})
    (run / "run.json").write_text(json.dumps({"identity": {}, "spec": spec.public(), "budget_ms": 1.0,
                                              "limit_ms": 1.0, "table_fingerprint": {}, "batch_size": 1,
                                              "metric": "accuracy", "direction": "max",
                                              "task": refs.get("task")}))
    return run


@pytest.mark.parametrize("field", ["model", "data", "task"])
def test_export_of_a_run_naming_user_code_needs_trust(tmp_path, field):
    from hwprune.export import export_run

    mark, ref = _evil(tmp_path)
    run = _hostile_run(tmp_path, **{field: ref})
    with pytest.raises(HwpruneError, match=rf"names user code \({field} '.*evil.py:build'\).*--trust-code"):
        export_run(run)
    assert not mark.exists() and sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_reading_a_run_never_imports_its_user_task(tmp_path):
    """pareto and trials.csv need the metric's name and direction: from run.json, not from the task's code."""
    from hwprune.search.controller import run_task

    mark, ref = _evil(tmp_path)
    task = run_task({"task": ref, "metric": "bleu", "direction": "max"})
    assert (task.metric, task.direction, task.show(0.5)) == ("bleu", "max", 0.5)
    assert not mark.exists()
    with pytest.raises(HwpruneError, match="without its metric"):
        run_task({"task": ref})


@pytest.mark.parametrize("url, shown", [
    ("postgresql://bob:s3cret@db:5432/studies", "postgresql://bob:***@db:5432/studies"),
    ("postgresql://db/studies?password=s3cret&sslmode=require", "postgresql://db/studies?password=***&sslmode=require"),
    ("postgresql+psycopg2://bob:p%40ss@db/s?sslpassword=k&auth_token=t",
     "postgresql+psycopg2://bob:***@db/s?auth_token=***&sslpassword=***"),
    ("sqlite:///runs/x.db", "sqlite:///runs/x.db"),
    ("runs/x.db", "runs/x.db"),
])
def test_every_secret_of_a_storage_url_is_masked(url, shown):
    from hwprune._io import is_masked, mask_url

    assert mask_url(url) == shown
    assert "s3cret" not in shown and "p%40ss" not in shown
    assert is_masked(mask_url(url)) == (url != shown)


def test_a_query_password_never_reaches_run_json(tmp_path):
    from hwprune.search.controller import run_spec
    from hwprune.search.spec import SearchSpec

    url = "postgresql://db.example/studies?password=s3cret"
    public = SearchSpec(model="cnn1d", data="mnist1d", budget="50%", storage=url).public()
    assert "s3cret" not in json.dumps(public)
    with pytest.raises(HwpruneError, match="does not keep its password"):
        run_spec({"spec": public})
    assert run_spec({"spec": public}, storage=url).storage == url


def test_a_bad_storage_url_fails_before_any_profiling_or_training(tmp_path):
    from hwprune.search.controller import run_search
    from hwprune.search.spec import SearchSpec

    def prepare(*_):
        raise AssertionError("profiling / training started before the storage was opened")

    spec = SearchSpec(model="cnn1d", data="mnist1d", budget="50%", out=str(tmp_path / "run"),
                      storage=f"sqlite:///{tmp_path}/no/such/dir/studies.db?password=s3cret")
    with pytest.raises(HwpruneError, match=r"cannot open storage 'sqlite:///.*password=\*\*\*'") as err:
        run_search(spec, log=lambda m: None, prepare=prepare)
    assert "s3cret" not in str(err.value) and not (tmp_path / "run").exists()


def _valid_run_json():
    from hwprune.search.spec import SearchSpec

    spec = SearchSpec(model="cnn1d", data="mnist1d", budget="50%")
    return {"identity": spec.identity(), "spec": spec.public(), "budget_ms": 1.0, "limit_ms": 0.9, "budget_margin": 0.0,
            "speed_factor": 1.0, "task": "classification", "metric": "accuracy", "direction": "max",
            "table": "t.json", "table_fingerprint": {"cpu": "x"}, "batch_size": 1, "grid": [0.5, 1.0],
            "menus": {}, "prices": {}, "versions": {}}



def _json_values():
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=5)
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                  max_size=3), max_leaves=6)


def test_an_edited_run_json_is_a_one_line_error_never_a_traceback(tmp_path):
    """Fuzzed: any field of run.json or of its spec deleted or replaced by any JSON value; reading the run
    (what export and pareto do first) either works or raises HwpruneError."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from hwprune.search.controller import run_limit, run_spec, run_task
    from hwprune.search.rundir import read_run

    base = _valid_run_json()
    (tmp_path / "run.json").write_text(json.dumps(base))
    assert read_run(tmp_path)["budget_margin"] == 0.0  # a run searched with --budget-margin 0 reads
    keys = [("top", k) for k in base] + [("spec", k) for k in base["spec"]] + [("top", "extra")]

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.sampled_from(keys), st.booleans(), _json_values()), min_size=1, max_size=3))
    def check(edits):
        info = json.loads(json.dumps(base))
        for (where, key), delete, value in edits:
            d = info if where == "top" else info["spec"] if isinstance(info.get("spec"), dict) else None
            if d is None:
                continue
            if delete:
                d.pop(key, None)
            else:
                d[key] = value
        (tmp_path / "run.json").write_text(json.dumps(info))
        try:
            got = read_run(tmp_path)
            spec = run_spec(got)
            run_limit(got), run_task(got)
            assert isinstance(spec.budget, str) and got["budget_ms"] > 0
        except HwpruneError as exc:
            assert "\n" not in str(exc)

    check()
    for text in ("[1, 2]", "{", "null", '"x"'):
        (tmp_path / "run.json").write_text(text)
        with pytest.raises(HwpruneError):
            read_run(tmp_path)


def test_a_resume_after_the_model_data_or_weights_changed_is_refused(tmp_path):
    """The run identity holds the content digests of the user's files, not only their names."""
    from hwprune.search.rundir import check_run_dir, claim_run_dir
    from hwprune.search.spec import SearchSpec

    model, data, weights = tmp_path / "m.py", tmp_path / "d.py", tmp_path / "w.pt"
    model.write_text("def build(): pass\n")
    data.write_text("def load(): pass\n")
    torch.save({"w": torch.zeros(2)}, weights)
    spec = SearchSpec(model=f"{model}:build", data=f"{data}:load", budget="50%", weights=str(weights))
    assert set(spec.identity()["sources"]) == {"model", "data", "weights"}
    out = tmp_path / "run"
    out.mkdir()
    assert claim_run_dir(out, spec.identity(), {}) is False
    assert check_run_dir(out, spec.identity()) is True
    model.write_text("def build(): pass  # edited\n")
    with pytest.raises(HwpruneError, match=r"cannot resume .*the model file\(s\) changed"):
        check_run_dir(out, spec.identity())
    model.write_text("def build(): pass\n")
    torch.save({"w": torch.ones(2)}, weights)
    with pytest.raises(HwpruneError, match=r"the weights file\(s\) changed"):
        check_run_dir(out, spec.identity())
    torch.save({"w": torch.zeros(2)}, weights)
    assert check_run_dir(out, spec.identity()) is True
    # a run of an older hwprune (no digests in its identity) resumes
    old = json.loads((out / "run.json").read_text())
    del old["identity"]["sources"]
    (out / "run.json").write_text(json.dumps(old))
    assert check_run_dir(out, spec.identity()) is True


def test_a_run_directory_is_claimed_by_exactly_one_of_several_processes(tmp_path):
    """Eight processes claim one directory at once, half of them for another study: one run.json, written
    whole by one; the same study's claimants resume it, the other study's are refused."""
    import subprocess
    import sys

    code = """
import sys, json, time
from pathlib import Path
from hwprune.search.rundir import claim_run_dir
from hwprune.errors import HwpruneError
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
try:
    print(json.dumps(claim_run_dir(Path(sys.argv[1]), {"study": sys.argv[2]}, {"by": sys.argv[2]})))
except HwpruneError as exc:
    print(json.dumps("refused"))
"""
    import time

    out = tmp_path / "run"
    out.mkdir()
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), "ab"[i % 2], start], stdout=subprocess.PIPE,
                              text=True) for i in range(8)]
    got = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    winner = json.loads((out / "run.json").read_text())
    mine = [g for i, g in enumerate(got) if "ab"[i % 2] == winner["by"]]
    theirs = [g for i, g in enumerate(got) if "ab"[i % 2] != winner["by"]]
    assert sorted(mine, key=str) == [False, True, True, True] and theirs == ["refused"] * 4
    assert winner["identity"] == {"study": winner["by"]} and [p.name for p in out.iterdir()] == ["run.json"]


def test_seeds_are_claimed_by_exactly_one_of_several_hosts_on_one_study(tmp_path):
    """Six processes, each as a host with its own --out on one shared storage, claim the seeds at once: one wins.
    (The storage here is an SQLite file, the same RDB code path as PostgreSQL.)"""
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path}/studies.db"
    code = """
import sys, time
from pathlib import Path
import optuna
from hwprune.search.controller import claim_seeds
from hwprune.search.spec import SearchSpec
spec = SearchSpec(model="cnn1d", data="mnist1d", budget="50%", storage=sys.argv[1], study="shared")
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
print(claim_seeds(Path(sys.argv[2]), spec))
"""
    import optuna

    optuna.storages.RDBStorage(url).engine.dispose()  # the tables made once, as a first host's search does
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tmp_path / f"out{i}"), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
    got = [p.communicate(timeout=60) for p in procs]
    assert sorted(o.strip() for o, _ in got) == ["False"] * 5 + ["True"], [e[-300:] for _, e in got]


def test_a_bug_in_hwprune_is_told_apart_from_the_users_error():
    from hwprune.device.timing import timing_of
    from hwprune.errors import is_own_bug

    def user_code():
        raise ValueError("the user's model")

    for fn, own in ((lambda: timing_of([]), True), (user_code, False),
                    (lambda: (_ for _ in ()).throw(HwpruneError("bad input")), False),
                    (lambda: torch.zeros(2) @ torch.zeros(3), False)):  # torch under the user's call
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            assert is_own_bug(exc) is own, exc


def test_a_bug_in_hwprune_stops_the_search_with_its_traceback(tables, tmp_path, monkeypatch):  # noqa: F811
    """Not a failed trial among others: the first trial that hits it stops the search, the exception (and its
    traceback) raised to the caller; the trial is marked failed with what happened."""
    import csv

    import hwprune.search.controller as controller
    from hwprune.device.timing import timing_of
    from hwprune.search import SearchSpec, run_search
    from test_search import DATA, MLP

    monkeypatch.setattr(controller, "train_candidate", lambda *a, **k: timing_of([]))
    out = tmp_path / "run"
    spec = SearchSpec(model=MLP, data=DATA, budget="80%", batch_size=4, tables=str(tables), finetune_steps=2,
                      trials=4, out=str(out), race=0, finish=0)
    with pytest.raises(ValueError, match="no samples to summarize") as err:
        run_search(spec, lambda m: None)
    assert err.traceback[-1].path.name == "timing.py"
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=spec.name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    ran = [t for t in study.get_trials() if t.state.name != "WAITING"]
    assert len(ran) == 1 and ran[0].state.name == "FAIL"
    assert ran[0].user_attrs["error"] == "a bug in hwprune: ValueError: no samples to summarize"


def test_a_lapsed_lease_never_crashes_the_live_host(tmp_path):
    """Host B fails host A's trial as stale (A was cut off longer than the grace); A comes back: its heartbeat says
    so once, its tell and attributes are dropped without raising, the trial stays failed with B's reason."""
    import time

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from hwprune.search.controller import Heartbeat, fail_interrupted
    from hwprune.search.trial import RUNNING, set_attrs, tell

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "j")))
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    unclaimed = study.ask()  # a process between ask and recording its owner: never failed inside the grace
    trial = study.ask()
    RUNNING[id(trial)] = trial
    trial.set_user_attr("owner", "host-a.invalid:123")
    trial.set_user_attr("heartbeat", time.time() - 100)
    logs = []
    assert fail_interrupted(study, logs.append, grace_s=50) == 1  # host B's view
    assert "stale: no heartbeat from host-a.invalid:123" in logs[0]
    hb = Heartbeat(study, 1.0, logs.append)
    assert hb.beat() == 0 and hb.beat() == 0
    assert sum("lease lapsed" in m for m in logs) == 1 and id(trial) not in RUNNING
    tell(study, trial, [0.9, 1.0])  # no exception
    assert set_attrs(trial, params=3) is False
    frozen = study.get_trials()[trial.number]
    assert frozen.state.name == "FAIL" and frozen.user_attrs["error"].startswith("stale")
    assert study.get_trials()[unclaimed.number].state.name == "RUNNING"
    assert fail_interrupted(study, logs.append, grace_s=0.0) == 1  # past the grace, never claimed: failed
    assert "never claimed" in logs[-1]


def test_build_space_leaves_the_callers_model_as_it_was():
    """Stacks split on a copy, the training mode put back."""
    from hwprune.models import build_model
    from hwprune.space import build_space

    net = build_model("lstm", (5, 4), 3, {"num_layers": 2, "hidden_size": 8}).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    space = build_space(net, torch.randn(2, 5, 4))
    assert space.groups and type(net.rnn) is nn.LSTM and net.rnn.num_layers == 2 and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_python_api_leaves_the_process_as_it_found_it(tmp_path, monkeypatch):
    """A search through hwprune.api (which seeds torch, sets Optuna's log level and draws pareto.png) leaves the
    random generators, Optuna's verbosity and matplotlib's backend as they were."""
    import random

    import matplotlib
    import optuna

    from hwprune import api
    from test_search import DATA, MLP

    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    optuna.logging.set_verbosity(optuna.logging.INFO)
    backend = matplotlib.get_backend()
    torch.manual_seed(1234)
    random.seed(99)
    want = (torch.rand(3), random.random())
    torch.manual_seed(1234)
    random.seed(99)
    api.search(MLP, DATA, target="cpu", budget="1ms", trials=2, finetune_steps=2, batch_size=4,
               tables=str(tmp_path / "t"), out=str(tmp_path / "run"), log=lambda m: None)
    assert (tmp_path / "run" / "pareto.png").exists()
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]
    assert optuna.logging.get_verbosity() == optuna.logging.INFO and matplotlib.get_backend() == backend
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_hosts_on_one_study_share_one_price_scale(tmp_path):
    """Hosts with their own --out and their own table join one storage: the first records its prices in the
    study; a host whose table is another device's, or whose entries for this model differ, is refused."""
    from hwprune.search.controller import check_study_prices
    from hwprune.search.spec import SearchSpec

    class Ctx:
        def __init__(self, fp, digest):
            self.rec = {"table_fingerprint": {"cpu": fp}, "digest": digest, "entries": 10, "margin": 0.05,
                        "batch_size": 1}

        def prices(self, all_casts=False):
            return dict(self.rec)

    spec = SearchSpec(model="cnn1d", data="mnist1d", budget="50%", storage=f"sqlite:///{tmp_path}/s.db",
                      study="shared")

    def join(out, fp, digest):  # a host with its own --out and table starts on the study
        ctx = Ctx(fp, digest)
        check_study_prices(tmp_path / out, spec, ctx, ctx.prices())

    join("a", "epyc", "d1")  # the first host records
    join("b", "epyc", "d1")  # the same scale joins
    with pytest.raises(HwpruneError, match="cannot join study 'shared': the table is another device's"):
        join("c", "xeon", "d1")
    with pytest.raises(HwpruneError, match="entries or calibration for this model changed"):
        join("d", "epyc", "d2")


def test_a_lost_database_connection_is_retried_then_raised(monkeypatch):
    from sqlalchemy.exc import OperationalError

    import hwprune.search.storage as st

    monkeypatch.setattr(st, "RETRY_WAITS", (0.0, 0.0, 0.0))
    calls = []

    def flaky(self, n):
        calls.append(n)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("server down"))
        if len(calls) == 2:  # as Optuna wraps a commit that met a lost connection
            try:
                raise OperationalError("COMMIT", {}, ConnectionResetError("cut"))
            except OperationalError as cause:
                import optuna

                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit") from cause
        return n * 2

    class Fake:
        _said_outage = False

    assert st._retried(flaky)(Fake(), 21) == 42 and len(calls) == 3
    calls.clear()
    with pytest.raises(OperationalError):  # down for longer than the waits: raised as before
        st._retried(lambda self: calls.append(1) or (_ for _ in ()).throw(
            OperationalError("SELECT 1", {}, ConnectionRefusedError("down"))))(Fake())
    assert len(calls) == 4
    with pytest.raises(RuntimeError):  # not a connection error: never retried
        st._retried(lambda self: calls.append(2) or (_ for _ in ()).throw(RuntimeError("finished")))(Fake())
    assert calls.count(2) == 1

    # a retried call inside a retried call: only the outer one retries (not 4 x 4 tries)
    calls.clear()
    inner = st._retried(lambda self: calls.append("in") or (_ for _ in ()).throw(
        OperationalError("SELECT 1", {}, ConnectionRefusedError("down"))))
    with pytest.raises(OperationalError):
        st._retried(lambda self: inner(self))(Fake())
    assert calls == ["in"] * 4
    # the private calls Optuna's _CachedStorage makes on its backend are retried too (an outage met in
    # study.get_trials -> _get_trials ended a search in CI)
    assert all(hasattr(getattr(st.RetryingRDBStorage, n), "__wrapped__")
               for n in ("_get_trials", "_create_new_trial", "get_all_trials", "set_trial_state_values"))
