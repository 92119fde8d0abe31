"""What a search run leaves: run.json, trials.csv, pareto.csv, best_policy.json (all written atomically)."""
from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path
from typing import Any, TypedDict

from hwprune._io import read_json, write_atomic
from hwprune.errors import HwpruneError

__all__ = ["RunInfo", "read_run", "check_run_dir", "claim_run_dir", "results_lock", "write_trials", "front", "write_front", "plot_front", "best_point", "TRIAL_COLUMNS",
           "limit_of", "judged", "within"]

TRIAL_COLUMNS = ["trial", "state", "seed", "accuracy", "predicted_latency_ms", "limit_ms", "feasible", "repairs",
                 "mean_keep", "formats", "flops", "params", "seconds", "train_seconds", "duplicate_of", "error", "owner",
                 "node"]


class RunInfo(TypedDict, total=False):
    """run.json: what a search run recorded, as :func:`read_run` checked it (required: spec, budget_ms,
    table_fingerprint, batch_size)."""

    identity: dict[str, Any]
    spec: dict[str, Any]  # a SearchSpec's fields (password masked): hwprune.search.controller.run_spec
    budget_ms: float
    limit_ms: float
    budget_margin: float
    speed_factor: float
    measure_factor: float
    dense_predicted_ms: float
    task: str | None
    metric: str
    direction: str
    table: str | None
    table_fingerprint: dict[str, Any]
    batch_size: int
    grid: list[float]
    menus: dict[str, Any]
    prices: dict[str, Any]
    versions: dict[str, Any]


_NUM = (int, float)
_RUN_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {  # field -> (types, required)
    "identity": ((dict,), False), "spec": ((dict,), True), "budget_ms": (_NUM, True), "limit_ms": (_NUM, False),
    "budget_margin": (_NUM, False), "speed_factor": (_NUM, False), "measure_factor": (_NUM, False),
    "dense_predicted_ms": (_NUM, False),
    "task": ((str, type(None)), False), "metric": ((str,), False), "direction": ((str,), False),
    "table": ((str, type(None)), False), "table_fingerprint": ((dict,), True), "batch_size": ((int,), True),
    "grid": ((list,), False), "menus": ((dict,), False), "prices": ((dict,), False), "versions": ((dict,), False)}


def read_run(out: Path) -> RunInfo:
    """``out/run.json`` checked field by field: an edited, damaged or foreign file is a one-line error naming
    the field, never a KeyError later. Fields this version does not know are kept (a newer hwprune's)."""
    path = Path(out) / "run.json"
    if not path.exists():
        raise HwpruneError(f"{str(out)!r} is not a search run directory (no run.json); give the --out of "
                           f"'hwprune search'")
    info = read_json(path, "run file")
    src = f"run file {str(path)!r}"
    if not isinstance(info, dict):
        raise HwpruneError(f"{src} holds a {type(info).__name__}, not a run record; it is damaged or not hwprune's")
    for key, (types, required) in _RUN_FIELDS.items():
        if key not in info:
            if required:
                raise HwpruneError(f"{src} has no {key!r}; it is damaged or not hwprune's")
            continue
        val = info[key]
        if isinstance(val, bool) or not isinstance(val, types):
            raise HwpruneError(f"{src}: {key!r} must be {' or '.join(t.__name__ for t in types)}, got "
                               f"{str(val)[:60]!r} ({type(val).__name__}); the file was edited or is damaged")
        if key == "budget_margin":
            if not 0 <= val < 1:
                raise HwpruneError(f"{src}: 'budget_margin' must be in [0, 1), got {val!r}")
        elif types is _NUM and not (val > 0 and val < float("inf")):
            raise HwpruneError(f"{src}: {key!r} must be a positive number, got {val!r}")
    if info["batch_size"] < 1:
        raise HwpruneError(f"{src}: 'batch_size' must be at least 1, got {info['batch_size']}")
    if info.get("direction", "max") not in ("max", "min"):
        raise HwpruneError(f"{src}: 'direction' must be 'max' or 'min', got {info['direction']!r}")
    return info  # type: ignore[return-value]


