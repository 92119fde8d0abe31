"""Profile a model on this device: every reachable layer configuration, then end-to-end calibration.

Incremental (only configurations missing from the table are measured) and
interrupt-safe (the table is saved atomically every few seconds and on Ctrl-C,
so a later run picks up where this one stopped).
"""
from __future__ import annotations

import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hwprune.latency.layers import CastConfig, LayerConfig, ModelLayers
from hwprune.latency.table import Entry, LatencyTable, calibration_key
from hwprune.latency.targets import Target
from hwprune.latency.timing import Timing
from hwprune.policy import Policy

__all__ = ["DEFAULT_GRID", "layer_configs", "measure_config", "measure_model", "random_policy", "timing_batch",
           "calibration_policies", "profile_layers", "calibrate", "build_block"]

DEFAULT_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def layer_configs(layers: ModelLayers, grid: tuple[float, ...], target: Target,
                  batch: int, log: Callable[[str], None] | None = None,
                  fused: bool = True) -> list[LayerConfig | CastConfig]:
    """Every distinct configuration the model's layers can take on the keep-ratio grid, in every offered format,
    then the dtype casts precision regions can need: at any layer's input, and at the output of the layers
    that feed the model output, between fp32 and every region dtype offered (and between those dtypes).
    ``fused``: each layer with its epilogue (see :meth:`LatencyTable.fused`)."""
    from hwprune.kernels import DTYPES

    full = {g.name: g.units for g in layers.space.groups}
    out: dict[str, LayerConfig | CastConfig] = {}
    ins: set[int] = set()
    outs: set[int] = set()
    low: set[str] = set()
    feeds_output = set(layers.sources.output) if layers.sources is not None else set()
    for form in layers.layers:
        offered = target.offered_formats(form.base.op)
        low.update(f for f in offered if f in DTYPES)
        dims_list = reachable_dims(layers, form, grid)
        involved, options = _unit_options(layers, form, grid)
        combos = math.prod(len(o) for o in options)
        if log and combos > COMBINATIONS_LIMIT:
            log(f"layer {form.name!r} depends on {len(involved)} groups ({combos:,} unit combinations): profiled "
                f"at its {len(dims_list)} reachable (inputs, outputs) pairs")
        for dims in dims_list:
            for fmt in offered:
                cfg = form.at(dims, batch, fmt, fused)
                out.setdefault(cfg.key, cfg)
            dense = form.at(dims, 1, "fp32")
            ins.add(dense.in_elems())
            if form.name in feeds_output:
                outs.add(dense.out_elems())
    if layers.sources is not None and low:
        names = ["fp32"] + sorted(low)
        for a, b in itertools.permutations(names, 2):
            for n in sorted(ins):
                c = CastConfig(a, b, n, batch)
                out.setdefault(c.key, c)
        for a in sorted(low):
            for n in sorted(outs):
                c = CastConfig(a, "fp32", n, batch)
                out.setdefault(c.key, c)
    return list(out.values())


COMBINATIONS_LIMIT = 4096  # above this many unit combinations, a layer's dims are enumerated dim by dim


def _dim_values(layers: ModelLayers, form: Any, dim: str, grid: tuple[float, ...]) -> set[int]:
    """Every value ``dim`` of ``form`` takes on the grid: the constant plus every reachable sum of
    ``factor * units`` over its groups (a set that grows with the range of the sum, not with the product)."""
    sums = {form.consts[dim]}
    for g, f in form.terms[dim].items():
        sums = {s + f * u for s in sums for u in layers.unit_options(g, list(grid))}
    return sums


def _unit_options(layers: ModelLayers, form: Any, grid: tuple[float, ...]) -> tuple[list[str], list[list[int]]]:
    """The groups a layer's dims depend on, and each one's unit options on the grid."""
    involved = sorted({g for terms in form.terms.values() for g in terms})
    return involved, [layers.unit_options(g, list(grid)) for g in involved]


def reachable_dims(layers: ModelLayers, form: Any, grid: tuple[float, ...]) -> list[tuple[int, int, int]]:
    """The (cin, cout, groups) a layer takes over the grid's unit combinations.

    Few combinations: exactly those. A layer fed by many groups (a concatenation of k branches has
    ``options ** k`` combinations, DenseNet-style blocks never finish) only depends on the sums, so its dims
    are enumerated one by one as reachable sums and combined: a bounded superset of what the search reaches.
    """
    full = {g.name: g.units for g in layers.space.groups}
    involved, options = _unit_options(layers, form, grid)
    depthwise = form.base.groups > 1
    if math.prod(len(o) for o in options) <= COMBINATIONS_LIMIT:
        seen: dict[tuple[int, int, int], None] = {}
        for combo in itertools.product(*options):
            units = {**full, **dict(zip(involved, combo))}
            seen.setdefault((form.dim("cin", units), form.dim("cout", units),
                             form.dim("groups", units) if depthwise else 1))
        return list(seen)
    groups = _dim_values(layers, form, "groups", grid) if depthwise else {1}
    return [(ci, co, gr) for ci in sorted(_dim_values(layers, form, "cin", grid))
            for co in sorted(_dim_values(layers, form, "cout", grid)) for gr in sorted(groups)
            if not depthwise or (ci % gr == 0 and co % gr == 0)]


