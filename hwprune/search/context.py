"""Everything a trial needs, prepared once: the dense model and data, the predictor, the budget.

Candidates are *repaired* before any fine-tuning: while the predicted latency
exceeds the budget, the group whose next-lower keep ratio saves the most
predicted time steps down one notch of the grid (then layers move to their
fastest offered format). Repair is deterministic, so every fine-tuned
candidate meets the budget and no fine-tune is spent on an infeasible one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from hwprune.errors import HwpruneError
from hwprune.latency import Predictor, analyze_layers, find_table, get_target, model_key
from hwprune.latency.layers import ModelLayers
from hwprune.policy import Policy
from hwprune.search.budget import parse_budget
from hwprune.search.spec import SearchSpec
from hwprune.setup import Setup, resolve

__all__ = ["SearchContext", "prepare_context", "dense_setup"]


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
    dense_val_accuracy: float
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # for data-driven importance
    notes: list[str] = field(default_factory=list)

    def policy(self, keep: dict[str, float], formats: dict[str, str]) -> Policy:
        return Policy(dict(keep), {k: v for k, v in formats.items() if v != "fp32"}, self.spec.channel_multiple,
                      self.spec.model)

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
        while current > self.budget_ms:
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
                    raise HwpruneError(f"cannot repair a policy to {self.budget_ms:.4f} ms")  # guarded earlier
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
                if self.price_ms(pol) <= self.budget_ms:
                    seeds.append((f"uniform-{r:g}" + ("" if fmt == "fp32" else f"-{fmt}"), pol))
                    break
        return seeds


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dense_setup(spec: SearchSpec, log: Callable[[str], None] = _log) -> Setup:
    """The spec's dense model with its trained weights (trained and cached first if there are none) and data."""
    from hwprune.train import DEFAULT_EPOCHS, TrainConfig, train_and_cache

    setup = resolve(spec.model, spec.data, None, spec.model_args, spec.weights, spec.seed)
    assert setup.data is not None
    if setup.weights == "random init":
        epochs = DEFAULT_EPOCHS.get(spec.model, 20)
        log(f"hwprune: no trained {spec.model} for {spec.data} (seed {spec.seed}); training it first ({epochs} epochs)")
        summary = train_and_cache(setup.model, setup.data, spec.model, spec.data, spec.seed, setup.model_args,
                                  TrainConfig(epochs=epochs, seed=spec.seed))
        setup.weights = summary["weights"]
    return setup


def prepare_context(spec: SearchSpec, log: Callable[[str], None] = _log) -> SearchContext:
    """Resolve model and data, train the base model if needed, load the table, parse the budget.

    ``spec`` must be validated already (:func:`hwprune.search.run_search` does it).
    """
    from hwprune.models import default_latency_batch
    from hwprune.train import evaluate, few_batches

    target = get_target(spec.target, threads=spec.threads)
    setup = dense_setup(spec, log)
    assert setup.data is not None
    batch = spec.batch_size or default_latency_batch(spec.model)
    layers = analyze_layers(setup.model, setup.example, spec.exclude, spec.channel_multiple)
    table = find_table(spec.tables, target, batch, spec.table, spec.allow_foreign_table)
    key = model_key(spec.model, setup.model_args, setup.input_shape, spec.exclude, spec.channel_multiple)
    predictor = Predictor(table, layers, key)
    if not predictor.calibrated:
        raise HwpruneError(f"table {str(table.path)!r} has no calibration for {key}; run 'hwprune profile "
                           f"--target {spec.target} --model {spec.model} --input-shape "
                           f"{','.join(map(str, setup.input_shape))} --batch-size {batch}' first")
    grid = tuple(table.models[key]["grid"])
    menus = predictor.menus(target)
    dense_ms = predictor.price(Policy(channel_multiple=spec.channel_multiple)).latency_ms
    budget_ms = parse_budget(spec.budget, dense_ms)
    ctx = SearchContext(spec, setup, layers, predictor, grid, menus, budget_ms, dense_ms,
                        evaluate(setup.model, setup.data.val), few_batches(setup.data.train))
    floor = ctx.price_ms(ctx.smallest())
    if floor > budget_ms:
        raise HwpruneError(f"budget {budget_ms:.4f} ms cannot be met: the smallest policy the grid allows is "
                           f"predicted at {floor:.4f} ms on {spec.target} (batch {batch})")
    if dense_ms <= budget_ms:
        ctx.notes.append(f"the dense model ({dense_ms:.4f} ms) already meets the budget; searching the "
                         f"accuracy/latency front anyway")
    torch.manual_seed(spec.seed)
    return ctx
