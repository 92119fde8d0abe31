"""The way out of a budget below the floor, measured: what would reach the budget on this machine.

Channel pruning cannot take a model below the cost of launching its operators. When a budget is below the
smallest policy's price, the refusal says, with numbers measured now in one set of interleaved rounds (ratios to
the dense model in the search's runtime, measured in the same rounds, so the machine's drift cancels):

- the smallest policy with every droppable block dropped as well (depth: :mod:`hwprune.space._depth`);
- the dense model and the smallest widths (fp32, with the blocks dropped) in every installed runtime of the
  target but ``compile`` (compiling takes minutes; ``hwprune profile --runtime all`` measures it);
- the smallest batch (up to 16 times the search's) at which the smallest policy's time per item is within the
  budget per item.

:func:`floor_paragraph` words a :class:`WayOut`; :func:`measure_way_out` measures one. Tests build a WayOut by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hwprune._modelcopy import copy_model
from hwprune.errors import one_line
from hwprune.policy import Policy

__all__ = ["WayOut", "floor_paragraph", "measure_way_out", "MAX_BATCH_FACTOR"]

MAX_BATCH_FACTOR = 16  # batches tried: the search's times 2, 4, ... up to this factor


@dataclass
class WayOut:
    """What was measured (every time a ratio to the dense model in the search's runtime at the search's batch, per
    item where the batch differs).

    Attributes:
        runtime: the search's runtime; batch: its batch; budget_share: the budget as a share of the dense model.
        depth: the smallest policy with every droppable block dropped (None: no block to drop); blocks: how many.
        runtimes: runtime -> {"dense": ratio, "smallest": ratio} or {"not_measured": why}.
        batches: [(batch, smallest policy's ratio per item)] in the search's runtime, in increasing batch.
        floor: the smallest policy (no depth) measured now; rounds: rounds of the measurement.
    """

    runtime: str
    batch: int
    budget_share: float
    floor: float | None = None
    depth: float | None = None
    searched_depth: bool = False  # the search had --depth: the smallest policy drops the blocks already
    blocks: int = 0
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: list[tuple[int, float]] = field(default_factory=list)
    rounds: int = 0


def floor_paragraph(w: WayOut) -> str:
    """One paragraph: what reaches the budget here, and what does not, with the measured ratios."""
    share = w.budget_share
    ok = lambda r: r is not None and r <= share  # noqa: E731
    parts = [f"What would reach the budget ({share:.0%} of the dense model in {w.runtime} at batch {w.batch}), "
             f"measured now in {w.rounds} interleaved rounds as shares of that dense model"]
    if w.floor is not None:
        dropped = " (its blocks dropped: --depth)" if w.searched_depth and w.blocks else ""
        parts.append(f"the smallest policy{dropped} runs {w.floor:.0%}")
    if w.blocks and not w.searched_depth:
        parts.append(f"with all {w.blocks} droppable block(s) dropped as well (search with --depth) "
                     f"{w.depth:.0%}" + (" -- within the budget" if ok(w.depth) else " -- still over it")
                     if w.depth is not None else f"{w.blocks} droppable block(s) could not be measured dropped")
    elif not w.blocks:
        parts.append("depth: no block of this model can be dropped (none keeps its input's shape)")
    deep = w.blocks and (w.searched_depth or w.depth is not None)
    small = "smallest policy" + (" with its blocks dropped" if deep else "")
    for rt, r in w.runtimes.items():
        if "not_measured" in r:
            parts.append(f"{rt}: not measured ({r['not_measured']})")
        else:
            parts.append(f"{rt}: dense {r['dense']:.0%}, {small} (fp32) {r['smallest']:.0%}"
                         + (" -- within the budget (--runtime " + rt + ")" if ok(r["smallest"]) else ""))
    reach = next(((b, r) for b, r in w.batches if ok(r)), None)
    if reach:
        parts.append(f"at batch {reach[0]} the {small} takes {reach[1]:.0%} of the dense model's time per item at "
                     f"batch {w.batch}, within the budget per item (--batch-size {reach[0]})")
    elif w.batches:
        b, r = w.batches[-1]
        parts.append(f"no batch up to {b} brings the {small} within the budget per item "
                     f"({r:.0%} at batch {b})")
    return "; ".join(parts) + "."


def measure_way_out(model: Any, example: Any, pool: Any, smallest: Policy, blocks: list[str], spec: Any,
                    batch: int, budget_share: float, log: Callable[[str], None], rounds: int = 7) -> WayOut:
    """Measure a :class:`WayOut` on this machine (the target must be local). ``model`` is the dense model,
    ``smallest`` the search's smallest policy, ``blocks`` the droppable ones (with ``spec.depth`` the smallest
    policy drops them already)."""
    import torch

    from hwprune import inputs
    from hwprune.device.onnxrt import RUNTIMES as ONNX_RUNTIMES, missing
    from hwprune.device.targets import TARGETS, get_target
    from hwprune.latency.profiler import deployed_for_timing, timing_batch
    from hwprune.latency.rounds import RoundPlan, measure_in_rounds

    here = get_target(spec.target, threads=spec.threads, runtime=spec.runtime)
    w = WayOut(here.runtime, batch, budget_share, blocks=len(blocks), rounds=rounds,
               searched_depth=bool(getattr(spec, "depth", False)))
    thin = Policy(dict(smallest.keep), {}, smallest.channel_multiple, drop=tuple(blocks))  # widths + depth, fp32
    deep = Policy(dict(smallest.keep), dict(smallest.formats), smallest.channel_multiple, drop=tuple(blocks))
    samplers: dict[Any, Callable[[], float]] = {}
    x = timing_batch(example, batch, pool)

    def add(key: Any, target: Any, policy: Policy, xb: Any) -> None:
        deployed, _ = deployed_for_timing(copy_model(model), policy, example, target, spec.exclude, False)
        xx = inputs.to_device(xb, target.device)
        with torch.no_grad():
            run = target.prepare(deployed.eval().to(target.device), xx)
        samplers[key] = target.sampler(lambda run=run, xx=xx: inputs.call(run, xx))

    log(f"hwprune: measuring what would reach the budget (the smallest policy, with depth, in each runtime, at "
        f"larger batches; {rounds} rounds)")
    with here.settings():
        add("dense", here, Policy(channel_multiple=smallest.channel_multiple), x)
        add("floor", here, smallest, x)
        if blocks and not w.searched_depth:
            try:
                add("depth", here, deep, x)
            except Exception as exc:  # noqa: BLE001 - said in the paragraph; the refusal stands
                log(f"hwprune: the smallest policy with its blocks dropped could not be measured: {one_line(exc)}")
        for rt in TARGETS.get(spec.target).runtimes:
            if rt == w.runtime:
                continue
            if rt == "compile":
                w.runtimes[rt] = {"not_measured": "compiling takes minutes; 'hwprune profile --runtime all' "
                                                  "measures it"}
                continue
            why = missing(rt) if rt in ONNX_RUNTIMES else None
            if why:
                w.runtimes[rt] = {"not_measured": why.split(":")[0]}
                continue
            try:
                other = get_target(spec.target, threads=spec.threads, runtime=rt)
                add((rt, "dense"), other, Policy(channel_multiple=smallest.channel_multiple), x)
                add((rt, "smallest"), other, thin, x)
                w.runtimes[rt] = {}
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot take this model is a line, not the end
                w.runtimes[rt] = {"not_measured": one_line(exc, 120)}
        factor = 2
        while factor <= MAX_BATCH_FACTOR:
            try:
                add(("batch", batch * factor), here, deep if "depth" in samplers else smallest,
                    timing_batch(example, batch * factor, pool))
            except Exception as exc:  # noqa: BLE001 - out of memory or a fixed batch in the model: stop there
                log(f"hwprune: not measured at batch {batch * factor}: {one_line(exc)}")
                break
            factor *= 2
        with torch.no_grad():
            res = measure_in_rounds(samplers, RoundPlan(rounds=rounds, extra_rounds=0), always=["dense"])
    dense = res.timing("dense").median_us
    ratio = lambda k, per=1: res.timing(k).median_us / per / dense  # noqa: E731
    w.floor = ratio("floor")
    w.depth = ratio("depth") if "depth" in samplers else None
    for rt, row in w.runtimes.items():
        if not row:
            row.update(dense=ratio((rt, "dense")), smallest=ratio((rt, "smallest")))
    w.batches = [(k[1], ratio(k, k[1] / batch)) for k in samplers if isinstance(k, tuple) and k[0] == "batch"]
    return w