def build_block(cfg: LayerConfig | CastConfig, target: Target) -> tuple[nn.Module, torch.Tensor]:
    """The module a table entry times, on the target's device, and its input: the layer in its format's real
    kernel (a precision-region layer takes its input already in its dtype and leaves its output in it: the
    casts are entries of their own), followed by its epilogue when it has one (a fused block: BatchNorm,
    activation, pooling, a residual sum, run in the dtype the layer leaves its output in)."""
    from hwprune.kernels import RegionLayer

    mod, x = cfg.build(target.device)
    mod = target.realize(mod, cfg.fmt)
    dtype = torch.float32
    if isinstance(mod, RegionLayer):
        x = x.to(mod.dtype)
        dtype = mod.out_dtype or mod.dtype
    post = cfg.epilogue() if isinstance(cfg, LayerConfig) else None
    if post is not None:
        mod = nn.Sequential(mod, post.to(target.device, dtype))
        if "add" in cfg.post:  # the residual operand is made on the first call: before any timing or capture
            with torch.no_grad():
                mod(x)
    return mod, x


SPENT = {"build": 0.0, "prepare": 0.0, "time": 0.0}  # seconds per phase of measure_config, for profile's report


def measure_config(cfg: LayerConfig | CastConfig, target: Target, repeats: int) -> Entry:
    """Time one table entry (:func:`build_block`) in isolation, as the target's runtime runs it."""
    t0 = time.perf_counter()
    mod, x = build_block(cfg, target)
    t1 = time.perf_counter()
    run = target.prepare(mod, x)
    t2 = time.perf_counter()
    t = target.time(lambda: run(x), repeats)
    SPENT["build"] += t1 - t0
    SPENT["prepare"] += t2 - t1
    SPENT["time"] += time.perf_counter() - t2
    return Entry(t.median_us, t.iqr_us, t.repeats, t.inner)


def try_measure(cfg: LayerConfig | CastConfig, target: Target, repeats: int) -> Entry | str:
    """:func:`measure_config`, or why the configuration cannot run: a shape rule of the target's kernel, or the
    kernel's own error (a shape it rejects, a silent fallback to another format) in one line."""
    from hwprune.errors import HwpruneError, is_oom, one_line

    why = target.unsupported(cfg)
    if why:
        return why
    try:
        return measure_config(cfg, target, repeats)
    except Exception as exc:  # noqa: BLE001 - any kernel failure marks the configuration, never a traceback
        if is_oom(exc):
            raise
        if getattr(target, "runtime", "eager") == "cudagraph" and "capture" in str(exc).lower():
            # a failed CUDA graph capture poisons every later one: stop, mark nothing
            raise HwpruneError(f"CUDA graph capture of {cfg.key!r} failed ({one_line(exc, 150)}); the CUDA "
                               f"context is unusable after that, so profiling stops here (the table keeps what "
                               f"was measured)") from None
        return one_line(exc, 200)


