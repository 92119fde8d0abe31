"""A measured finish: the best trials timed against the dense model before one is called best.

Prices are predictions; the user's budget is about the deployed model. Where the target is this machine, the
``spec.finish`` best-scoring trials within the priced limit are deployed on the target's kernels and timed in
interleaved rounds with the dense model (the same rounds, so the machine's drift cancels in the ratio). A
trial's measured latency is the median of its per-round ratios times the dense model's price; one over the
budget is listed as dropped in the study's ``finish`` attribute and is never the best point
(:func:`hwprune.search.rundir.best_point`), in the search's summary nor in ``export --trial best``. Every trial
that met the budget is timed a second time at the end (:func:`confirm`) and keeps its verdict only when both
measurements clear the margin. A candidate whose verdict is still open after 15 rounds gets more rounds (up to 120
or 10 s, :func:`sequential`); before its fine-tune, each proposal and seed is timed too and moved to the budget as
measured (:func:`gate`). A timing's noise is its own standard error or, where larger, the search's :func:`drift`:
how far apart timings of one policy are, from every timing the search made (:func:`timed`). The timer is a
parameter so that tests can put a candidate over the budget.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from hwprune.errors import one_line
from hwprune.policy import Policy

__all__ = ["finish", "confirm", "gate", "drift", "time_versus_dense", "undecided", "SURE", "MORE"]

SURE = 2.0  # a timed trial meets the budget when its ratio is under it by this many standard errors,
FLOOR = 0.01  # and by at least this share: measurements minutes apart differ by more than their rounds' errors
# (cnn1d at 30%: trials the finish timed under 0.300x measured 0.303x in the benchmark's final rounds)
MORE = 2  # batches of further trials timed when none of the best clearly met the budget
GATE_TRIES = 3  # timings of a proposal before its fine-tune (the first, and after each of at most two shrinks)
GATE_ROUNDS = 30  # rounds of one such timing at most
GROW_AT = 0.03  # the gate grows a proposal measured clearly within the budget by more than this share
DRIFT_PAIRS = 3  # pairs of timings of one policy from which a search estimates how far apart timings are
DRIFT_APART = 30.0  # seconds: pairs at least this far apart are the ones a drift is estimated from, where enough
SPREAD_TIMINGS = 3  # the gate's first call: separate timings of the proposal and the seeds, for that estimate

Timer = Callable[[Any, list[tuple[int, Policy]]], dict[int, Any]]  # trial -> median ratio, or (ratio, noise)
Trainer = Callable[[Any, Policy, int], float]  # a policy's validation score after the search's fine-tune (seed +)


def undecided(ratio: float, noise: float, allowed: float) -> bool:
    """Whether more rounds could change a timed ratio's verdict against the ``allowed`` ratio: it is not yet
    clearly under (by :data:`SURE` standard errors and :data:`FLOOR`), yet the interval of ``SURE`` standard
    errors around it reaches under ``allowed`` by :data:`FLOOR` (more precision can show it meets)."""
    under = allowed / ratio - 1  # the share it is under the allowed ratio by (negative: over)
    return under < max(FLOOR, SURE * noise) and under + SURE * noise >= FLOOR


def time_versus_dense(ctx: Any, cands: list[tuple[int, Policy]], rounds: int = 15, max_rounds: int = 120,
                      max_seconds: float = 10.0) -> dict[int, tuple[float, float]]:
    """Each candidate's median ratio to the dense model over interleaved rounds on this machine, as the target's
    runtime runs them (deployed on its kernels), and that median's relative standard error. ``rounds`` first;
    then, while a candidate's verdict against the budget is :func:`undecided`, ``rounds`` more for those
    candidates (with the dense model), up to ``max_rounds`` or ``max_seconds`` of rounds: a sequential measurement,
    the rule unchanged, the rounds spent where the verdict needs them (cnn1d at 30%: 15 rounds gave 2-4% noise, a
    trial at 0.283x of a 0.30x budget was dropped as marginal, and four timings of one policy in a row read
    0.286, 0.304, 0.305 and 0.285x; 15 rounds of four cnn1d models take 0.3 s). A candidate that cannot be
    deployed is left out."""
    import functools

    from hwprune.device.targets import get_target
    from hwprune.latency.profiler import REFERENCE, deployed_for_timing, measure_rounds, model_sampler, timing_batch
    from hwprune.latency.rounds import RoundPlan
    from hwprune.search.context import user_dense

    spec, setup = ctx.spec, ctx.setup
    target = get_target(spec.target, threads=spec.threads, runtime=spec.runtime)
    x = timing_batch(setup.example, ctx.predictor.table.batch_size, setup.timing_pool())
    allowed = ctx.budget_ms / ctx.measure_factor / ctx.dense_ms  # the budget as a ratio to the dense model
    items = {}
    with target.settings():
        # the user's own dense model, as deployed: a budget given as a share is a share of it (a multi-layer GRU
        # split into per-layer modules, as the analysis and every pruned model has it, ran 2-7% slower)
        reference = functools.cache(model_sampler(user_dense(setup, target), x, target))  # prepared once
        for number, pol in cands:
            try:
                model, _ = deployed_for_timing(setup.model, pol, setup.example, target, spec.exclude, False)
            except Exception:  # noqa: BLE001 - the user's model at a pruned shape: not timed, not dropped
                continue
            items[number] = functools.cache(model_sampler(model, x, target))

        def measure(keys: list[int], seed: int) -> dict[int, list[float]]:
            # each candidate in its own rounds with the dense model, as a deployment is compared with it: timed
            # together, three cnn1d candidates read 7-8% lower ratios than each timed alone (0.448-0.456 against
            # 0.461-0.507x for one int8 policy, three passes each), and the benchmark's final timings, one model
            # against the dense one, then measured picks over the budget
            out = {}
            for n in keys:
                plan = RoundPlan(rounds=rounds, extra_rounds=0, seed=len(cands) + seed + n)
                res = measure_rounds({n: items[n]}, target, plan, reference=reference)
                out[n] = [a / b for a, b in zip(res.samples[n], res.samples[REFERENCE])]
            return out

        return sequential(measure, list(items), allowed, rounds, max_rounds, max_seconds)


def sequential(measure: Callable[[list[int], int], dict[int, list[float]]], keys: list[int], allowed: float,
               rounds: int, max_rounds: int, max_seconds: float = float("inf")) -> dict[int, tuple[float, float]]:
    """``measure(keys, rounds_so_far)`` (per-round ratios to the dense model of each key) for every key, then again
    for the keys whose verdict is :func:`undecided`, until none is, each has ``max_rounds`` or the rounds have
    taken ``max_seconds``; returns each key's median ratio and its relative standard error over all its rounds."""
    ratios: dict[int, list[float]] = {n: [] for n in keys}
    out: dict[int, tuple[float, float]] = {}
    todo, done, t0 = list(keys), 0, time.perf_counter()
    while todo and done < max_rounds and (not done or time.perf_counter() - t0 < max_seconds):
        for n, got in measure(todo, done).items():
            ratios[n] += got
            out[n] = _median_and_error(ratios[n])
        done += rounds
        todo = [n for n in todo if undecided(*out[n], allowed)]
    return out


