"""``--backend ray``: the same search, its fine-tunes run as Ray Tune trials (locally or on a cluster).

The driver keeps the Optuna study (the same journal file or RDB as the local
backend) and does everything cheap and stateful: a custom Tune ``Searcher``
asks the study for a candidate, repairs it to the budget and prices it
(:func:`hwprune.search.trial.propose`), and tells the study the result.
Only the fine-tune runs on Ray workers, each with ``--cpus-per-trial`` /
``--gpus-per-trial``. Ray's ``OptunaSearch`` is not used: it keeps its own
study and has no constraint or repair hook. Fine-tunes that are losing are
stopped by :class:`StoppingScheduler`, a Tune scheduler applying the local
backend's rule (:mod:`hwprune.search.early_stop`: racing under a budget,
dominance on the front).

Multi-node clusters: ``--ray-address host:port`` (or ``auto``) joins one; the
run directory (Tune's ``storage_path`` is ``RUN_DIR/ray``) must be on storage
every node sees, and a model or data given as ``path/to/file.py:factory``
must exist at the same absolute path on every node. The dense weights travel
with the trials (``tune.with_parameters``), so workers need no model cache.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import HwpruneError, one_line
from hwprune.search.spec import SearchSpec

__all__ = ["check_ray", "run_ray"]

_STARTED_HERE = False


def check_ray(spec: SearchSpec) -> None:
    """Ray importable and its cluster reachable (starting a local one when no address is given)."""
    global _STARTED_HERE
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError as exc:
        raise HwpruneError(f"--backend ray needs ray[tune] ({exc}); pip install 'ray[tune]'") from None
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if spec.ray_address and spec.ray_address != "auto":
        _check_reachable(spec.ray_address)
    try:
        if spec.ray_address:
            ray.init(address=spec.ray_address, log_to_driver=False, logging_level="ERROR")
        else:
            need = max(1, int(round(spec.workers * spec.cpus_per_trial + 0.4999)))
            ray.init(num_cpus=need, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            _STARTED_HERE = True
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        where = f"at {spec.ray_address!r}" if spec.ray_address else "locally"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HwpruneError(f"cannot start or reach a Ray cluster {where}: {msg} (accepted: --ray-address auto, "
                           f"host:port of a running 'ray start --head', or none for a local Ray)") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect to ``host:port`` first: ``ray.init`` retries an unreachable address for minutes."""
    import socket

    addr = address.split("://", 1)[-1]
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise HwpruneError(f"--ray-address {address!r} is not 'auto' or host:port (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise HwpruneError(f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc} (start one with "
                           f"'ray start --head' there, or leave --ray-address out for a local Ray)") from None


def _portable_spec(spec: SearchSpec) -> dict[str, Any]:
    """The spec as a dict, file references made absolute (Tune trials run in their own directory).

    The storage URL's password is masked: workers never open the study, and Tune keeps these parameters on disk.
    """
    d = spec.public()
    for key in ("model", "data"):
        ref = d[key]
        if ":" in ref and ref.split(":")[0].endswith(".py"):
            path, fn = ref.rsplit(":", 1)
            d[key] = f"{Path(path).resolve()}:{fn}"
    return d


_WORKER_CACHE: dict[str, Any] = {}


def worker_setup(spec: SearchSpec, dense_state: dict[str, Any]) -> tuple[Any, Any]:
    """The dense model (weights from the driver) and importance batches, rebuilt on a worker."""
    from hwprune.resolve import resolve
    from hwprune.space import prepare_model
    from hwprune.train import few_batches

    setup = resolve(spec.model, spec.data, None, spec.model_args, None, spec.seed, use_cache=False, task=spec.task,
                    num_classes=spec.num_classes)  # a user task stays the user's task on a worker
    prepare_model(setup.model)  # the driver's analysis split RNN stacks in place: the same keys here
    setup.model.load_state_dict(dense_state)
    return setup, few_batches(setup.data.train)


def _node() -> str:
    """The Ray node this worker runs on: host name and the first 12 characters of its node id."""
    import socket

    import ray

    try:
        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return socket.gethostname()


