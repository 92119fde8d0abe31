"""One trial of the search, the same for both backends: propose, repair, screen, train, reuse, early stop.

A **proposal** is made before the study's trial exists. ``screen`` candidates are sampled from a shadow
copy of the study (an in-memory study holding the same finished trials and a sampler of the same kind, so
TPE or NSGA-II sample from the same history), each repaired to the budget
(:meth:`~hwprune.search.context.SearchContext.repair`) and scored by the cheap proxy
(:mod:`hwprune.search.screen`); the best-screened one is enqueued into the real study with its *repaired*
parameters and asked back. So the study only ever holds the policies that were trained, and the sampler
learns from those (the sample each came from is kept in the trial's ``sampled`` attribute). Keep ratios are
ordered integer parameters (an index into the table's grid: the sampler learns that 0.5 lies between 0.375
and 0.625); studies started by older versions, with categorical keep ratios, go on with those.

The local backend (:mod:`hwprune.search.controller`) and the Ray backend (:mod:`hwprune.search.ray_backend`)
both call :func:`propose` in the driver and :func:`train_candidate` where the fine-tune runs.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import HwpruneError, one_line
from hwprune.policy import Policy
from hwprune.search.context import SearchContext
from hwprune.search.early_stop import spent
from hwprune.search.rundir import front, judged, limit_of, results_lock, within, write_trials
from hwprune.search.spec import SearchSpec

__all__ = ["OWNER", "FINISHED", "finished", "make_sampler", "params_of", "param_mode", "propose", "proxy_of", "reuse",
           "train_candidate", "rule_from", "free_memory", "Progress", "screen_correlation", "spent"]

FINISHED = ("COMPLETE", "PRUNED")  # trials that count toward --trials; failed ones are retried
OWNER = f"{socket.gethostname()}:{os.getpid()}"
RUNNING: dict[int, Any] = {}  # this process's running trials (id -> optuna Trial): their leases are renewed


def tell(study: Any, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
    """Tell the study a trial of this process ended; a trial another host already failed (its lease lapsed, see
    :func:`hwprune.search.controller.fail_interrupted`) keeps that state, and this result is dropped."""
    RUNNING.pop(id(trial), None)
    study.tell(trial, values, state=state, skip_if_finished=True)


def set_attrs(trial: Any, **attrs: Any) -> bool:
    """Set user attributes of this process's trial; False (nothing raised) when another host failed it meanwhile."""
    try:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
    except RuntimeError:  # Optuna refuses to update a finished trial
        RUNNING.pop(id(trial), None)
        return False
    return True


def finished(trials: list[Any]) -> list[Any]:
    """Trials that count toward ``--trials``: finished ones, not the one the measured finish grew (one more)."""
    return [t for t in trials if t.state.name in FINISHED and t.user_attrs.get("grown_from") is None]


