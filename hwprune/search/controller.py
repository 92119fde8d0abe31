"""The search controller: Optuna multi-objective (accuracy up, predicted latency down) under a budget.

Each trial is proposed in the driver (:mod:`hwprune.search.trial`): a keep ratio per group (an ordered
index into the grid the table was profiled on) and a format per layer (from the layer's measured menu) are
sampled several times, each sample repaired to the budget (:mod:`hwprune.search.context`) and ranked by a
cheap proxy (:mod:`hwprune.search.screen`); the best is told to the study with its repaired values and
fine-tuned from the dense weights (same data order and seed for every trial, so accuracy differences come
from the policy); the study gets validation score and predicted latency. A policy already evaluated is not
fine-tuned again. The first trials are the uniform and latency-knapsack seeds. The study lives in a journal
file in the run directory (or an RDB), so the same command resumes it; this module runs the study (local
ask-and-tell loop, leases of running trials, resume checks) and the summary.
"""
from __future__ import annotations

import importlib.util
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hwprune._io import pid_alive
from hwprune.errors import HwpruneError, is_oom, is_own_bug, one_line
from hwprune.search.context import SearchContext, prepare_context
from hwprune.search.early_stop import spent
from hwprune.search.rundir import (best_point, check_run_dir, claim_run_dir, front, judged, plot_front,
                                   results_lock, write_front, write_trials)
from hwprune.search.spec import SearchSpec
from hwprune.search.trial import (OWNER, Progress, finished, free_memory, make_sampler, params_of, propose,
                                  proxy_of, reuse, rule_from, screen_correlation, set_attrs, tell, train_candidate)

__all__ = ["run_search", "open_study", "load_front", "SearchResult", "Heartbeat", "fail_interrupted", "stale_for"]

SearchResult = dict[str, Any]


