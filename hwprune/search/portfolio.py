"""Using the whole budget, and seeds that cost no fine-tune.

**Fill** raises a policy into the headroom its price leaves under the limit (not when the dense model itself
meets the limit: then the search maps the front, and filling would turn every sample into the dense model): the
move that recovers the most cost of cutting (:mod:`hwprune.search.sensitivity`) per millisecond added — a group
one width up, or a layer to a format that costs less — until no move fits. **Project** maps any sample into the budget: repair (cut)
until it fits, then fill, so no candidate leaves budget unused.

**The portfolio** of seeds, each in fp32 and with each low-precision format offered to all layers, each filled
to the limit, all screened by the proxy before any fine-tune:

- ``uniform``: one keep ratio for every group (the largest that fits);
- ``knapsack``: the latency knapsack over the costs of cutting (HALP-like, :func:`hwprune.search.knapsack.allocate`);
- ``threshold``: every group at its narrowest width whose cost stays under one threshold, the threshold
  bisected on the price (FastNAS's sensitivity threshold, bisected against the table instead of FLOPs);
- ``tp``: Torch-Pruning's own ranking — its global, isomorphic pruner with group L2 magnitude, what its one-liner
  does — its pruning ratio bisected on the price (CNNs: Torch-Pruning does not follow recurrent layers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from hwprune.policy import Policy

__all__ = ["Seed", "fill", "project", "shrink", "cut_to", "uniform_seed", "threshold_seed", "knapsack_seed", "tp_seed",
           "build_seed", "portfolio",
           "level_ratios", "output_layer"]


def level_ratios(ctx: Any, group: str) -> list[float]:
    """The keep ratios of a group's distinct widths on the searched grid, ascending (one per kept-unit count);
    first :data:`~hwprune.search.context.DROP` where the group carries a droppable block (``spec.depth``)."""
    from hwprune.search.sensitivity import group_levels

    from hwprune.search.context import DROP

    units = {g.name: g.units for g in ctx.layers.space.groups}[group]
    widths = [r for _, r in group_levels(ctx.grid, units, ctx.spec.channel_multiple)]
    return [DROP] + widths if group in getattr(ctx, "carriers", {}) else widths


def _up(ratios: list[float], r: float) -> float | None:
    higher = [v for v in ratios if v > r + 1e-12]
    return min(higher) if higher else None


def fill(ctx: Any, policy: Policy, limit: float | None = None) -> tuple[Policy, int]:
    """Raise ``policy`` while its price stays at most ``limit`` (default the search's limit): each step makes
    the move that recovers the most cost of cutting per millisecond added (a move that adds nothing first), a
    group one width up or a layer to a format of its menu that costs less. Returns the policy and the moves.
    A policy already over the limit is returned as it is."""
    if limit is None and not ctx.fills:
        return policy, 0
    limit = ctx.limit_ms if limit is None else limit
    keep_cost, fmt_cost = ctx.costs()
    keep = ctx.canonical(ctx.keep_of(policy))
    formats = dict(policy.formats)
    current = ctx.price_ms(ctx.policy(keep, formats))
    moves = 0
    if current > limit:
        return policy, 0
    levels = {g: level_ratios(ctx, g) for g in keep}
    while True:
        best: tuple[float, float, Callable[[], None]] | None = None  # (gain per ms, gain, apply)
        for g, r in sorted(keep.items()):
            nr = _up(levels[g], r)
            if nr is None:
                continue
            now = ctx.price_ms(ctx.policy({**keep, g: nr}, formats))
            gain = keep_cost[g][_on(keep_cost[g], r)] - keep_cost[g][_on(keep_cost[g], nr)]
            if now <= limit and gain > 0:
                move = (gain / max(now - current, 1e-9), gain, lambda g=g, nr=nr: keep.update({g: nr}))
                best = move if best is None or move[:2] > best[:2] else best
        for layer, menu in sorted(ctx.menus.items()):
            have = formats.get(layer, "fp32")
            for fmt in menu:
                gain = fmt_cost[layer].get(have, 0.0) - fmt_cost[layer].get(fmt, 0.0)
                if fmt == have or gain <= 0:
                    continue
                now = ctx.price_ms(ctx.policy(keep, {**formats, layer: fmt}))
                if now <= limit:
                    move = (gain / max(now - current, 1e-9), gain,
                            lambda layer=layer, fmt=fmt: formats.update({layer: fmt}))
                    best = move if best is None or move[:2] > best[:2] else best
        if best is None:
            return ctx.policy(keep, formats), moves
        best[2]()
        moves += 1
        current = ctx.price_ms(ctx.policy(keep, formats))


def _on(costs: dict[float, float], r: float) -> float:
    """The ratio of ``costs`` nearest ``r`` (a ratio off the grid: its nearest)."""
    return r if r in costs else min(costs, key=lambda v: abs(v - r))


def cut_to(ctx: Any, policy: Policy, limit: float) -> tuple[Policy, int]:
    """``policy`` brought down to price ``limit`` keeping its shape: scaled along its own direction
    (:func:`shrink`), then repaired for what is left (formats too slow at any width), then filled back up to the
    limit; the moves it took (0: it fit). Greedy repair alone cuts what the costs of cutting call cheap first, and
    on cnn1d they call the first convolution cheap: 50% picks shrunk that way went from 16 to 8 channels there and
    scored 0.836-0.890 against 0.938-0.942 before."""
    if ctx.price_ms(policy) <= limit:
        return policy, 0
    scaled = shrink(ctx, policy, limit=limit)
    cut, m = ctx.repair(scaled if scaled is not None else policy, limit=limit)
    grown, n = fill(ctx, cut, limit)
    return grown, 1 + m + n


def project(ctx: Any, policy: Policy, ray: bool = False) -> tuple[Policy, int]:
    """``policy`` mapped into the budget: repaired until its price fits the limit, then filled up to it. With
    ``ray`` (the sampler's samples) it is first scaled down along its own direction (:func:`shrink`), so that the
    sample's shape survives: greedy repair alone takes every sample far over the limit to nearly the same policy
    (cnn1d at 30%: 15 different samples, each 11-15 moves over, all onto [8, 8, 8, 96]), and the sampler then
    learns about one point."""
    if ray:
        scaled = shrink(ctx, policy)
        if scaled is not None:
            policy = scaled
    cut, m = ctx.repair(policy)
    grown, n = fill(ctx, cut)
    return grown, m + n


def shrink(ctx: Any, policy: Policy, steps: int = 20, limit: float | None = None) -> Policy | None:
    """``policy`` scaled toward its narrowest widths along its own direction until its price fits the limit:
    each group at ``lowest + t x (its width - lowest)``, snapped to the nearest width it can take, with the largest
    ``t`` in [0, 1] a bisection finds within ``limit`` (default the search's); formats as they are. ``policy``
    itself when it fits; None when even ``t = 0`` does not (its formats are too slow: repair then trades them)."""
    limit = ctx.limit_ms if limit is None else limit
    keep = ctx.canonical(ctx.keep_of(policy))
    formats = dict(policy.formats)
    if ctx.price_ms(ctx.policy(keep, formats)) <= limit:
        return policy
    from hwprune.search.context import DROP

    levels = {g: level_ratios(ctx, g) for g in keep}
    # the narrowest width of each group (a block the sample dropped stays dropped; the shrink drops none)
    low = {g: r if r <= DROP else min([v for v in levels[g] if v > DROP] or [r]) for g, r in keep.items()}

    def at(t: float) -> Policy:
        out = {}
        for g, r in keep.items():
            want = low[g] + t * (r - low[g])
            # the nearest width (a tie: the narrower), not the next one down: a group of two widths (cnn1d's first
            # conv, 8 or 16 channels) lost half its units at any t < 1, and 50% picks the finish shrank that way
            # scored 0.852-0.886 validation against 0.93+ (search_quality cnn1d run 15)
            near = [v for v in levels[g] if low[g] - 1e-12 <= v <= r + 1e-12] or [low[g]]
            out[g] = min(near, key=lambda v: (abs(v - want), v))
        return ctx.policy(out, formats)

    if ctx.price_ms(at(0.0)) > limit:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ctx.price_ms(at(mid)) <= limit:
            lo = mid
        else:
            hi = mid
    return at(lo)


def _fastest_formats(ctx: Any, fmt: str) -> dict[str, str]:
    return {layer: fmt for layer, menu in ctx.menus.items() if fmt in menu}


def uniform_seed(ctx: Any, fmt: str = "fp32", limit: float | None = None) -> tuple[float, Policy] | None:
    """The largest keep ratio of the grid that fits ``limit`` (default the search's) with every group at it,
    layers in ``fmt`` where their menu has it, and its policy (None when none fits)."""
    formats = _fastest_formats(ctx, fmt)
    limit = ctx.limit_ms if limit is None else limit
    for r in sorted(ctx.grid, reverse=True):
        pol = ctx.policy({g.name: r for g in ctx.layers.space.groups}, formats)
        if ctx.price_ms(pol) <= limit:
            return r, pol
    return None


def threshold_seed(ctx: Any, fmt: str = "fp32", steps: int = 30, limit: float | None = None) -> Policy | None:
    """Every group at its narrowest width whose cost of cutting is at most a threshold, layers in ``fmt`` where
    their menu has it; the threshold bisected on price so the policy just fits the limit (None when even the
    narrowest widths do not)."""
    keep_cost, _ = ctx.costs()
    formats = _fastest_formats(ctx, fmt)
    levels = {g.name: level_ratios(ctx, g.name) for g in ctx.layers.space.groups}
    limit = ctx.limit_ms if limit is None else limit

    def at(t: float) -> Policy:
        keep = {}
        for g, rs in levels.items():
            ok = [r for r in rs if keep_cost[g][_on(keep_cost[g], r)] <= t]
            keep[g] = min(ok) if ok else rs[-1]
        return ctx.policy(keep, formats)

    hi = max(max(c.values()) for c in keep_cost.values()) if keep_cost else 0.0
    if ctx.price_ms(at(hi)) > limit:
        return None
    lo = 0.0
    if ctx.price_ms(at(lo)) <= limit:
        return at(lo)
    for _ in range(steps):  # price(at(t)) falls as t grows: the smallest t that fits keeps the most
        mid = (lo + hi) / 2
        if ctx.price_ms(at(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    return at(hi)


def output_layer(model: Any, example: Any) -> Any:
    """The Linear or Conv layer called last in a forward pass: the output layer a pruner must leave whole (None:
    none)."""
    import torch
    from torch import nn

    from hwprune import inputs

    seen: list[Any] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod)) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    was = model.training
    try:
        with torch.no_grad():
            inputs.call(model.eval(), example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen[-1] if seen else None


def _tp_keep(ctx: Any, ratio: float) -> dict[str, float] | None:
    """Each group's keep ratio after Torch-Pruning's global, isomorphic pruner (group L2 magnitude, rounded to the
    channel multiple, the output layer and the excluded ones left whole) at ``ratio``, read off the pruned group
    roots and put on the searched widths (the narrowest that keeps at least as many units); None when
    Torch-Pruning fails on the model."""
    from hwprune._modelcopy import copy_model

    import torch_pruning as tp

    model = copy_model(ctx.setup.model).eval()
    ex = ctx.setup.example
    try:
        mods = dict(model.named_modules())
        ignored = [m for m in [output_layer(model, ex)] + [mods.get(n) for n in ctx.spec.exclude] if m is not None]
        pruner = tp.pruner.BasePruner(model, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=True, isomorphic=True, pruning_ratio=ratio,
                                      round_to=ctx.spec.channel_multiple, ignored_layers=ignored)
        pruner.step()
    except Exception:  # noqa: BLE001 - a seed among several: a model Torch-Pruning cannot take gives none
        return None
    from hwprune.policy import keep_units
    from hwprune.search.context import DROP

    mods = dict(model.named_modules())
    keep = {}
    for g in ctx.layers.space.groups:  # on the searched widths: the narrowest keeping at least Torch-Pruning's units
        width = getattr(mods.get(g.name), "out_channels", getattr(mods.get(g.name), "out_features", None))
        widths = [r for r in level_ratios(ctx, g.name) if r != DROP]
        keep[g.name] = 1.0 if width is None else next(
            (r for r in widths if keep_units(r, g.units, ctx.spec.channel_multiple) >= int(width)), 1.0)
    return keep


def tp_seed(ctx: Any, fmt: str = "fp32", steps: int = 5, limit: float | None = None) -> Policy | None:
    """Torch-Pruning's ranking (:func:`_tp_keep`) at the least pruning ratio whose policy fits the limit (bisected
    on the price), layers in ``fmt`` where their menu has it; None for a recurrent model, a model Torch-Pruning
    cannot take, or where no ratio of 0.2, 0.4, 0.6, 0.8 fits. Torch-Pruning's widths are computed once per
    ratio."""
    from hwprune.space import is_recurrent

    if is_recurrent(ctx.setup.model):
        return None
    formats = _fastest_formats(ctx, fmt)
    cache = ctx.__dict__.setdefault("_tp_keeps", {})

    def at(r: float) -> Policy | None:
        if r not in cache:
            cache[r] = _tp_keep(ctx, r)
        return None if cache[r] is None else ctx.policy(cache[r], formats)

    limit = ctx.limit_ms if limit is None else limit
    fits = lambda p: p is not None and ctx.price_ms(p) <= limit  # noqa: E731
    # a scan first: past some ratio Torch-Pruning leaves a group whole rather than empty it, so its price is not
    # monotone in the ratio over the whole range; then the least ratio that fits, bisected within its step (to
    # 0.2 / 2**steps)
    scan = [k / 5 for k in range(1, 5)]
    hi = next((r for r in scan if fits(at(r))), None)
    if hi is None:
        return None
    lo = hi - 0.2
    for _ in range(steps):  # more pruning fits better: the least ratio that fits keeps the most
        mid = (lo + hi) / 2
        if fits(at(mid)):
            hi = mid
        else:
            lo = mid
    return at(hi)


def knapsack_seed(ctx: Any, fmt: str = "fp32", limit: float | None = None) -> Policy | None:
    """The latency knapsack over the costs of cutting (:func:`hwprune.search.knapsack.allocate`), layers in
    ``fmt`` where their menu has it (None when the narrowest widths do not fit)."""
    from hwprune.search.knapsack import allocate

    keep_cost, _ = ctx.costs()
    formats = _fastest_formats(ctx, fmt)
    levels = {g.name: level_ratios(ctx, g.name) for g in ctx.layers.space.groups}
    losses = {g: [keep_cost[g][_on(keep_cost[g], r)] for r in rs] for g, rs in levels.items()}
    keep = allocate(levels, losses, lambda k: ctx.price_ms(ctx.policy(k, formats)),
                    ctx.limit_ms if limit is None else limit)
    return None if keep is None else ctx.policy(keep, formats)


@dataclass
class Seed:
    """One seed of the portfolio: its name, policy, kind (uniform, knapsack, threshold, tp), the format offered to
    all layers, and the names of later seeds that came out the same policy."""

    name: str
    policy: Policy
    kind: str
    fmt: str
    same_as: list[str] = field(default_factory=list)


def build_seed(ctx: Any, kind: str, fmt: str, limit: float | None = None) -> Policy | None:
    """The seed of ``kind`` (uniform, knapsack, threshold, tp) with layers in ``fmt``, at price ``limit`` (default
    the search's), filled up to it; None where that kind has none there."""
    if kind == "uniform":
        u = uniform_seed(ctx, fmt, limit)
        pol = None if u is None else u[1]
    else:
        make = {"knapsack": knapsack_seed, "threshold": threshold_seed, "tp": tp_seed}[kind]
        pol = make(ctx, fmt, limit=limit)
    return None if pol is None else fill(ctx, pol, limit)[0]


def portfolio(ctx: Any) -> list[Seed]:
    """The seeds (see the module doc), each filled to the limit, each policy once (the first name kept): uniform,
    knapsack, threshold and Torch-Pruning's in fp32, then each with every low-precision format."""
    fmts = sorted({f for menu in ctx.menus.values() for f in menu if f != "fp32"})
    out: list[Seed] = []
    seen: dict[str, Seed] = {}
    for fmt in ["fp32"] + fmts:
        suffix = "" if fmt == "fp32" else f"-{fmt}"
        u = uniform_seed(ctx, fmt)
        cands = [("uniform", f"uniform-{u[0]:g}{suffix}", fill(ctx, u[1])[0])] if u else []
        cands += [(kind, kind + suffix, build_seed(ctx, kind, fmt)) for kind in ("knapsack", "threshold", "tp")]
        for kind, name, pol in cands:
            if pol is None:
                continue
            key = json.dumps(pol.to_dict(), sort_keys=True)
            if key in seen:
                seen[key].same_as.append(name)
            else:
                seen[key] = Seed(name, pol, kind, fmt)
                out.append(seen[key])
    return out