def make_sampler(name: str, seed: int):  # type: ignore[no-untyped-def]
    """The Optuna sampler of ``--sampler``."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.RandomSampler(seed=seed)


def param_mode(study: Any) -> str:
    """How a study's keep ratios are parameters: ``u`` (an index into the group's distinct widths, this
    version), ``k`` (an index into the grid, studies before 2026-12-06) or ``keep`` (categorical ratios, older)."""
    names = {k for t in study.get_trials(deepcopy=False) for k in t.params}
    return "keep" if any(k.startswith("keep:") for k in names) else "k" if any(k.startswith("k:") for k in names) \
        else "u"


def params_of(ctx: SearchContext, keep: dict[str, float], formats: dict[str, str], mode: str = "u"
              ) -> dict[str, Any]:
    """The study parameters of a policy: per group the index of its width among the group's distinct widths
    (``u:<group>``; in older studies ``k:<group>``, the index of its keep ratio in the grid, or ``keep:<group>``,
    the ratio itself), per layer with a menu its format."""
    from hwprune.search.portfolio import level_ratios

    grid = sorted(ctx.grid)
    nearest = lambda rs, r: min(range(len(rs)), key=lambda i: abs(rs[i] - r))  # noqa: E731
    canon = ctx.canonical({g.name: keep.get(g.name, 1.0) for g in ctx.layers.space.groups})
    p: dict[str, Any] = {}
    for g in ctx.layers.space.groups:
        r = keep.get(g.name, 1.0)
        if mode == "keep":
            p[f"keep:{g.name}"] = r
        elif mode == "k":
            p[f"k:{g.name}"] = nearest(grid, r)
        else:
            p[f"u:{g.name}"] = nearest(level_ratios(ctx, g.name), canon[g.name])
    p.update({f"fmt:{n}": formats.get(n, "fp32") for n, menu in ctx.menus.items() if len(menu) > 1})
    return p


def _suggest(ctx: SearchContext, trial: Any, mode: str) -> tuple[dict[str, float], dict[str, str]]:
    from hwprune.search.portfolio import level_ratios

    grid = sorted(ctx.grid)
    groups = ctx.layers.space.groups
    if mode == "keep":
        keep = {g.name: trial.suggest_categorical(f"keep:{g.name}", list(ctx.grid)) for g in groups}
    elif mode == "k":
        keep = {g.name: grid[trial.suggest_int(f"k:{g.name}", 0, len(grid) - 1)] for g in groups}
    else:
        keep = {}
        for g in groups:
            rs = level_ratios(ctx, g.name)
            keep[g.name] = rs[trial.suggest_int(f"u:{g.name}", 0, len(rs) - 1)]
    formats = {n: trial.suggest_categorical(f"fmt:{n}", menu) for n, menu in ctx.menus.items() if len(menu) > 1}
    return keep, formats


def _gamma(n: int) -> int:
    """TPE's "good" trials out of ``n``: a quarter (at least one; Optuna's default, a tenth, is one trial up to 10)."""
    return max(1, min(math.ceil(0.25 * n), 25))


def _shadow(ctx: SearchContext, study: Any, salt: int) -> Any:
    """An in-memory study holding the real study's finished trials, with a sampler of the spec's kind. With the
    ``metric`` objective (a budgeted search) it has one objective, the score, the price a constraint every trial
    meets (candidates are projected into the budget): the sampler learns which policies score best, not a front."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    seed = ctx.spec.seed + salt
    if ctx.spec.objective != "metric":
        sh = optuna.create_study(directions=study.directions, sampler=make_sampler(ctx.spec.sampler, seed))
        sh.add_trials(done)
        return sh
    if ctx.spec.sampler == "tpe":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
            sampler: Any = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True,
                                                      gamma=_gamma)
    else:
        sampler = make_sampler(ctx.spec.sampler, seed)
    sh = optuna.create_study(direction="maximize", sampler=sampler)
    for t in done:
        curve = {int(k): float(v) for k, v in (t.user_attrs.get("curve") or {}).items()}
        if t.state == TrialState.COMPLETE and t.values:
            sh.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.values[0],
                                                   constraints={"latency": t.values[1] - limit_of(t.user_attrs,
                                                                                                  ctx.limit_ms)}))
        elif curve:  # stopped early: what it reached, as Optuna's pruned trials carry it
            sh.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=t.params,
                                                   distributions=t.distributions, intermediate_values=curve))
    return sh