def _median_and_error(ratios: list[float]) -> tuple[float, float]:
    """The median of per-round ratios and its relative standard error: 1.25 sigma / sqrt(n), sigma from the IQR
    (1.35 sigma)."""
    ratios = sorted(ratios)
    med = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [med, med, med]
    return med, 1.25 * (q[2] - q[0]) / 1.35 / len(ratios) ** 0.5 / med


Resize = Callable[[Policy, float, bool], tuple[Policy, int]]  # (policy, price limit, grow?) -> (policy, moves)


def gate(ctx: Any, policy: Policy, log: Callable[[str], None], timer: Timer | None = None,
         others: list[Policy] | tuple[Policy, ...] = (), resize: Resize | None = None, what: str = "a proposal"
         ) -> tuple[Policy, dict[str, Any] | None]:
    """Time a proposal against the dense model before its fine-tune (``spec.gate``, with the finish, where this
    machine is the target and trials run one at a time), and move it to the budget *as measured*:

    - one that does not measure clearly within the budget (the finish's rule: by :data:`SURE` standard errors and
      :data:`FLOOR`) is cut to the price at which it would measure the budget less 3 x its noise (its price times
      that / measured; :func:`~hwprune.search.portfolio.cut_to`, its shape kept) and timed again: the table's
      errors are not the same for every policy, and the proposals that score best were often those it under-priced (cnn1d at 30% and 50%: the best-scoring timed trial failed the
      finish in 3 of 3 searches each), so the fine-tunes went to candidates the finish then dropped (a move aims
      at the budget less 3 x the noise, at least 2%);
    - one clearly within and under the budget less 3 x its noise (at least 2%) by more than :data:`GROW_AT` is
      filled to the price at which it would measure that (the finish's growing target), and timed again; a grown
      policy that then measures over goes back to the one measured within.
      Prices err the other way too (cnn1d at 30%: a search fine-tuned 11 proposals priced at the limit that
      measured 0.18-0.22x of a 0.30x budget). The trial's price limit becomes the grown price
      (``gate.grown_limit_ms``, :func:`hwprune.search.rundir.limit_of`).

    "Clearly" counts the search's :func:`drift` (how far apart timings of one policy are) where it exceeds a
    timing's own noise: the first time the gate runs in a search, the proposal and ``others`` (the seeds) are
    timed :data:`SPREAD_TIMINGS` times each to learn it, and the proposal's median timing is its first.
    :data:`GATE_TRIES` timings at most. ``resize`` moves a policy to a price limit (default: filled or repaired;
    a seed is built again at that limit). The finish stays the arbiter. Returns the policy to fine-tune and what
    was measured (None: not gated; ``final``: the verdict on the returned policy)."""
    from hwprune.errors import HwpruneError

    spec = ctx.spec
    if not getattr(spec, "gate", False) or spec.finish <= 0 or not ctx.fills or spec.backend != "local":
        return policy, None
    if timer is None:
        from hwprune.device.targets import get_target

        if not get_target(spec.target, threads=spec.threads, runtime=spec.runtime).is_local():
            return policy, None
        import functools

        # fewer rounds than the finish's (the finish decides; this only steers the fine-tunes): at most 30 or 3 s
        timer = functools.partial(time_versus_dense, max_rounds=GATE_ROUNDS, max_seconds=3.0)
    resize = resize or _resizer(ctx, log)
    allowed = ctx.budget_ms / ctx.measure_factor  # measured ratio x dense price <= this
    info: dict[str, Any] | None = None
    measured_within: Policy | None = None  # the last policy timed clearly within
    times: dict[int, tuple[float, float]] = {}  # id(policy) -> its timing (ratio, noise)
    for attempt in range(GATE_TRIES):
        try:
            got = _first_timing(ctx, timer, policy, others) if attempt == 0 else timed(ctx, timer, [(0, policy)])
        except Exception as exc:  # noqa: BLE001 - a check before the fine-tune: said, the proposal trained as it is
            log(f"hwprune: could not time {what} before its fine-tune: {one_line(exc)}")
            return _gated(ctx, measured_within or policy, info, measured_within is not None, times)
        if 0 not in got:  # not deployable: its fine-tune will say why
            return _gated(ctx, measured_within or policy, info, measured_within is not None, times)
        ratio, noise = got[0]
        times[id(policy)] = (ratio, noise)
        ms = ratio * ctx.dense_ms
        # the finish's rule: clearly within, by 2 standard errors (or the search's drift, where larger) and 1%
        need = 1 + max(FLOOR, SURE * noise_of(ctx, noise))
        ok = ms * need <= allowed
        now = {"ratio": round(ratio, 4), "noise": round(noise, 4), "measured_ms": round(ms, 4)}
        if info is None:
            info = {**now, "verdict": "within" if ok else "over", "shrunk": 0}
        else:
            info["after"] = now
        if not ok and measured_within is not None:  # grown past what it measures: back to the one within
            info["grown_back"] = True
            return _gated(ctx, measured_within, info, True, times)
        if ok:
            measured_within = policy
        last = attempt == GATE_TRIES - 1
        # a move aims where the finish's two timings will pass: the budget less 3 x the noise (at least 2%), as
        # the finish grows its best; a grown policy aimed at "clearly within" alone failed the finish about half
        # the time (cnn1d at 30%: the best-scoring trial of a search timed 0.288x, then 0.286x, marginal at 3.6%)
        target = allowed / (1 + max(0.02, 3 * noise_of(ctx, noise)))
        if last or (ok and ms > target * (1 - GROW_AT)):
            return _gated(ctx, policy, info, ok, times)
        limit = ctx.price_ms(policy) * target / ms
        if ok:  # headroom it measured: filled into it
            bigger, moves = resize(policy, limit, True)
            if not moves or bigger == policy:
                return _gated(ctx, policy, info, True, times)
            info.update(grown=info.get("grown", 0) + moves)
            log(f"hwprune: {what} measured {ratio:.3f}x of the dense model, clearly within the budget "
                f"({allowed / ctx.dense_ms:.3f}x): grown by {moves} move(s) to a price of "
                f"{ctx.price_ms(bigger):.4f} ms before its fine-tune")
            policy = bigger
            continue
        try:
            smaller, moves = resize(policy, limit, False)
        except HwpruneError:  # the smallest policy is priced over it: the finish decides
            return _gated(ctx, policy, info, False, times)
        if not moves or smaller == policy:
            return _gated(ctx, policy, info, False, times)
        info.update(shrunk=info["shrunk"] + moves, price_limit_ms=round(limit, 5))
        log(f"hwprune: {what} measured {ratio:.3f}x of the dense model, not clearly within the budget "
            f"({allowed / ctx.dense_ms:.3f}x): shrunk by {moves} move(s) to a price of "
            f"{ctx.price_ms(smaller):.4f} ms before its fine-tune")
        policy = smaller
    return _gated(ctx, policy, info, False, times)  # not reached: the last attempt returns


