"""The search controller: Optuna multi-objective (accuracy up, predicted latency down) under a budget.

Each trial samples a keep ratio per group (from the grid the table was
profiled on) and a format per layer (from the layer's measured menu), repairs
the policy to the budget (see :mod:`hwprune.search.context`), fine-tunes the
pruned model from the dense weights (same data order and seed for every trial,
so accuracy differences come from the policy) and reports validation accuracy
and predicted latency. A policy already evaluated is not fine-tuned again. The first trials are the uniform policies that just meet
the budget. The study lives in a journal file in the run directory, so the
same command resumes it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import HwpruneError, is_oom, one_line
from hwprune.search.context import SearchContext, prepare_context
from hwprune.search.rundir import check_run_dir, claim_run_dir, front, plot_front, write_front, write_trials
from hwprune.search.spec import SearchSpec

__all__ = ["run_search", "open_study", "load_front", "SearchResult", "propose", "train_candidate", "Progress",
           "Heartbeat", "fail_interrupted", "stale_for"]

SearchResult = dict[str, Any]


def _sampler(name: str, seed: int):  # type: ignore[no-untyped-def]
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(out: Path, spec: SearchSpec, load_only: bool = False):  # type: ignore[no-untyped-def]
    """Create or load the study: a journal file in ``out`` by default, or ``spec.storage`` (an RDB URL)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from hwprune._io import mask_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: one line each from hwprune, reason in trials.csv
    storage: Any = spec.storage or JournalStorage(JournalFileBackend(str(out / "study.journal")))
    try:
        if load_only:
            return optuna.load_study(study_name=spec.name, storage=storage)
        return optuna.create_study(study_name=spec.name, storage=storage, directions=["maximize", "minimize"],
                                   sampler=_sampler(spec.sampler, spec.seed), load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server: one line
        where = mask_url(spec.storage) or str(out)
        raise HwpruneError(f"cannot open study {spec.name!r} in {where!r}: {one_line(exc)}") from exc


def _params(ctx: SearchContext, keep: dict[str, float], formats: dict[str, str]) -> dict[str, Any]:
    p: dict[str, Any] = {f"keep:{g.name}": keep.get(g.name, 1.0) for g in ctx.layers.space.groups}
    p.update({f"fmt:{n}": formats.get(n, "fp32") for n, menu in ctx.menus.items() if len(menu) > 1})
    return p


def propose(ctx: SearchContext, trial: Any) -> tuple[Any, float, Any]:
    """Sample a candidate on ``trial``, repair it to the budget and price it (in the driver, before any training).

    Returns the policy, its predicted latency, and the completed trial that already evaluated the same policy
    (or None). The trial's user attributes get the policy, repair count and FLOPs.
    """
    from optuna.trial import TrialState

    trial.set_user_attr("owner", OWNER)  # which process runs it: a resumed search fails only dead owners' trials
    trial.set_user_attr("heartbeat", time.time())  # its lease, renewed by Heartbeat while it runs
    keep = {g.name: trial.suggest_categorical(f"keep:{g.name}", list(ctx.grid)) for g in ctx.layers.space.groups}
    formats = {n: trial.suggest_categorical(f"fmt:{n}", menu) for n, menu in ctx.menus.items() if len(menu) > 1}
    policy, repairs = ctx.repair(ctx.policy(keep, formats))
    pred = ctx.predictor.price(policy)
    trial.set_user_attr("policy", policy.to_dict())
    trial.set_user_attr("repairs", repairs)
    trial.set_user_attr("flops", pred.macs // ctx.predictor.table.batch_size)
    trial.set_user_attr("predicted_latency_ms", pred.latency_ms)
    key = json.dumps(policy.to_dict(), sort_keys=True)
    for prev in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if json.dumps(prev.user_attrs.get("policy"), sort_keys=True) == key:  # same policy: same result
            return policy, pred.latency_ms, prev
    return policy, pred.latency_ms, None


def reuse(trial: Any, dup: Any, t0: float) -> tuple[float, float]:
    """A repeated policy: record which finished trial it repeats and return that trial's values."""
    trial.set_user_attr("duplicate_of", dup.number)
    trial.set_user_attr("params", dup.user_attrs.get("params"))
    trial.set_user_attr("seconds", round(time.time() - t0, 2))
    return dup.values[0], dup.values[1]


def train_candidate(setup: Any, batches: Any, spec: SearchSpec, policy: Any,
                    at_checkpoint: Callable[[int, float], None] | None = None) -> tuple[float, int]:
    """Prune the dense model to ``policy``, fine-tune it, return (validation score, parameters).

    The score is the task's metric where higher is better, minus the metric where lower is (perplexity):
    what the study maximizes (:meth:`hwprune.tasks.Task.score`). ``at_checkpoint(step, score)`` runs at :func:`~hwprune.search.early_stop.checkpoints`; it may raise to
    stop the fine-tune.
    """
    from hwprune.apply import apply_policy
    from hwprune.measure import count_params
    from hwprune.search.early_stop import checkpoints
    from hwprune.train import evaluate, finetune, subset

    data, task = setup.data, setup.task
    val = subset(data.val, spec.val_subset, spec.seed)  # the same items for every trial
    model = apply_policy(setup.model, policy, setup.example, exclude=spec.exclude, importance=spec.importance,
                         batches=batches)
    params = count_params(model)
    marks = set(checkpoints(spec.finetune_steps, at_checkpoint is not None and spec.early_stop_margin > 0))

    def callback(step: int) -> None:
        if step in marks and at_checkpoint is not None:
            at_checkpoint(step, task.score(evaluate(model, val, task=task)))

    finetune(model, data.train, spec.finetune_steps, lr=spec.lr, batch_size=spec.train_batch_size, seed=spec.seed,
             callback=callback, device=spec.device, task=task)
    return task.score(evaluate(model, val, task=task)), params


def _rule_from(study: Any, spec: SearchSpec) -> Any:
    """The early-stopping rule, holding the finished trials of a (resumed) study."""
    from hwprune.search.early_stop import DominanceRule

    rule = DominanceRule(spec.early_stop_margin)
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE" and t.user_attrs.get("curve"):
            rule.add(t.number, t.values[1], t.user_attrs["curve"], t.values[0])
    return rule


def _evaluate(ctx: SearchContext, rule: Any, trial: Any) -> tuple[float, float]:
    import optuna

    t0 = time.time()
    try:
        policy, latency, dup = propose(ctx, trial)
        if dup is not None:
            return reuse(trial, dup, t0)
        curve: dict[str, float] = {}
        seed = bool(trial.user_attrs.get("seed"))

        def at_checkpoint(step: int, acc: float) -> None:
            curve[str(step)] = acc
            trial.set_user_attr("curve", dict(curve))
            why = None if seed else rule.check(latency, step, acc)
            if why:
                trial.set_user_attr("error", why)
                trial.set_user_attr("seconds", round(time.time() - t0, 2))
                raise optuna.TrialPruned(why)

        t1 = time.time()
        trial.set_user_attr("node", socket.gethostname())  # the local backend fine-tunes here
        try:
            acc, params = train_candidate(ctx.setup, ctx.batches, ctx.spec, policy, at_checkpoint)
        finally:
            trial.set_user_attr("train_seconds", round(time.time() - t1, 3))
        trial.set_user_attr("params", params)
    except optuna.TrialPruned:
        raise
    except Exception as exc:
        trial.set_user_attr("error", ("out of memory: " if is_oom(exc) else "") + one_line(exc))
        if is_oom(exc):
            _free_memory()
        raise
    trial.set_user_attr("seconds", round(time.time() - t0, 2))
    if curve:
        rule.add(trial.number, latency, curve, acc)
    return acc, latency


FINISHED = ("COMPLETE", "PRUNED")  # trials that count toward --trials; failed ones are retried
OWNER = f"{socket.gethostname()}:{os.getpid()}"


def finished(trials: list[Any]) -> list[Any]:
    return [t for t in trials if t.state.name in FINISHED]


def _free_memory() -> None:
    """After an out-of-memory trial: drop what it held, so the next trial starts clean."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process that ran a trial still runs: True/False on this host, None when unknowable."""
    host, _, pid = (owner or "").rpartition(":")
    if not owner or not pid.isdigit():
        return False  # no owner recorded: the process ended between creating the trial and starting it
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    of another host whose lease is younger than ``grace_s`` seconds.
    """
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        alive = owner_alive(t.user_attrs.get("owner"))
        why = None
        if alive is False:
            why = "interrupted (process ended mid-trial)"
        elif alive is None:
            age = stale_for(t, grace_s)
            if age is not None:
                why = f"stale: no heartbeat from {t.user_attrs['owner']} for {age:.0f} s (host down or cut off)"
        if why:
            # Optuna's public API cannot fail a trial of another process with a reason: storage calls
            study._storage.set_trial_user_attr(t._trial_id, "error", why)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            log(f"hwprune: trial {t.number} marked failed: {why}")
            n += 1
    return n


def remaining(trials: list[Any], wanted: int, grace_s: float = 120.0) -> int:
    """Trials still to start: wanted minus finished minus those other live processes are running now."""
    others = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("owner") != OWNER
              and owner_alive(t.user_attrs.get("owner")) is not False and stale_for(t, grace_s) is None]
    return max(0, wanted - len(finished(trials)) - len(others))


class Heartbeat:
    """Renews the lease (user attribute ``heartbeat``) of this process's running trials every ``interval_s``."""

    def __init__(self, study: Any, interval_s: float) -> None:
        import threading

        self.study, self.interval_s = study, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hwprune-heartbeat", daemon=True)

    def beat(self) -> int:
        import optuna

        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("owner") == OWNER:
                self.study._storage.set_trial_user_attr(t._trial_id, "heartbeat", time.time())
                n += 1
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a storage hiccup must not kill the search; the next beat retries
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Progress:
    """The progress bar (trials, best feasible accuracy, ETA) and trials.csv, updated as each trial ends."""

    def __init__(self, out: Path, ctx: SearchContext, total: int, done: int, log: Callable[[str], None]) -> None:
        from tqdm import tqdm

        self.out, self.ctx, self.log = out, ctx, log
        self.bar = tqdm(total=total, initial=done, desc="search", unit="trial", file=sys.stderr, disable=None)
        self.failed = 0

    def trial_ended(self, trials: list[Any], trial: Any) -> None:
        write_trials(self.out, trials, self.ctx.limit_ms, self.ctx.task)
        pts = front(trials, self.ctx.limit_ms)
        if trial.state.name in FINISHED:
            self.bar.update(1)
        if trial.state.name == "FAIL":
            self.failed += 1
            self.log(f"hwprune: trial {trial.number} failed: {trial.user_attrs.get('error', 'unknown')}")
        if pts:
            task = self.ctx.task
            self.bar.set_postfix({f"best_{task.metric}": f"{task.show(max(p.values[0] for p in pts)):.4f}"})

    def check_failures(self, trials: list[Any], wanted: int) -> None:
        """Stop when nothing works: every trial failed, or this session failed more often than it asked for."""
        failed = [t for t in trials if t.state.name == "FAIL"]
        if failed and not finished(trials):
            raise HwpruneError(f"every trial failed; the first: {failed[0].user_attrs.get('error', 'unknown')}")
        if self.failed > max(5, wanted):
            raise HwpruneError(f"{self.failed} trials failed in this run (see trials.csv); the last: "
                               f"{failed[-1].user_attrs.get('error', 'unknown')}")

    def close(self) -> None:
        self.bar.close()


def _run_local(ctx: SearchContext, study: Any, out: Path, log: Callable[[str], None]) -> None:
    spec = ctx.spec
    grace = spec.heartbeat_grace
    todo = remaining(study.get_trials(deepcopy=False), spec.trials, grace)
    progress = Progress(out, ctx, spec.trials, spec.trials - todo, log)
    rule = _rule_from(study, spec)
    objective = lambda trial: _evaluate(ctx, rule, trial)  # noqa: E731

    def ended(st: Any, tr: Any) -> None:
        trials = st.get_trials(deepcopy=False)
        progress.trial_ended(trials, tr)
        if remaining(trials, spec.trials, grace) <= 0:  # another process on the same study may have filled it
            st.stop()

    try:
        while todo > 0:
            study.optimize(objective, n_trials=todo, catch=(Exception,), callbacks=[ended])
            trials = study.get_trials(deepcopy=False)
            progress.check_failures(trials, todo)
            fail_interrupted(study, log, grace)  # a host that died meanwhile: its trials are not waited for
            todo = remaining(study.get_trials(deepcopy=False), spec.trials, grace)
    finally:
        progress.close()


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
    if spec.backend == "ray":
        from hwprune.search.ray_backend import check_ray

        check_ray(spec)  # installed, and the cluster reachable: before any training
    ctx = prepare(spec, log)
    table = ctx.predictor.table
    resumed = claim_run_dir(out, spec.identity(), {
        "spec": spec.public(), "budget_ms": ctx.budget_ms, "budget_margin": ctx.margin, "limit_ms": ctx.limit_ms,
        "speed_factor": ctx.speed_factor,
        "dense_predicted_ms": ctx.dense_ms,
        f"dense_val_{ctx.task.metric}": ctx.dense_val_metric, "task": ctx.task.name, "metric": ctx.task.metric,
        "direction": ctx.task.direction, "table": str(table.path), "table_fingerprint": table.fingerprint,
        "batch_size": table.batch_size, "grid": list(ctx.grid), "menus": ctx.menus})
    from hwprune._io import read_json

    if resumed:  # the run keeps the speed factor it started with: its trials are priced under one limit
        first = float(read_json(out / "run.json", "run file").get("speed_factor", 1.0))
        if first != ctx.speed_factor:
            ctx.notes.append(f"resuming with the speed factor the run started with ({first:.3f}), not this "
                             f"machine's now ({ctx.speed_factor:.3f}): one study, one price scale")
            ctx.speed_factor = first
    for note in ctx.notes:
        log(f"hwprune: {note}")
    log(f"hwprune: {'resuming' if resumed else 'starting'} study {spec.name!r} in {out}; budget {ctx.budget_ms:.4f} ms "
        f"(dense {ctx.dense_ms:.4f} ms, val {ctx.task.metric} {ctx.dense_val_metric:.4f}); table {table.path}")
    study = open_study(out, spec)
    fail_interrupted(study, log, spec.heartbeat_grace)
    if not resumed and not study.trials and spec.uniform_seeds:
        for name, pol in ctx.uniform_seeds():
            study.enqueue_trial(_params(ctx, pol.keep, pol.formats), user_attrs={"seed": name})
    t0 = time.time()
    with Heartbeat(study, spec.heartbeat_interval):
        if spec.backend == "ray":
            from hwprune.search.ray_backend import run_ray

            run_ray(ctx, study, out, log)
        else:
            _run_local(ctx, study, out, log)
    trials = study.get_trials(deepcopy=False)
    task = ctx.task
    write_trials(out, trials, ctx.limit_ms, task)
    pts = front(trials, ctx.limit_ms)
    best = write_front(out, pts, ctx.budget_ms, task)
    plot_front(out, trials, pts, ctx.budget_ms, (ctx.dense_val_metric, ctx.dense_ms), ctx.limit_ms, task)
    seeds = {t.user_attrs["seed"]: {"trial": t.number, task.metric: task.show(t.values[0]),
                                    "predicted_latency_ms": t.values[1]}
             for t in trials if t.user_attrs.get("seed") and t.state.name == "COMPLETE"}
    count = lambda s: len([t for t in trials if t.state.name == s])  # noqa: E731
    return {"study": spec.name, "out": str(out), "backend": spec.backend, "budget_ms": ctx.budget_ms,
            "budget_margin": ctx.margin, "limit_ms": ctx.limit_ms,
            "dense_predicted_ms": ctx.dense_ms, f"dense_val_{task.metric}": ctx.dense_val_metric,
            "task": task.name, "metric": task.metric, "direction": task.direction,
            "trials": count("COMPLETE") + count("PRUNED"), "complete": count("COMPLETE"),
            "stopped_early": count("PRUNED"), "failed": count("FAIL"),
            "repaired": sum(1 for t in trials if t.user_attrs.get("repairs")),
            "duplicates": sum(1 for t in trials if t.user_attrs.get("duplicate_of") not in (None, "")),
            "seconds": round(time.time() - t0, 1), "pareto": _points(pts, task), "best": best, "uniform_seeds": seeds,
            "table_fingerprint": table.fingerprint, "resumed": resumed}


def load_front(run_dir: str | Path, storage: str | None = None) -> SearchResult:
    """The front of a finished or running search, read back from its run directory."""
    from hwprune._io import read_json

    out = Path(run_dir)
    info = read_json(out / "run.json", "run file")
    spec = run_spec(info, storage)
    study = open_study(out, spec, load_only=True)
    pts = front(study.get_trials(deepcopy=False), run_limit(info))
    task = run_task(info)
    return {"study": spec.name, "out": str(out), "budget_ms": info["budget_ms"], "limit_ms": run_limit(info),
            "metric": task.metric, "direction": task.direction, "pareto": _points(pts, task)}


def run_task(info: dict[str, Any]) -> Any:
    """The task a run scored with (runs of older versions: classification)."""
    from hwprune.tasks import get_task

    return get_task(info.get("task") or (info.get("spec") or {}).get("task"))


def run_limit(info: dict[str, Any]) -> float:
    """The priced limit of a run: its budget less the margin (runs of older versions had none)."""
    return float(info.get("limit_ms", info["budget_ms"]))


def run_spec(info: dict[str, Any], storage: str | None = None) -> SearchSpec:
    """The spec a run.json recorded; ``storage`` supplies the URL whose password run.json does not keep."""
    from hwprune._io import mask_url

    spec = SearchSpec(**info["spec"])
    if storage:
        if mask_url(storage) != spec.storage:
            raise HwpruneError(f"--storage {mask_url(storage)!r} is not the run's storage {spec.storage!r}")
        spec.storage = storage
    elif spec.storage and ":***@" in spec.storage:
        raise HwpruneError(f"the run's study is in {spec.storage!r}, and run.json does not keep its password; "
                           f"pass --storage with the full URL")
    return spec


def _points(pts: list[Any], task: Any = None) -> list[dict[str, Any]]:
    """Front trials as the ``pareto`` list of ``--json`` (the metric under its own name, e.g. accuracy)."""
    from hwprune.tasks import get_task

    task = get_task(task)
    return [{"trial": t.number, task.metric: task.show(t.values[0]), "predicted_latency_ms": t.values[1],
             "seed": t.user_attrs.get("seed", "")} for t in pts]