def _trainable(config: dict[str, Any], spec: dict[str, Any], dense_state: dict[str, Any]) -> None:
    """One fine-tune on a Ray worker; reports checkpoint accuracies and the final one."""
    import json

    import torch
    from ray import tune

    from hwprune.policy import Policy
    from hwprune.search.trial import train_candidate

    t0 = time.time()
    try:
        s = SearchSpec(**spec)
        torch.set_num_threads(max(1, int(s.cpus_per_trial)))
        key = json.dumps(s.identity(), sort_keys=True, default=str)
        if key not in _WORKER_CACHE:  # workers are reused across trials: build the dense model once
            _WORKER_CACHE.clear()
            _WORKER_CACHE[key] = worker_setup(s, dense_state)
        setup, batches = _WORKER_CACHE[key]
        policy = Policy.from_dict(config["policy"])

        node = _node()
        tune.report({"accuracy": float("nan"), "step": 0, "final": False, "node": node})  # where it runs, at once

        def at_checkpoint(step: int, acc: float) -> None:
            tune.report({"accuracy": acc, "step": step, "final": False, "node": node})

        t1 = time.time()
        acc, params = train_candidate(setup, batches, s, policy, at_checkpoint)
        tune.report({"accuracy": acc, "step": s.finetune_steps, "final": True, "params": params,
                     "seconds": round(time.time() - t0, 2), "train_seconds": round(time.time() - t1, 3),
                     "node": _node()})
    except Exception as exc:  # noqa: BLE001 - contained: the trial fails with its reason, the search goes on
        tune.report({"accuracy": float("nan"), "step": -1, "final": True, "error": one_line(exc), "node": _node()})


