"""Everything a trial needs, prepared once: the dense model and data, the predictor, the budget.

Candidates are *repaired* before any fine-tuning: while the predicted latency
exceeds the search limit (the budget less a margin for prediction error), the group whose next-lower keep ratio saves the most
predicted time steps down one notch of the grid (then layers move to their
fastest offered format). Repair is deterministic, so every fine-tuned
candidate meets the budget and no fine-tune is spent on an infeasible one.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hwprune.errors import HwpruneError
from hwprune.latency import ProfileJob, Predictor, analyze_layers, get_target, model_key, resolve_table
from hwprune.latency.layers import ModelLayers
from hwprune.policy import Policy
from hwprune.search.budget import parse_budget
from hwprune.search.spec import SearchSpec
from hwprune.setup import Setup, resolve
from hwprune.space import prepare_model

__all__ = ["SearchContext", "prepare_context", "dense_setup", "MARGIN_QUANTILE"]

MARGIN_QUANTILE = 0.9  # which quantile of the calibration errors the automatic budget margin is


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
    speed_factor: float = 1.0  # machine's speed now / at profiling (hwprune.latency.speed), for absolute budgets

    @property
    def task(self) -> Any:
        """The search's :class:`~hwprune.tasks.Task` (the data's, or the spec's ``task``)."""
        return self.setup.task

    @property
    def limit_ms(self) -> float:
        """The predicted latency a candidate may reach: the budget less the margin for prediction error, at the
        speed the table was measured at (an absolute budget on a machine that runs ``speed_factor`` times slower
        now buys that much less table time; a share of the dense latency is the same share at any speed)."""
        return self.budget_ms / (1.0 + self.margin) / self.speed_factor

    def policy(self, keep: dict[str, float], formats: dict[str, str]) -> Policy:
        """A policy of these keep ratios and formats; a format the table marks unsupported at the layer's
        pruned shape falls back to fp32 (:meth:`Predictor.runnable`)."""
        pol = Policy(dict(keep), {k: v for k, v in formats.items() if v != "fp32"}, self.spec.channel_multiple,
                     self.spec.model)
        return self.predictor.runnable(pol)

    def price_ms(self, policy: Policy) -> float:
        return self.predictor.price(policy).latency_ms

    def _fastest(self, layer: str) -> str:
        def cost(fmt: str) -> float:
            return self.price_ms(self.policy({}, {layer: fmt}))
        return min(self.menus[layer], key=cost)

    def repair(self, policy: Policy) -> tuple[Policy, int]:
        """Lower keep ratios (greedy by predicted saving), then formats, until the budget is met."""
        keep = {g.name: policy.keep.get(g.name, 1.0) for g in self.layers.space.groups}
        formats = dict(policy.formats)
        steps = 0
        current = self.price_ms(self.policy(keep, formats))
        while current > self.limit_ms:
            best: tuple[float, str, float] | None = None
            for g, r in sorted(keep.items()):
                lower = [v for v in self.grid if v < r]
                if not lower:
                    continue
                trial = {**keep, g: max(lower)}
                saving = current - self.price_ms(self.policy(trial, formats))
                if best is None or saving > best[0]:
                    best = (saving, g, max(lower))
            if best is not None and best[0] <= 0:  # rounding to the channel multiple: no saving yet
                g = max(sorted(keep), key=lambda n: keep[n])
                best = (0.0, g, max(v for v in self.grid if v < keep[g]))
            if best is not None:
                keep[best[1]] = best[2]
            else:
                changed = False
                for layer in sorted(self.menus):
                    fast = self._fastest(layer)
                    if formats.get(layer, "fp32") != fast:
                        formats[layer] = fast
                        changed = True
                        break
                if not changed:
                    raise HwpruneError(f"cannot repair a policy to {self.limit_ms:.4f} ms")  # guarded earlier
            steps += 1
            current = self.price_ms(self.policy(keep, formats))
        return self.policy(keep, formats), steps

    def smallest(self) -> Policy:
        """Every group at the lowest keep ratio and every layer in its fastest format."""
        low = {g.name: min(self.grid) for g in self.layers.space.groups}
        return self.policy(low, {layer: self._fastest(layer) for layer in self.menus})

    def uniform_seeds(self) -> list[tuple[str, Policy]]:
        """The uniform policies that just meet the budget: fp32, and each low-precision format offered to all."""
        seeds = []
        fmts = sorted({f for menu in self.menus.values() for f in menu if f != "fp32"})
        for fmt in ["fp32"] + fmts:
            formats = {layer: fmt for layer, menu in self.menus.items() if fmt in menu}
            for r in sorted(self.grid, reverse=True):
                pol = self.policy({g.name: r for g in self.layers.space.groups}, formats)
                if self.price_ms(pol) <= self.limit_ms:
                    seeds.append((f"uniform-{r:g}" + ("" if fmt == "fp32" else f"-{fmt}"), pol))
                    break
        return seeds