def timing_batch(example: torch.Tensor, n: int, pool: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` inputs to time a model on: drawn (seeded, with replacement) from ``pool`` (real inputs from the
    data) when given, else from ``example``'s rows when the inputs are integers (token ids: ``randn`` would not
    be a valid input), else standard normal."""
    g = torch.Generator().manual_seed(seed)
    src = pool if pool is not None and len(pool) else (example if not example.is_floating_point() else None)
    if src is None:
        return torch.randn(n, *example.shape[1:], generator=g)
    return src[torch.randint(len(src), (n,), generator=g)]


def measure_model(model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, target: Target, repeats: int,
                  as_runtime: bool = True) -> Timing:
    """End-to-end time of a (deployed) model on ``x``, run as the target's runtime runs it (``as_runtime``
    False: the module as given, e.g. an already compiled or TorchScript artifact)."""
    if isinstance(model, nn.Module):
        model = model.eval().to(target.device)
    x = x.to(target.device)
    run = target.prepare(model, x) if as_runtime else model
    return target.time(lambda: run(x), repeats)


def random_policy(layers: ModelLayers, grid: tuple[float, ...], menus: dict[str, list[str]], rng: random.Random,
                  p_lowp: float = 0.5) -> Policy:
    """Random keep ratio per group from the grid; per layer fp32 or (with ``p_lowp``) a menu format."""
    keep = {g.name: rng.choice(grid) for g in layers.space.groups}
    formats = {}
    for name, menu in menus.items():
        low = [f for f in menu if f != "fp32"]
        if low and rng.random() < p_lowp:
            formats[name] = rng.choice(low)
    return Policy(keep, formats, layers.channel_multiple)


def calibration_policies(layers: ModelLayers, grid: tuple[float, ...], menus: dict[str, list[str]], n: int,
                         seed: int = 1234, fix: Callable[[Policy], Policy] | None = None) -> list[Policy]:
    """Dense, three uniform points of the grid, then random policies: ``n`` that differ in what they build.

    Policies count as the same when they keep the same units in the same formats; a small space
    (one group, few formats) yields fewer than ``n``. ``fix`` (e.g. :meth:`Predictor.runnable`) turns a
    policy into one whose every layer has a kernel, before it is counted.
    """
    m = layers.channel_multiple
    ratios = sorted(grid)
    uniform = [ratios[0], ratios[len(ratios) // 3], ratios[2 * len(ratios) // 3]]
    keep = lambda r: {g.name: r for g in layers.space.groups}  # noqa: E731
    fixed = [Policy({}, {}, m)] + [Policy(keep(r), {}, m) for r in uniform]
    # each low-precision format on every layer that offers it, small and dense: the corners a search under a
    # tight budget goes to (random policies mix formats and rarely reach them; a fit without them extrapolates)
    for fmt in sorted({f for menu in menus.values() for f in menu if f != "fp32"}):
        on = {name: fmt for name, menu in menus.items() if fmt in menu}
        fixed += [Policy(keep(ratios[0]), on, m), Policy({}, on, m)]
    rng = random.Random(seed)
    out: dict[str, Policy] = {}
    for pol in itertools.chain(fixed, (random_policy(layers, grid, menus, rng) for _ in range(50 * n))):
        pol = fix(pol) if fix else pol
        what = json.dumps([pol.units(layers.space), pol.formats], sort_keys=True)
        out.setdefault(what, pol)
        if len(out) == n:
            break
    return list(out.values())


@dataclass
class _Saver:
    table: LatencyTable
    every_s: float = 5.0
    last: float = 0.0

    def maybe(self, force: bool = False) -> None:
        if force or time.time() - self.last > self.every_s:
            self.table.save()
            self.last = time.time()


def profile_layers(table: LatencyTable, configs: list[LayerConfig | CastConfig], target: Target, repeats: int,
                   log: Callable[[str], None]) -> int:
    """Measure every configuration missing from ``table``; returns how many were measured."""
    from tqdm import tqdm

    todo = [c for c in configs if c.key not in table.entries and c.key not in table.unsupported]
    log(f"{len(configs)} layer configurations; {len(configs) - len(todo)} already in the table; measuring {len(todo)}")
    saver = _Saver(table)
    t0, rejected = time.time(), 0
    spent0 = dict(SPENT)
    try:
        for cfg in tqdm(todo, desc="profiling layers", unit="cfg", file=sys.stderr, disable=None):
            got = try_measure(cfg, target, repeats)
            if isinstance(got, Entry):
                table.entries[cfg.key] = got
            else:
                table.unsupported[cfg.key] = got
                rejected += 1
            saver.maybe()
    finally:
        saver.maybe(force=True)
    if todo:
        wall = max(time.time() - t0, 1e-9)
        parts = {k: SPENT[k] - spent0[k] for k in SPENT}
        split = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
        log(f"measured {len(todo) - rejected} configurations in {wall:.1f} s ({len(todo) / wall:.1f}/s; {split}, "
            f"other {max(0.0, wall - sum(parts.values())):.1f} s); {rejected} unsupported by their kernel")
    return len(todo)


def calibrate(table: LatencyTable, key: str, model: nn.Module, example: torch.Tensor,
              policies: list[Policy], target: Target, repeats: int, exclude: list[str],
              log: Callable[[str], None], extra: dict[str, Any], inputs: torch.Tensor | None = None) -> int:
    """Measure end to end the calibration policies not yet measured for ``key``; returns how many."""
    from tqdm import tqdm

    from hwprune.apply import apply_policy
    from hwprune.apply.formats import deploy

    entry = table.models.setdefault(key, {})
    entry.update(extra)
    samples = entry.setdefault("calibration", [])
    done = {calibration_key(s["policy"]) for s in samples}
    todo = [p for p in policies if calibration_key(p.to_dict()) not in done]
    log(f"end-to-end calibration: {len(policies)} policies, measuring {len(todo)}")
    x = timing_batch(example, table.batch_size, inputs)
    saver = _Saver(table)
    try:
        for pol in tqdm(todo, desc="calibrating", unit="model", file=sys.stderr, disable=None):
            pruned, _ = deploy(apply_policy(model, pol, example, exclude=exclude), target, example)
            t = measure_model(pruned, x, target, repeats)
            samples.append({"policy": pol.to_dict(), "measured_us": round(t.median_us, 3),
                            "iqr_us": round(t.iqr_us, 3)})
            saver.maybe()
    finally:
        saver.maybe(force=True)
    return len(todo)


