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
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import HwpruneError
from hwprune.search.context import SearchContext, prepare_context
from hwprune.search.rundir import check_run_dir, claim_run_dir, front, plot_front, write_front, write_trials
from hwprune.search.spec import SearchSpec

__all__ = ["run_search", "open_study", "load_front", "SearchResult"]

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

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: one line each from hwprune, reason in trials.csv
    storage: Any = spec.storage or JournalStorage(JournalFileBackend(str(out / "study.journal")))
    try:
        if load_only:
            return optuna.load_study(study_name=spec.name, storage=storage)
        return optuna.create_study(study_name=spec.name, storage=storage, directions=["maximize", "minimize"],
                                   sampler=_sampler(spec.sampler, spec.seed), load_if_exists=True)
    except (KeyError, ValueError, ImportError) as exc:
        raise HwpruneError(f"cannot open study {spec.name!r} in {spec.storage or str(out)!r}: {exc}") from exc


def _params(ctx: SearchContext, keep: dict[str, float], formats: dict[str, str]) -> dict[str, Any]:
    p: dict[str, Any] = {f"keep:{g.name}": keep.get(g.name, 1.0) for g in ctx.layers.space.groups}
    p.update({f"fmt:{n}": formats.get(n, "fp32") for n, menu in ctx.menus.items() if len(menu) > 1})
    return p


