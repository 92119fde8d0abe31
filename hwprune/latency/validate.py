"""Predictor fidelity: predicted against measured end-to-end latency on random policies."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hwprune.latency.layers import ModelLayers
from hwprune.latency.predictor import Predictor
from hwprune.latency.profiler import measure_model, random_policy
from hwprune.latency.targets import Target

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
    """Side-by-side fidelity of the table predictor and the FLOPs proxy."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_predictor(model: nn.Module, example: torch.Tensor, layers: ModelLayers, predictor: Predictor,
                       target: Target, samples: int, seed: int, repeats: int, exclude: list[str],
                       grid: tuple[float, ...], menus: dict[str, list[str]],
                       log: Callable[[str], None] | None = None, inputs: torch.Tensor | None = None) -> FidelityReport:
    """Draw ``samples`` random policies, measure each twice end to end, compare with both predictors."""
    from hwprune.apply import apply_policy
    from hwprune.apply.formats import deploy

    rng = random.Random(seed)
    from hwprune.latency.profiler import timing_batch

    x = timing_batch(example, predictor.table.batch_size, inputs)
    rows = []
    for i in range(samples):
        pol = predictor.runnable(random_policy(layers, grid, menus, rng))
        pred = predictor.price(pol)
        m, _ = deploy(apply_policy(model, pol, example, exclude=exclude), target, example)
        t1 = measure_model(m, x, target, repeats).median_us
        t2 = measure_model(m, x, target, repeats).median_us
        rows.append({"policy": pol.to_dict(), "predicted_us": pred.latency_us, "flops_us": predictor.price_flops(pred.macs),
                     "measured_us": (t1 + t2) / 2, "rerun_diff_pct": 100 * abs(t1 - t2) / ((t1 + t2) / 2),
                     "macs": pred.macs})
        if log:
            r = rows[-1]
            log(f"[{i + 1}/{samples}] measured {r['measured_us'] / 1e3:.3f} ms  predicted {r['predicted_us'] / 1e3:.3f} ms"
                f"  FLOPs proxy {r['flops_us'] / 1e3:.3f} ms")
    meas = [r["measured_us"] for r in rows]
    t = _errors([r["predicted_us"] for r in rows], meas)
    f = _errors([r["flops_us"] for r in rows], meas)
    return FidelityReport(samples, t["within_10pct"], t["kendall_tau"], t["mape"], t["worst"], t["bias"],
                          f["within_10pct"], f["kendall_tau"], f["mape"], f["worst"],
                          float(np.median([r["rerun_diff_pct"] for r in rows])), rows)
