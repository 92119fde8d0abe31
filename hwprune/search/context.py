"""Everything a trial needs, prepared once: the dense model and data, the predictor, the budget.

Candidates are *repaired* before any fine-tuning: while the predicted latency
exceeds the search limit (the budget less a margin for prediction error), the move that saves the most predicted
time per unit of importance lost is made: a group one notch down the grid, or a layer to another format of its
menu. Repair is deterministic, so every fine-tuned candidate meets the budget and no fine-tune is spent on an
infeasible one.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hwprune._modelcopy import copy_model
from hwprune.errors import HwpruneError, one_line
from hwprune.latency import ProfileJob, Predictor, analyze_layers, get_target, model_key, resolve_table
from hwprune.latency.layers import ModelLayers
from hwprune.latency.ondemand import check_formats
from hwprune.policy import Policy
from hwprune.search.budget import parse_budget
from hwprune.search.spec import SearchSpec
from hwprune.resolve import Setup, resolve
from hwprune.space import prepare_model

__all__ = ["SearchContext", "prepare_context", "dense_setup", "MARGIN_QUANTILE"]

MARGIN_QUANTILE = 0.9  # which quantile of the calibration errors the automatic budget margin is


DROP = 0.0  # the keep ratio of a group whose block is dropped (spec.depth): one level below its narrowest width


@dataclass
class SearchContext:
    """The prepared search: model, data, layers, predictor, grid, format menus and the budget."""

    spec: SearchSpec
    setup: Setup
    layers: ModelLayers
    predictor: Predictor
    grid: tuple[float, ...]
    menus: dict[str, list[str]]
    budget_ms: float
    dense_ms: float
    dense_val_metric: float  # the task's metric of the dense model on the validation split
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # for data-driven importance
    notes: list[str] = field(default_factory=list)
    margin: float = 0.0  # share of the budget kept free: candidates are priced at most budget / (1 + margin)
    speed_factor: float = 1.0  # the price scale at the limit: speed now / at profiling (price_scale)
    measure_factor: float = 1.0  # measured ratio x dense price <= budget / this (1 for a share; price_scale)
    screen: Any = None  # the cheap proxy (hwprune.search.screen.Screen); None with spec.screen 0
    table_grid: tuple[float, ...] = ()  # the keep ratios the table was profiled at (grid: those searched)
    meter: Any = None  # hwprune.latency.ondemand.ConfigMeter: measures entries off the table's grid; None: grid only
    _importance: Any = None  # (unit scores, keep losses, format losses), computed when first asked
    val_items: int = 0  # validation items a trial is scored on (near-ties: hwprune.search.finish.tie_margin)
    sensitivity: Any = None  # hwprune.search.sensitivity.SensitivityMap, once measured (spec.costs 'sensitivity')
    carriers: dict[str, str] = field(default_factory=dict)  # spec.depth: group -> the block it drops at ratio DROP
    timings: dict[str, list[Any]] = field(default_factory=dict)  # policy -> its timings (search.finish.timed)

    def keep_of(self, policy: Policy) -> dict[str, float]:
        """Every group's keep ratio in ``policy``, :data:`DROP` for a group whose block it drops."""
        gone = set(policy.drop)
        return {g.name: DROP if self.carriers.get(g.name) in gone else policy.keep.get(g.name, 1.0)
                for g in self.layers.space.groups}

    def importance(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[float, float]], dict[str, dict[str, float]]]:
        """The dense model's unit scores (the spec's criterion), the importance each group loses at each keep
        ratio of the grid (:func:`~hwprune.search.knapsack.level_losses`) and each layer loses in each format
        of its menu (:func:`~hwprune.search.knapsack.format_losses`); computed once."""
        if self._importance is None:
            from hwprune.apply import unit_scores
            from hwprune.policy import keep_units
            from hwprune.search.knapsack import format_losses, level_losses

            spec = self.spec
            scores = unit_scores(self.setup.model, self.setup.example, exclude=spec.exclude,
                                 importance=spec.importance, batches=self.batches or None, loss=self.task.loss)
            keep: dict[str, dict[float, float]] = {}
            for g in self.layers.space.groups:
                units = [keep_units(r, g.units, spec.channel_multiple) for r in self.grid]
                if g.name in scores:
                    lost = level_losses(scores[g.name], units)
                else:  # no scores for this group: every unit of average importance
                    lost = [float(g.units - u) for u in units]
                keep[g.name] = dict(zip(self.grid, lost))
                if g.name in self.carriers:  # the block dropped: every unit of the group, and then some
                    keep[g.name][DROP] = max([float(v) for v in lost] + [float(g.units)]) * 1.5
            batch = self.batches[0][0] if self.batches else self.setup.example
            self._importance = (scores, keep, format_losses(self.setup.model, self.menus, batch))
        return self._importance

    def costs(self) -> tuple[dict[str, dict[float, float]], dict[str, dict[str, float]]]:
        """The cost of each group at each keep ratio of the grid and of each layer in each format of its menu:
        measured by the proxy (:mod:`hwprune.search.sensitivity`, ``spec.costs`` 'sensitivity', the default) or
        counted as importance lost (:meth:`importance`, 'importance'); computed once."""
        if self.spec.costs == "importance":
            _, keep, fmt = self.importance()
            return keep, fmt
        if self.sensitivity is None:
            from hwprune.search.screen import Screen
            from hwprune.search.sensitivity import measure_sensitivity

            proxy = Screen(self.setup, self.spec, self.batches, steps=0)

            def score(keep: dict[str, float], formats: dict[str, str]) -> float:
                try:
                    return proxy.score(self.policy(keep, formats))
                except Exception:  # noqa: BLE001 - a width the user's model cannot run at: priced as failed
                    return float("-inf")

            groups = [(g.name, g.units) for g in self.layers.space.groups]
            self.sensitivity = measure_sensitivity(score, groups, self.grid, self.menus, self.spec.channel_multiple,
                                                   drops=set(self.carriers), drop_ratio=DROP)
            self.sensitivity.method = proxy.method
        return self.sensitivity.keep, self.sensitivity.formats

    @property
    def fills(self) -> bool:
        """Whether candidates are filled up to the limit: not when the dense model meets it (the front is
        searched then, and every filled sample would be the dense model)."""
        return self.dense_ms > self.limit_ms

    def canonical(self, keep: dict[str, float]) -> dict[str, float]:
        """Keep ratios as the lowest ratio of the grid that keeps the same units: one policy per pruned shape."""
        from hwprune.policy import keep_units
        from hwprune.search.sensitivity import group_levels

        m = self.spec.channel_multiple
        units = {g.name: g.units for g in self.layers.space.groups}
        return {g: r if g not in units or (r == DROP and g in self.carriers) else
                dict(group_levels(self.grid, units[g], m)).get(keep_units(r, units[g], m), r) for g, r in keep.items()}

    @property
    def task(self) -> Any:
        """The search's :class:`~hwprune.tasks.Task` (the data's, or the spec's ``task``)."""
        return self.setup.task

    @property
    def limit_ms(self) -> float:
        """The predicted latency a candidate may reach: the budget less the margin for prediction error, at the
        speed the table was measured at (an absolute budget on a machine that runs ``speed_factor`` times slower
        now buys that much less table time; a share of the dense latency: where the speed curve puts it, see
        :func:`price_scale`)."""
        return self.budget_ms / (1.0 + self.margin) / self.speed_factor

    def prices(self, all_casts: bool = False) -> dict[str, Any]:
        """What this study's prices are made of, for a resume to compare: the table's device (fingerprint),
        a digest of every entry the model's layers can use on the table's grid and menus and of the model's fit and
        calibration runs, and the margin. Entries other models add to the table, and entries measured on demand
        (:meth:`settle`), do not change it."""
        import hashlib
        import json

        from hwprune.latency.layers import CastConfig
        from hwprune.latency.profiler import reachable_dims

        table, key = self.predictor.table, self.predictor.key
        fused = table.fused(key)
        keys: set[str] = set()
        sizes: set[int] = set()  # the activation sizes a cast can have on the table's grid
        for form in self.layers.layers:
            for dims in reachable_dims(self.layers, form, self.table_grid or self.grid):
                for fmt in self.menus.get(form.name, ["fp32"]):
                    keys.add(form.at(dims, table.batch_size, fmt, fused).key)
                dense = form.at(dims, 1, "fp32")
                sizes |= {dense.in_elems(), dense.out_elems()}
        keys |= {k for k in table.entries if k.startswith("cast|")  # all_casts: the digest of runs before 2026-12-02
                 and (all_casts or getattr(CastConfig.from_key(k), "elems", None) in sizes)}
        blob = {"entries": {k: table.entries[k].to_dict()["median_us"] for k in sorted(keys) if k in table.entries},
                "unsupported": sorted(keys & set(table.unsupported)), "model": table.models.get(key, {})}
        digest = hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
        pricer = type(self.predictor).__name__  # a benchmark's FLOPs pricer is another price scale
        return {"table_fingerprint": table.fingerprint, "digest": digest + ("" if pricer == "Predictor" else
                                                                            f"/{pricer}"),
                "entries": len(blob["entries"]), "margin": round(self.margin, 6), "batch_size": table.batch_size}

    def policy(self, keep: dict[str, float], formats: dict[str, str]) -> Policy:
        """A policy of these keep ratios and formats; a format the table marks unsupported at the layer's
        pruned shape falls back to fp32 (:meth:`Predictor.runnable`)."""
        keep = self.canonical(dict(keep))
        drop = tuple(self.carriers[g] for g, r in keep.items() if r == DROP and g in self.carriers)
        gone = lambda n: any(n == d or n.startswith(d + ".") for d in drop)  # noqa: E731
        pol = Policy({g: r for g, r in keep.items() if not (r == DROP and g in self.carriers)},
                     {k: v for k, v in formats.items() if v != "fp32" and not gone(k)}, self.spec.channel_multiple,
                     self.spec.model, drop)
        return self.predictor.runnable(pol)

    def price_ms(self, policy: Policy) -> float:
        return self.predictor.price(policy).latency_ms

    def _fastest(self, layer: str) -> str:
        def cost(fmt: str) -> float:
            return self.price_ms(self.policy({}, {layer: fmt}))
        return min(self.menus[layer], key=cost)

    def repair(self, policy: Policy, limit: float | None = None) -> tuple[Policy, int]:
        """Until the price is at most ``limit`` (default the search's limit), make the move that saves the most
        predicted time per unit of cost of cutting: one group one width down (its next lower kept-unit count), or
        one layer to another format of its menu (costs from :meth:`costs`; a move that costs nothing and saves comes first). Returns the policy and the
        number of moves."""
        from hwprune.search.portfolio import level_ratios

        lim = self.limit_ms if limit is None else limit
        keep = self.canonical(self.keep_of(policy))
        formats = dict(policy.formats)
        steps = 0
        current = self.price_ms(self.policy(keep, formats))
        if current <= lim:
            return self.policy(keep, formats), 0
        keep_loss, fmt_loss = self.costs()
        levels = {g: level_ratios(self, g) for g in keep}
        while current > lim:
            best: tuple[float, float, Callable[[], None]] | None = None  # (saving per loss, saving, apply)
            for g, r in sorted(keep.items()):
                lower = [v for v in levels[g] if v < r - 1e-12]
                if not lower:
                    continue
                nr = max(lower)
                saving = current - self.price_ms(self.policy({**keep, g: nr}, formats))
                lost = _at(keep_loss[g], nr) - _at(keep_loss[g], r)
                move = (saving / lost if lost > 0 else float("inf"), saving, lambda g=g, nr=nr: keep.update({g: nr}))
                if saving > 0 and (best is None or move[:2] > best[:2]):
                    best = move
            for layer in sorted(self.menus):
                now = formats.get(layer, "fp32")
                for fmt in self.menus[layer]:
                    if fmt == now:
                        continue
                    saving = current - self.price_ms(self.policy(keep, {**formats, layer: fmt}))
                    lost = fmt_loss[layer].get(fmt, 0.0) - fmt_loss[layer].get(now, 0.0)
                    move = (saving / lost if lost > 0 else float("inf"), saving,
                            lambda layer=layer, fmt=fmt: formats.update({layer: fmt}))
                    if saving > 0 and (best is None or move[:2] > best[:2]):
                        best = move
            if best is None:  # rounding to the channel multiple: a notch that saves nothing yet
                movable = [g for g in sorted(keep) if any(v < keep[g] - 1e-12 for v in levels[g])]
                if not movable:  # every group at its lowest: the smallest policy met the limit when it was checked
                    small = self.smallest()
                    if self.price_ms(small) <= lim:
                        return small, steps + 1
                    raise HwpruneError(f"cannot repair a policy to {lim:.4f} ms")  # guarded earlier
                g = max(movable, key=lambda n: keep[n])
                keep[g] = max(v for v in levels[g] if v < keep[g] - 1e-12)
            else:
                best[2]()
            steps += 1
            current = self.price_ms(self.policy(keep, formats))
        return self.policy(keep, formats), steps

    def settle(self, policy: Policy, log: Callable[[str], None], grow: bool = True, limit: float | None = None
               ) -> tuple[Policy, int]:
        """With a meter (keep ratios off the table's grid): measure the entries ``policy`` lacks, then repair it
        on the measured prices (and, with ``grow``, fill it into headroom they leave, at most twice), until it is
        priced from measured entries only and meets ``limit`` (default the search's). Returns the policy and the
        moves it took (0: ``policy`` as it was)."""
        from hwprune.search.portfolio import fill

        if self.meter is None:
            return policy, 0
        moves, fills = 0, 0
        for _ in range(8):
            n = self.meter.measure(self.predictor, policy)
            if n:
                log(f"hwprune: measured {n} layer configuration(s) the table lacked "
                    f"({self.meter.measured} in {self.meter.seconds:.1f} s so far)")
            if self.price_ms(policy) <= (self.limit_ms if limit is None else limit) and not n:
                grown, g = fill(self, policy, limit) if grow and fills < 2 else (policy, 0)
                if not g:
                    return policy, moves
                policy, moves, fills = grown, moves + g, fills + 1
                continue
            policy, m = self.repair(policy, limit)
            moves += m
            if not m and not self.meter.missing(self.predictor, policy) and not (grow and fills < 2):
                return policy, moves
        left = self.meter.missing(self.predictor, policy)
        if left:
            log(f"hwprune: {len(left)} configuration(s) of a policy are still priced by interpolation after 8 "
                f"rounds of measuring and repair")
        return policy, moves

    def smallest(self) -> Policy:
        """Every group at the lowest keep ratio and every layer in its fastest format: the lowest of the searched
        ratios, or of the table's grid where that prices lower (a launch-bound layer measured on demand at a
        lower width need not run faster)."""
        fastest = {layer: self._fastest(layer) for layer in self.menus}
        grids = {self.grid, self.table_grid or self.grid}
        pols = [self.policy({g.name: DROP if g.name in self.carriers else min(grid)
                             for g in self.layers.space.groups}, fastest) for grid in grids]
        return min(pols, key=self.price_ms)