def check_run_dir(out: Path, identity: dict[str, Any]) -> bool:
    """True if ``out`` holds this study already; an error if it holds another; False if new.

    A run of an older hwprune, whose identity has no source digests, resumes without them being compared."""
    run = out / "run.json"
    if run.exists():
        old = read_json(run, "run file")
        theirs = old.get("identity") if isinstance(old, dict) else None
        if not isinstance(theirs, dict):
            raise HwpruneError(f"run directory {str(out)!r} holds a run.json without a study identity; choose "
                               f"another --out")
        mine = identity if "sources" in theirs else {k: v for k, v in identity.items() if k != "sources"}
        if theirs != mine:
            then, now = theirs.get("sources") or {}, mine.get("sources") or {}
            changed = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
            if changed and all(theirs.get(k) == mine.get(k) for k in mine if k != "sources"):
                raise HwpruneError(f"cannot resume {str(out)!r}: the {', '.join(changed)} file(s) changed since the "
                                   f"run started (content digest differs), so new trials would start from other "
                                   f"code, data or weights than its trials did; search into a new --out, or put "
                                   f"the files back")
            diff = [k for k in mine if theirs.get(k) != mine[k]] + [k for k in theirs if k not in mine]
            raise HwpruneError(f"run directory {str(out)!r} holds a different study (differs in "
                               f"{', '.join(diff) or 'format'}); choose another --out")
        return True
    return False


