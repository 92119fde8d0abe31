"""Loss-aware costs of cutting: what each group loses at each width it can take, measured once per search.

A unit of a 16-channel first convolution and a unit of a 128-unit hidden layer are not worth the same, so the
cost of a cut is measured, not counted: the search's proxy (:class:`~hwprune.search.screen.Screen` without
fine-tune steps: the pruned model's validation loss after BatchNorm re-estimation where it has BatchNorm) is
evaluated with **only that group cut** to each of its widths (FastNAS's sensitivity map, NetAdapt's per-layer
proposals), and with **only that layer** in each low-precision format of its menu. The cost is the rise of the
loss over the dense model's, in nats, so groups and formats compare on one scale; it is made monotone (a group
never costs less for keeping fewer units) and never negative. Within a group the units still go in the order of
the spec's importance criterion (the pruner's own ranking).

Groups with many distinct widths are evaluated at up to ``max_levels`` of them (always the narrowest) and
linearly interpolated in between; a proxy that fails on a pruned shape prices that width at :data:`FAILED`.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

from hwprune.policy import keep_units

__all__ = ["SensitivityMap", "group_levels", "measure_sensitivity", "FAILED"]

FAILED = 1e6  # the cost of a width whose pruned model the proxy could not evaluate: never chosen while any other is
TIE = 1e-6  # a tiny cost per share of units dropped: equal measured losses still prefer the wider group


def group_levels(grid: tuple[float, ...] | list[float], units: int, multiple: int) -> list[tuple[int, float]]:
    """The distinct widths a group of ``units`` can take on ``grid``: (kept units, the lowest ratio giving
    them), ascending; the last is the whole group. Computed once per grid (the search asks for them per move)."""
    return list(_levels(tuple(sorted(grid)), units, multiple))


@functools.lru_cache(maxsize=1024)
def _levels(grid: tuple[float, ...], units: int, multiple: int) -> tuple[tuple[int, float], ...]:
    by_units: dict[int, float] = {}
    for r in grid:
        by_units.setdefault(keep_units(r, units, multiple), r)
    return tuple(sorted(by_units.items()))


@dataclass
class SensitivityMap:
    """Costs of cutting, in the proxy's loss units (see the module doc).

    Attributes:
        keep: group -> keep ratio (every ratio of the grid) -> cost of keeping that share.
        formats: layer -> format of its menu -> cost of running it in that format (fp32: 0).
        measured: group -> the kept-unit counts actually evaluated (the others interpolated).
        evaluations: proxy evaluations spent; seconds: their wall time.
    """

    keep: dict[str, dict[float, float]]  # with depth, a droppable group also at the drop ratio (0.0)
    formats: dict[str, dict[str, float]]
    measured: dict[str, list[int]] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    method: str = ""

    def line(self) -> str:
        return (f"costs of cutting measured: {self.evaluations} proxy evaluations ({self.method}) in "
                f"{self.seconds:.1f} s")

    def to_dict(self) -> dict[str, object]:
        return {"keep": {g: {f"{r:g}": round(v, 6) for r, v in d.items()} for g, d in self.keep.items()},
                "formats": {n: {f: round(v, 6) for f, v in d.items()} for n, d in self.formats.items()},
                "measured": self.measured, "evaluations": self.evaluations, "seconds": round(self.seconds, 2),
                "method": self.method}


def _spaced(n: int, k: int) -> list[int]:
    """``k`` indices of ``range(n)`` evenly spread, the first and last included (all when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _interpolate(units: list[int], known: dict[int, float]) -> list[float]:
    xs = sorted(known)
    out = []
    for u in units:
        if u in known:
            out.append(known[u])
            continue
        lo = max((x for x in xs if x < u), default=xs[0])
        hi = min((x for x in xs if x > u), default=xs[-1])
        w = 0.0 if hi == lo else (u - lo) / (hi - lo)
        out.append(known[lo] * (1 - w) + known[hi] * w)
    return out


def monotone(costs: list[float]) -> list[float]:
    """Costs over widths ascending, made non-increasing with width (a narrower width costs at least as much as
    any wider one) and non-negative."""
    out = [max(0.0, c) for c in costs]
    for i in range(len(out) - 2, -1, -1):
        out[i] = max(out[i], out[i + 1])
    return out


def measure_sensitivity(score: Callable[[dict[str, float], dict[str, str]], float],
                        groups: list[tuple[str, int]], grid: tuple[float, ...], menus: dict[str, list[str]],
                        multiple: int, max_levels: int = 12, drops: set[str] = frozenset(),
                        drop_ratio: float = 0.0) -> SensitivityMap:
    """The costs of cutting each group to each width of ``grid`` and running each layer in each format.

    Args:
        score: the proxy of a policy given as (keep ratios, formats); higher is better, ``-inf`` when it failed.
        groups: (name, units) of every prunable group.
        grid: the keep ratios searched.
        menus: layer -> formats it may run in.
        multiple: the channel multiple keep ratios round to.
        max_levels: at most this many widths per group are evaluated; the rest are interpolated.
        drops: groups whose block can be dropped (depth): also evaluated at ``drop_ratio`` (the block gone), a
            cost at least that of its narrowest width.
    """
    t0 = time.time()
    calls = 0

    def cost(keep: dict[str, float], formats: dict[str, str]) -> float:
        nonlocal calls
        calls += 1
        s = score(keep, formats)
        return FAILED if s == float("-inf") or s != s else base - s

    base = score({}, {})
    calls += 1
    keep: dict[str, dict[float, float]] = {}
    measured: dict[str, list[int]] = {}
    for name, n in groups:
        levels = group_levels(grid, n, multiple)
        units = [u for u, _ in levels]
        idx = [i for i in _spaced(len(levels), max_levels) if i != len(levels) - 1]
        known = {units[-1]: 0.0}
        known.update({units[i]: cost({name: levels[i][1]}, {}) for i in idx})
        measured[name] = sorted(known)
        per_level = monotone(_interpolate(units, known))
        per_units = {u: c + TIE * (n - u) / n for u, c in zip(units, per_level)}
        keep[name] = {r: per_units[keep_units(r, n, multiple)] for r in grid}
        if name in drops:
            keep[name][drop_ratio] = max(cost({name: drop_ratio}, {}), max(keep[name].values())) + TIE
    formats = {layer: {f: (0.0 if f == "fp32" else max(0.0, cost({}, {layer: f}))) for f in menu}
               for layer, menu in menus.items()}
    return SensitivityMap(keep, formats, measured, calls, time.time() - t0)
