"""The table a command prices with: found in the table folders, or measured here first.

When this machine is the target (``cpu``; ``arm`` on an ARM board or with
``--emulate``; ``cuda`` with a GPU) and no table matching its fingerprint at
the asked batch holds the model, :func:`resolve_table` profiles what is missing
(one line saying why and what it costs, then progress bars) into the user's
table folder, and the command goes on. ``profile=None`` (``--no-profile``)
restores the refusal. A target that is not this machine is priced from any
table of its kind (profiled on the device and copied here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwprune import inputs
from hwprune._modelcopy import copy_model
from hwprune.errors import HwpruneError
from hwprune.latency.layers import ModelLayers
from hwprune.latency.table import (LatencyTable, fingerprint_diff, table_dirs, table_path, user_tables_dir)
from hwprune.device.targets import Target, fingerprint_line

__all__ = ["ProfileJob", "profile_model", "resolve_table", "find_table", "missing_for", "estimate_seconds",
           "ConfigMeter"]


@dataclass
class ProfileJob:
    """What profiling a model needs: the model, an example batch, its layers and its key in the table."""

    model: nn.Module
    example: Any  # a batch of model inputs (hwprune.inputs)
    layers: ModelLayers
    key: str
    input_shape: tuple[int, ...]
    exclude: list[str] = field(default_factory=list)
    grid: tuple[float, ...] = ()
    calibration: int = 20
    repeats: int = 10  # rounds of interleaved timing (hwprune.latency.rounds)
    inputs: Any = None  # real inputs to time whole models on (default: from the example)

    def __post_init__(self) -> None:
        if not self.grid:
            from hwprune.latency.profiler import DEFAULT_GRID

            self.grid = DEFAULT_GRID


@dataclass
class ConfigMeter:
    """Measures, on this machine, the layer configurations a policy needs and the table lacks (keep ratios off the
    profiled grid), into the table, which is saved to ``dest`` (merged with the file there).

    Each call measures what is missing in interleaved rounds with the dense model as the speed reference in every
    round (:func:`~hwprune.latency.profiler.profile_layers`, the profile's own method) and puts the new entries on
    the scale of the table's profile: times ``reference at profiling / reference now`` (the table's stored
    reference of its layer rounds; :attr:`factors` keeps each call's).
    """

    table: LatencyTable
    target: Target
    key: str
    model: nn.Module  # the dense model (the speed reference)
    x: Any  # its timing batch
    dest: Path
    repeats: int = 10
    measured: int = 0  # configurations measured so far
    seconds: float = 0.0
    factors: list[float] = field(default_factory=list)  # reference at profiling / now, per call

    def missing(self, predictor: Any, policy: Any) -> list[Any]:
        """The configurations pricing ``policy`` needs that the table has neither measured nor marked unsupported."""
        out: dict[str, Any] = {}
        for c in predictor.needed(policy):
            if c.key not in self.table.entries and c.key not in self.table.unsupported:
                out.setdefault(c.key, c)
        return list(out.values())

    def measure(self, predictor: Any, policy: Any) -> int:
        """Measure what ``policy`` lacks into the table and save it; the number of configurations measured."""
        import statistics
        import tempfile

        from hwprune.latency.profiler import model_sampler, profile_layers
        from hwprune.latency.table import Entry

        todo = self.missing(predictor, policy)
        if not todo:
            return 0
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="hwprune-meter-") as tmp:
            scratch = LatencyTable(self.table.fingerprint, self.table.batch_size, path=Path(tmp) / "t.json",
                                   casts=self.table.casts)
            with self.target.settings():  # the table's threads; the command's own settings come back after
                got = profile_layers(scratch, todo, self.target, self.repeats, lambda m: None,
                                     reference=model_sampler(self.model, self.x, self.target))
        then = (self.table.models.get(self.key, {}).get("reference_layer_rounds") or {}).get("median_us")
        now = statistics.median(got["reference_us"]) if got["reference_us"] else None
        if not (then and now):  # the search makes a meter only for a table with the reference (a CPU profile)
            raise HwpruneError(f"cannot put entries measured now on the scale of {str(self.table.path)!r}: "
                               f"{'it stores no speed reference' if not then else 'no reference was measured'}")
        factor = float(then) / now
        self.factors.append(factor)
        for k, e in scratch.entries.items():
            self.table.entries.setdefault(k, Entry(e.median_us * factor, e.iqr_us * factor, e.repeats, e.inner))
        for k, why in scratch.unsupported.items():
            self.table.unsupported.setdefault(k, why)
        self.table.save(self.dest)
        predictor.entries_changed()  # the interpolation's neighbours now include the new entries
        self.measured += len(scratch.entries)
        self.seconds += time.time() - t0
        return len(todo)


def check_formats(pred: Any, model: nn.Module, example: Any, target: Target, log: Callable[[str], None]) -> None:
    """Leave off the predictor's menus every format the model cannot run with on a layer
    (:func:`~hwprune.device.deploy.format_refusals`), each said with its reason; the rest of the model keeps its
    formats. Profile, search and validate check alike, so their menus agree."""
    from hwprune.device.deploy import format_refusals

    pred.refused = {}  # every format the table offers is tried again (a second check must not see the first's)
    pred.refused = format_refusals(model, example, pred.menus(target), target)
    for name, fmts in sorted(pred.refused.items()):
        for fmt, why in sorted(fmts.items()):
            log(f"hwprune: {fmt} left off the menu of {name}: the model does not run with it ({why})")


def profile_model(table: LatencyTable, target: Target, job: ProfileJob, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure the job's missing layer configurations, then its end-to-end calibration runs (the smallest policy
    the grid allows among them: the floor a budget is checked against); saves the table. The dense model is the
    speed reference in every round of both."""
    from hwprune.latency.predictor import Predictor
    from hwprune.latency.profiler import (calibrate, calibration_policies, layer_configs, model_sampler,
                                          profile_layers, reference_stats, timing_batch)

    dropped = table.upgrade_casts()
    if dropped:
        log(f"hwprune: {table.path} held bf16/fp16 timings with their casts included (an older table); "
            f"{dropped} of them are measured again as precision-region entries")
    fused = table.fused(job.key)
    configs = layer_configs(job.layers, job.grid, target, table.batch_size, log, fused=fused)
    x = timing_batch(job.example, table.batch_size, job.inputs)
    got = profile_layers(table, configs, target, job.repeats, log,
                         reference=model_sampler(copy_model(job.model), x, target))
    pred = Predictor(table, job.layers, job.key)
    check_formats(pred, job.model, job.example, target, log)
    menus = pred.menus(target)
    smallest = pred.runnable(smallest_policy(pred, job.grid, menus))
    pols = calibration_policies(job.layers, job.grid, menus, job.calibration, fix=pred.runnable, smallest=smallest)
    extra = {"grid": list(job.grid), "input_shape": list(job.input_shape), "blocks": "fused" if fused else "layers"}
    if not table.models.get(job.key, {}).get("smallest"):  # the speed curve's second anchor (measured below)
        extra["smallest"] = smallest.to_dict()
    if got["reference_us"]:
        extra["reference_layer_rounds"] = reference_stats(got["reference_us"])
        log(f"hwprune: speed reference (the dense model, {len(got['reference_us'])} rounds among the layers): "
            f"median {extra['reference_layer_rounds']['median_us'] / 1e3:.4f} ms, spread "
            f"{extra['reference_layer_rounds']['spread_pct']:.1f}% (IQR / median)")
    cal = calibrate(table, job.key, job.model, job.example, pols, target, job.repeats, job.exclude, log, extra,
                    job.inputs, regions_priced=job.layers.sources is not None and table.casts == "regions")
    ref = table.models[job.key].get("reference")
    if ref:
        log(f"hwprune: speed reference (the dense model, {ref['rounds']} rounds among the calibration runs): "
            f"median {ref['median_us'] / 1e3:.4f} ms, spread {ref['spread_pct']:.1f}%")
    return {"configurations": len(configs), "measured_now": got["measured"], "calibration_measured_now": cal,
            "remeasured": got["remeasured"], "still_noisy": got["noisy"], "failed": len(got["failed"]),
            "reference": ref}


def smallest_policy(pred: Any, grid: tuple[float, ...], menus: dict[str, list[str]]) -> Any:
    """Every group at the grid's lowest keep ratio, every layer in the format its table entries price fastest
    (the smallest policy the grid allows: :meth:`SearchContext.smallest` with the raw layer sum)."""
    from hwprune.policy import Policy

    m = pred.layers.channel_multiple
    low = {g.name: min(grid) for g in pred.layers.space.groups}
    fastest = {}
    for layer, menu in menus.items():
        cost = lambda f: pred.price(Policy(low, {layer: f}, m)).layer_sum_us  # noqa: E731
        best = min(menu, key=cost)
        if best != "fp32":
            fastest[layer] = best
    return Policy(low, fastest, m)


def missing_for(table: LatencyTable, target: Target, layers: ModelLayers | None, key: str | None) -> str:
    """What ``table`` lacks to price the model ('' when nothing): its calibration or layer configurations.

    Layer configurations are checked only where this machine is the target (its formats are the table's).
    """
    from hwprune.latency.profiler import layer_configs

    if key is None or layers is None:
        return ""
    model = table.models.get(key, {})
    if not model.get("calibration"):
        return "no calibration runs for this model"
    if not target.is_local():
        return ""
    configs = layer_configs(layers, tuple(model.get("grid") or ()), target, table.batch_size, fused=table.fused(key))
    gone = sum(1 for c in configs if c.key not in table.entries and c.key not in table.unsupported)
    return f"{gone} of its {len(configs)} layer configurations unmeasured" if gone else ""


def estimate_seconds(job: ProfileJob, target: Target, batch: int, configs: int, calibration: int) -> float:
    """A rough profiling time from one timed dense forward pass (an estimate for the user, never stored)."""
    model = copy_model(job.model).eval().to(target.device)  # the job's model stays where it is (the CPU)
    from hwprune.latency.profiler import timing_batch

    x = inputs.to_device(timing_batch(job.example, batch, job.inputs), target.device)
    with torch.inference_mode():
        inputs.call(model, x)
        t0 = time.perf_counter()
        inputs.call(model, x)
        if target.device == "cuda":  # pragma: no cover - needs a GPU
            torch.cuda.synchronize()
        dense = time.perf_counter() - t0
    layer = dense / max(1, len(job.layers.layers))
    per_run = lambda one: job.repeats * max(0.002, one) + 5 * one  # noqa: E731 - repeats last >= 2 ms each
    prep = target.prepare_seconds()  # an ONNX export or a compile per item
    return configs * (per_run(layer) + 0.004 + prep) + calibration * (per_run(dense) + 0.05 + 2 * prep)


def _load_all(dirs: list[Path], target: Target, batch: int) -> list[LatencyTable]:
    found = []
    for d in dirs:
        if d.is_dir():
            found += [LatencyTable.load(p) for p in sorted(d.glob(f"{target.name}-*/b{batch}.json"))]
    return [t for t in found if t.fingerprint.get("target") == target.name
            and t.fingerprint.get("runtime", "eager") == target.runtime]  # a table per runtime


def _where(dirs: list[Path]) -> str:
    return " or ".join(repr(str(d)) for d in dirs)


def resolve_table(target: Target, batch: int, layers: ModelLayers | None = None, key: str | None = None, *,
                  tables: str | Path | None = None, table: str | Path | None = None, allow_foreign: bool = False,
                  profile: ProfileJob | None = None, log: Callable[[str], None] = lambda m: None) -> LatencyTable:
    """The table that prices ``target`` at ``batch`` for the model ``key``.

    Lookup: ``table`` (a file) if given; else the folders of :func:`~hwprune.latency.table.table_dirs`
    (``tables`` alone, or the user's folder then the reference tables). Where this machine is the target,
    a table of its own fingerprint that holds the model is used; failing that, with ``profile`` the missing
    measurements are taken now (into ``tables`` or the user's folder); without it, a table of this machine
    is returned as it is, and a table of another device only with ``allow_foreign``.
    """
    if table:
        return _check_file(LatencyTable.load(table), target, allow_foreign)
    dirs = table_dirs(tables)
    if not target.is_local():
        return _remote(_load_all(dirs, target, batch), target, batch, key, dirs)
    fp = target.fingerprint()
    mine = [t for t in (LatencyTable.load(table_path(d, fp, batch)) for d in dirs
                        if table_path(d, fp, batch).is_file()) if not fingerprint_diff(t.fingerprint, fp)]
    for t in mine:
        if not missing_for(t, target, layers, key):
            return t
    foreign = [t for t in _load_all(dirs, target, batch) if fingerprint_diff(t.fingerprint, fp)]
    if allow_foreign:
        for t in foreign:
            if not missing_for(t, target, layers, key):
                return t
    if profile is not None:
        return _profile_here(target, batch, fp, mine, foreign, Path(tables) if tables else user_tables_dir(),
                             profile, log)
    if mine:
        return mine[0]
    if foreign and allow_foreign:
        return foreign[0]
    if foreign:
        t = foreign[0]
        raise HwpruneError(f"table {str(t.path)!r} was measured on another device "
                           f"({'; '.join(fingerprint_diff(t.fingerprint, fp))}); profile this one (leave out "
                           f"--no-profile), or pass --allow-foreign-table")
    raise HwpruneError(f"no {target.name} latency table for this machine ({fingerprint_line(fp)}) at batch {batch} "
                       f"under {_where(dirs)}; leave out --no-profile to measure one now, or run 'hwprune profile "
                       f"--target {target.name} --batch-size {batch}"
                       + (f" --runtime {target.runtime}" if target.runtime != "eager" else "") + "'")


def find_table(tables_dir: str | Path, target: Target, batch: int, table: str | Path | None = None,
               allow_foreign: bool = False) -> LatencyTable:
    """A table of ``target`` at ``batch`` in ``tables_dir`` (or the file ``table``), never profiling."""
    return resolve_table(target, batch, tables=tables_dir, table=table, allow_foreign=allow_foreign)


def _check_file(tbl: LatencyTable, target: Target, allow_foreign: bool) -> LatencyTable:
    if tbl.fingerprint.get("target") != target.name:
        raise HwpruneError(f"table {str(tbl.path)!r} was measured for target {tbl.fingerprint.get('target')!r}, "
                           f"not {target.name!r}")
    if target.is_local() and not allow_foreign:
        diff = fingerprint_diff(tbl.fingerprint, target.fingerprint())
        if diff:
            raise HwpruneError(f"table {str(tbl.path)!r} was measured on another device ({'; '.join(diff)}); "
                               f"profile this one, or pass --allow-foreign-table")
    return tbl


def _remote(found: list[LatencyTable], target: Target, batch: int, key: str | None, dirs: list[Path]) -> LatencyTable:
    """A target that is not this machine: a table measured on it and copied here."""
    if key is not None:
        found = [t for t in found if key in t.models] or found
    if not found:
        raise HwpruneError(f"no {target.name} latency table for batch {batch} under {_where(dirs)}; run 'hwprune "
                           f"profile --target {target.name} --batch-size {batch}' on the device and copy its table "
                           f"folder into {str(user_tables_dir())!r} (or pass --tables/--table)")
    if len(found) > 1:
        raise HwpruneError(f"{len(found)} {target.name} tables for batch {batch}: "
                           f"{', '.join(str(t.path) for t in found)}; pick one with --table")
    return found[0]


def _profile_here(target: Target, batch: int, fp: dict[str, Any], mine: list[LatencyTable],
                  foreign: list[LatencyTable], dest_dir: Path, job: ProfileJob,
                  log: Callable[[str], None]) -> LatencyTable:
    """Measure what this machine's table lacks for the job, starting from any table of this fingerprint."""
    from hwprune.latency.profiler import layer_configs

    dest = table_path(dest_dir, fp, batch)
    if dest.is_file() and not any(t.path == dest for t in mine):
        other = LatencyTable.load(dest)
        raise HwpruneError(f"{str(dest)!r} holds a table of another setup of this device (differs in "
                           f"{'; '.join(fingerprint_diff(other.fingerprint, fp))}); move it away, or pass "
                           f"--tables DIR to profile into another folder")
    tbl = LatencyTable(fp, batch, path=dest)
    for t in mine:  # measurements of this very device (e.g. a reference table): reused, not re-taken
        tbl.merge(t)
    if mine:
        why = f"the tables of this machine ({', '.join(repr(str(t.path)) for t in mine)}) lack this model " \
              f"({missing_for(mine[0], target, job.layers, job.key)})"
    else:
        why = f"no {target.name} table for this machine ({fingerprint_line(fp)}) at batch {batch}"
        if foreign:
            why += f"; {str(foreign[0].path)!r} is another device's (differs in " \
                   f"{', '.join(d.split(':')[0] for d in fingerprint_diff(foreign[0].fingerprint, fp))})"
    configs = layer_configs(job.layers, job.grid, target, batch, fused=tbl.fused(job.key))
    todo = sum(1 for c in configs if c.key not in tbl.entries and c.key not in tbl.unsupported)
    cal = job.calibration - len(tbl.models.get(job.key, {}).get("calibration", []))
    with target.settings():  # the table's threads and allocator; the command's own settings come back after
        est = estimate_seconds(job, target, batch, todo, max(0, cal))
        log(f"hwprune: {why}; measuring {todo} layer configurations and up to {max(0, cal)} calibration runs, "
            f"~{est:.0f} s (estimated), into {str(dest)!r} (--no-profile refuses instead)")
        t0 = time.time()
        profile_model(tbl, target, job, log)
        tbl.save()
    log(f"hwprune: profiled in {time.time() - t0:.1f} s -> {dest}")
    return tbl