def _neighbours(ctx: SearchContext, study: Any, n: int, rng: Any) -> list[tuple[str, Policy]]:
    """``n`` local moves around the best finished trial (highest score): one group a width down and another a
    width up, or one layer to another format of its menu; the projection then puts each at the limit."""
    from optuna.trial import TrialState

    from hwprune.search.portfolio import level_ratios

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if within(t, ctx.limit_ms) and t.user_attrs.get("policy")]
    if not done or n <= 0:
        return []
    best = max(done, key=lambda t: (t.values[0], -t.number))
    pol = Policy.from_dict(best.user_attrs["policy"])
    groups = [g.name for g in ctx.layers.space.groups]
    out = []
    for _ in range(n * 3):
        keep = ctx.canonical(ctx.keep_of(pol))
        formats = dict(pol.formats)
        flip = [layer for layer, menu in ctx.menus.items() if len(menu) > 1]
        if flip and (len(groups) < 2 or rng.random() < 0.25):
            layer = rng.choice(sorted(flip))
            formats[layer] = rng.choice([f for f in ctx.menus[layer] if f != formats.get(layer, "fp32")])
        elif len(groups) >= 2:
            a, b = rng.sample(groups, 2)
            ra, rb = level_ratios(ctx, a), level_ratios(ctx, b)
            ia, ib = ra.index(keep[a]) if keep[a] in ra else len(ra) - 1, rb.index(keep[b]) if keep[b] in rb else 0
            if ia == 0 or ib == len(rb) - 1:
                continue
            keep[a], keep[b] = ra[ia - rng.randint(1, min(2, ia))], rb[ib + 1]
        else:
            continue
        out.append((f"neighbour of trial {best.number}", ctx.policy(keep, formats)))
        if len(out) >= n:
            break
    return out


def _key(policy: Policy) -> str:
    return json.dumps(policy.to_dict(), sort_keys=True)


def _done_policies(study: Any) -> dict[str, Any]:
    from optuna.trial import TrialState

    return {json.dumps(t.user_attrs.get("policy"), sort_keys=True): t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def unseen(cands: dict[str, Any], done: Any, raced: Any) -> dict[str, Any]:
    """The candidates (by policy key) neither finished (``done``) nor stopped by racing (``raced``); when every
    one was seen, those finished (reused: no fine-tune, no proxy), else all of them (one stopped runs again)."""
    return ({k: c for k, c in cands.items() if k not in done and k not in raced}
            or {k: c for k, c in cands.items() if k in done} or cands)


def _candidates(ctx: SearchContext, study: Any, mode: str, log: Callable[[str], None],
                done: dict[str, Any]) -> dict[str, Any]:
    """Sample ``screen`` candidates (at least one) and, with the ``metric`` objective, as many local moves around
    the best trial so far; project each into the budget (:func:`~hwprune.search.portfolio.project`: repaired to
    the limit, then filled up to it) and screen them; the user attributes the chosen one's trial gets (its
    parameters under ``params``)."""
    from optuna.trial import TrialState

    from hwprune.search.portfolio import project

    n = max(1, ctx.spec.screen)
    # policies racing stopped: proposing one again would fine-tune it again to the same stop (cnn1d at 30%: one
    # policy was fine-tuned and stopped 11 times in a search of 17 trials)
    raced = {json.dumps(t.user_attrs.get("policy"), sort_keys=True)
             for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))}
    seen = set(done) | raced
    cands: dict[str, dict[str, Any]] = {}
    for attempt in range(3):  # projection maps many samples onto a policy already trained: draw again
        sh = _shadow(ctx, study, len(study.trials) + 1000 * attempt)
        samples: list[tuple[str, dict[str, float], dict[str, str]]] = []
        for _ in range(n):
            t = sh.ask()
            keep, formats = _suggest(ctx, t, mode)
            samples.append(("sampler", keep, formats))
        if ctx.spec.objective == "metric" and ctx.spec.screen > 1:
            rng = random.Random(ctx.spec.seed * 1000 + len(study.trials) + 100 * attempt)
            for src, pol in _neighbours(ctx, study, n, rng):
                samples.append((src, dict(pol.keep), dict(pol.formats)))
        for src, keep, formats in samples:
            policy, repairs = project(ctx, ctx.policy(keep, formats), ray=src == "sampler")
            k = _key(policy)
            if k in cands:
                continue
            cands[k] = {"policy": policy, "repairs": repairs, "sampled": {"keep": keep, "formats": formats},
                        "from": src}
        if any(k not in seen for k in cands):
            break
    fresh = unseen(cands, done, raced)
    if ctx.screen is not None and len(fresh) > 1:
        for c in fresh.values():
            c["screen"] = proxy_of(ctx, c["policy"], log)
    elif ctx.screen is not None:
        c = next(iter(fresh.values()))
        if _key(c["policy"]) not in done:
            c["screen"] = proxy_of(ctx, c["policy"], log)
    from hwprune.search.finish import gate

    seeds = [Policy.from_dict(t.user_attrs["policy"]) for t in study.get_trials(deepcopy=False)
             if t.user_attrs.get("seed") and isinstance(t.user_attrs.get("policy"), dict)][:3]
    # the best-screened first; one the gate moved onto a policy already trained or stopped gives way to the next
    # (cnn1d at 30%: three proposals in a row were shrunk onto the first seed's policy), three at most
    ranked = sorted(fresh.values(), key=lambda c: -c.get("screen", 0.0))
    for best in ranked[:3]:
        pol, more = ctx.settle(best["policy"], log)  # its entries measured (keep ratios off the table's grid)
        pol, gated = gate(ctx, pol, log, others=seeds) if _key(pol) not in done else (pol, None)  # timed first
        if _key(pol) not in seen:
            break
    attrs = {"repairs": best["repairs"] + more, "sampled": best["sampled"], "screened": len(fresh),
             "proposed_by": best["from"]}
    if gated is not None:
        attrs["gate"] = gated
    if "screen" in best:
        attrs["screen"] = best["screen"]
    attrs["_params"] = params_of(ctx, ctx.keep_of(pol), pol.formats, mode)
    return attrs