def _at(losses: dict[float, float], r: float) -> float:
    """The loss at keep ratio ``r`` (a ratio off the grid: the nearest grid ratio's)."""
    return losses[r] if r in losses else losses[min(losses, key=lambda v: abs(v - r))]


def _floor_measured(predictor: Predictor, smallest: Policy) -> str:
    """What profiling measured for the smallest policy, as a share of the dense model measured in the same
    rounds: this very policy when it was a calibration run, else the smallest policy profiling chose (every group
    at the lowest ratio, formats by the raw layer sum); '' when neither was measured."""
    from hwprune.latency.speed import smallest_reference
    from hwprune.latency.table import calibration_key

    if smallest.drop:  # profiling measures no policy without blocks: the paragraph after measures it
        return ""
    runs = {calibration_key(s["policy"]): s["measured_us"] for s in predictor.calibration}
    dense = runs.get(calibration_key(Policy(channel_multiple=smallest.channel_multiple).to_dict()))
    small, which = runs.get(calibration_key(smallest.to_dict())), ""
    if small is None:
        got = smallest_reference(predictor.table, predictor.key)
        small = got[1]["median_us"] if got else None
        which = " (its formats as profiling chose them from the raw layer sums)"
    if small is None or dense is None:
        return ""
    return (f"; measured at profiling{which}: {small / 1e3:.4f} ms, {small / dense:.0%} of the dense "
            f"{dense / 1e3:.4f} ms")


