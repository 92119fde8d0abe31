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

from hwprune import inputs
from hwprune.latency.layers import FP32_ONLY_OPS, CastConfig, LayerConfig, ModelLayers
from hwprune.latency.rounds import RoundPlan, RoundResult, measure_in_rounds
from hwprune.latency.table import Entry, LatencyTable, calibration_key
from hwprune.device.targets import Target
from hwprune.device.timing import Timing
from hwprune.policy import Policy

__all__ = ["DEFAULT_GRID", "layer_configs", "measure_config", "measure_model", "random_policy", "timing_batch",
           "calibration_policies", "profile_layers", "calibrate", "build_block", "Failure", "try_prepare",
           "try_measure", "measure_rounds", "model_sampler", "round_plan", "REFERENCE", "deployed_for_timing"]

DEFAULT_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def layer_configs(layers: ModelLayers, grid: tuple[float, ...], target: Target,
                  batch: int, log: Callable[[str], None] | None = None,
                  fused: bool = True) -> list[LayerConfig | CastConfig]:
    """Every distinct configuration the model's layers can take on the keep-ratio grid, in every offered format,
    then the dtype casts precision regions can need: at any layer's input, and at the output of the layers
    that feed the model output, between fp32 and every region dtype offered (and between those dtypes).
    ``fused``: each layer with its epilogue (see :meth:`LatencyTable.fused`)."""
    from hwprune.device.kernels import DTYPES

    full = {g.name: g.units for g in layers.space.groups}
    out: dict[str, LayerConfig | CastConfig] = {}
    ins: set[int] = set()
    outs: set[int] = set()
    low: set[str] = set()
    feeds_output = set(layers.sources.output) if layers.sources is not None else set()
    for form in layers.layers:
        offered = target.offered_formats(form.base.op) if form.base.op not in FP32_ONLY_OPS else ("fp32",)
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
    from hwprune.device.kernels import RegionLayer

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


SPENT = {"build": 0.0, "prepare": 0.0, "time": 0.0}  # seconds per phase of profiling, for profile's report
REFERENCE = "__reference__"  # the speed reference's key in a round: the dense model at the table's batch
ROUND_BYTES = 1 << 30  # prepared items held at once for interleaving (inputs, weights); more go in another chunk
# without a terminal, a profile says how far it is at most this often (seconds)
PROGRESS_LINE_S = 30.0
# a chunk's first rounds last about this long (HWPRUNE_ROUND_SECONDS overrides): it is saved when done, so an
# interrupted profile loses at most one chunk; longer chunks interleave more items
ROUND_SECONDS = 20.0


@dataclass(frozen=True)
class Failure:
    """Why a configuration could not be timed; ``permanent`` only for the kernel's own refusal of the shape (a
    known shape rule, or the same error twice), never for what may pass on a retry (memory, the OS, time-outs)."""

    why: str
    permanent: bool


_TRANSIENT_WORDS = ("out of memory", "resource temporarily", "timed out", "timeout", "interrupted", "try again",
                    "busy", "cannot allocate", "too many open files")


def is_transient(exc: BaseException) -> bool:
    """Whether a timing failure may pass on a retry: the OS, memory, time-outs (never stored as unsupported)."""
    if isinstance(exc, (OSError, MemoryError, TimeoutError, ConnectionError)):
        return True
    text = str(exc).lower()
    return any(w in text for w in _TRANSIENT_WORDS)


def _nbytes(mod: nn.Module, x: torch.Tensor) -> int:
    held = sum(t.numel() * t.element_size() for t in itertools.chain(mod.parameters(), mod.buffers()))
    return held + 2 * x.numel() * x.element_size()  # the input, and about as much for the output


def _round_seconds() -> float:
    import os

    from hwprune.errors import HwpruneError

    raw = os.environ.get("HWPRUNE_ROUND_SECONDS", "")
    try:
        value = float(raw) if raw else ROUND_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        raise HwpruneError(f"HWPRUNE_ROUND_SECONDS={raw!r} is not a positive number of seconds")
    return value