def _resizer(ctx: Any, log: Callable[[str], None]) -> Resize:
    """The gate's default move to a price limit: filled up to it (growing) or repaired down to it, then its
    entries off the table's grid measured (:meth:`~hwprune.search.context.SearchContext.settle`)."""
    from hwprune.search.portfolio import cut_to, fill

    def resize(policy: Policy, limit: float, up: bool) -> tuple[Policy, int]:
        moved, moves = fill(ctx, policy, limit=limit) if up else cut_to(ctx, policy, limit)
        if moves:
            moved, more = ctx.settle(moved, log, grow=False, limit=limit)  # entries the new widths lack
            moves += more
        return moved, moves

    return resize


def _first_timing(ctx: Any, timer: Timer, policy: Policy, others: Any) -> dict[int, tuple[float, float]]:
    """The gate's first timing of ``policy``; in a search whose :func:`drift` is not known yet, ``policy`` and
    ``others`` timed :data:`SPREAD_TIMINGS` times each (their median is the answer for ``policy``)."""
    if drift(_record(ctx)) is not None:
        return timed(ctx, timer, [(0, policy)])
    cands = list(enumerate([policy, *[p for p in others if p != policy]]))
    runs = [timed(ctx, timer, cands) for _ in range(SPREAD_TIMINGS)]
    mine = sorted((r[0] for r in runs if 0 in r), key=lambda v: v[0])
    return {0: mine[len(mine) // 2]} if mine else {}


def _gated(ctx: Any, policy: Policy, info: dict[str, Any] | None, ok: bool, times: dict[int, tuple[float, float]]
           ) -> tuple[Policy, dict[str, Any] | None]:
    """The gate's answer: ``policy`` and its record, with ``final`` (the verdict on ``policy``), its timing
    (``final_ratio``, ``final_noise``) and, for one measured within at a price over the search's limit, that price
    as its own limit (``grown_limit_ms``)."""
    if info is None:
        return policy, None
    info["final"] = "within" if ok else "over"
    if id(policy) in times:
        info["final_ratio"], info["final_noise"] = (round(v, 5) for v in times[id(policy)])
    price = ctx.price_ms(policy)
    if ok and price > ctx.limit_ms:
        info["grown_limit_ms"] = price
    return policy, info


def finish(ctx: Any, study: Any, log: Callable[[str], None], timer: Timer | None = None,
           trainer: Trainer | None = None) -> dict[str, Any] | None:
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
    from hwprune.search.rundir import within
    from hwprune.search.trial import OWNER, finished

    trials = study.get_trials(deepcopy=False)
    done = len(finished(trials))
    before = study.user_attrs.get("finish")
    if isinstance(before, dict) and before.get("after_trials") == done:  # a resume that ran nothing new
        log("hwprune: measured finish: as before (no trial finished since)")
        return before
    # a study other processes add to: time and drop only (one process growing or re-scoring is enough)
    shared = any(t.user_attrs.get("owner") not in (None, OWNER) for t in trials)
    ok = [t for t in trials if t.state.name == "COMPLETE" and within(t, ctx.limit_ms) and t.user_attrs.get("policy")
          and t.user_attrs.get("duplicate_of") in (None, "")]
    ok.sort(key=lambda t: (-t.values[0], t.values[1], t.number))
    if not ok:
        return None
    timer = timer or time_versus_dense
    allowed = ctx.budget_ms / ctx.measure_factor  # measured ratio x dense price <= this (price_scale)
    got: dict[int, tuple[float, float]] = {}
    rows: list[dict[str, Any]] = []
    top: list[Any] = []
    # the best spec.finish first; while none of those timed clearly meets the budget, the next ones (at most
    # MORE batches): an exported point must meet it on a later measurement too, not by the luck of this one
    for k in range(MORE + 1):
        batch = ok[k * spec.finish:(k + 1) * spec.finish]
        if not batch or any(r["verdict"] == "met" for r in rows):
            break
        cands = [(t.number, Policy.from_dict(t.user_attrs["policy"])) for t in batch]
        try:
            new = timed(ctx, timer, cands)
        except Exception as exc:  # noqa: BLE001 - timing is a check on top of a finished search: said, not fatal
            log(f"hwprune: the measured finish could not time the candidates: {one_line(exc)}")
            if not rows:
                return None
            break
        got.update(new)
        top += batch
        spread = drift(_record(ctx))  # with the gate's timings of the same policies, minutes earlier
        rows = [_row(t, got[t.number], ctx.dense_ms, allowed, spread or 0.0) for t in top if t.number in got]
    over = [r["trial"] for r in rows if r["verdict"] != "met"]
    log(f"hwprune: measured finish: {len(rows)} best trial(s) timed against the dense model ("
        + ", ".join(f"trial {r['trial']} {r['ratio']:.3f}x = {r['measured_ms']:.4f} ms" for r in rows)
        + f"; budget {allowed:.4f} ms)" + (f"; over the budget as measured, or within {SURE:g} standard errors of "
                                           f"it, never the best point: {', '.join(map(str, over))}" if over else ""))
    result: dict[str, Any] = {"timed": rows, "dropped": over, "budget_ms_table_scale": round(allowed, 5),
                              "met": [r["trial"] for r in rows if r["verdict"] == "met"]}
    _said_drift(ctx, result)
    met = [t for t in top if t.number in result["met"]]
    result["after_trials"] = done
    if shared:
        log("hwprune: other processes added trials to this study: the finish times and drops only (no re-scoring, "
            "no growing)")
        best = max(met, key=lambda t: (t.values[0], -t.values[1], -t.number)) if met else None
        score = best.values[0] if best is not None else float("-inf")
    else:
        best, score = rescore_ties(ctx, met, result, log, trainer)
    # the best-scoring timed trial, when it did not clearly meet the budget and scores above every trial that did
    # (by more than a near-tie): shrunk into the budget rather than passed over for a worse point (cnn1d at 30%:
    # a seed grown to 0.838 validation timed 0.288x and 0.286x, marginal, and the search fell back to 0.740)
    lead = _to_shrink(ctx, [t for t in top if t.number in got and t.number not in result["met"]
                            and (best is None or t.values[0] > score + tie_margin(ctx, score))],
                      {n: v[0] for n, v in got.items()}, allowed)
    shrink = lead is not None
    if spec.grow and ctx.fills and not shared and (best is not None or shrink):  # dense within: no growing
        move = lead if shrink else best
        result["grown"] = grow(ctx, study, move, got[move.number], allowed, log, timer, trainer, shrink=shrink)
        g = result["grown"] or {}
        if g.get("trial") is not None:
            result["met"].append(g["trial"])
            if g["score"] >= score:  # the moved trial scored at least as well: it is the best point
                best = next(t for t in study.get_trials(deepcopy=False) if t.number == g["trial"])
    best = confirm(ctx, study, best, result, allowed, log, timer)
    if best is None and spec.grow and ctx.fills and not shared:
        untimed = [t for t in ok if t.number not in got][:spec.finish]
        best = rescue(ctx, study, top, result, allowed, log, timer, trainer, untimed)
    if best is not None:
        result["best"] = best.number
    study.set_user_attr("finish", result)  # finished trials cannot take attributes: the study keeps it
    return result


SHRINK_REACH = 0.10  # a trial measured up to this share over the budget is shrunk before a lower-ratio one


def _to_shrink(ctx: Any, cands: list[Any], ratios: dict[int, float], allowed: float) -> Any:
    """Which timed trial to shrink into the budget: the best-scoring of ``cands`` measured at most
    :data:`SHRINK_REACH` over it, else the one measured lowest (a trial far over loses more to the shrink than it
    is ahead: cnn1d at 50%, the best trial timed 0.564x and shrunk to 0.33x scored 0.836 against 0.931 for one
    timed 0.465x); None without candidates."""
    if not cands:
        return None
    budget = allowed / ctx.dense_ms
    near = [t for t in cands if ratios[t.number] <= budget * (1 + SHRINK_REACH)]
    if near:
        return max(near, key=lambda t: (t.values[0], -t.number))
    return min(cands, key=lambda t: (ratios[t.number], -t.values[0]))


def rescue(ctx: Any, study: Any, top: list[Any], result: dict[str, Any], allowed: float,
           log: Callable[[str], None], timer: Timer, trainer: Trainer | None = None,
           untimed: list[Any] | None = None) -> Any:
    """When the second timing left no trial clearly within the budget. First the best-scoring trials not timed yet
    (``untimed``) are timed twice; the best-scoring that clearly meets it both times is the fallback
    (``fallback`` in the record). Then the best-scoring timed trial, when it scores more than a near-tie above the
    fallback, is shrunk into the budget on the worse of its timings (:func:`grow` with ``shrink``: one more
    fine-tune) and timed once more; it is the best point only where that timing clearly meets the budget too and
    it scores at least the fallback's (``rescued``). cnn1d at 50%: a search whose 17 proposals racing stopped kept
    three seeds, the best timed 0.472x then 0.489x with 1.7% drift, and ended with no point; the GRU at 50%: the
    shrink of the best (0.977) scored 0.924 where an untimed seed (0.955) was priced 6% lower. Returns the trial,
    or None."""
    fallback = _fallback(ctx, untimed or [], result, allowed, log, timer)
    floor = fallback.values[0] + tie_margin(ctx, fallback.values[0]) if fallback is not None else float("-inf")
    rows = {r["trial"]: r for r in result["timed"]}
    worse = {n: max(r["ratio"], r.get("ratio_again") or 0.0) for n, r in rows.items()}
    lead = _to_shrink(ctx, [t for t in top if t.number in rows and t.values[0] > floor], worse, allowed)
    if lead is None:
        return _said_fallback(fallback, log)
    r = rows[lead.number]
    worst = worse[lead.number]
    g = grow(ctx, study, lead, (worst, r["noise"]), allowed, log, timer, trainer, shrink=True)
    result["rescued"] = g
    if not g or g.get("trial") is None:
        return _said_fallback(fallback, log)
    pol = Policy.from_dict(g["policy"])
    try:
        again = timed(ctx, timer, [(g["trial"], pol)]).get(g["trial"])
    except Exception as exc:  # noqa: BLE001 - a check on top of a finished search: said, not fatal
        log(f"hwprune: the measured finish could not time the shrunk trial again: {one_line(exc)}")
        return _said_fallback(fallback, log)
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == g["trial"])
    verdict = "over" if again is None else _row(trial, again, ctx.dense_ms, allowed,
                                                drift(_record(ctx)) or 0.0)["verdict"]
    g.update(verdict=verdict, ratio_again=None if again is None else round(again[0], 4))
    if verdict != "met":
        result["dropped"] = list(dict.fromkeys(result["dropped"] + [g["trial"]]))
        log(f"hwprune: measured finish: the trial shrunk into the budget measured {g['ratio_again']}x the second "
            f"time, not clearly within" + ("" if fallback is not None else "; no point is known to meet the budget"))
        return _said_fallback(fallback, log)
    result["met"] = list(dict.fromkeys(result["met"] + [g["trial"]]))
    if fallback is not None and g["score"] < fallback.values[0]:
        log(f"hwprune: measured finish: trial {lead.number} shrunk into the budget scored "
            f"{ctx.task.show(g['score']):.4f}, below trial {fallback.number}'s {ctx.task.show(fallback.values[0]):.4f}")
        return _said_fallback(fallback, log)
    log(f"hwprune: measured finish: no trial met the budget twice; trial {lead.number} shrunk into it is the "
        f"best point (trial {g['trial']}, {again[0]:.3f}x the second time)")
    return trial


def _fallback(ctx: Any, untimed: list[Any], result: dict[str, Any], allowed: float, log: Callable[[str], None],
              timer: Timer) -> Any:
    """Of ``untimed`` (trials the finish has not timed), the best-scoring that two timings each put clearly within
    the budget (each candidate alone against the dense model, the drift counted); its rows go to
    ``result['fallback']`` and the trials that met to ``result['met']``. None when none does."""
    if not untimed:
        return None
    cands = [(t.number, Policy.from_dict(t.user_attrs["policy"])) for t in untimed]
    try:
        first = timed(ctx, timer, cands)
        again = timed(ctx, timer, cands)
    except Exception as exc:  # noqa: BLE001 - a check on top of a finished search: said, not fatal
        log(f"hwprune: the measured finish could not time the next trials: {one_line(exc)}")
        return None
    spread = drift(_record(ctx)) or 0.0
    rows, kept = [], []
    for t in untimed:
        if t.number not in first or t.number not in again:
            continue
        row = _twice(t, first[t.number], again[t.number], ctx.dense_ms, allowed, spread)
        row["ratio_first"] = round(first[t.number][0], 4)
        rows.append(row)
        if row["verdict"] == "met":
            kept.append(t)
    result["fallback"] = rows
    result["met"] = list(dict.fromkeys(result["met"] + [t.number for t in kept]))
    result["dropped"] = list(dict.fromkeys(result["dropped"] + [r["trial"] for r in rows if r["verdict"] != "met"]))
    log("hwprune: measured finish: the next trials timed twice: " + ", ".join(
        f"trial {r['trial']} {r['ratio_first']:.3f}x and {r['ratio']:.3f}x at worst ({r['verdict']})" for r in rows))
    return max(kept, key=lambda t: (t.values[0], -t.values[1], -t.number)) if kept else None


def _said_fallback(fallback: Any, log: Callable[[str], None]) -> Any:
    if fallback is not None:
        log(f"hwprune: measured finish: the best point is trial {fallback.number}, timed within the budget twice")
    return fallback


def confirm(ctx: Any, study: Any, best: Any, result: dict[str, Any], allowed: float, log: Callable[[str], None],
            timer: Timer) -> Any:
    """Time every trial that met the budget once more, after the re-scoring and growing (minutes later, in fresh
    rounds with a freshly deployed dense model): this VM's ratios drift between measurements by more than one
    run's standard errors (a GRU int8 policy timed 0.461x by the finish measured 0.525x in the benchmark minutes
    later). A trial keeps 'met' only when each of its two measurements clears the same margin on its own noise; one
    that does not is dropped, and the best point is the best-scoring of those left (a re-scored trial by its
    mean). Each verdict's noise is at least the search's :func:`drift` (these timings included). Returns that
    trial (None when none is left)."""
    met = list(dict.fromkeys(result["met"]))
    if not met:
        return best
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    cands = [(n, Policy.from_dict(by_number[n].user_attrs["policy"])) for n in met if n in by_number]
    try:
        again = timed(ctx, timer, cands)
    except Exception as exc:  # noqa: BLE001 - a check on top of a finished search: said, not fatal
        log(f"hwprune: the measured finish could not time the candidates a second time: {one_line(exc)}")
        return best
    rows = {r["trial"]: r for r in result["timed"]}
    grown = result.get("grown") or {}
    first = {n: (r["ratio"], r["noise"]) for n, r in rows.items()}
    if grown.get("trial") is not None:
        first[grown["trial"]] = (grown["ratio"], grown.get("noise", 0.01))
    kept, lost = [], []
    spread = _said_drift(ctx, result)
    for n in met:
        if n not in again or n not in first:
            continue
        row = _twice(by_number[n], first[n], again[n], ctx.dense_ms, allowed, spread or 0.0)
        row["ratio_again"] = round(again[n][0], 4)
        (kept if row["verdict"] == "met" else lost).append(n)
        if n in rows:
            rows[n].update(verdict=row["verdict"], ratio_again=row["ratio_again"])
        else:
            grown.update(verdict=row["verdict"], ratio_again=row["ratio_again"])
    result["met"] = kept
    result["dropped"] = list(dict.fromkeys(result["dropped"] + lost))
    result["confirmed"] = {"timed_again": [n for n in met if n in again], "dropped": lost}
    log("hwprune: measured finish, a second timing: " + ", ".join(
        f"trial {n} {again[n][0]:.3f}x" for n in met if n in again)
        + (f"; no longer clearly within the budget, dropped: {', '.join(map(str, lost))}" if lost else
           "; all still within the budget"))
    if best is not None and best.number in kept:
        return best
    if not kept:
        return None
    means = {r["trial"]: r["mean"] for r in result.get("rescored", [])}
    if grown.get("trial") is not None and "score" in grown:
        means[grown["trial"]] = grown["score"]
    pick = max((by_number[n] for n in kept), key=lambda t: (means.get(t.number, t.values[0]), -t.values[1],
                                                              -t.number))
    log(f"hwprune: measured finish: the best point is now trial {pick.number}")
    return pick


def _row(t: Any, timed: tuple[float, float], dense_ms: float, allowed: float, spread: float = 0.0
         ) -> dict[str, Any]:
    """A timed trial: its ratio, measured ms (table scale) and verdict: ``over`` the budget, ``marginal`` (under
    it by less than :data:`SURE` standard errors of its own ratio, or of ``spread`` (the drift between timings,
    :func:`drift`) where that is larger, or :data:`FLOOR`: a later measurement may well miss) or ``met``."""
    ratio, noise = timed
    ms = ratio * dense_ms
    noise = max(noise, spread)
    verdict = "over" if ms > allowed else "marginal" if ms * (1 + max(FLOOR, SURE * noise)) > allowed else "met"
    return {"trial": t.number, "ratio": round(ratio, 4), "measured_ms": round(ms, 4), "noise": round(noise, 4),
            "predicted_ms": round(t.values[1], 4), "verdict": verdict}


def _twice(t: Any, first: tuple[float, float], again: tuple[float, float], dense_ms: float, allowed: float,
           spread: float) -> dict[str, Any]:
    """A trial timed twice: the :func:`_row` of its worse timing, 'met' only when each timing clears the margin on
    its own noise (at least ``spread``, the drift between timings)."""
    verdicts = [_row(t, m, dense_ms, allowed, spread)["verdict"] for m in (first, again)]
    row = _row(t, max(first, again), dense_ms, allowed, spread)
    row["verdict"] = next((v for v in ("over", "marginal") if v in verdicts), "met")
    return row


def drift(timings: dict[str, list[Any]]) -> float | None:
    """How far apart two timings of one policy are, as the relative standard deviation of one timing: 1.4826 x
    the median absolute difference of their logs / sqrt 2 over pairs of timings of one policy (robust to a timing
    a burst hit), from the search's timings by policy (:func:`timed`: ``(seconds, ratio)``, or bare ratios); the
    pairs at least :data:`DRIFT_APART` apart where there are :data:`DRIFT_PAIRS` of them (what a later measurement
    will see: timings back to back agree more closely), else all; None under :data:`DRIFT_PAIRS` pairs. One
    timing's own standard error does not see it: on a 2-core VM a cnn1d policy timed 0.291x and 0.288x (1% noise
    each) by the finish measured 0.303x in the benchmark minutes later, and twelve timings of another, seconds to
    minutes apart, ran from 0.256x to 0.285x (3.5%)."""
    import itertools
    import math

    near, far = [], []
    for v in timings.values():
        for a, b in itertools.combinations([x if isinstance(x, tuple) else (0.0, x) for x in v], 2):
            if a[1] > 0 and b[1] > 0:
                (far if abs(a[0] - b[0]) >= DRIFT_APART else near).append(abs(math.log(a[1] / b[1])))
    diffs = far if len(far) >= DRIFT_PAIRS else near + far
    if len(diffs) < DRIFT_PAIRS:
        return None
    return 1.4826 * statistics.median(diffs) / math.sqrt(2)


def timed(ctx: Any, timer: Timer, cands: list[tuple[int, Policy]]) -> dict[int, tuple[float, float]]:
    """``timer``'s answer for ``cands`` as (ratio, noise), each timing also kept by policy in the search's record
    (``ctx.timings``: (seconds, ratio)), from which :func:`drift` learns how far apart timings of one policy are."""
    from hwprune.search.trial import _key  # one policy key for the search (trial.py's)

    got = {n: _pair(v) for n, v in timer(ctx, cands).items()}
    record = _record(ctx)
    pols = dict(cands)
    now = time.monotonic()
    for n, (ratio, _) in got.items():
        if n in pols:
            record.setdefault(_key(pols[n]), []).append((now, ratio))
    return got


def _record(ctx: Any) -> dict[str, list[float]]:
    record = getattr(ctx, "timings", None)
    if record is None:
        record = {}
        ctx.timings = record
    return record


def noise_of(ctx: Any, own: float) -> float:
    """A timing's noise for a verdict: its own standard error, or the search's :func:`drift` where larger."""
    return max(own, drift(_record(ctx)) or 0.0)


def _pair(v: Any) -> tuple[float, float]:
    """A timer's value as (median ratio, its relative noise); a bare ratio gets 1% noise."""
    return (float(v[0]), float(v[1])) if isinstance(v, (tuple, list)) else (float(v), 0.01)


def _train(ctx: Any, policy: Policy, seed: int = 0) -> float:
    """``policy``'s validation score after the search's fine-tune, with the spec's seed plus ``seed`` (another
    data order)."""
    import dataclasses

    from hwprune.search.trial import train_candidate

    spec = dataclasses.replace(ctx.spec, seed=ctx.spec.seed + seed) if seed else ctx.spec
    return train_candidate(ctx.setup, ctx.batches, spec, policy)[0]


def tie_margin(ctx: Any, score: float) -> float:
    """Scores closer than this are a near-tie: two validation items for a metric in [0, 1] (accuracy), else half a
    percent of the score (perplexity)."""
    n = getattr(ctx, "val_items", 0) or 0
    return 2.0 / n if n and 0.0 <= abs(score) <= 1.0 else 0.005 * abs(score)


def rescore_ties(ctx: Any, met: list[Any], result: dict[str, Any], log: Callable[[str], None],
                 trainer: Trainer | None = None) -> tuple[Any, float]:
    """The best of the trials timed within the budget; where others are within :func:`tie_margin` of it, each of
    them is fine-tuned once more with another data order (seed + 1) and ranked by the mean of its two scores, not
    by its speed. Returns the best trial and its (mean) score; the re-scores go to ``result['rescored']``."""
    if not met:
        return None, float("-inf")
    top = max(met, key=lambda t: (t.values[0], -t.values[1], -t.number))
    margin = tie_margin(ctx, top.values[0])
    near = [t for t in met if top.values[0] - t.values[0] <= margin]
    if len(near) < 2:
        return top, top.values[0]
    train = trainer or _train
    rows = []
    for t in near[:3]:
        again = train(ctx, Policy.from_dict(t.user_attrs["policy"]), 1)
        rows.append({"trial": t.number, "scores": [t.values[0], again], "mean": (t.values[0] + again) / 2})
    best = max(rows, key=lambda r: (r["mean"], -r["trial"]))
    result["rescored"] = rows
    log(f"hwprune: near-tie on validation (within {margin:.4g}): re-scored with another data order, "
        + ", ".join(f"trial {r['trial']} {ctx.task.show(r['mean']):.4f}" for r in rows)
        + f" (means of two fine-tunes, {len(rows)} more fine-tunes); best: trial {best['trial']}")
    chosen = next(t for t in near if t.number == best["trial"])
    return chosen, best["mean"]


def grow(ctx: Any, study: Any, best: Any, measured_as: tuple[float, float], allowed: float,
         log: Callable[[str], None], timer: Timer, trainer: Trainer | None = None, shrink: bool = False
         ) -> dict[str, Any] | None:
    """Move the best trial to the budget as measured: the price that maps onto the budget less a safety (3 x its
    timing's noise, :func:`noise_of`, at least 2%) as this trial measured, filled up to it
    (:func:`~hwprune.search.portfolio.fill`: headroom) or, with ``shrink`` (no timed trial clearly met the
    budget), repaired down to it; then timed against the dense model, and only where it measures within the
    budget less the same safety on its own noise, fine-tuned (the search's fine-tune) and added to the study as
    trial ``finish-grown`` or ``finish-shrunk``: one more fine-tune, said. Returns what happened (None: nothing
    worth moving)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from hwprune.errors import HwpruneError
    from hwprune.search.portfolio import fill, level_ratios
    from hwprune.search.trial import param_mode, params_of

    ratio, noise = measured_as
    safety = max(0.02, 3 * noise_of(ctx, noise))
    target = allowed * (1 - safety)
    measured = ratio * ctx.dense_ms
    if (measured <= target if shrink else measured >= target * 0.99) or param_mode(study) != "u":
        return None
    pol = Policy.from_dict(best.user_attrs["policy"])
    limit = ctx.price_ms(pol) * target / measured  # the price that maps onto the target as this trial measured
    if shrink:
        from hwprune.search.portfolio import cut_to

        try:
            moved, moves = cut_to(ctx, pol, limit)  # its shape kept: scaled down along its own direction
        except HwpruneError:  # not even the smallest policy is priced that low
            return None
    else:
        moved, moves = fill(ctx, pol, limit=limit)
    if not moves:
        return None
    g_ratio, g_noise = timed(ctx, timer, [(-1, moved)])[-1]
    g_ms = g_ratio * ctx.dense_ms
    word = "shrunk" if shrink else "grown"
    out: dict[str, Any] = {"from_trial": best.number, "policy": moved.to_dict(), "price_limit_ms": round(limit, 5),
                           "ratio": round(g_ratio, 4), "noise": round(g_noise, 4), "measured_ms": round(g_ms, 4),
                           "trial": None, "move": word}
    if g_ms > allowed * (1 - max(0.02, 3 * noise_of(ctx, g_noise))):  # the same safety, on its own noise
        log(f"hwprune: moving trial {best.number} to the measured budget ({measured:.4f} of {allowed:.4f} ms): "
            f"the {word} policy measured {g_ms:.4f} ms, too close to the budget; kept as it was")
        return out
    score = (trainer or _train)(ctx, moved, 0)
    params = params_of(ctx, ctx.keep_of(moved), moved.formats)
    dists = {k: (IntDistribution(0, len(level_ratios(ctx, k[2:])) - 1) if k.startswith("u:")
                 else CategoricalDistribution(ctx.menus[k[4:]])) for k in params}
    price = ctx.predictor.price(moved)
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=dists, values=[score, price.latency_ms],
        user_attrs={"policy": moved.to_dict(), "seed": f"finish-{word}", "grown_from": best.number,
                    "measured_ratio": round(g_ratio, 5), "predicted_latency_ms": price.latency_ms,
                    "flops": price.macs // ctx.predictor.table.batch_size}))
    out["trial"] = study.get_trials(deepcopy=False)[-1].number
    out["score"] = score
    log(f"hwprune: {word} trial {best.number} ({measured:.4f} ms measured) to the budget: trial {out['trial']} "
        f"measures {g_ms:.4f} ms of the {allowed:.4f} ms budget (priced {price.latency_ms:.4f} ms: chosen by "
        f"measurement), val {ctx.task.metric} {ctx.task.show(score):.4f} after one more fine-tune")
    return out


def _said_drift(ctx: Any, result: dict[str, Any]) -> float | None:
    """The search's :func:`drift` now, into ``result['drift']`` (its pairs and the noise)."""
    import itertools

    record = _record(ctx)
    spread = drift(record)
    pairs = [(a, b) for v in record.values() for a, b in itertools.combinations(v, 2)]
    apart = sum(1 for a, b in pairs if isinstance(a, tuple) and abs(a[0] - b[0]) >= DRIFT_APART)
    result["drift"] = {"pairs": len(pairs), "apart": apart, "noise": None if spread is None else round(spread, 4)}
    return spread
