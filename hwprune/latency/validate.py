"""Predictor fidelity: predicted against measured end-to-end latency on random policies."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.latency.layers import ModelLayers
from hwprune.latency.predictor import Predictor
from hwprune.latency.profiler import random_policy
from hwprune.device.targets import Target

__all__ = ["kendall_tau", "FidelityReport", "validate_predictor"]


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a: (concordant - discordant) pairs over all pairs."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += int(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]))
    return s / (n * (n - 1) / 2) if n > 1 else 0.0


def _errors(pred: list[float], meas: list[float]) -> dict[str, float]:
    rel = [abs(p - m) / m for p, m in zip(pred, meas)]
    signed = [(p - m) / m for p, m in zip(pred, meas)]
    return {"within_10pct": float(np.mean([r <= 0.10 for r in rel])), "kendall_tau": kendall_tau(pred, meas),
            "mape": float(np.mean(rel)), "worst": float(max(rel)), "bias": float(np.mean(signed))}


@dataclass
class FidelityReport:
    """Side-by-side fidelity of the table predictor and the FLOPs proxy, beside the noise floor.

    ``noise_pct``: the median difference between the medians of a policy's odd and even rounds (a re-run);
    ``noise_floor_pct``: the median over policies of twice the standard error of their measured median, in % (how
    far a measured latency itself may be off); ``resolvable`` is False when that floor reaches 10%: a +-10% verdict
    cannot be resolved on this machine right now. ``speed``: the speed check (predictions are multiplied by its
    factor). ``left_out``: sampled policies not measured because their deployed model is not what the table prices.
    """

    samples: int
    within_10pct: float
    kendall_tau: float
    mape: float
    worst: float
    bias: float
    flops_within_10pct: float
    flops_kendall_tau: float
    flops_mape: float
    flops_worst: float
    noise_pct: float
    rows: list[dict[str, Any]]
    noise_floor_pct: float = 0.0
    rounds: int = 0
    speed: dict[str, Any] | None = None
    left_out: list[str] = field(default_factory=list)

    @property
    def resolvable(self) -> bool:
        return self.noise_floor_pct < 10.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resolvable": self.resolvable}


def validate_predictor(model: nn.Module, example: torch.Tensor, layers: ModelLayers, predictor: Predictor,
                       target: Target, samples: int, seed: int, repeats: int, exclude: list[str],
                       grid: tuple[float, ...], menus: dict[str, list[str]],
                       log: Callable[[str], None] | None = None, inputs: torch.Tensor | None = None) -> FidelityReport:
    """Draw ``samples`` random policies and measure them end to end in interleaved rounds (every policy and the
    dense model, the speed reference, once per round in a fresh order; ``repeats`` rounds, more for noisy ones);
    compare with both predictors, scaled by the speed factor (the dense model now over at profiling, timed in the
    same rounds: the comparison is one of ratios to the dense model)."""
    from hwprune.latency.profiler import deployed_for_timing, model_sampler, timing_batch
    from hwprune.latency.speed import measure_with_anchors, median_se_pct
    from hwprune.device.timing import timing_of

    rng = random.Random(seed)
    x = timing_batch(example, predictor.table.batch_size, inputs)
    regions = layers.sources is not None and predictor.table.casts == "regions"
    pols, prepared, left_out = [], {}, []
    for i in range(samples):
        pol = predictor.runnable(random_policy(layers, grid, menus, rng))
        deployed, problem = deployed_for_timing(model, pol, example, target, exclude, regions)
        if problem:
            left_out.append(problem)
            if log:
                log(f"hwprune: sampled policy {i + 1} left out (not a validation of the table): {problem}")
            continue
        prepared[len(pols)] = model_sampler(deployed, x, target)
        pols.append(pol)
    if log:
        log(f"hwprune: measuring {len(pols)} policies and the dense model in {repeats} interleaved rounds")
    res, speed = measure_with_anchors(prepared, predictor.table, predictor.key, model, example, x, target, exclude,
                                      repeats, seed)
    if log and speed:
        log(f"hwprune: {speed.line()}")
    rows = []
    for i, pol in enumerate(pols):
        pred = predictor.price(pol)
        factor = speed.factor_at(pred.latency_us) if speed else 1.0
        t = res.timing(i)
        odd, even = res.samples[i][0::2], res.samples[i][1::2] or res.samples[i]
        a, b = timing_of(odd).median_us, timing_of(even).median_us
        rows.append({"policy": pol.to_dict(), "predicted_us": pred.latency_us * factor, "speed_factor": factor,
                     "flops_us": predictor.price_flops(pred.macs) * factor, "measured_us": t.median_us,
                     "spread_pct": t.spread_pct, "rounds": t.repeats,
                     "rerun_diff_pct": 100 * abs(a - b) / ((a + b) / 2), "macs": pred.macs})
        if log:
            r = rows[-1]
            log(f"[{i + 1}/{len(pols)}] measured {r['measured_us'] / 1e3:.3f} ms (spread {r['spread_pct']:.1f}%)  "
                f"predicted {r['predicted_us'] / 1e3:.3f} ms  FLOPs proxy {r['flops_us'] / 1e3:.3f} ms")
    if not rows:
        raise HwpruneError("no sampled policy could be measured as the table prices it (see the lines above)")
    meas = [r["measured_us"] for r in rows]
    t = _errors([r["predicted_us"] for r in rows], meas)
    f = _errors([r["flops_us"] for r in rows], meas)
    floor = float(np.median([2 * median_se_pct(r["spread_pct"], r["rounds"]) for r in rows]))
    return FidelityReport(len(rows), t["within_10pct"], t["kendall_tau"], t["mape"], t["worst"], t["bias"],
                          f["within_10pct"], f["kendall_tau"], f["mape"], f["worst"],
                          float(np.median([r["rerun_diff_pct"] for r in rows])), rows, floor,
                          max(r["rounds"] for r in rows), speed.to_dict() if speed else None, left_out)