def price_scale(speed: Any, budget_ms: float, relative: bool, rho: float = 1.0) -> tuple[float, float]:
    """``(speed_factor, measure_factor)`` for a search from the machine's speed curve now
    (:class:`~hwprune.latency.speed.SpeedCurve`, factor ``f(p)`` for a policy priced ``p`` at the table's speed):

    - the price scale at the limit: a candidate priced ``p`` runs ``p * f(p)`` now; an absolute budget ``B``
      (``budget_ms``, the margin taken off) allows ``p <= B / f(p)``, a share ``s`` of the dense latency ``D``
      allows ``p * f(p) <= s * D * f(D)``, so ``p <= B * f(D) / f(p)``: a speed factor ``f(p) / f(D)``. The
      curve is not flat (small, overhead-bound policies move more than the dense model), so a share is not the
      same share of the table's prices at every speed: on an AMD EPYC VM whose cnn1d table was profiled on
      another host, the dense model ran 0.744x and the smallest policy 0.687x its table time, and policies priced
      0.22-0.29x of the dense model measured 6-16% under their prices (a 30% search priced
      [16,16,16,32] out at 0.290x that measured 0.256x);
    - what a *measured* ratio to the dense model is compared with: ``ratio * dense price <= budget / factor``,
      the factor 1 for a share (the ratio is the share) and ``f(D)`` for an absolute budget (the ratio times the
      dense model's time now).

    ``rho`` is the user's own dense model's time over the dense model the table prices (:func:`_speed_now`: a
    model whose RNN stacks the analysis split): a share is of the user's model, ``s * rho * D * f(D)``, and a
    measured ratio is to the user's model, ``ratio * rho * D * f(D)`` for an absolute budget. ``p`` is where the
    limit falls, found by a few fixed-point steps (the curve is flat beyond its anchors)."""
    dense = speed.factor
    base = dense * rho if relative else 1.0
    factor = 1.0
    for _ in range(5):
        factor = speed.factor_at(1e3 * budget_ms / factor) / base
    return factor, 1.0 if relative else dense * rho


