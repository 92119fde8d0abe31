"""Price a policy from a latency table: sum of measured layers, calibrated end to end.

Each layer's entry is a fused block where the model was profiled since blocks
(the layer with its BatchNorm / activation / pooling epilogue,
:mod:`hwprune.latency.epilogue`; :meth:`LatencyTable.fused`), a bare layer in
older tables.

``latency = a * sum(layer and cast entries) + c * sum(layer output elements) + b``,
fitted by non-negative least squares on the end-to-end measurements that
``hwprune profile`` took for this model. Casts: where a policy's bf16/fp16
layers form precision regions (:func:`hwprune.device.kernels.plan_regions`), each
dtype change is a measured ``cast|...`` entry (by dtype pair and tensor size);
output elements in a 16-bit region count half (half the bytes). ``a`` absorbs
what isolated timing misses per unit of layer work (cold caches between
layers); ``c`` prices the memory-bound operators the table does not hold
(concatenations, operators no block holds; in bare-layer tables also
normalization, activations and residual sums), which touch every output
element of the layers before them; ``b`` is what does not shrink with pruning
(Python dispatch, the classifier). The FLOPs proxy is ``a * multiply-adds + b``, fitted on the
same runs, for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np
import torch

from hwprune.errors import HwpruneError
from hwprune.latency.layers import CastConfig, LayerConfig, ModelLayers
from hwprune.latency.table import LatencyTable
from hwprune.policy import Policy

__all__ = ["Prediction", "Predictor", "fit_calibration", "fit_linear", "fit_nonneg", "model_key"]


def model_key(model_ref: str, model_args: dict[str, Any], input_shape: Iterable[int], exclude: Iterable[str],
              channel_multiple: int) -> str:
    """Names a model configuration inside a table (calibration is per model).

    A ``file.py:factory`` reference is keyed by the file's absolute path, so a
    relative and an absolute reference to the same file find the same entry.
    """
    from pathlib import Path

    target, sep, attr = model_ref.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target):
        model_ref = f"{Path(target).resolve()}:{attr}"
    args = ",".join(f"{k}={v}" for k, v in sorted(model_args.items()))
    excl = ",".join(sorted(exclude))
    shape = "+".join("x".join(map(str, s)) for s in input_shape) if any(isinstance(s, (tuple, list)) for s in input_shape) \
        else "x".join(map(str, input_shape))  # several inputs: one shape each, joined by '+'

    return f"{model_ref}[{args}]@{shape}" + (f"-excl[{excl}]" if excl else "") + f"-m{channel_multiple}"


def fit_nonneg(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares ``y ~ features @ coef`` (columns scaled first for conditioning)."""
    from scipy.optimize import nnls

    scale = np.maximum(np.abs(features).max(axis=0), 1e-12)
    coef, _ = nnls(features / scale, y)
    return coef / scale


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y = a*x + b`` with ``a > 0`` and ``b >= 0``.

    Work cannot take negative time and overhead cannot be negative: when noise
    pushes the fit there, the fit goes through 0 (``y = a*x``) instead.
    """
    if len(x) < 2 or float(np.ptp(x)) == 0.0:
        return (float(np.mean(y / np.maximum(x, 1e-12))), 0.0)
    a, b = np.polyfit(x, y, 1)
    if a <= 0 or b < 0:
        return (float(np.dot(x, y) / np.dot(x, x)), 0.0)
    return float(a), float(b)


def fit_calibration(features: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """``(a, c, b)`` of ``measured ~ a * layer sum + c * output elements + b`` over calibration runs.

    Three terms are fitted only from 6 runs or more (two per term), and only while the layer sum keeps a
    positive weight; otherwise ``measured ~ a * layer sum + b`` (:func:`fit_linear`, ``a > 0``). Three noisy
    runs fit three terms exactly, and non-negative least squares then may put all weight on the constant and
    price every policy the same (a CI run refused a 99% budget that way: smallest = dense = 0.78 ms, measured
    69% of dense at profiling).
    """
    if len(y) >= 6:
        a, c, b = fit_nonneg(features, y)
        if a > 0:
            return float(a), float(c), float(b)
    a, b = fit_linear(features[:, 0], y)
    return a, 0.0, b


def _on_reference_scale(run: dict[str, Any], model: dict[str, Any]) -> float:
    """A calibration run's time at the speed of the model's stored reference: runs measured in a later profile
    session (their own ``reference_us``, the dense model in their rounds) are scaled by reference / theirs, so
    that runs of sessions minutes or days apart fit one line. Runs without it are taken as measured."""
    measured = float(run["measured_us"])
    ref, theirs = (model.get("reference") or {}).get("median_us"), run.get("reference_us")
    if ref and theirs:
        return measured * float(ref) / float(theirs)
    return measured


@dataclass
class Prediction:
    """A priced policy: calibrated total, the raw layer sum, and each layer's entry."""

    latency_us: float
    layer_sum_us: float
    macs: int
    out_elems: float  # in fp32 terms: 16-bit activations count half
    by_layer: list[dict[str, Any]] = field(default_factory=list)
    estimated: list[str] = field(default_factory=list)  # keys priced by interpolation (--allow-missing)

    @property
    def latency_ms(self) -> float:
        return self.latency_us / 1000.0


