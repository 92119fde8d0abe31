"""A latency knapsack: keep ratios that keep the most importance under a priced latency limit.

In the spirit of HALP (NeurIPS'22): each group's units are ranked by importance; lowering a group by one notch
of the grid removes its least important remaining units (the importance it loses) and saves what the latency
table prices (the predicted saving). Greedy by saving per unit of lost importance until the price meets the
limit (and, as a second start, greedy up from the smallest policy), each finished by a local search of one-notch
raises and swaps; the better of the two is kept. Prices come from the table through ``price`` and need not be additive across groups (a
layer between two groups is priced at both their widths).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["allocate", "level_losses", "format_losses"]


def level_losses(scores: torch.Tensor, units: list[int]) -> list[float]:
    """Importance lost when a group keeps ``units[i]`` of its units (its most important ones): the sum of the
    scores of the units it drops, each score relative to the group's mean (Torch-Pruning's default
    normalization, so groups of different layers compare)."""
    s = scores.detach().double().flatten()
    s = s / s.mean().clamp_min(1e-12)
    ordered = torch.sort(s).values  # ascending: the first ones go first
    n = len(ordered)
    return [float(ordered[: n - k].sum()) if k < n else 0.0 for k in units]


def _out_units(mod: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "hidden_size"):
        if isinstance(getattr(mod, attr, None), int):
            return int(getattr(mod, attr))
    return 1


def format_losses(model: nn.Module, menus: dict[str, list[str]], batch: Any) -> dict[str, dict[str, float]]:
    """Importance lost when a layer runs in a lower-precision format, in the units of :func:`level_losses`.

    A first-order proxy: the layer's relative output error in that format (weights and inputs as the format's
    simulation has them, :class:`hwprune.apply.formats.FormatSim`; measured on the inputs ``batch`` brings the
    layer in the dense model) times its output units, i.e. a format that perturbs a layer's output by 1% loses
    what dropping 1% of the layer's units of average importance loses. fp32 loses nothing. A layer the batch
    does not reach gets the relative error of its weights instead.
    """
    from hwprune import inputs
    from hwprune.apply.formats import FormatSim

    mods = dict(model.named_modules())
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    hooks = []
    for name in menus:
        if name in mods:
            hooks.append(mods[name].register_forward_pre_hook(
                lambda m, a, k, name=name: (seen.setdefault(name, (a, k)), None)[1], with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs.call(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)

    def first(out: Any) -> torch.Tensor:
        out = out[0] if isinstance(out, tuple) else out
        return out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out

    losses: dict[str, dict[str, float]] = {}
    for name, menu in menus.items():
        mod = mods.get(name)
        losses[name] = {"fp32": 0.0}
        if mod is None:
            continue
        for fmt in menu:
            if fmt == "fp32":
                continue
            sim = FormatSim(mod, fmt)
            with torch.no_grad():
                if name in seen:
                    a, k = seen[name]
                    ref, got = first(mod(*a, **k)).float(), first(sim(*a, **k)).float()
                else:
                    simulated = sim._params()
                    pairs = [(p, simulated[n]) for n, p in mod.named_parameters() if p.dim() >= 2]
                    ref = torch.cat([p.flatten() for p, _ in pairs]) if pairs else torch.zeros(1)
                    got = torch.cat([q.flatten() for _, q in pairs]) if pairs else torch.zeros(1)
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
            losses[name][fmt] = err * _out_units(mod)
    return losses


def allocate(levels: dict[str, list[float]], losses: dict[str, list[float]],
             price: Callable[[dict[str, float]], float], limit: float) -> dict[str, float] | None:
    """Keep ratios, one of ``levels[g]`` per group (ascending, the last one the dense 1.0), that keep the most
    importance (least total ``losses[g][i]``) found with ``price(keep) <= limit``; None when even the lowest
    levels do not meet it.

    Two starts, each finished by a local search, the better kept: from the dense model down (lower the group
    that saves the most latency per unit of importance lost until the limit holds), and from the smallest
    policy up (raise the group that recovers the most importance per unit of latency added while it holds)."""
    names = list(levels)

    def keep(at: dict[str, int]) -> dict[str, float]:
        return {g: levels[g][i] for g, i in at.items()}

    def lost(at: dict[str, int]) -> float:
        return sum(losses[g][i] for g, i in at.items())

    low = {g: 0 for g in names}
    if price(keep(low)) > limit:
        return None
    down = {g: len(levels[g]) - 1 for g in names}
    current = price(keep(down))
    while current > limit:
        best: tuple[float, float, str] | None = None  # (ratio, saving, group)
        for g in names:
            if down[g] == 0:
                continue
            down[g] -= 1
            saved = current - price(keep(down))
            down[g] += 1
            dl = losses[g][down[g] - 1] - losses[g][down[g]]
            cand = (saved / dl if dl > 0 else (float("inf") if saved > 0 else 0.0), saved, g)
            if best is None or cand > best:
                best = cand
        assert best is not None  # the lowest levels fit, so some group can still go down
        down[best[2]] -= 1
        current = price(keep(down))
    up = dict(low)
    current = price(keep(up))
    while True:
        best_up: tuple[float, str] | None = None
        for g in names:
            if up[g] + 1 >= len(levels[g]):
                continue
            up[g] += 1
            now = price(keep(up))
            up[g] -= 1
            gain = losses[g][up[g]] - losses[g][up[g] + 1]
            if now <= limit and gain > 0:
                cand = (gain / max(now - current, 1e-12), g)
                if best_up is None or cand > best_up:
                    best_up = cand
        if best_up is None:
            break
        up[best_up[1]] += 1
        current = price(keep(up))
    ends = [_local(start, levels, lost, lambda at: price(keep(at)) <= limit) for start in (down, up)]
    return keep(min(ends, key=lost))


def _local(at: dict[str, int], levels: dict[str, list[float]], lost: Callable[[dict[str, int]], float],
           fits: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Raise a group one notch, or lower one and raise another, while that loses less importance and fits."""
    at = dict(at)
    while True:
        best: tuple[float, tuple[tuple[str, int], ...]] | None = None
        base = lost(at)
        moves = [((g, +1),) for g in at] + [((a, -1), (b, +1)) for a in at for b in at if a != b]
        for move in moves:
            if any(not 0 <= at[g] + d < len(levels[g]) for g, d in move):
                continue
            for g, d in move:
                at[g] += d
            gain = base - lost(at)
            ok = gain > 1e-12 and fits(at)
            for g, d in move:
                at[g] -= d
            if ok and (best is None or gain > best[0]):
                best = (gain, move)
        if best is None:
            return at
        for g, d in best[1]:
            at[g] += d