def confirmed_scale(speed: Any, rho: float, again: Callable[[], tuple[Any, float]], limit_ms: float,
                    relative: bool, share: float | None = None, anchor_ms: float | None = None
                    ) -> tuple[float, float, Any, float, str]:
    """:func:`price_scale` of the speed check ``(speed, rho)``; where its factor is more than
    :data:`CONFIRM_FACTOR` off 1, two more checks (``again()``) and the median by factor. Returns
    ``(speed_factor, measure_factor, speed, rho, note)``, the note empty when one check was enough.

    A budget given as a share (``share`` of the dense model) that the smallest policy meets as timed now against
    the user's dense model is never priced under that policy: the factor is capped where its price (``anchor_ms``,
    else its time at profiling) sits at the limit (at least 1). The 2-layer LSTM's smallest policy measured 0.21x
    of dense in a benchmark's 30-round timings while three speed checks in a row, on a VM whose small models slowed
    more than its dense one for seconds at a time, priced the 30% share at the budget / 1.599 and refused the
    search."""
    factor, measure = price_scale(speed, limit_ms, relative, rho)
    notes = []
    if abs(factor - 1.0) > CONFIRM_FACTOR:
        checks = [(factor, measure, speed, rho)]
        for _ in range(2):
            s2, r2 = again()
            if s2 is not None:
                checks.append((*price_scale(s2, limit_ms, relative, r2), s2, r2))
        checks.sort(key=lambda c: c[0])
        notes.append(f"the speed check priced candidates at the budget / {factor:.3f}, more than {CONFIRM_FACTOR:.0%} "
                     f"off the table's scale: checked {len(checks)} times (factors "
                     f"{', '.join(f'{c[0]:.3f}' for c in checks)}), the median kept")
        factor, measure, speed, rho = checks[len(checks) // 2]
    small = getattr(speed, "small", None)
    if relative and share is not None and small is not None:
        now = small.now_us / (speed.dense.now_us * rho)  # the smallest policy's ratio to the user's dense model now
        cap = max(1.0, limit_ms / max(small.then_us / 1e3, anchor_ms or 0.0))
        if now <= share and factor > cap:
            notes.append(f"the smallest policy measures {now:.3f}x your dense model now, within the {share:.0%} "
                         f"share: priced at the budget / {cap:.3f} instead of / {factor:.3f}, so that it stays "
                         f"under the limit")
            factor = cap
    return factor, measure, speed, rho, "; ".join(notes)


def _anchor_price(ctx: SearchContext, table: Any, key: str) -> float | None:
    """The price of the smallest policy the table's speed check times (its anchor), None without one."""
    from hwprune.latency.speed import smallest_reference

    anchor = smallest_reference(table, key)
    if anchor is None:
        return None
    try:
        return ctx.price_ms(Policy.from_dict(anchor[0]))
    except (HwpruneError, KeyError):
        return None  # an anchor the search's space no longer prices (excluded layers): its measured time serves


def _scale_note(factor: float, relative: bool, rho: float = 1.0) -> str:
    user = "" if rho == 1.0 else (f"; your own dense model (its RNN stacks fused, as you deploy it) measures "
                                  f"{rho:.3f}x the per-layer stack every pruned model is: budgets and measured "
                                  f"ratios are taken against yours")
    if not relative:
        return user
    if abs(factor - 1.0) < 5e-4 and not user:
        return "; the budget is a share of the dense latency, which scales alike, so the search is unchanged"
    return (f"{user}; the budget is a share of your dense model's latency: candidates are priced on the table's "
            f"scale at the budget / {factor:.3f}")


USER_DENSE = "__user_dense__"  # the user's own dense model, in the speed check's rounds
# a speed check that prices candidates more than this far off the table's scale is taken twice more and the median
# kept. The 2-layer LSTM's searches of one benchmark run (one table, one VM, minutes apart) read factors 1.00-1.17 for
# the same shares, one 1.46 while another process ran (under its smallest policy: the search was refused), and one
# 1.165 left only the smallest policy under the limit at 30% (its uniform 0.375 measured 0.292x in the benchmark):
# one check of ~10 rounds is that noisy, and a limit 5% off moves the search's pick
CONFIRM_FACTOR = 0.05
# rounds of a search's speed check (at least; the table's reference rounds if more): the check times the dense model
# and the smallest policy once per search (0.1-0.2 s for the 2-layer LSTM at batch 16 in 10 rounds, whose spreads
# were 7-40% beside a running benchmark), and its factor sets every price of the search
SPEED_ROUNDS = 30


def _speed_now(model: torch.nn.Module, setup: Setup, table: Any, key: str, target: Any, batch: int,
               exclude: list[str]) -> tuple[Any, float]:
    """The speed curve (:mod:`hwprune.latency.speed`): the dense model and the smallest policy timed now in the
    same rounds, against the table's measurements of both (None without a stored reference); and where the
    analysis restructured the model (``model``: multi-layer RNNs split into one module per layer, which every
    pruned model is), the user's own dense model in the same rounds: the median per-round ratio of its time to the
    restructured dense model's (1.0 where nothing was restructured). A budget given as a share is a share of the
    user's model: a 2-layer GRU split into two single-layer GRUs ran 2-7% slower than the fused ``nn.GRU`` the
    user deploys (three 30-round timings: 1.037, 1.071, 1.019), and ratios taken against the split one put picks
    over the budget as the user measures it."""
    import statistics

    from hwprune.latency.profiler import REFERENCE, model_sampler, timing_batch
    from hwprune.latency.speed import measure_with_anchors, model_reference
    from hwprune.space._rnnstack import RNNStack

    ref = model_reference(table, key)
    if not ref:
        return None, 1.0
    x = timing_batch(setup.example, batch, setup.timing_pool())
    split = any(isinstance(m, RNNStack) for m in model.modules())
    with target.settings():  # the table's threads while timing; the search's own afterwards
        items = {USER_DENSE: model_sampler(user_dense(setup, target), x, target)} if split else {}
        res, speed = measure_with_anchors(items, table, key, model, setup.example, x, target, exclude,
                                          max(int(ref.get("rounds", 10)), SPEED_ROUNDS))
    if not split:
        return speed, 1.0
    return speed, statistics.median(a / b for a, b in zip(res.samples[USER_DENSE], res.samples[REFERENCE]))


def user_dense(setup: Setup, target: Any) -> torch.nn.Module:
    """The user's own dense model as the target's runtime deploys it (not restructured by the analysis): what a
    budget given as a share of the dense latency is a share of."""
    from hwprune._modelcopy import copy_model
    from hwprune.device.deploy import deploy

    return deploy(copy_model(setup.model).eval(), target, setup.example)[0]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dense_setup(spec: SearchSpec, log: Callable[[str], None] = _log, setup: Setup | None = None) -> Setup:
    """The spec's dense model with its trained weights (trained and cached first if there are none) and data."""
    from hwprune.train import DEFAULT_EPOCHS, TrainConfig, train_and_cache

    setup = setup or resolve(spec.model, spec.data, None, spec.model_args, spec.weights, spec.seed, task=spec.task,
                             num_classes=spec.num_classes)
    assert setup.data is not None
    if setup.weights == "random init":
        epochs = DEFAULT_EPOCHS.get(spec.model, 20)
        log(f"hwprune: no trained {spec.model} for {spec.data} (seed {spec.seed}); training it first ({epochs} epochs)")
        summary = train_and_cache(setup.model, setup.data, spec.model, spec.data, spec.seed, setup.model_args,
                                  TrainConfig(epochs=epochs, seed=spec.seed, device=spec.device, task=setup.task))
        setup.weights = summary["weights"]
    return setup


def _search_grid(spec: SearchSpec, target: Any, table: Any, table_grid: tuple[float, ...], model: torch.nn.Module,
                 setup: Setup, key: str) -> tuple[tuple[float, ...], Any, str]:
    """The keep ratios searched, the meter that measures their entries (None: the table's grid only), and a note
    saying which."""
    from hwprune.latency.ondemand import ConfigMeter
    from hwprune.latency.profiler import timing_batch
    from hwprune.latency.table import table_path, user_tables_dir

    n = spec.keep_levels
    if not n:
        return table_grid, None, ""
    fine = tuple(sorted(set(table_grid) | {round(k / n, 6) for k in range(1, n + 1)}))
    if fine == table_grid:
        return table_grid, None, ""
    why = ("this machine is not the target" if not target.is_local() else
           "--no-profile" if not spec.profile else
           "the table was given as a file (--table)" if spec.table else
           "the Ray backend (measuring beside running fine-tunes would be noisy)" if spec.backend == "ray" else
           "the table stores no speed reference of its layer rounds to put new entries on its scale"
           if not (table.models.get(key, {}).get("reference_layer_rounds") or {}).get("median_us") else "")
    dest = table_path(spec.tables or user_tables_dir(), target.fingerprint(), table.batch_size)
    if not why and dest.is_file() and dest != table.path:
        from hwprune.latency.table import LatencyTable, fingerprint_diff

        if fingerprint_diff(LatencyTable.load(dest).fingerprint, table.fingerprint):
            why = f"{str(dest)!r} holds a table of another setup of this device"
    if why:
        return table_grid, None, (f"keep ratios on the table's grid only ({', '.join(f'{r:g}' for r in table_grid)}):"
                                  f" finer ones are measured on demand, which needs this machine ({why})")
    x = timing_batch(setup.example, table.batch_size, setup.timing_pool())
    meter = ConfigMeter(table, target, key, copy_model(model), x, dest)
    return fine, meter, (f"keep ratios in steps of 1/{n} down to {min(fine):g} beside the table's grid; the layer "
                         f"configurations a trial needs that the table lacks are measured before it trains, into "
                         f"{str(dest)!r}")


def prepare_context(spec: SearchSpec, log: Callable[[str], None] = _log) -> SearchContext:
    """Everything the search needs, cheapest checks first.

    Order: the model and data (shapes; nothing trained), the latency table (profiled here first when this
    machine is the target and has none, unless ``spec.profile`` is off), the budget against the grid's
    smallest policy, and only then the base model's training (if not cached) and its evaluation.
    ``spec`` must be validated already (:func:`hwprune.search.run_search` does it).
    """
    from hwprune.models import default_latency_batch
    from hwprune.train import evaluate, few_batches

    target = get_target(spec.target, threads=spec.threads, runtime=spec.runtime)
    setup = resolve(spec.model, spec.data, None, spec.model_args, spec.weights, spec.seed, task=spec.task,
                    num_classes=spec.num_classes)
    assert setup.data is not None
    batch = spec.batch_size or default_latency_batch(spec.model)
    from hwprune.space import check_prunable

    structure = copy_model(setup.model)  # the analysis splits RNN stacks in place; training and the cache
    layers = analyze_layers(structure, setup.example, spec.exclude, spec.channel_multiple)  # keep the user's keys
    check_prunable(layers.space)
    for name, why in layers.space.kept.items():  # said before anything is measured: the user may restructure
        log(f"hwprune: kept whole, not searched: {name}: {why}")
    key = model_key(spec.model, setup.model_args, setup.input_shape, spec.exclude, spec.channel_multiple)
    job = ProfileJob(structure, setup.example, layers, key, tuple(setup.input_shape), list(spec.exclude),
                     inputs=setup.timing_pool())
    table = resolve_table(target, batch, layers, key, tables=spec.tables, table=spec.table,
                          allow_foreign=spec.allow_foreign_table, profile=job if spec.profile else None, log=log)
    predictor = Predictor(table, layers, key)
    if not predictor.calibrated:
        how = f"--data {spec.data}" if spec.data else f"--input-shape {','.join(map(str, setup.input_shape))}"
        raise HwpruneError(f"table {str(table.path)!r} has no calibration for {key}; run 'hwprune profile "
                           f"--target {spec.target} --model {spec.model} {how} --batch-size {batch}' first")
    table_grid = tuple(table.models[key]["grid"])
    grid, meter, why = _search_grid(spec, target, table, table_grid, structure, setup, key)
    if meter is not None:
        predictor.allow_missing = True  # proposals are priced by interpolation first, then measured
    check_formats(predictor, structure, setup.example, target, log)
    menus = predictor.menus(target)
    dense_ms = predictor.price(Policy(channel_multiple=spec.channel_multiple)).latency_ms
    budget_ms = parse_budget(spec.budget, dense_ms)
    # the margin stays where the gate and the finish measure too: priced up to the budget itself (cnn1d run 7),
    # candidates timed within it before their fine-tune measured over it minutes later in the finish (this VM's
    # ratios move with its load by more than one timing's error), and 2 of 3 searches at 50% ended with none met
    margin = predictor.margin(MARGIN_QUANTILE) if spec.budget_margin is None else spec.budget_margin
    ctx = SearchContext(spec, setup, layers, predictor, grid, menus, budget_ms, dense_ms, float("nan"), margin=margin,
                        table_grid=table_grid, meter=meter, carriers=layers.carriers() if spec.depth else {})
    if spec.depth:
        ctx.notes.append(f"depth: {len(ctx.carriers)} block(s) may be dropped ({', '.join(ctx.carriers.values())})"
                         if ctx.carriers else "depth: no block of this model can be dropped (none keeps its input's "
                         "shape); channels and formats only")
    if why:
        ctx.notes.append(why)
    if target.format_note():
        ctx.notes.append(target.format_note())
    speed, rho = _speed_now(structure, setup, table, key, target, batch, spec.exclude) if target.is_local() \
        else (None, 1.0)
    if speed is not None:
        relative = str(spec.budget).strip().endswith("%")
        ctx.speed_factor, ctx.measure_factor, speed, rho, note = confirmed_scale(
            speed, rho, lambda: _speed_now(structure, setup, table, key, target, batch, spec.exclude),
            budget_ms / (1.0 + margin), relative, budget_ms / dense_ms, _anchor_price(ctx, table, key))
        if note:
            ctx.notes.append(note)
        ctx.notes.append(speed.line() + _scale_note(ctx.speed_factor, relative, rho))
    if meter is not None:  # the floor is checked on measured entries: estimates below the profiled grid are rough
        for _ in range(3):
            n = meter.measure(predictor, ctx.smallest())
            if not n:
                break
            log(f"hwprune: measured {n} layer configuration(s) the table lacked for the smallest policy (the floor "
                f"a budget is checked against)")
    floor = ctx.price_ms(ctx.smallest())
    if floor > ctx.limit_ms:
        if target.is_local() and spec.way_out:  # the way out, measured, before the one-line refusal
            from hwprune.search.floor import floor_paragraph, measure_way_out

            try:
                way = measure_way_out(setup.model, setup.example, setup.timing_pool(), ctx.smallest(),
                                      [b.name for b in layers.space.blocks], spec, batch, budget_ms / dense_ms, log)
                log("hwprune: " + floor_paragraph(way))
            except Exception as exc:  # noqa: BLE001 - an aid to the refusal, never a reason to lose it
                log(f"hwprune: could not measure what would reach the budget: {one_line(exc)}")
        kept = "" if margin == 0 else (f" ({budget_ms:.4f} ms less the {margin:.1%} margin for prediction error; "
                                       f"--budget-margin 0 prices up to the budget itself)")
        if abs(ctx.speed_factor - 1.0) >= 5e-4:
            kept += (f" on the table's scale (the speed check now: prices / {ctx.speed_factor:.3f}, "
                     f"{ctx.limit_ms * ctx.speed_factor:.4f} ms before it)")
        raise HwpruneError(f"budget {ctx.limit_ms:.4f} ms{kept} cannot be met: the smallest policy the grid allows"
                           f"{f' (its {len(ctx.smallest().drop)} droppable block(s) dropped)' if ctx.smallest().drop else ''} "
                           f"is predicted at {floor:.4f} ms on {spec.target} (batch {batch}), "
                           f"{floor / dense_ms:.0%} of the dense model's {dense_ms:.4f} ms"
                           + _floor_measured(predictor, ctx.smallest()))
    if margin:
        how = "--budget-margin" if spec.budget_margin is not None else \
            f"the {MARGIN_QUANTILE:.0%} quantile of the calibration runs' leave-one-out |measured/predicted - 1|"
        ctx.notes.append(f"candidates are priced at most {ctx.limit_ms:.4f} ms: the budget less a {margin:.1%} "
                         f"margin ({how})")
    note = predictor.headroom_note(batch)
    if note:
        ctx.notes.append(note)
    if dense_ms <= ctx.limit_ms:
        ctx.notes.append(f"the dense model ({dense_ms:.4f} ms) already meets the budget; searching the "
                         f"{setup.task.metric}/latency front anyway")
    ctx.setup = dense_setup(spec, log, setup)  # the expensive part last: every cheap check has passed
    prepare_model(setup.model)  # trials (and Ray workers) prune the split form the analysis saw
    ctx.dense_val_metric = evaluate(setup.model, setup.data.val, task=setup.task)
    ctx.val_items = min(len(setup.data.val), spec.val_subset or len(setup.data.val))
    ctx.batches = few_batches(setup.data.train)
    if spec.screen:
        from hwprune.search.screen import Screen

        ctx.screen = Screen(setup, spec, ctx.batches)
        ctx.notes.append(f"screen: {spec.screen} repaired samples per fine-tune, ranked by "
                         f"{ctx.screen.method}")
    torch.manual_seed(spec.seed)
    return ctx