class Predictor:
    """Prices policies of one model from one table.

    Args:
        table: the latency table (its batch size is the batch that is priced).
        layers: the model's layer forms (:func:`hwprune.latency.layers.analyze_layers`).
        key: the model's key in the table (:func:`model_key`); its calibration is used if present.
        allow_missing: price unmeasured configurations by interpolation, flagged as estimated.
    """

    def __init__(self, table: LatencyTable, layers: ModelLayers, key: str, allow_missing: bool = False) -> None:
        self.table, self.layers, self.key, self.allow_missing = table, layers, key, allow_missing
        self.fused = table.fused(key)  # layer entries are blocks (layer + epilogue), or bare in older tables
        self._families: dict[str, list[tuple[LayerConfig, float]]] | None = None
        self._guesses: dict[str, float] = {}  # interpolated entries (repair prices the same ones many times)
        self.coef: tuple[float, float, float] = (1.0, 0.0, 0.0)  # layer sum, output elements, constant
        self.flops_coef: tuple[float, float] | None = None
        self.refused: dict[str, dict[str, str]] = {}  # {layer: {format: why}}: the model cannot run with it
        model = table.models.get(key, {})
        # with a stored speed reference, only runs that carry the reference of their own rounds can be put on its
        # scale (:func:`_on_reference_scale`): an older run merged back from another copy of the table is left out
        self.calibration: list[dict[str, Any]] = [s for s in model.get("calibration", [])
                                                  if not model.get("reference") or "reference_us" in s]
        self._feats, self._y = np.zeros((0, 3)), np.zeros(0)
        if self.calibration:
            raw = [self.price(Policy.from_dict(s["policy"], source=f"calibration of {key}"))
                   for s in self.calibration]
            self._y = np.array([_on_reference_scale(s, model) for s in self.calibration])
            self._feats = np.array([[r.layer_sum_us, float(r.out_elems), 1.0] for r in raw])
            self.coef = fit_calibration(self._feats, self._y)
            self.flops_coef = fit_linear(np.array([float(r.macs) for r in raw]), self._y)

    def calibration_errors(self) -> list[float]:
        """Leave-one-out ``|measured / predicted - 1|`` of each calibration run (the fit without that run).

        With fewer than 5 runs the in-sample errors of the full fit are returned (too few to leave one out).
        """
        n = len(self._y)
        if n == 0:
            return []
        if n < 5:
            pred = self._feats @ np.array(self.coef)
            return [abs(float(m / max(p, 1e-9)) - 1) for m, p in zip(self._y, pred)]
        out = []
        for i in range(n):
            keep = np.arange(n) != i
            coef = np.array(fit_calibration(self._feats[keep], self._y[keep]))
            out.append(abs(float(self._y[i] / max(float(self._feats[i] @ coef), 1e-9)) - 1))
        return out

    def margin(self, quantile: float = 0.9) -> float:
        """The ``quantile`` of :meth:`calibration_errors` (0 without calibration): how far measured runs strayed."""
        errs = self.calibration_errors()
        return float(np.quantile(errs, quantile)) if errs else 0.0

    def pruning_headroom(self) -> tuple[float, float] | None:
        """``(ratio, fraction)``: the smallest uniform fp32 calibration policy (every group at ``ratio``) measured
        ``fraction`` of the dense model's time. None without both runs. A fraction near 1 means the model is
        launch- or overhead-bound at this batch on this device: pruning buys little latency there."""
        groups = {g.name for g in self.layers.space.groups}
        dense, small = None, None
        for s in self.calibration:
            pol = s["policy"]
            if pol.get("formats"):
                continue
            keep = pol.get("keep", {})
            vals = {float(keep.get(g, 1.0)) for g in groups}
            if vals == {1.0}:
                dense = float(s["measured_us"])
            elif len(vals) == 1:
                r = next(iter(vals))
                if small is None or r < small[0]:
                    small = (r, float(s["measured_us"]))
        if dense is None or small is None:
            return None
        return small[0], small[1] / dense

    def headroom_note(self, batch: int) -> str | None:
        """A one-line warning when pruning barely changes measured latency (:meth:`pruning_headroom` >= 0.8)."""
        got = self.pruning_headroom()
        if got is None or got[1] < 0.8:
            return None
        return (f"keeping {got[0]:.0%} of every group measured {got[1]:.0%} of the dense model's time at batch "
                f"{batch}: the model is launch- or overhead-bound here, so pruning buys little latency and the "
                f"predictor ranks differences near the measurement noise (a larger --batch-size, or --runtime "
                f"cudagraph / compile, makes the work dominate)")

    @property
    def calibrated(self) -> bool:
        return bool(self.calibration)

    @staticmethod
    def _family(cfg: LayerConfig) -> str:
        """Configurations that differ only in channel counts."""
        return replace(cfg, cin=0, cout=0, groups=0 if cfg.groups > 1 else 1).key

    def needed(self, policy: Policy) -> list[LayerConfig | CastConfig]:
        """Every table entry pricing ``policy`` reads: its layers' configurations and its precision regions' casts."""
        configs = self.layers.configs(policy, self.table.batch_size, self.fused)
        casts, _ = self._casts(configs, policy.drop)
        return [c for _, c in casts + configs]

    def entries_changed(self) -> None:
        """Forget what interpolation derived from the table's entries (after entries were added to it)."""
        self._families, self._guesses = None, {}

    def _interpolate(self, cfg: LayerConfig) -> float:
        if cfg.key not in self._guesses:
            self._guesses[cfg.key] = self._fit_neighbours(cfg)
        return self._guesses[cfg.key]

    def _fit_neighbours(self, cfg: LayerConfig) -> float:
        """An estimate from the measured configurations of the same shape family nearest in (log inputs, log
        outputs): a non-negative fit of ``fixed + per_mac * multiply-adds`` on up to six of them (a layer's fixed
        cost does not shrink with its channels), or the nearest one scaled by multiply-adds when they all have
        the same count."""
        if self._families is None:
            self._families = {}
            for k, e in self.table.entries.items():
                c = LayerConfig.from_key(k)
                if c is not None:
                    self._families.setdefault(self._family(c), []).append((c, e.median_us))
        near = self._families.get(self._family(cfg), [])
        if not near:
            raise HwpruneError(f"configuration {cfg.key!r} is not in the table and no measured neighbour "
                               f"shares its shape family; profile this model")
        dist = lambda c: abs(np.log(c.cin / cfg.cin)) + abs(np.log(c.cout / cfg.cout))  # noqa: E731
        closest = sorted(near, key=lambda t: dist(t[0]))[:6]
        macs = np.array([float(c.macs()) for c, _ in closest])
        if len(set(macs.tolist())) >= 2:  # latency ~ fixed cost + per-multiply-add cost, fitted on the neighbours
            from scipy.optimize import nnls

            (per_mac, fixed), _ = nnls(np.stack([macs, np.ones_like(macs)], 1), np.array([u for _, u in closest]))
            if per_mac > 0 or fixed > 0:
                return float(per_mac * cfg.macs() + fixed)
        nb, lat = closest[0]
        return lat * cfg.macs() / max(nb.macs(), 1)

    def _cast_entry(self, cfg: CastConfig) -> float | None:
        """A cast not measured, priced from the nearest measured size of the same dtype pair (linear in size)."""
        near = [(c, e.median_us) for k, e in self.table.entries.items() if k.startswith(f"cast|{cfg.src}>{cfg.dst}|")
                for c in [CastConfig.from_key(k)] if c is not None and c.batch == cfg.batch]
        if not near:
            return None
        c, us = min(near, key=lambda t: abs(np.log(t[0].elems / cfg.elems)))
        return us * cfg.elems / c.elems

    def _casts(self, configs: list[tuple[str, LayerConfig]], drop: tuple[str, ...] = ()
               ) -> tuple[list[tuple[str, CastConfig]], dict[str, float]]:
        """The casts of a policy's precision regions, and each layer's output width in fp32 terms (0.5 for 16-bit)."""
        from hwprune.device.kernels import DTYPE_NAMES, plan_regions, region_dtype

        src = self.layers.sources_for(drop)
        if self.table.casts != "regions" or src is None or all(region_dtype(c.fmt) == torch.float32 for _, c in configs):
            return [], {}
        by = dict(configs)
        plan = plan_regions({n: region_dtype(c.fmt) for n, c in configs}, src)
        b = self.table.batch_size
        out = [(n, CastConfig(DTYPE_NAMES[x], DTYPE_NAMES[y], by[n].in_elems() // b, b))
               for n, (x, y) in plan.cast_in.items() if n in by]
        out += [(n, CastConfig(DTYPE_NAMES[x], DTYPE_NAMES[y], by[n].out_elems() // b, b))
                for n, (x, y) in plan.cast_out.items() if n in by]
        width = {n: (0.5 if d != torch.float32 else 1.0) for n, d in plan.act.items()}
        return out, width

    def price(self, policy: Policy, by_layer: bool = False) -> Prediction:
        """Predicted latency of ``policy`` at the table's batch size (a missing entry is an error)."""
        total, macs, elems, rows, est = 0.0, 0, 0.0, [], []
        configs = self.layers.configs(policy, self.table.batch_size, self.fused)
        casts, width = self._casts(configs, policy.drop)
        for name, cfg in casts:
            e = self.table.entries.get(cfg.key)
            if e is not None:
                us = e.median_us
            else:
                guess = self._cast_entry(cfg) if self.allow_missing else None
                if guess is None:
                    raise HwpruneError(f"the {cfg.src}->{cfg.dst} cast at layer {name!r} ({cfg.key!r}) is not in "
                                       f"table {str(self.table.path)!r}; profile this model"
                                       + ("" if self.allow_missing else ", or pass --allow-missing to estimate"))
                us = guess
                est.append(cfg.key)
            total += us
            if by_layer:
                rows.append({"layer": name, "key": cfg.key, "latency_us": us, "estimated": e is None})
        for name, cfg in configs:
            e = self.table.entries.get(cfg.key)
            if e is not None:
                us = e.median_us
            elif cfg.key in self.table.unsupported:
                raise HwpruneError(f"layer {name!r} cannot run {cfg.fmt} at this shape ({cfg.key!r}): "
                                   f"{self.table.unsupported[cfg.key]}")
            elif self.allow_missing:
                us = self._interpolate(cfg)
                est.append(cfg.key)
            else:
                raise HwpruneError(f"layer {name!r} in configuration {cfg.key!r} is not in table "
                                   f"{str(self.table.path)!r}; profile it, or pass --allow-missing to estimate")
            total += us
            macs += cfg.macs()
            elems += cfg.out_elems() * width.get(name, 1.0)
            if by_layer:
                rows.append({"layer": name, "key": cfg.key, "latency_us": us, "estimated": e is None})
        a, c, b = self.coef
        return Prediction(a * total + c * elems + b, total, macs, elems, rows, est)

    def price_flops(self, macs: int) -> float:
        """The FLOPs-proportional proxy (fitted on the same calibration runs), in microseconds."""
        if self.flops_coef is None:
            raise HwpruneError(f"table has no calibration for {self.key!r}; run 'hwprune profile' for it")
        a, b = self.flops_coef
        return a * macs + b

    def menus(self, target: Any = None) -> dict[str, list[str]]:
        """Each layer's menu (:meth:`menu`): what the table measured, whichever machine asks.

        ``target`` is accepted for callers of older versions and not used: a CUDA search priced from a CPU
        box sees the menu the GPU's table holds.
        """
        return {f.name: self.menu(f.name) for f in self.layers.layers}

    def menu(self, layer: str, offered: Iterable[str] | None = None) -> list[str]:
        """Formats worth offering for ``layer``: measured (not marked unsupported), faster than fp32 at its
        dense shape, and not :attr:`refused` (the model does not run with it: :func:`~hwprune.latency.ondemand.
        check_formats`). ``offered`` narrows the formats considered (default: every format a table can hold)."""
        from hwprune.policy import FORMATS

        form = next(f for f in self.layers.layers if f.name == layer)
        full = {g.name: g.units for g in self.layers.space.groups}
        base = self.table.entries.get(form.config(full, self.table.batch_size, "fp32", self.fused).key)
        out = ["fp32"]
        for fmt in (FORMATS if offered is None else offered):
            if fmt == "fp32" or base is None or fmt in self.refused.get(layer, {}):
                continue
            e = self.table.entries.get(form.config(full, self.table.batch_size, fmt, self.fused).key)
            if e is not None and e.median_us < base.median_us:
                out.append(fmt)
        return out

    def runnable(self, policy: Policy) -> Policy:
        """``policy`` with fp32 for every layer whose configuration the table marks unsupported in its format.

        A kernel that accepts a layer's dense shape may reject a pruned one (2:4 sparse and fp8 need
        multiples of 16): that layer runs fp32, as deployment would leave it.
        """
        if not policy.formats or not self.table.unsupported:  # the common case, on the search's pricing path
            return policy
        formats = dict(policy.formats)
        for name, cfg in self.layers.configs(policy, self.table.batch_size, self.fused):
            if cfg.fmt != "fp32" and cfg.key in self.table.unsupported:
                formats.pop(name, None)
        if formats == policy.formats:
            return policy
        return Policy(dict(policy.keep), formats, policy.channel_multiple, policy.model, policy.drop)