def _floor_measured(predictor: Predictor, smallest: Policy) -> str:
    """What profiling measured for the smallest policy, as a share of the dense model measured in the same
    rounds: this very policy when it was a calibration run, else the smallest policy profiling chose (every group
    at the lowest ratio, formats by the raw layer sum); '' when neither was measured."""
    from hwprune.latency.speed import smallest_reference
    from hwprune.latency.table import calibration_key

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


def _speed_now(model: torch.nn.Module, setup: Setup, table: Any, key: str, target: Any, batch: int,
               exclude: list[str]) -> Any:
    """The speed curve (:mod:`hwprune.latency.speed`): the dense model and the smallest policy timed now in the
    same rounds, against the table's measurements of both (None without a stored reference)."""
    from hwprune.latency.profiler import timing_batch
    from hwprune.latency.speed import measure_with_anchors, model_reference

    ref = model_reference(table, key)
    if not ref:
        return None
    x = timing_batch(setup.example, batch, setup.timing_pool())
    with target.settings():  # the table's threads while timing; the search's own afterwards
        return measure_with_anchors({}, table, key, model, setup.example, x, target, exclude,
                                    int(ref.get("rounds", 10)))[1]


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

    structure = copy.deepcopy(setup.model)  # the analysis splits RNN stacks in place; training and the cache
    layers = analyze_layers(structure, setup.example, spec.exclude, spec.channel_multiple)  # keep the user's keys
    check_prunable(layers.space)
    key = model_key(spec.model, setup.model_args, setup.input_shape, spec.exclude, spec.channel_multiple)
    job = ProfileJob(structure, setup.example, layers, key, tuple(setup.input_shape), list(spec.exclude),
                     inputs=setup.timing_pool())
    table = resolve_table(target, batch, layers, key, tables=spec.tables, table=spec.table,
                          allow_foreign=spec.allow_foreign_table, profile=job if spec.profile else None, log=log)
    predictor = Predictor(table, layers, key)
    if not predictor.calibrated:
        raise HwpruneError(f"table {str(table.path)!r} has no calibration for {key}; run 'hwprune profile "
                           f"--target {spec.target} --model {spec.model} --input-shape "
                           f"{','.join(map(str, setup.input_shape))} --batch-size {batch}' first")
    grid = tuple(table.models[key]["grid"])
    menus = predictor.menus(target)
    dense_ms = predictor.price(Policy(channel_multiple=spec.channel_multiple)).latency_ms
    budget_ms = parse_budget(spec.budget, dense_ms)
    margin = predictor.margin(MARGIN_QUANTILE) if spec.budget_margin is None else spec.budget_margin
    ctx = SearchContext(spec, setup, layers, predictor, grid, menus, budget_ms, dense_ms, float("nan"), margin=margin)
    speed = _speed_now(structure, setup, table, key, target, batch, spec.exclude) if target.is_local() else None
    if speed is not None:
        relative = str(spec.budget).strip().endswith("%")
        ctx.notes.append(speed.line() + ("; the budget is a share of the dense latency, which scales alike, so the "
                                         "search is unchanged" if relative else ""))
        # an absolute budget: the factor where the search's candidates are (at the limit), from the curve
        ctx.speed_factor = 1.0 if relative else speed.factor_at(1e3 * budget_ms / (1.0 + margin))
    floor = ctx.price_ms(ctx.smallest())
    if floor > ctx.limit_ms:
        kept = "" if margin == 0 else (f" ({budget_ms:.4f} ms less the {margin:.1%} margin for prediction error; "
                                       f"--budget-margin 0 prices up to the budget itself)")
        raise HwpruneError(f"budget {ctx.limit_ms:.4f} ms{kept} cannot be met: the smallest policy the grid allows "
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
    ctx.batches = few_batches(setup.data.train)
    torch.manual_seed(spec.seed)
    return ctx