def _evaluate(ctx: SearchContext, trial: Any) -> tuple[float, float]:
    from optuna.trial import TrialState

    from hwprune.apply import apply_policy
    from hwprune.measure import count_params
    from hwprune.train import evaluate, finetune

    t0 = time.time()
    keep = {g.name: trial.suggest_categorical(f"keep:{g.name}", list(ctx.grid)) for g in ctx.layers.space.groups}
    formats = {n: trial.suggest_categorical(f"fmt:{n}", menu) for n, menu in ctx.menus.items() if len(menu) > 1}
    data = ctx.setup.data
    assert data is not None
    try:
        policy, repairs = ctx.repair(ctx.policy(keep, formats))
        pred = ctx.predictor.price(policy)
        trial.set_user_attr("policy", policy.to_dict())
        trial.set_user_attr("repairs", repairs)
        trial.set_user_attr("flops", pred.macs // ctx.predictor.table.batch_size)
        key = json.dumps(policy.to_dict(), sort_keys=True)
        for prev in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if json.dumps(prev.user_attrs.get("policy"), sort_keys=True) == key:  # same policy: same result
                trial.set_user_attr("duplicate_of", prev.number)
                trial.set_user_attr("params", prev.user_attrs.get("params"))
                trial.set_user_attr("seconds", round(time.time() - t0, 2))
                return prev.values[0], prev.values[1]
        model = apply_policy(ctx.setup.model, policy, ctx.setup.example, exclude=ctx.spec.exclude,
                             importance=ctx.spec.importance, batches=ctx.batches)
        trial.set_user_attr("params", count_params(model))
        finetune(model, data.train, ctx.spec.finetune_steps, lr=ctx.spec.lr, seed=ctx.spec.seed)
        acc = evaluate(model, data.val)
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise
    trial.set_user_attr("seconds", round(time.time() - t0, 2))
    return acc, pred.latency_ms


def run_search(spec: SearchSpec, log: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) a search; returns the summary that ``--json`` prints."""
    import optuna
    from tqdm import tqdm

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    spec.validate()
    if spec.backend == "ray":
        raise HwpruneError("--backend ray is not available yet in this version; use --backend local")
    out = Path(spec.out or Path("runs") / spec.name)
    check_run_dir(out, spec.identity())  # before any training or reading: a wrong --out costs nothing
    ctx = prepare_context(spec, log)
    table = ctx.predictor.table
    resumed = claim_run_dir(out, spec.identity(), {
        "spec": dict(vars(spec)), "budget_ms": ctx.budget_ms, "dense_predicted_ms": ctx.dense_ms,
        "dense_val_accuracy": ctx.dense_val_accuracy, "table": str(table.path), "table_fingerprint": table.fingerprint,
        "batch_size": table.batch_size, "grid": list(ctx.grid), "menus": ctx.menus})
    for note in ctx.notes:
        log(f"hwprune: {note}")
    log(f"hwprune: {'resuming' if resumed else 'starting'} study {spec.name!r} in {out}; budget {ctx.budget_ms:.4f} ms "
        f"(dense {ctx.dense_ms:.4f} ms, val acc {ctx.dense_val_accuracy:.4f}); table {table.path}")
    study = open_study(out, spec)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (process ended mid-trial)")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if not resumed and not study.trials:
        for name, pol in ctx.uniform_seeds():
            study.enqueue_trial(_params(ctx, pol.keep, pol.formats), user_attrs={"seed": name})
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    todo = max(0, spec.trials - len(done))
    bar = tqdm(total=spec.trials, initial=len(done), desc="search", unit="trial", file=sys.stderr, disable=None)

    def on_trial(st: Any, trial: Any) -> None:
        trials = st.get_trials(deepcopy=False)
        write_trials(out, trials, ctx.budget_ms)
        pts = front(trials, ctx.budget_ms)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.update(1)
        elif trial.state == optuna.trial.TrialState.FAIL:
            log(f"hwprune: trial {trial.number} failed: {trial.user_attrs.get('error', 'unknown')}")
        if pts:
            bar.set_postfix(best_acc=f"{max(p.values[0] for p in pts):.4f}")

    objective = lambda trial: _evaluate(ctx, trial)  # noqa: E731
    while todo > 0:
        study.optimize(objective, n_trials=todo, callbacks=[on_trial], catch=(Exception,))
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        if not complete and failed:
            raise HwpruneError(f"every trial failed; the first: {failed[0].user_attrs.get('error', 'unknown')}")
        todo = max(0, spec.trials - len(complete))
    bar.close()
    trials = study.get_trials(deepcopy=False)
    write_trials(out, trials, ctx.budget_ms)
    pts = front(trials, ctx.budget_ms)
    best = write_front(out, pts, ctx.budget_ms)
    plot_front(out, trials, pts, ctx.budget_ms, (ctx.dense_val_accuracy, ctx.dense_ms))
    seeds = {t.user_attrs["seed"]: {"trial": t.number, "accuracy": t.values[0], "predicted_latency_ms": t.values[1]}
             for t in trials if t.user_attrs.get("seed") and t.state == optuna.trial.TrialState.COMPLETE}
    return {"study": spec.name, "out": str(out), "budget_ms": ctx.budget_ms, "dense_predicted_ms": ctx.dense_ms,
            "dense_val_accuracy": ctx.dense_val_accuracy, "trials": len([t for t in trials if t.state.name == "COMPLETE"]),
            "failed": len([t for t in trials if t.state.name == "FAIL"]),
            "repaired": sum(1 for t in trials if t.user_attrs.get("repairs")),
            "pareto": _points(pts), "best": best, "uniform_seeds": seeds, "table_fingerprint": table.fingerprint, "resumed": resumed}


def load_front(run_dir: str | Path) -> SearchResult:
    """The front of a finished or running search, read back from its run directory."""
    from hwprune._io import read_json

    out = Path(run_dir)
    info = read_json(out / "run.json", "run file")
    spec = SearchSpec(**{k: v for k, v in info["spec"].items()})
    study = open_study(out, spec, load_only=True)
    pts = front(study.get_trials(deepcopy=False), info["budget_ms"])
    return {"study": spec.name, "out": str(out), "budget_ms": info["budget_ms"], "pareto": _points(pts)}


def _points(pts: list[Any]) -> list[dict[str, Any]]:
    """Front trials as the ``pareto`` list of ``--json``."""
    return [{"trial": t.number, "accuracy": t.values[0], "predicted_latency_ms": t.values[1],
             "seed": t.user_attrs.get("seed", "")} for t in pts]