def open_study(out: Path, spec: SearchSpec, load_only: bool = False):  # type: ignore[no-untyped-def]
    """Create or load the study: a journal file in ``out`` by default, or ``spec.storage`` (an RDB URL)."""
    import optuna

    from hwprune._io import mask_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: one line each from hwprune, reason in trials.csv
    storage = study_storage(out, spec)  # an unreachable server: one line there
    try:
        if load_only:
            return optuna.load_study(study_name=spec.name, storage=storage)
        return optuna.create_study(study_name=spec.name, storage=storage, directions=["maximize", "minimize"],
                                   sampler=make_sampler(spec.sampler, spec.seed), load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server: one line
        where = mask_url(spec.storage) or str(out)
        msg = one_line(exc).replace(spec.storage, where) if spec.storage else one_line(exc)
        raise HwpruneError(f"cannot open study {spec.name!r} in {where!r}: {msg}") from exc


def study_storage(out: Path, spec: SearchSpec) -> Any:
    """The study's storage: ``spec.storage`` (an RDB URL; :class:`~hwprune.search.storage.RetryingRDBStorage`),
    else a journal file in the run directory."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec.storage:
        from hwprune._io import mask_url
        from hwprune.search.storage import RetryingRDBStorage

        try:
            return RetryingRDBStorage(spec.storage)  # a database outage of a few seconds is ridden out
        except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server: one line
            where = mask_url(spec.storage) or ""
            raise HwpruneError(f"cannot open storage {where!r}: {one_line(exc).replace(spec.storage, where)}; check "
                               f"the URL (e.g. postgresql://user:password@host:5432/db or sqlite:///path/studies.db) "
                               f"and that the server is reachable") from exc
    return JournalStorage(JournalFileBackend(str(out / "study.journal")))


def check_storage(out: Path, spec: SearchSpec) -> None:
    """Open the RDB storage once (Optuna creates its tables if they are missing): a bad URL, a missing driver or an
    unreachable server is a one-line error (:func:`study_storage`) before minutes of profiling and training."""
    study_storage(out, spec).engine.dispose()


def _marker(out: Path, spec: SearchSpec, what: str) -> Any:
    """Create the marker study ``<study>:<what>`` in the study's storage: the new study for exactly one of the
    processes and hosts that try at once (the storage refuses a second study of one name: a unique key in an RDB,
    a locked journal), None for the others."""
    import optuna

    try:
        return optuna.create_study(study_name=f"{spec.name}:{what}", storage=study_storage(out, spec))
    except optuna.exceptions.DuplicatedStudyError:
        return None


def claim_seeds(out: Path, spec: SearchSpec) -> bool:
    """True for exactly one of the processes and hosts that start on one study: the one that enqueues the seeds
    (it created the marker ``<study>:seeds``), so two hosts starting together cannot both enqueue them."""
    return _marker(out, spec, "seeds") is not None


def _run_one(ctx: SearchContext, rule: Any, study: Any, log: Callable[[str], None]) -> Any:
    """Propose, train and tell one trial (ask-and-tell: the study holds the repaired policy, see
    :mod:`hwprune.search.trial`). A failing fine-tune fails its trial with the reason and the search goes
    on; an interrupt fails it and stops."""
    import optuna
    from optuna.trial import TrialState

    t0 = time.time()
    trial, policy, latency, dup = propose(ctx, study, log)
    if dup is not None:
        tell(study, trial, list(reuse(trial, dup, t0)))
        return trial
    curve: dict[str, float] = {}
    seed = bool(trial.user_attrs.get("seed"))
    raced = judged(latency, trial.user_attrs, ctx.limit_ms)  # grown by the gate into measured headroom: within

    def at_checkpoint(step: int, acc: float) -> None:
        curve[str(step)] = acc
        trial.set_user_attr("curve", dict(curve))
        why = None if seed else rule.check(raced, step, acc, key=trial.number)
        if why:
            trial.set_user_attr("error", why)
            trial.set_user_attr("steps_run", step)  # what it cost: --trials counts fine-tunes' worth of steps
            raise optuna.TrialPruned(why)

    t1 = time.time()
    set_attrs(trial, node=socket.gethostname())  # the local backend fine-tunes here
    failed = None
    try:
        try:
            acc, params = train_candidate(ctx.setup, ctx.batches, ctx.spec, policy, at_checkpoint)
        finally:
            set_attrs(trial, train_seconds=round(time.time() - t1, 3), seconds=round(time.time() - t0, 2))
    except optuna.TrialPruned:
        tell(study, trial, state=TrialState.PRUNED)
        return trial
    except Exception as exc:  # noqa: BLE001 - the candidate fails with its reason; Progress stops a search
        if is_own_bug(exc):  # hwprune's, not the user's model or data: stop here, with the traceback
            set_attrs(trial, error="a bug in hwprune: " + one_line(exc))
            tell(study, trial, state=TrialState.FAIL)
            raise
        failed = (("out of memory: " if is_oom(exc) else "") + one_line(exc), is_oom(exc))  # where all fail
    except BaseException:
        set_attrs(trial, error="interrupted")
        tell(study, trial, state=TrialState.FAIL)
        raise
    if failed is not None:  # handled outside the except: its traceback (and the trial's tensors) released first
        if not set_attrs(trial, error=failed[0]):
            return _lapsed(trial, log)
        if failed[1]:
            free_memory()
        tell(study, trial, state=TrialState.FAIL)
        return trial
    if not set_attrs(trial, params=params):
        return _lapsed(trial, log)
    if curve:
        rule.add(trial.number, raced, curve, acc)
    tell(study, trial, [acc, latency])  # failed as stale by another host meanwhile: dropped
    return trial


def _lapsed(trial: Any, log: Callable[[str], None]) -> Any:
    log(f"hwprune: trial {trial.number} was failed by another host as stale while it ran here (its lease lapsed); "
        f"its result is dropped")
    return trial


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process that ran a trial still runs: True/False on this host, None when unknowable."""
    host, _, pid = (owner or "").rpartition(":")
    if not owner or not pid.isdigit():
        return False  # no owner recorded: the process ended between creating the trial and starting it
    if host != socket.gethostname():
        return None
    return pid_alive(int(pid))


def stale_for(trial: Any, grace_s: float, now: float | None = None) -> float | None:
    """Seconds since a RUNNING trial of another host last beat, when that is over ``grace_s``; else None.

    Every search process renews a lease on its running trials (user attribute ``heartbeat``, every
    ``heartbeat_interval`` seconds, see :class:`Heartbeat`); a trial whose lease is older than the grace
    period belongs to a host that crashed or lost the storage. Trials of this host are judged by their
    process instead (:func:`owner_alive`).
    """
    start = trial.datetime_start.timestamp() if trial.datetime_start else None
    last = trial.user_attrs.get("heartbeat", start)
    if not isinstance(last, (int, float)):
        return None
    age = (time.time() if now is None else now) - float(last)
    return age if age > grace_s else None


def fail_interrupted(study: Any, log: Callable[[str], None], grace_s: float = 120.0) -> int:
    """Mark FAIL the RUNNING trials whose process has ended, or whose host stopped renewing their lease.

    Trials of live processes (another ``hwprune search`` on the same study) are left running; so are trials
    of another host whose lease is younger than ``grace_s`` seconds, and a trial with no owner yet (a process
    between ``ask`` and recording itself) until it is ``grace_s`` old.
    """
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        alive = owner_alive(owner) if owner else None
        why = None
        if alive is False:
            why = "interrupted (process ended mid-trial)"
        elif alive is None:
            age = stale_for(t, grace_s)
            if age is not None:
                why = (f"stale: no heartbeat from {owner} for {age:.0f} s (host down or cut off)" if owner else
                       f"stale: started {age:.0f} s ago and never claimed by a process")
        if why:
            try:  # the reason on the trial: Optuna's public API sets attributes only through the trial's own process
                study._storage.set_trial_user_attr(t._trial_id, "error", why)
            except Exception:  # noqa: BLE001 - it finished meanwhile: nothing to fail
                continue
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            log(f"hwprune: trial {t.number} marked failed: {why}")
            n += 1
    return n


def remaining(trials: list[Any], wanted: int, grace_s: float = 120.0, steps: int = 0) -> int:
    """Trials still to start: ``wanted`` fine-tunes' worth of ``steps`` less what the finished trials spent (one
    stopped early counts its share, :func:`~hwprune.search.early_stop.spent`; ``steps`` 0: each counts 1) and
    less the trials other live processes are running now; only whole fine-tunes that still fit."""
    others = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("owner") != OWNER
              and owner_alive(t.user_attrs.get("owner")) is not False and stale_for(t, grace_s) is None]
    return max(0, math.floor(wanted - spent(finished(trials), steps) - len(others) + 1e-9))


