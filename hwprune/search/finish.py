"""A measured finish: the best trials timed against the dense model before one is called best.

Prices are predictions; the user's budget is about the deployed model. Where the target is this machine, the
``spec.finish`` best-scoring trials within the priced limit are deployed on the target's kernels and timed in
interleaved rounds with the dense model (the same rounds, so the machine's drift cancels in the ratio). A
trial's measured latency is the median of its per-round ratios times the dense model's price; one over the
budget is listed as dropped in the study's ``finish`` attribute and is never the best point
(:func:`hwprune.search.rundir.best_point`), in the search's summary nor in ``export --trial best``. The timer is
a parameter so that tests can put a candidate over the budget.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

from hwprune.errors import one_line
from hwprune.policy import Policy

__all__ = ["finish", "time_versus_dense"]

Timer = Callable[[Any, list[tuple[int, Policy]]], dict[int, float]]


def time_versus_dense(ctx: Any, cands: list[tuple[int, Policy]], rounds: int = 15) -> dict[int, float]:
    """Each candidate's median ratio to the dense model over ``rounds`` interleaved rounds on this machine, as
    the target's runtime runs them (deployed on its kernels). A candidate that cannot be deployed is left out."""
    import copy

    from hwprune.device.targets import get_target
    from hwprune.latency.profiler import REFERENCE, deployed_for_timing, measure_rounds, model_sampler, timing_batch
    from hwprune.latency.rounds import RoundPlan

    spec, setup = ctx.spec, ctx.setup
    target = get_target(spec.target, threads=spec.threads, runtime=spec.runtime)
    x = timing_batch(setup.example, ctx.predictor.table.batch_size, setup.timing_pool())
    items = {}
    with target.settings():
        dense, _ = deployed_for_timing(copy.deepcopy(setup.model), Policy(channel_multiple=spec.channel_multiple),
                                       setup.example, target, spec.exclude, False)
        for number, pol in cands:
            try:
                model, _ = deployed_for_timing(setup.model, pol, setup.example, target, spec.exclude, False)
            except Exception:  # noqa: BLE001 - the user's model at a pruned shape: not timed, not dropped
                continue
            items[number] = model_sampler(model, x, target)
        res = measure_rounds(items, target, RoundPlan(rounds=rounds, extra_rounds=0, seed=len(cands)),
                             reference=model_sampler(dense, x, target))
    ref = res.samples[REFERENCE]
    return {n: statistics.median(a / b for a, b in zip(res.samples[n], ref)) for n in items}


def finish(ctx: Any, study: Any, log: Callable[[str], None], timer: Timer | None = None) -> dict[str, Any] | None:
    """Time the ``spec.finish`` best trials within the priced limit against the dense model (see the module doc);
    the study's user attribute ``finish`` gets each one's ratio, measured ms (on the table's scale) and verdict
    ('met' or 'over') and the list of ``dropped`` trials. Returns it, None when nothing was timed (why is
    logged)."""
    from hwprune.device.targets import get_target

    spec = ctx.spec
    if spec.finish <= 0:
        return None
    if timer is None and not get_target(spec.target, threads=spec.threads, runtime=spec.runtime).is_local():
        log(f"hwprune: no measured finish: this machine is not a {spec.target} device (export on the target "
            f"measures the chosen point)")
        return None
    ok = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.values
          and t.values[1] <= ctx.limit_ms + 1e-12 and t.user_attrs.get("policy")
          and t.user_attrs.get("duplicate_of") in (None, "")]
    ok.sort(key=lambda t: (-t.values[0], t.values[1], t.number))
    top = ok[:spec.finish]
    if not top:
        return None
    cands = [(t.number, Policy.from_dict(t.user_attrs["policy"])) for t in top]
    try:
        ratios = (timer or time_versus_dense)(ctx, cands)
    except Exception as exc:  # noqa: BLE001 - timing is a check on top of a finished search: said, not fatal
        log(f"hwprune: the measured finish could not time the candidates: {one_line(exc)}")
        return None
    allowed = ctx.budget_ms / ctx.speed_factor  # the budget on the table's scale
    rows = []
    for t in top:
        if t.number not in ratios:
            continue
        ms = ratios[t.number] * ctx.dense_ms
        verdict = "met" if ms <= allowed else "over"
        rows.append({"trial": t.number, "ratio": round(ratios[t.number], 4), "measured_ms": round(ms, 4),
                     "predicted_ms": round(t.values[1], 4), "verdict": verdict})
    over = [r["trial"] for r in rows if r["verdict"] == "over"]
    log(f"hwprune: measured finish: {len(rows)} best trial(s) timed against the dense model ("
        + ", ".join(f"trial {r['trial']} {r['ratio']:.3f}x = {r['measured_ms']:.4f} ms" for r in rows)
        + f"; budget {allowed:.4f} ms)" + (f"; over the budget as measured, never the best point: "
                                           f"{', '.join(map(str, over))}" if over else ""))
    result = {"timed": rows, "dropped": over, "budget_ms_table_scale": round(allowed, 5)}
    study.set_user_attr("finish", result)  # finished trials cannot take attributes: the study keeps it
    return result