def prepare_config(cfg: LayerConfig | CastConfig, target: Target) -> tuple[Callable[[], float], int]:
    """One table entry (:func:`build_block`) as the target's runtime runs it, warmed up: its sampler (one timing
    sample per call) and the bytes it holds."""
    t0 = time.perf_counter()
    mod, x = build_block(cfg, target)
    t1 = time.perf_counter()
    run = target.prepare(mod, x)
    sample = target.sampler(lambda: run(x))
    SPENT["build"] += t1 - t0
    SPENT["prepare"] += time.perf_counter() - t1
    return sample, _nbytes(mod, x)


def try_prepare(cfg: LayerConfig | CastConfig, target: Target) -> tuple[Callable[[], float], int] | Failure:
    """:func:`prepare_config`, or why the configuration cannot run. A failure is tried once more: it is permanent
    (stored as unsupported) when the target's shape rule refuses it, or when the kernel raised the same kind of
    error twice and it is not one that may pass later (:func:`is_transient`)."""
    from hwprune.errors import HwpruneError, is_oom, one_line

    why = target.unsupported(cfg)
    if why:
        return Failure(why, True)
    errors: list[Exception] = []
    for _ in range(2):
        try:
            return prepare_config(cfg, target)
        except Exception as exc:  # noqa: BLE001 - any kernel failure marks the configuration, never a traceback
            if is_oom(exc):
                raise
            if getattr(target, "runtime", "eager") == "cudagraph" and "capture" in str(exc).lower():
                # a failed CUDA graph capture poisons every later one: stop, mark nothing
                raise HwpruneError(f"CUDA graph capture of {cfg.key!r} failed ({one_line(exc, 150)}); the CUDA "
                                   f"context is unusable after that, so profiling stops here (the table keeps what "
                                   f"was measured)") from None
            errors.append(exc)
    first, last = errors  # the same kind of error twice (messages may hold addresses): the kernel refuses it
    return Failure(one_line(last, 200), type(first) is type(last) and not any(is_transient(e) for e in errors))


def measure_config(cfg: LayerConfig | CastConfig, target: Target, repeats: int) -> Entry:
    """Time one table entry on its own (``repeats`` rounds back to back); profiling interleaves many instead."""
    return _entry(prepare_config(cfg, target)[0], repeats)


def try_measure(cfg: LayerConfig | CastConfig, target: Target, repeats: int) -> Entry | Failure:
    """:func:`measure_config`, or the :class:`Failure` of :func:`try_prepare`."""
    got = try_prepare(cfg, target)
    return got if isinstance(got, Failure) else _entry(got[0], repeats)


def _entry(sample: Callable[[], float], repeats: int) -> Entry:
    t0 = time.perf_counter()
    t = measure_in_rounds({0: sample}, RoundPlan(rounds=repeats, extra_rounds=0)).timing(0)
    SPENT["time"] += time.perf_counter() - t0
    return Entry(t.median_us, t.iqr_us, t.repeats, t.inner)