class Heartbeat:
    """Renews the lease (user attribute ``heartbeat``) of this process's running trials every ``interval_s``
    (the trials :func:`hwprune.search.trial.propose` registered, through their own ``set_user_attr``). A lease
    another host lapsed (it failed the trial as stale) and a storage error are logged, each kind once."""

    def __init__(self, study: Any, interval_s: float, log: Callable[[str], None] | None = None) -> None:
        import threading

        self.study, self.interval_s = study, interval_s
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._said: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hwprune-heartbeat", daemon=True)

    def beat(self) -> int:
        from hwprune.search.trial import RUNNING

        n = 0
        for key, trial in list(RUNNING.items()):
            try:
                trial.set_user_attr("heartbeat", time.time())
                n += 1
            except RuntimeError as exc:  # Optuna: the trial is finished (another host failed it as stale)
                RUNNING.pop(key, None)
                number = trial.number
                self._say(f"lapsed-{key}", f"hwprune: warning: trial {number}'s lease lapsed and another host "
                                              f"failed it as stale ({one_line(exc)}); its result will be dropped")
        return n

    def _say(self, key: str, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log(msg)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not kill the search; the next beat retries
                self._say(type(exc).__name__, f"hwprune: warning: a lease renewal failed ({one_line(exc)}); "
                                              f"retrying every {self.interval_s:g} s (said once)")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _run_local(ctx: SearchContext, study: Any, out: Path, log: Callable[[str], None]) -> None:
    spec = ctx.spec
    grace = spec.heartbeat_grace
    steps = spec.finetune_steps
    todo = remaining(study.get_trials(deepcopy=False), spec.trials, grace, steps)
    progress = Progress(out, ctx, spec.trials, spent(finished(study.get_trials(deepcopy=False)), steps), log,
                        steps)
    rule = rule_from(study, spec, ctx.task, ctx.limit_ms)
    try:
        while todo > 0:
            for _ in range(todo):
                trial = _run_one(ctx, rule, study, log)
                trials = progress.trial_ended(study, trial.number)
                if remaining(trials, spec.trials, grace, steps) <= 0:  # another process on the same study may have
                    break  # filled it
            progress.check_failures(study.get_trials(deepcopy=False), todo)
            fail_interrupted(study, log, grace)  # a host that died meanwhile: its trials are not waited for
            todo = remaining(study.get_trials(deepcopy=False), spec.trials, grace, steps)
    finally:
        progress.close()


def study_grid(ctx: SearchContext, study: Any, log: Callable[[str], None]) -> None:
    """The keep ratios a study searches are its own: recorded when it starts (its parameters are indices into
    them), read back on a resume; a study of an older version searched the table's grid."""
    have = study.user_attrs.get("grid")
    if have is None and not study.trials:
        study.set_user_attr("grid", list(ctx.grid))
        return
    grid = tuple(float(r) for r in have) if have is not None else ctx.table_grid or ctx.grid
    if grid == ctx.grid:
        return
    off = sorted(set(grid) - set(ctx.table_grid or ctx.grid))
    if off and ctx.meter is None:
        raise HwpruneError(f"cannot resume: the study searched keep ratios off the table's grid "
                           f"({', '.join(f'{r:g}' for r in off[:6])}{', ...' if len(off) > 6 else ''}), measured on "
                           f"demand on the machine it ran on; resume it there with this machine as the target, the "
                           f"local backend and the table found in --tables (not --table)")
    log(f"hwprune: resuming with the study's own keep ratios ({len(grid)} levels: "
        f"{', '.join(f'{r:g}' for r in grid)})")
    ctx.grid = grid
    if not off:
        ctx.meter = None


def check_prices(out: Path, ctx: SearchContext, log: Callable[[str], None], now: dict[str, Any]) -> None:
    """A resumed study keeps one price scale: the table's device, the entries and calibration this model is
    priced from, and the margin must be those the run started with; otherwise the resume is refused (its trials'
    predicted latencies would mix with prices of another table). A run started before prices were recorded gets
    them recorded now, said. ``now``: this process's :meth:`SearchContext.prices`."""
    from hwprune._io import read_json, write_atomic

    info = read_json(out / "run.json", "run file")
    then = info.get("prices")
    if then is None:
        log("hwprune: this run was started before hwprune recorded its prices; recording the table's now (later "
            "resumes are checked against them)")
        write_atomic(out / "run.json", json.dumps({**info, "prices": now}, indent=2, sort_keys=True, default=str)
                     + "\n")
        return
    what = price_diff(then, now, ctx)
    if what:
        n = len(_trial_rows(out))
        raise HwpruneError(f"cannot resume {str(out)!r}: {'; '.join(what)}, so its {n} trial(s) were priced on "
                           f"another scale than new ones would be; search into a new --out (or give --table the "
                           f"table it started with: {info.get('table')})")


def price_diff(then: dict[str, Any], now: dict[str, Any], ctx: SearchContext) -> list[str]:
    """What differs between two price records (:meth:`SearchContext.prices`): each a reason trials priced under
    one cannot share a study with trials priced under the other."""
    what = []
    if then.get("table_fingerprint") != now["table_fingerprint"]:
        what.append("the table is another device's or runtime's (its fingerprint differs)")
    elif then.get("digest") not in (now["digest"], ctx.prices(all_casts=True)["digest"]):
        what.append(f"the table's entries or calibration for this model changed ({then.get('entries')} -> "
                    f"{now['entries']} entries priced from, digest {then.get('digest')} -> {now['digest']})")
    try:
        margin = float(then.get("margin", 0.0))
    except (TypeError, ValueError):
        margin = float("nan")
    if not abs(margin - now["margin"]) <= 1e-3:  # the table on disk rounds what made it
        what.append(f"the budget margin changed ({then.get('margin', 0)} -> {now['margin']:.2%})")
    if then.get("batch_size") != now["batch_size"]:
        what.append(f"the latency batch changed ({then.get('batch_size')} -> {now['batch_size']})")
    return what


def check_study_prices(out: Path, spec: SearchSpec, ctx: SearchContext, now: dict[str, Any]) -> None:
    """One price scale per study, however many hosts join it with their own --out and table: the first to start
    records its prices (``now``: :meth:`SearchContext.prices`) in the storage (a marker study ``<study>:prices`` it
    alone can create, the record on it); every later process compares its own and is refused on a difference."""
    import optuna

    marker = _marker(out, spec, "prices")
    if marker is not None:
        marker.set_user_attr("prices", now)
        return
    marker = optuna.load_study(study_name=f"{spec.name}:prices", storage=study_storage(out, spec))
    then = None
    for _ in range(100):  # its creator writes the record right after creating it
        then = marker.user_attrs.get("prices")
        if then is not None:
            break
        time.sleep(0.05)
    if not isinstance(then, dict):
        return  # its creator died between the two writes: nothing to compare with (run.json still is)
    what = price_diff(then, now, ctx)
    if what:
        raise HwpruneError(f"cannot join study {spec.name!r}: {'; '.join(what)}: the process or host that started "
                           f"it priced its trials on another scale; give this host the same table (--table), or "
                           f"search into another --study")


def _trial_rows(out: Path) -> list[Any]:
    """The rows of a run's trials.csv (empty when it has none yet)."""
    import csv

    p = out / "trials.csv"
    if not p.exists():
        return []
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def run_search(spec: SearchSpec, log: Callable[[str], None] | None = None,
               prepare: Callable[[SearchSpec, Callable[[str], None]], SearchContext] = prepare_context) -> SearchResult:
    """Run (or resume) a search; returns the summary that ``--json`` prints.

    ``prepare`` builds the context (default :func:`prepare_context`); a benchmark may pass one that prices
    candidates another way (e.g. by FLOPs), which the local backend then searches under unchanged.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    spec.validate()
    out = Path(spec.out or Path("runs") / spec.name)
    check_run_dir(out, spec.identity())  # before any training or reading: a wrong --out costs nothing
    if spec.storage:
        check_storage(out, spec)  # a typo in the URL, a missing driver, a server down: before any profiling
    if spec.backend == "ray":
        from hwprune.search.ray_backend import check_ray, shutdown_if_started

        check_ray(spec)  # installed, and the cluster reachable: before any training
        try:
            return _search(spec, log, prepare, out)
        finally:
            shutdown_if_started()  # a local Ray this search started, however it ended (never one it joined)
    return _search(spec, log, prepare, out)


def _search(spec: SearchSpec, log: Callable[[str], None],
            prepare: Callable[[SearchSpec, Callable[[str], None]], SearchContext], out: Path) -> SearchResult:
    """:func:`run_search` after its cheap checks."""
    ctx = prepare(spec, log)
    table = ctx.predictor.table
    prices = ctx.prices()
    resumed = claim_run_dir(out, spec.identity(), {
        "spec": spec.public(), "budget_ms": ctx.budget_ms, "budget_margin": ctx.margin, "limit_ms": ctx.limit_ms,
        "speed_factor": ctx.speed_factor, "measure_factor": ctx.measure_factor,
        "dense_predicted_ms": ctx.dense_ms,
        f"dense_val_{ctx.task.metric}": ctx.dense_val_metric, "task": ctx.task.name, "metric": ctx.task.metric,
        "direction": ctx.task.direction, "table": str(table.path), "table_fingerprint": table.fingerprint,
        "batch_size": table.batch_size, "grid": list(ctx.grid), "menus": ctx.menus, "prices": prices})
    from hwprune._io import read_json

    if resumed:
        check_prices(out, ctx, log, prices)  # the run keeps the speed factor it started with: its trials are priced under one limit
        began = read_json(out / "run.json", "run file")
        first = float(began.get("speed_factor", 1.0))
        if first != ctx.speed_factor:
            ctx.notes.append(f"resuming with the speed factor the run started with ({first:.3f}), not this "
                             f"machine's now ({ctx.speed_factor:.3f}): one study, one price scale")
            ctx.speed_factor = first
        ctx.measure_factor = float(began.get("measure_factor", 1.0 if str(spec.budget).strip().endswith("%")
                                             else first))  # a run from before it: its speed factor served
    for note in ctx.notes:
        log(f"hwprune: {note}")
    log(f"hwprune: {'resuming' if resumed else 'starting'} study {spec.name!r} in {out}; budget {ctx.budget_ms:.4f} ms "
        f"(dense {ctx.dense_ms:.4f} ms, val {ctx.task.metric} {ctx.dense_val_metric:.4f}); table {table.path}")
    study = open_study(out, spec)
    check_study_prices(out, spec, ctx, prices)  # hosts with their own --out and table on one storage: one price scale
    study_grid(ctx, study, log)
    fail_interrupted(study, log, spec.heartbeat_grace)
    if spec.costs == "sensitivity":  # on the study's own keep ratios (a resume may have changed them)
        ctx.costs()
        log(f"hwprune: {ctx.sensitivity.line()}")
    portfolio = None
    if not resumed and not study.trials and spec.uniform_seeds:
        if claim_seeds(out, spec):
            portfolio = enqueue_seeds(ctx, study, log)
        else:
            log("hwprune: the seeds of this study are enqueued by another process that started on it")
    t0 = time.time()
    with Heartbeat(study, spec.heartbeat_interval, log):
        if spec.backend == "ray":
            from hwprune.search.ray_backend import run_ray

            run_ray(ctx, study, out, log)
        else:
            _run_local(ctx, study, out, log)
    from hwprune.search.finish import finish

    finished_ = finish(ctx, study, log)
    task = ctx.task
    with results_lock(out):  # another process on this study may write its results now: read inside the lock
        trials = study.get_trials(deepcopy=False)
        write_trials(out, trials, ctx.limit_ms, task)
        pts = front(trials, ctx.limit_ms)
        fin = finished_ or {}
        chosen = best_point(pts, fin.get("dropped", []), trials, ctx.limit_ms, fin.get("met", []),
                            fin.get("best")) if pts else None
        if pts and chosen is None:
            log(f"hwprune: no best point: the measured finish timed every feasible trial it reached over the budget "
                f"(or within 2 standard errors of it) on this machine; no best_policy.json. More trials, a "
                f"larger --budget-margin, or export a trial by number (export --trial N measures it again)")
        best = write_front(out, pts, ctx.budget_ms, task, False if pts and chosen is None else chosen)
        if importlib.util.find_spec("matplotlib") is not None:
            plot_front(out, trials, pts, ctx.budget_ms, (ctx.dense_val_metric, ctx.dense_ms), ctx.limit_ms, task)
        else:
            log("hwprune: no pareto.png (matplotlib is not installed: pip install 'hwprune[plot]'); the front is in "
                "pareto.csv")
    seeds = {t.user_attrs["seed"]: {"trial": t.number, task.metric: task.show(t.values[0]),
                                    "predicted_latency_ms": t.values[1]}
             for t in trials if t.user_attrs.get("seed") and t.state.name == "COMPLETE"
             and t.user_attrs.get("grown_from") is None}
    count = lambda s: len([t for t in trials if t.state.name == s  # noqa: E731
                           and t.user_attrs.get("grown_from") is None])  # the finish's are reported under finish
    return {"study": spec.name, "out": str(out), "backend": spec.backend, "budget_ms": ctx.budget_ms,
            "budget_margin": ctx.margin, "limit_ms": ctx.limit_ms,
            "dense_predicted_ms": ctx.dense_ms, f"dense_val_{task.metric}": ctx.dense_val_metric,
            "task": task.name, "metric": task.metric, "direction": task.direction,
            "trials": count("COMPLETE") + count("PRUNED"), "complete": count("COMPLETE"),
            "stopped_early": count("PRUNED"), "failed": count("FAIL"),
            "finetunes": round(spent(finished(trials), spec.finetune_steps), 3),  # fine-tunes' worth of steps
            "repaired": sum(1 for t in trials if t.user_attrs.get("repairs")),
            "duplicates": sum(1 for t in trials if t.user_attrs.get("duplicate_of") not in (None, "")),
            "gate": {"timed": sum(1 for t in trials if t.user_attrs.get("gate")),  # proposals timed before training
                     "shrunk": sum(1 for t in trials if (t.user_attrs.get("gate") or {}).get("verdict") == "over"),
                     "grown": sum(1 for t in trials if (t.user_attrs.get("gate") or {}).get("grown"))},
            "screen": screen_correlation(trials), "portfolio": portfolio, "finish": finished_,
            "costs": ctx.sensitivity.to_dict() if ctx.sensitivity is not None else ctx.spec.costs,
            "seconds": round(time.time() - t0, 1), "pareto": _points(pts, task), "best": best, "uniform_seeds": seeds,
            "table_fingerprint": table.fingerprint, "resumed": resumed}


def enqueue_seeds(ctx: SearchContext, study: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The portfolio of seeds (:func:`hwprune.search.portfolio.portfolio`: uniform, knapsack and threshold, fp32 and
    per format, each filled to the limit), screened by the proxy; the fp32 uniform seed and the best-screened
    others, ``spec.seed_trials`` in all (at most ``spec.trials``), are enqueued to be fine-tuned first. Returns
    every seed with its proxy, price and whether it was enqueued. With the gate
    (:func:`~hwprune.search.finish.gate`), each enqueued seed is timed first and, where it measures clearly within
    the budget with headroom or not clearly within, built again at the price its measurement allows."""
    from hwprune.search.finish import gate
    from hwprune.search.portfolio import build_seed, portfolio

    t0 = time.time()
    rows = []
    for seed in portfolio(ctx):
        pol, moves = ctx.settle(seed.policy, log)  # its entries measured first (keep ratios off the table's grid)
        rows.append({"seed": seed, "policy": pol, "moves": moves, "predicted_ms": ctx.price_ms(pol),
                     "screen": proxy_of(ctx, pol, log) if ctx.screen is not None else None})
    ranked = sorted(rows, key=lambda r: -r["screen"] if r["screen"] is not None else 0.0)  # stable: portfolio order
    first = [r for r in rows if r["seed"].kind == "uniform" and r["seed"].fmt == "fp32"]
    chosen, seen = [], set()
    for r in first + [r for r in ranked if r not in first]:  # the fp32 uniform seed, then by proxy, each policy once
        key = json.dumps(r["policy"].to_dict(), sort_keys=True)
        if key not in seen and len(chosen) < min(ctx.spec.seed_trials, ctx.spec.trials):
            seen.add(key)
            chosen.append(r)
    others = [r["policy"] for r in chosen]
    for r in chosen:
        def resize(policy: Any, limit: float, up: bool, seed: Any = r["seed"]) -> tuple[Any, int]:
            pol = build_seed(ctx, seed.kind, seed.fmt, limit)  # the same kind of seed at the measured price
            if pol is None:
                if up:
                    return policy, 0
                raise HwpruneError(f"no {seed.kind} seed fits {limit:.4f} ms")  # the gate leaves it to the finish
            pol, more = ctx.settle(pol, log, grow=False, limit=limit)
            return pol, 0 if pol == policy else 1 + more

        before = r["policy"]
        r["policy"], gated = gate(ctx, before, log, others=others, resize=resize, what=f"seed {r['seed'].name}")
        if r["policy"] != before and r["screen"] is not None:
            r["screen"] = proxy_of(ctx, r["policy"], log)  # its proxy at the widths it is trained at
        study.enqueue_trial(params_of(ctx, ctx.keep_of(r["policy"]), r["policy"].formats),
                            user_attrs={"seed": r["seed"].name, **({"repairs": r["moves"]} if r["moves"] else {}),
                                        **({"screen": r["screen"]} if r["screen"] is not None else {}),
                                        **({"gate": gated} if gated is not None else {})})
    log(f"hwprune: seeds: a portfolio of {len(rows)} filled to the limit, screened in {time.time() - t0:.1f} s ("
        + ", ".join(r["seed"].name + (f" {r['screen']:.4f}" if r["screen"] is not None else "") for r in ranked)
        + f"); fine-tuned first: {', '.join(r['seed'].name for r in chosen)}")
    return [{"seed": r["seed"].name, "screen": r["screen"], "predicted_ms": round(r["predicted_ms"], 5),
             "policy": r["policy"].to_dict(), "fine_tuned": r in chosen, "same_as": r["seed"].same_as} for r in rows]


def load_front(run_dir: str | Path, storage: str | None = None) -> SearchResult:
    """The front of a finished or running search, read back from its run directory."""
    from hwprune.search.rundir import read_run

    out = Path(run_dir)
    info = read_run(out)
    spec = run_spec(info, storage)
    study = open_study(out, spec, load_only=True)
    pts = front(study.get_trials(deepcopy=False), run_limit(info))
    task = run_task(info)
    return {"study": spec.name, "out": str(out), "budget_ms": info["budget_ms"], "limit_ms": run_limit(info),
            "metric": task.metric, "direction": task.direction, "pareto": _points(pts, task)}


def run_task(info: dict[str, Any]) -> Any:
    """The task a run scored with (runs of older versions: classification), for reading its results: a user task
    (``file.py:factory``) is not imported (run.json may come from anyone); its metric and direction come from
    run.json, and it cannot score."""
    from hwprune.factory import is_factory_ref
    from hwprune.tasks import Task, get_task

    ref = info.get("task") or (info.get("spec") or {}).get("task")
    if not (isinstance(ref, str) and is_factory_ref(ref)):
        return get_task(ref)
    metric, direction = info.get("metric"), info.get("direction")
    if not isinstance(metric, str) or direction not in ("max", "min"):
        raise HwpruneError(f"run.json names user task {ref!r} without its metric and direction; the run is damaged "
                           f"or from an older hwprune")

    def unavailable(*_: Any) -> Any:
        raise HwpruneError(f"user task {ref!r} is not loaded when a run is read back")

    return Task(ref, metric, direction, unavailable, unavailable)


def run_limit(info: dict[str, Any]) -> float:
    """The priced limit of a run: its budget less the margin (runs of older versions had none)."""
    return float(info.get("limit_ms", info["budget_ms"]))


def run_spec(info: dict[str, Any], storage: str | None = None) -> SearchSpec:
    """The spec a run.json recorded, each field type-checked; ``storage`` supplies the URL whose password
    run.json does not keep."""
    import dataclasses

    from hwprune._io import is_masked, mask_url
    from hwprune.search.spec import _check

    raw = info.get("spec")
    if not isinstance(raw, dict):
        raise HwpruneError("run.json has no spec mapping; the file is damaged or not hwprune's")
    known = {f.name for f in dataclasses.fields(SearchSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HwpruneError(f"run.json's spec has field(s) this hwprune does not know ({', '.join(unknown[:4])}): "
                           f"written by a newer hwprune, or edited")
    spec = SearchSpec(**{k: _check(k, v, "run.json's spec") for k, v in raw.items()})
    if not spec.model or not spec.data or not spec.budget:
        raise HwpruneError("run.json's spec lacks its model, data or budget; the file is damaged or edited")
    if storage:
        if mask_url(storage) != spec.storage:
            raise HwpruneError(f"--storage {mask_url(storage)!r} is not the run's storage {spec.storage!r}")
        spec.storage = storage
    elif is_masked(spec.storage):
        raise HwpruneError(f"the run's study is in {spec.storage!r}, and run.json does not keep its password; "
                           f"pass --storage with the full URL")
    return spec


def _points(pts: list[Any], task: Any = None) -> list[dict[str, Any]]:
    """Front trials as the ``pareto`` list of ``--json`` (the metric under its own name, e.g. accuracy)."""
    from hwprune.tasks import get_task

    task = get_task(task)
    return [{"trial": t.number, task.metric: task.show(t.values[0]), "predicted_latency_ms": t.values[1],
             "seed": t.user_attrs.get("seed", "")} for t in pts]