def _make_classes() -> tuple[type, type]:
    """The Searcher and the scheduler (defined lazily: Ray is an optional import)."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler
    from ray.tune.search import Searcher

    class StoppingScheduler(FIFOScheduler):
        """Applies the early-stopping rule at each checkpoint a trial reports (:func:`~hwprune.search.trial.rule_from`:
        racing under a budget, dominance on the front)."""

        def __init__(self, rule: Any) -> None:
            super().__init__()
            self.rule = rule
            self.curves: dict[str, dict[str, float]] = {}
            self.reasons: dict[str, str] = {}

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            if result.get("final", True) or result.get("step", -1) <= 0:  # step 0: where it runs, no score yet
                return TrialScheduler.CONTINUE
            self.curves.setdefault(trial.trial_id, {})[str(result["step"])] = float(result["accuracy"])
            if trial.config["seed"]:  # the uniform seeds always finish; their curves are references
                return TrialScheduler.CONTINUE
            why = self.rule.check(trial.config["latency"], int(result["step"]), float(result["accuracy"]),
                                  key=trial.config.get("number", trial.trial_id))
            if why:
                self.reasons[trial.trial_id] = why
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE

    class StudySearcher(Searcher):
        """Asks the Optuna study for candidates (repaired, priced) and tells it the results."""

        def __init__(self, ctx: Any, study: Any, progress: Any, scheduler: Any, wanted: int) -> None:
            super().__init__(metric="accuracy", mode="max")
            self.ctx, self.study, self.progress, self.scheduler = ctx, study, progress, scheduler
            self.log = progress.log
            self.wanted = wanted
            self.live: dict[str, tuple[Any, float, float]] = {}
            self.nodes: dict[str, str] = {}  # where each live trial reported from (a node that dies says no more)
            from hwprune.search.trial import finished, spent

            # counted here, not re-read: Tune polls suggest() in its event loop, and a storage read per poll
            # kept the driver at ~90% CPU, starving the workers. Fine-tunes' worth: one stopped early, its share
            self.steps = ctx.spec.finetune_steps
            self.done = spent(finished(study.get_trials(deepcopy=False)), self.steps)

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            if result.get("node"):
                node = str(result["node"])
                if trial_id in self.live and self.nodes.get(trial_id) != node:  # where a running trial runs, in
                    self.live[trial_id][0].set_user_attr("node", node)      # the study (once, at its start)
                self.nodes[trial_id] = node

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            from hwprune.search.trial import propose, reuse

            if self.progress.failed > max(5, self.wanted) or (self.progress.failed >= 3 and not self.done):
                return Searcher.FINISHED if not self.live else None  # nothing works: stop, report after fit()
            while self.done + len(self.live) + 1 <= self.wanted + 1e-9:  # a whole fine-tune still fits
                t0 = time.time()
                trial, policy, latency, dup = propose(self.ctx, self.study, self.log)
                if dup is not None:  # same policy as a finished trial: same result, no fine-tune
                    self._tell(trial, "COMPLETE", list(reuse(trial, dup, t0)))
                    continue
                self.live[trial_id] = (trial, latency, t0)
                return {"policy": policy.to_dict(), "latency": latency, "seed": bool(trial.user_attrs.get("seed")),
                        "number": trial.number}
            return Searcher.FINISHED if not self.live else None

        def _tell(self, trial: Any, state: str, values: list[float] | None = None) -> None:
            from optuna.trial import TrialState

            from hwprune.search.trial import tell

            tell(self.study, trial, values if state == "COMPLETE" else None,  # failed as stale meanwhile: kept
                 None if state == "COMPLETE" else getattr(TrialState, state))
            if state in ("COMPLETE", "PRUNED"):  # an asked trial has no state: the one told, frozen, has
                from hwprune.search.trial import spent

                self.done += spent([self.study.get_trials(deepcopy=False)[trial.number]], self.steps)
            self.progress.trial_ended(self.study, trial.number)

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            if trial_id not in self.live:
                return
            trial, latency, t0 = self.live.pop(trial_id)
            from hwprune.search.trial import set_attrs  # attributes of a trial another host failed: dropped
            curve = self.scheduler.curves.get(trial_id, {})
            if curve:
                set_attrs(trial, curve=curve)
            set_attrs(trial, seconds=round(time.time() - t0, 2))
            node = (result or {}).get("node") or self.nodes.pop(trial_id, None)
            if node:
                set_attrs(trial, node=node)
            if error or result is None:
                set_attrs(trial, error="the Ray worker died (see the Tune logs under RUN_DIR/ray)")
                self._tell(trial, "FAIL")
            elif result.get("error"):
                set_attrs(trial, error=result["error"])
                self._tell(trial, "FAIL")
            elif not result.get("final"):
                set_attrs(trial, error=self.scheduler.reasons.get(trial_id, "stopped by the Tune scheduler"))
                if curve:  # what it cost: --trials counts fine-tunes' worth of steps
                    set_attrs(trial, steps_run=max(int(k) for k in curve))
                self._tell(trial, "PRUNED")
            else:
                set_attrs(trial, params=result.get("params"))
                set_attrs(trial, train_seconds=result.get("train_seconds"))
                if curve:
                    self.scheduler.rule.add(trial.number, latency, curve, float(result["accuracy"]))
                self._tell(trial, "COMPLETE", [float(result["accuracy"]), latency])

    return StudySearcher, StoppingScheduler


def shutdown_if_started() -> None:
    """Shut down the local Ray this process started (a failed search included); a cluster it joined is left."""
    global _STARTED_HERE
    if _STARTED_HERE:
        import ray

        ray.shutdown()
        _STARTED_HERE = False


def run_ray(ctx: Any, study: Any, out: Path, log: Callable[[str], None]) -> None:
    """Run the remaining trials of ``study`` through Ray Tune, ``spec.workers`` at a time."""
    global _STARTED_HERE
    import ray
    from ray import tune

    from hwprune.search.trial import Progress, finished, rule_from, spent

    spec = ctx.spec
    check_ray(spec)
    steps = spec.finetune_steps
    todo = math.floor(spec.trials - spent(finished(study.trials), steps) + 1e-9)
    progress = Progress(out, ctx, spec.trials, spent(finished(study.trials), steps), log, steps)
    StudySearcher, StoppingScheduler = _make_classes()
    scheduler = StoppingScheduler(rule_from(study, spec, ctx.task, ctx.limit_ms))
    searcher = StudySearcher(ctx, study, progress, scheduler, spec.trials)
    res = {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(_trainable, spec=_portable_spec(spec),
                                                         dense_state=ctx.setup.model.state_dict()), res)
    log(f"hwprune: Ray backend: {spec.workers} concurrent trials, {res['cpu']:g} CPU / {res['gpu']:g} GPU each; "
        f"cluster {ray.cluster_resources().get('CPU', 0):g} CPUs; Tune logs in {out / 'ray'}")
    try:
        while todo > 0:
            tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=-1, max_concurrent_trials=spec.workers,
                reuse_actors=True),
                run_config=tune.RunConfig(storage_path=str((out / "ray").resolve()),
                                          name=time.strftime("session-%Y%m%d-%H%M%S"), verbose=0))
            with contextlib.redirect_stdout(sys.stderr):  # Tune prints its banner to stdout; --json owns stdout
                tuner.fit()
            trials = study.get_trials(deepcopy=False)
            progress.check_failures(trials, todo)
            todo = math.floor(spec.trials - spent(finished(trials), steps) + 1e-9)
    finally:
        progress.close()
        if _STARTED_HERE:
            ray.shutdown()
            _STARTED_HERE = False