def round_plan(repeats: int, seed: int = 0) -> RoundPlan:
    """The rounds of a measurement asked for with ``--repeats``: that many rounds, and half as many again for the
    items whose spread is above 10% after them (at most 15 samples an item at the default 10, as many as the
    sequential timing before rounds took at most)."""
    return RoundPlan(rounds=repeats, extra_rounds=max(1, repeats // 2), noisy_pct=10.0, seed=seed)


def measure_rounds(prepare: dict[Any, Callable[[], Callable[[], float]]], target: Target, plan: RoundPlan,
                   reference: Callable[[], Callable[[], float]] | None = None) -> RoundResult:
    """Prepare every item (a thunk returning its sampler) and time them in interleaved rounds
    (:func:`~hwprune.latency.rounds.measure_in_rounds`), with the ``reference`` (key :data:`REFERENCE`) in every
    round. A runtime that cannot hold several prepared items (:attr:`Target.interleaved`) times them one at a
    time, each with its rounds back to back, the reference last."""
    items = dict(prepare)
    if reference is not None:
        items[REFERENCE] = reference
    if target.interleaved:
        samplers = {k: make() for k, make in items.items()}
        t0 = time.perf_counter()
        res = measure_in_rounds(samplers, plan, always=[REFERENCE] if reference is not None else [])
        SPENT["time"] += time.perf_counter() - t0
        return res
    out = RoundResult({})
    for k, make in items.items():
        one = measure_in_rounds({k: make()}, plan)
        out.samples.update(one.samples)
        out.inner.update(one.inner)
        out.remeasured += one.remeasured
        out.noisy += one.noisy
    return out


def timing_batch(example: Any, n: int, pool: Any = None, seed: int = 0) -> Any:
    """``n`` inputs to time a model on (see :func:`hwprune.inputs.draw`): real rows from ``pool`` when given,
    else the example's rows when any input is not floating point, else standard normal."""
    return inputs.draw(example, n, pool, seed)


def measure_model(model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, target: Target, repeats: int,
                  as_runtime: bool = True) -> Timing:
    """End-to-end time of a (deployed) model on ``x`` on its own (``repeats`` rounds back to back), run as the
    target's runtime runs it (``as_runtime`` False: the module as given, e.g. an already compiled or TorchScript
    artifact). Comparisons between models use :func:`measure_rounds` with :func:`model_sampler` instead."""
    sample = model_sampler(model, x, target, as_runtime)()
    return measure_in_rounds({0: sample}, RoundPlan(rounds=repeats, extra_rounds=0)).timing(0)


def model_sampler(model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, target: Target,
                  as_runtime: bool = True) -> Callable[[], Callable[[], float]]:
    """A thunk that prepares ``model`` on ``x`` as the target's runtime runs it and returns its sampler (for
    :func:`measure_rounds`)."""
    def make() -> Callable[[], float]:
        m = model.eval().to(target.device) if isinstance(model, nn.Module) else model
        xx = inputs.to_device(x, target.device)
        run = target.prepare(m, xx) if as_runtime else m
        return target.sampler(lambda: inputs.call(run, xx))
    return make


def deployed_for_timing(model: nn.Module, policy: Policy, example: torch.Tensor, target: Target, exclude: list[str],
                        regions_priced: bool) -> tuple[nn.Module, str]:
    """``policy`` applied to ``model`` and deployed on the target's kernels, and what keeps it from being the
    model the table prices ('' when nothing): a layer left simulated (no real kernel), or precision regions that
    fell back to islands where the table prices regions (``regions_priced``). Such a run is never fitted and
    never counted as a validation of the predictor."""
    from hwprune.apply import apply_policy
    from hwprune.device.deploy import deploy

    deployed, rep = deploy(apply_policy(model, policy, example, exclude=exclude), target, example)
    if rep.simulated:
        sim = ", ".join(f"{k}:{v}" for k, v in sorted(rep.simulated.items()))
        return deployed, f"layers left simulated, without a real kernel ({sim})"
    if regions_priced and rep.regions.startswith("islands"):
        return deployed, f"precision regions fell back to {rep.regions}"
    return deployed, ""


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
                         seed: int = 1234, fix: Callable[[Policy], Policy] | None = None,
                         smallest: Policy | None = None) -> list[Policy]:
    """Dense, three uniform points of the grid, then random policies: ``n`` that differ in what they build.

    Policies count as the same when they keep the same units in the same formats; a small space
    (one group, few formats) yields fewer than ``n``. ``smallest`` (the floor of a budget) comes right after
    the dense policy. ``fix`` (e.g. :meth:`Predictor.runnable`) turns a
    policy into one whose every layer has a kernel, before it is counted.
    """
    m = layers.channel_multiple
    ratios = sorted(grid)
    uniform = [ratios[0], ratios[len(ratios) // 3], ratios[2 * len(ratios) // 3]]
    keep = lambda r: {g.name: r for g in layers.space.groups}  # noqa: E731
    fixed = [Policy({}, {}, m)] + ([smallest] if smallest is not None else []) + [Policy(keep(r), {}, m) for r in uniform]
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
                   log: Callable[[str], None], reference: Callable[[], Callable[[], float]] | None = None,
                   plan: RoundPlan | None = None) -> dict[str, Any]:
    """Measure every configuration missing from ``table`` in interleaved rounds (:func:`measure_rounds`: all of
    them once per round, freshly shuffled), with the speed ``reference`` in every round. Items are prepared into
    a chunk until it holds :data:`ROUND_BYTES` or its rounds would last :data:`ROUND_SECONDS` (each item's
    first sample, taken and dropped while preparing, says how long it takes); each chunk is saved when its rounds
    are done, so an interrupted profile keeps the chunks it finished. Returns counts and the reference's samples."""
    from tqdm import tqdm

    todo = [c for c in configs if c.key not in table.entries and c.key not in table.unsupported]
    log(f"{len(configs)} layer configurations; {len(configs) - len(todo)} already in the table; measuring {len(todo)}")
    plan = plan or round_plan(repeats)
    saver = _Saver(table)
    t0 = time.time()
    spent0 = dict(SPENT)
    out: dict[str, Any] = {"measured": 0, "unsupported": 0, "failed": {}, "remeasured": 0, "noisy": 0,
                           "reference_us": []}
    chunk: dict[str, Callable[[], Callable[[], float]]] = {}
    held, chunk_s = 0, 0.0
    bar = tqdm(todo, desc="profiling layers", unit="cfg", file=sys.stderr, disable=None)
    said = time.time()  # not a terminal (a log file, CI): no bar, a progress line every PROGRESS_LINE_S instead

    def flush() -> None:
        nonlocal held, chunk_s
        if not chunk:
            return
        res = measure_rounds(chunk, target, plan, reference if target.interleaved else None)
        for k in chunk:
            t = res.timing(k)
            table.entries[k] = Entry(t.median_us, t.iqr_us, t.repeats, t.inner)
        out["measured"] += len(chunk)
        out["remeasured"] += len([k for k in res.remeasured if k != REFERENCE])
        out["noisy"] += len([k for k in res.noisy if k != REFERENCE])
        out["reference_us"] += res.samples.get(REFERENCE, [])
        chunk.clear()
        held, chunk_s = 0, 0.0
        saver.maybe(force=True)
        progress()

    def progress(prepared: int | None = None) -> None:
        nonlocal said
        if bar.disable and time.time() - said >= PROGRESS_LINE_S:
            said = time.time()
            log(f"hwprune: profiling: {out['measured'] + out['unsupported']} of {len(todo)} configurations done, "
                + (f"{prepared} prepared (exported, converted, compiled: the runtime's own cost), "
                   if prepared is not None else "") + f"{said - t0:.0f} s")

    try:
        for i, cfg in enumerate(bar):
            progress(i)  # preparing dominates in the ONNX runtimes: said while no chunk is measured yet
            got = try_prepare(cfg, target)
            if isinstance(got, Failure):
                if got.permanent:
                    table.unsupported[cfg.key] = got.why
                    out["unsupported"] += 1
                else:
                    out["failed"][cfg.key] = got.why
                continue
            sampler, nbytes = got
            chunk[cfg.key] = lambda s=sampler: s  # noqa: E731 - prepared already (its bytes count for the chunk)
            t1 = time.perf_counter()
            sampler()
            held, chunk_s = held + nbytes, chunk_s + (time.perf_counter() - t1) * plan.rounds
            if not target.interleaved or held > ROUND_BYTES or chunk_s > _round_seconds():
                flush()
        flush()
    finally:
        saver.maybe(force=True)
    if todo:
        wall = max(time.time() - t0, 1e-9)
        parts = {k: SPENT[k] - spent0[k] for k in SPENT}
        split = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
        log(f"measured {out['measured']} configurations in {plan.rounds} interleaved rounds in {wall:.1f} s "
            f"({len(todo) / wall:.1f}/s; {split}, other {max(0.0, wall - sum(parts.values())):.1f} s); "
            f"{out['remeasured']} re-measured (spread over {plan.noisy_pct:g}%), {out['noisy']} still noisy; "
            f"{out['unsupported']} unsupported by their kernel")
    if out["failed"]:
        k, why = next(iter(out["failed"].items()))
        log(f"hwprune: warning: {len(out['failed'])} configurations failed to time and are left unmeasured (not "
            f"marked unsupported; the next profile tries them again), e.g. {k!r}: {why}")
    return out


def reference_stats(samples: list[float]) -> dict[str, Any]:
    """A speed reference's median, IQR, spread and round count, as stored in a table."""
    from hwprune.device.timing import timing_of

    t = timing_of(samples)
    return {"kind": "dense model", "median_us": round(t.median_us, 3), "iqr_us": round(t.iqr_us, 3),
            "spread_pct": round(t.spread_pct, 2), "rounds": t.repeats}


def calibrate(table: LatencyTable, key: str, model: nn.Module, example: torch.Tensor,
              policies: list[Policy], target: Target, repeats: int, exclude: list[str],
              log: Callable[[str], None], extra: dict[str, Any], inputs: torch.Tensor | None = None,
              regions_priced: bool = True) -> int:
    """Measure end to end, in interleaved rounds with the dense model as the speed reference, the calibration
    policies not yet measured for ``key``; returns how many. A policy whose deployed model is not what the table
    prices (:func:`deployed_for_timing`) is left out, with a line saying why. The model's ``reference`` (the dense
    model's median, spread and rounds) is set by the first calibration; every run stores the reference measured in
    its own rounds (``reference_us``)."""
    entry = table.models.setdefault(key, {})
    if entry.get("calibration") and not entry.get("reference"):
        # runs of a table profiled before speed references (timed one after another, in another session): they
        # cannot be put on this session's speed scale, so all of them are measured again here
        log(f"hwprune: the table's {len(entry['calibration'])} calibration runs for this model have no speed "
            f"reference (an older table): measuring them again, with it")
        entry["calibration"] = []
    entry.update(extra)
    samples = entry.setdefault("calibration", [])
    done = {calibration_key(s["policy"]) for s in samples}
    todo = [p for p in policies if calibration_key(p.to_dict()) not in done]
    log(f"end-to-end calibration: {len(policies)} policies, measuring {len(todo)} in interleaved rounds")
    if not todo:
        return 0
    x = timing_batch(example, table.batch_size, inputs)
    prepared: dict[int, Callable[[], Callable[[], float]]] = {}
    for i, pol in enumerate(todo):
        deployed, problem = deployed_for_timing(model, pol, example, target, exclude, regions_priced)
        if problem:
            log(f"hwprune: calibration policy {i} left out (not fitted): {problem}")
            continue
        prepared[i] = model_sampler(deployed, x, target)
    from hwprune._modelcopy import copy_model

    res = measure_rounds(prepared, target, round_plan(repeats), model_sampler(copy_model(model), x, target))
    ref = reference_stats(res.samples[REFERENCE])
    for i in prepared:
        t = res.timing(i)
        samples.append({"policy": todo[i].to_dict(), "measured_us": round(t.median_us, 3),
                        "iqr_us": round(t.iqr_us, 3), "reference_us": ref["median_us"]})
    entry.setdefault("reference", ref)
    if ref["spread_pct"] > NOISY_MACHINE_PCT:
        log(f"hwprune: warning: the machine is noisy: the dense model's spread over {ref['rounds']} rounds was "
            f"{ref['spread_pct']:.1f}% (IQR / median), so prices from this table are uncertain by about that much; "
            f"profile again on a quieter machine (stop other work; 'hwprune profile --tables DIR' into a new folder) "
            f"for a table you can trust to +-10%")
    table.save()
    return len(prepared)


NOISY_MACHINE_PCT = 5.0  # a reference spread (IQR / median over rounds) above this: the machine is said to be noisy