def proxy_of(ctx: SearchContext, policy: Policy, log: Callable[[str], None]) -> float:
    """The screen's proxy of ``policy``; a candidate the proxy cannot evaluate (its pruned model fails to run)
    ranks last, said once per candidate (its fine-tune will fail with the same reason if it is chosen)."""
    from hwprune.errors import is_oom

    assert ctx.screen is not None
    try:
        return ctx.screen.score(policy)
    except Exception as exc:  # noqa: BLE001 - the user's model on a pruned shape: the trial, not the search, fails
        if is_oom(exc):
            free_memory()
        log(f"hwprune: screening a candidate failed: {one_line(exc)}")
        return float("-inf")


def propose(ctx: SearchContext, study: Any, log: Callable[[str], None] | None = None
            ) -> tuple[Any, Policy, float, Any]:
    """The next trial of ``study``, asked in the driver before any training: a waiting one (a seed), else the
    best-screened of ``spec.screen`` repaired samples (see the module doc).

    Returns the trial, its policy, the policy's predicted latency, and the completed trial that already
    evaluated the same policy (or None). The trial's user attributes get the policy, its repair count, the
    sample it was repaired from, its proxy and FLOPs.
    """
    from optuna.trial import TrialState

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    mode = param_mode(study)
    done = _done_policies(study)  # finished trials' policies: a proposal already evaluated is reused
    token = None
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        attrs = _candidates(ctx, study, mode, log, done)
        token = uuid.uuid4().hex
        study.enqueue_trial(attrs.pop("_params"), user_attrs={**attrs, "proposal": token})
    trial = study.ask()
    RUNNING[id(trial)] = trial
    try:
        trial.set_user_attr("owner", OWNER)  # which process runs it: a resumed search fails only dead owners' trials
        trial.set_user_attr("heartbeat", time.time())  # its lease, renewed by Heartbeat while it runs
        keep, formats = _suggest(ctx, trial, mode)  # an enqueued trial: its fixed (repaired) parameters
        lim = limit_of(trial.user_attrs, ctx.limit_ms)  # a proposal the gate grew: the price it was grown to
        grown = lim if lim > ctx.limit_ms else None
        policy, repairs = ctx.repair(ctx.policy(keep, formats), limit=grown)
        policy, more = ctx.settle(policy, log, limit=grown)  # settled before it was enqueued: a no-op
        attrs = trial.user_attrs
        if more:  # measuring moved it off its parameters (e.g. a policy another process sampled)
            trial.set_user_attr("params_are", f"{more} repair move(s) from the trained policy: entries measured "
                                              f"on demand priced it over the limit")
        if "proposal" not in attrs and "seed" not in attrs:
            # another process on the same study asked our proposal first: this trial was sampled by the study
            # itself, so its parameters are the sample and the trained policy is the repaired one
            trial.set_user_attr("sampled", {"keep": keep, "formats": formats})
            trial.set_user_attr("repairs", repairs)
            trial.set_user_attr("params_are", "sampled (a concurrent process took the repaired proposal)")
        elif "seed" in attrs:
            trial.set_user_attr("repairs", repairs)
        pred = ctx.predictor.price(policy)
        trial.set_user_attr("objective", ctx.spec.objective)
        trial.set_constraint("latency", pred.latency_ms - lim)  # <= 0: within the priced (or gate-measured) limit
        trial.set_user_attr("policy", policy.to_dict())
        trial.set_user_attr("flops", pred.macs // ctx.predictor.table.batch_size)
        trial.set_user_attr("predicted_latency_ms", pred.latency_ms)
        if getattr(pred, "estimated", None):  # an entry that could not be measured: priced by interpolation, and said
            trial.set_user_attr("estimated_entries", len(pred.estimated))
        dup = done.get(_key(policy))
        if dup is None and ctx.screen is not None and "screen" not in attrs:  # seeds: their proxy, for the
            trial.set_user_attr("screen", proxy_of(ctx, policy, log))  # rank correlation the search reports
    except BaseException:
        tell(study, trial, state=TrialState.FAIL)
        raise
    return trial, policy, pred.latency_ms, dup


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
    what the study maximizes (:meth:`hwprune.tasks.Task.score`). ``at_checkpoint(step, score)`` runs at
    :func:`~hwprune.search.early_stop.checkpoints`; it may raise to stop the fine-tune.
    """
    from hwprune.apply import apply_policy
    from hwprune.measure import count_params
    from hwprune.search.early_stop import checkpoints
    from hwprune.train import evaluate, finetune, refresh_batchnorm, subset

    data, task = setup.data, setup.task
    val = subset(data.val, spec.val_subset, spec.seed)  # the same items for every trial
    model = apply_policy(setup.model, policy, setup.example, exclude=spec.exclude, importance=spec.importance,
                         batches=batches, loss=task.loss)
    params = count_params(model)
    marks = set(checkpoints(spec.finetune_steps, at_checkpoint is not None and spec.early_stop_margin > 0))

    def callback(step: int) -> None:
        if step in marks and at_checkpoint is not None:
            refresh_batchnorm(model, data.train, spec.train_batch_size, spec.seed)  # as finetune does at its end
            at_checkpoint(step, task.score(evaluate(model, val, task=task)))

    finetune(model, data.train, spec.finetune_steps, lr=spec.lr, batch_size=spec.train_batch_size, seed=spec.seed,
             callback=callback, device=spec.device, task=task, teacher=setup.model, distill=spec.distill)
    return task.score(evaluate(model, val, task=task)), params


def rule_from(study: Any, spec: SearchSpec, task: Any, limit_ms: float = float("inf")) -> Any:
    """The early-stopping rule, holding the finished and stopped trials of a (resumed) study: racing
    (:class:`~hwprune.search.early_stop.RacingRule`) when the search maximizes the metric under the budget
    (``limit_ms``), dominance on the front otherwise; its messages in ``task``'s metric."""
    from hwprune.search.early_stop import DominanceRule, RacingRule

    racing = spec.objective == "metric" and spec.race >= 2
    rule: Any = (RacingRule(spec.race, limit_ms, enabled=spec.early_stop_margin > 0, metric=task.metric,
                            sign=task.sign) if racing
                 else DominanceRule(spec.early_stop_margin, metric=task.metric, sign=task.sign))
    for t in study.get_trials(deepcopy=False):
        curve = t.user_attrs.get("curve")
        if not curve or t.state.name not in ("COMPLETE", "PRUNED") or (t.state.name == "PRUNED" and not racing):
            continue
        final = t.values[0] if t.state.name == "COMPLETE" else float("-inf")
        latency = t.values[1] if t.state.name == "COMPLETE" else t.user_attrs.get("predicted_latency_ms", float("inf"))
        rule.add(t.number, judged(latency, t.user_attrs, limit_ms), curve, final)
    return rule


def free_memory() -> None:
    """After an out-of-memory trial: drop what it held, so the next trial starts clean."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def screen_correlation(trials: list[Any]) -> dict[str, Any] | None:
    """How the screen's proxy ranked the trials it scored against their fine-tuned scores (finished trials
    with a proxy, each policy once): Spearman and Kendall (:func:`hwprune.search.screen.rank_correlation`)."""
    from hwprune.search.screen import rank_correlation

    pairs = [(t.user_attrs["screen"], t.values[0]) for t in trials if t.state.name == "COMPLETE"
             and isinstance(t.user_attrs.get("screen"), (int, float)) and t.user_attrs["screen"] > float("-inf")
             and t.user_attrs.get("duplicate_of") in (None, "")]
    return rank_correlation([p for p, _ in pairs], [v for _, v in pairs])


class Progress:
    """The progress bar (trials, best feasible accuracy, ETA) and trials.csv, updated as each trial ends."""

    def __init__(self, out: Path, ctx: SearchContext, total: int, done: float, log: Callable[[str], None],
                 steps: int = 0) -> None:
        from tqdm import tqdm

        self.out, self.ctx, self.log = out, ctx, log
        self.steps = steps  # a fine-tune's steps: a trial stopped early advances the bar by its share (0: by 1)
        self.bar = tqdm(total=total, initial=done, desc="search", unit="trial", file=sys.stderr, disable=None)
        self.failed = 0
        # not a terminal (a log file, CI): no bar is drawn, so one line per finished trial instead
        self.lines = bool(self.bar.disable)
        self.done, self.total, self.t0 = done, total, time.monotonic()

    def trial_ended(self, study: Any, number: int) -> list[Any]:
        """Rewrite trials.csv from the study as it is now (see :func:`results_lock`); returns that snapshot."""
        with results_lock(self.out):
            trials = study.get_trials(deepcopy=False)
            write_trials(self.out, trials, self.ctx.limit_ms, self.ctx.task)
        trial = trials[number]
        pts = front(trials, self.ctx.limit_ms)
        if trial.state.name in FINISHED:  # a fine-tune's worth: a trial stopped early counts its share of steps
            self.bar.update(spent([trial], self.steps) if trial.user_attrs.get("grown_from") is None else 0)
        if trial.state.name == "FAIL":
            self.failed += 1
            self.log(f"hwprune: trial {trial.number} failed: {trial.user_attrs.get('error', 'unknown')}")
        task = self.ctx.task
        best = task.show(max(p.values[0] for p in pts)) if pts else None
        if best is not None:
            self.bar.set_postfix({f"best_{task.metric}": f"{best:.4f}"})
        if self.lines and trial.state.name in FINISHED:
            self.done += spent([trial], self.steps) if trial.user_attrs.get("grown_from") is None else 0
            got = (f"val {task.metric} {task.show(trial.values[0]):.4f}, predicted {trial.values[1]:.4f} ms"
                   if trial.state.name == "COMPLETE" and trial.values else "stopped early")
            self.log(f"hwprune: trial {trial.number} done ({round(self.done, 2):g}/{self.total}, "
                     f"{(time.monotonic() - self.t0) / 60:.1f} min): {got}; best feasible "
                     + (f"{task.metric} {best:.4f}" if best is not None else "none yet"))
        return trials

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