def claim_run_dir(out: Path, identity: dict[str, Any], run_info: dict[str, Any]) -> bool:
    """Create ``out`` for this study, or accept it if it holds the same study; True when resuming. The run file
    is created atomically: of several processes claiming one directory at once, one writes it and the others
    check their identity against it."""
    if check_run_dir(out, identity):
        return True
    import torch

    run = out / "run.json"
    info = {"identity": identity, **run_info,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "optuna": __import__("optuna").__version__, "hwprune": __import__("hwprune").__version__}}
    if not write_atomic(run, json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", exclusive=True):
        return check_run_dir(out, identity)  # another process claimed it first: the same study, or an error
    return False


def trial_columns(task: Any = None) -> list[str]:
    """trials.csv's columns: the metric's own name where TRIAL_COLUMNS says accuracy."""
    from hwprune.tasks import get_task

    metric = get_task(task).metric
    return [metric if c == "accuracy" else c for c in TRIAL_COLUMNS]


def limit_of(attrs: dict[str, Any], limit_ms: float) -> float:
    """The price a trial may reach: the search's limit (the budget less its margin), or, for a trial the gate
    (:func:`hwprune.search.finish.gate`) grew into headroom it *measured* clearly within the budget before the
    fine-tune, the price it was grown to (``gate.grown_limit_ms``; the table's margin is there for prices nothing
    measured)."""
    g = attrs.get("gate")
    if isinstance(g, dict) and g.get("final") == "within" and isinstance(g.get("grown_limit_ms"), (int, float)):
        return max(limit_ms, float(g["grown_limit_ms"]))
    return limit_ms


def judged(latency: float, attrs: dict[str, Any], limit_ms: float) -> float:
    """A trial's price as racing compares it with ``limit_ms``: one within its own limit (:func:`limit_of`)
    counts as at most the search's limit."""
    return min(latency, limit_ms) if latency <= limit_of(attrs, limit_ms) + 1e-12 else latency


def within(t: Any, limit_ms: float) -> bool:
    """Whether a finished trial's price is within its limit (:func:`limit_of`)."""
    return bool(t.values) and t.values[1] <= limit_of(t.user_attrs, limit_ms) + 1e-12


def _row(t: Any, limit_ms: float, task: Any) -> dict[str, Any]:
    a = t.user_attrs
    pol = a.get("policy", {})
    keep = list(pol.get("keep", {}).values())
    fmts: dict[str, int] = {}
    for f in pol.get("formats", {}).values():
        fmts[f] = fmts.get(f, 0) + 1
    vals = t.values or [None, a.get("predicted_latency_ms")]  # stopped or failed: priced all the same
    return {"trial": t.number, "state": t.state.name, "seed": a.get("seed", ""),
            task.metric: "" if vals[0] is None else f"{task.show(vals[0]):.4f}",
            "predicted_latency_ms": "" if vals[1] is None else f"{vals[1]:.5f}", "limit_ms": f"{limit_ms:.5f}",
            "feasible": "" if vals[1] is None else str(vals[1] <= limit_of(a, limit_ms) + 1e-12),
            "repairs": a.get("repairs", ""), "mean_keep": f"{sum(keep) / len(keep):.3f}" if keep else "1.000",
            "formats": " ".join(f"{k}:{v}" for k, v in sorted(fmts.items())) or "fp32",
            "flops": a.get("flops", ""), "params": a.get("params", ""), "seconds": a.get("seconds", ""),
            "train_seconds": a.get("train_seconds", ""),
            "duplicate_of": a.get("duplicate_of", ""), "error": a.get("error", ""), "owner": a.get("owner", ""),
            "node": a.get("node", "")}


def results_lock(out: Path) -> Any:
    """The lock every writer of a run's result files holds while it reads the study and writes them.

    Several processes may search one study; each rewrites trials.csv (and at its end pareto.csv,
    best_policy.json, the plot) from its own read of the study. Reading *inside* the lock makes the files follow
    the order of the writes: a process that read the study earlier cannot overwrite a later process's files
    with its older view (a proposal still waiting, a trial still running).
    """
    from hwprune._io import file_lock

    return file_lock(Path(out) / ".results.lock")


def write_trials(out: Path, trials: list[Any], limit_ms: float, task: Any = None) -> None:
    """trials.csv; ``feasible`` says whether the predicted latency is within ``limit_ms`` (budget less margin);
    the metric column is named after the task's metric (accuracy, perplexity, ...)."""
    from hwprune.tasks import get_task

    task = get_task(task)
    buf = io.StringIO()
    w = csv.DictWriter(buf, trial_columns(task))
    w.writeheader()
    for t in sorted(trials, key=lambda t: t.number):
        w.writerow(_row(t, limit_ms, task))
    write_atomic(out / "trials.csv", buf.getvalue())


def front(trials: list[Any], limit_ms: float) -> list[Any]:
    """Feasible (priced within ``limit_ms``, or measured within by the gate: :func:`within`), non-dominated
    trials, by latency; ties keep the first trial."""
    ok = [t for t in trials if t.state.name == "COMPLETE" and within(t, limit_ms)]
    pts, seen = [], set()
    for t in sorted(ok, key=lambda t: t.number):
        if tuple(t.values) in seen:  # the same point again (a repeated policy): keep the first trial
            continue
        seen.add(tuple(t.values))
        dominated = any((o.values[0] >= t.values[0] and o.values[1] <= t.values[1]) and
                        (o.values[0] > t.values[0] or o.values[1] < t.values[1]) for o in ok)
        if not dominated:
            pts.append(t)
    return sorted(pts, key=lambda t: (t.values[1], -t.values[0], t.number))


def best_point(pts: list[Any], over: Any = (), trials: list[Any] | None = None, limit_ms: float | None = None,
               met: Any = (), prefer: int | None = None) -> Any:
    """The best-scoring point of a front (highest accuracy, lowest perplexity); ties: the faster. With the
    measured finish (:mod:`hwprune.search.finish`): trials it timed ``over`` the budget are passed over, and
    trials it timed within it (``met``: a trial grown into measured headroom is priced over the limit) count as
    feasible; the best of the feasible ``trials`` (within ``limit_ms``) is taken, dominated or not, unless the
    finish picked one (``prefer``: near-ties re-scored with another data order). None when the finish passed over
    every feasible trial: no point is known to meet the budget, and none is called best (a search once reported
    a point its own finish had timed over, and the benchmark measured it at 0.561x of a 0.50x budget)."""
    over, met = set(over), set(met)
    if (over or met) and trials is not None and limit_ms is not None:
        ok = [t for t in trials if t.state.name == "COMPLETE" and t.values and t.number not in over
              and (within(t, limit_ms) or t.number in met)]
        if prefer is not None and any(t.number == prefer for t in ok):  # the finish's pick (near-ties re-scored)
            return next(t for t in ok if t.number == prefer)
        if ok:
            return max(ok, key=lambda t: (t.values[0], -t.values[1], -t.number))
        return None
    return max(pts, key=lambda t: (t.values[0], -t.values[1]))


def write_front(out: Path, pts: list[Any], budget_ms: float, task: Any = None, best: Any = None
                ) -> dict[str, Any] | None:
    """pareto.csv and best_policy.json (``best``, default the best-scoring feasible point; ties: the faster;
    ``False``: none, the measured finish passed over every point, and no best_policy.json is left)."""
    from hwprune.tasks import get_task

    task = get_task(task)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", task.metric, "predicted_latency_ms", "seed", "policy"])
    for t in pts:
        w.writerow([t.number, f"{task.show(t.values[0]):.4f}", f"{t.values[1]:.5f}", t.user_attrs.get("seed", ""),
                    json.dumps(t.user_attrs.get("policy", {}), sort_keys=True)])
    write_atomic(out / "pareto.csv", buf.getvalue())
    if not pts or best is False:  # False: the measured finish passed over every point (best_point's None)
        (out / "best_policy.json").unlink(missing_ok=True)  # an earlier end of this run's search wrote it
        return None
    best = best or best_point(pts)
    write_atomic(out / "best_policy.json", json.dumps(best.user_attrs["policy"], indent=2, sort_keys=True) + "\n")
    return {"trial": best.number, task.metric: task.show(best.values[0]), "predicted_latency_ms": best.values[1],
            "budget_ms": budget_ms}


def plot_front(out: Path, trials: list[Any], pts: list[Any], budget_ms: float, dense: tuple[float, float],
               limit_ms: float | None = None, task: Any = None) -> Path:
    """pareto.png: every completed trial, the front, the budget line, the dense model (``dense``: its metric and
    latency) and the uniform seeds; the y axis is the task's metric."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    from hwprune.tasks import get_task

    task = get_task(task)
    m = lambda t: task.show(t.values[0])  # noqa: E731
    done = [t for t in trials if t.state.name == "COMPLETE" and t.values]
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    ax.scatter([t.values[1] for t in done], [m(t) for t in done], s=14, c="0.7", label="trials")
    ax.plot([t.values[1] for t in pts], [m(t) for t in pts], "o-", c="tab:blue", label="Pareto front")
    seeds = [t for t in done if t.user_attrs.get("seed")]
    for i, t in enumerate(seeds):  # labels staggered: uniform seeds often sit close together
        ax.scatter([t.values[1]], [m(t)], marker="s", s=40, c="tab:orange")
        ax.annotate(t.user_attrs["seed"], (t.values[1], m(t)), fontsize=7, xytext=(6, -10 - 9 * i),
                    textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"})
    ax.scatter([dense[1]], [dense[0]], marker="*", s=120, c="tab:green", label="dense")
    ax.axvline(budget_ms, ls="--", c="tab:red", label=f"budget {budget_ms:.3f} ms")
    if limit_ms is not None and limit_ms < budget_ms:
        ax.axvline(limit_ms, ls=":", c="tab:red", label=f"priced limit {limit_ms:.3f} ms (margin)")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(f"validation {task.label}")
    ax.legend(fontsize=8, loc="lower right" if task.direction == "max" else "upper right")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(out / "pareto.png", buf.getvalue())
    return out / "pareto.png"
