"""The machine's speed now against its speed when the table was profiled, from the speed reference.

Profiling times the dense model (at the table's batch) in every round of the calibration runs and stores its
median, spread and round count with the model (``models[key]["reference"]``). ``search``, ``validate`` and
``export`` time it again; the ratio now/then is the *speed factor*. It is applied (absolute prices scaled by
it) only when it differs from 1 by more than the noise of the two medians: twice the combined standard error of
a median, ``1.2533 * sigma / sqrt(n)`` with ``sigma = IQR / 1.349`` (a normal approximation), so that noise is
never applied as if it were a speed change.

Why the dense model and not a fixed canary: measured here (bench/reference_tracking.py), the dense model's
round-to-round time is what the model's prices must follow, and a fixed memory-bound canary (a 16 MB streaming
add) or a matmul followed the dense cnn1d only loosely (correlation 0.61 and 0.54 over 40 rounds), so scaling
by a canary would add its own noise to every price.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SpeedCheck", "median_se_pct", "speed_check", "model_reference"]


def model_reference(table: Any, key: str) -> dict[str, Any] | None:
    """The speed reference of model ``key`` in ``table``: the stored one, or for a table profiled before
    references (none stored) its dense calibration run, with that run's IQR and 5 rounds (the fewest repeats the
    sequential timing took: its noise is not underestimated). None when neither is there."""
    model = table.models.get(key, {})
    if model.get("reference"):
        return dict(model["reference"])
    for run in model.get("calibration", []):
        pol = run["policy"]
        if not any(float(v) < 1.0 for v in (pol.get("keep") or {}).values()) and not pol.get("formats"):
            m = float(run["measured_us"])
            return {"kind": "dense calibration run (a table without a stored reference)", "median_us": m,
                    "iqr_us": float(run.get("iqr_us", 0.0)), "spread_pct": 100 * float(run.get("iqr_us", 0.0)) / m,
                    "rounds": 5}
    return None


def median_se_pct(spread_pct: float, rounds: int) -> float:
    """Standard error of a median over ``rounds`` samples, in % of it, from the samples' IQR / median (%)."""
    return 1.2533 * (spread_pct / 1.349) / math.sqrt(max(rounds, 1))


@dataclass(frozen=True)
class SpeedCheck:
    """The speed reference at profiling (``then``) and now."""

    then_us: float
    then_spread_pct: float
    then_rounds: int
    now_us: float
    now_spread_pct: float
    now_rounds: int
    min_pct: float = 1.0  # a change below this is never called significant (timer and clock granularity)

    @property
    def ratio(self) -> float:
        """Time now / time then: > 1 when the machine is slower now."""
        return self.now_us / self.then_us

    @property
    def noise_pct(self) -> float:
        """How far the ratio may stray from 1 by noise alone (95%: two combined standard errors), in %."""
        se = math.hypot(median_se_pct(self.then_spread_pct, self.then_rounds),
                        median_se_pct(self.now_spread_pct, self.now_rounds))
        return max(self.min_pct, 2 * se)

    @property
    def significant(self) -> bool:
        return abs(self.ratio - 1) * 100 > self.noise_pct

    @property
    def factor(self) -> float:
        """What absolute prices are multiplied by: the ratio where significant, else exactly 1."""
        return self.ratio if self.significant else 1.0

    def line(self) -> str:
        """One line for the user."""
        head = (f"the dense model measures {self.now_us / 1e3:.4f} ms now (spread {self.now_spread_pct:.1f}%, "
                f"{self.now_rounds} rounds) against {self.then_us / 1e3:.4f} ms when the table was profiled "
                f"(spread {self.then_spread_pct:.1f}%, {self.then_rounds} rounds)")
        if not self.significant:
            return f"{head}: within the noise (+-{self.noise_pct:.1f}%), prices used as measured"
        how = "slower" if self.ratio > 1 else "faster"
        return (f"{head}: this machine is {abs(self.ratio - 1):.1%} {how} now than at profiling (more than the "
                f"+-{self.noise_pct:.1f}% noise), so absolute prices are scaled by {self.ratio:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "noise_pct": self.noise_pct, "factor": self.factor,
                "significant": self.significant}


def speed_check(reference: dict[str, Any] | None, now_samples: list[float]) -> SpeedCheck | None:
    """Compare the stored ``reference`` (a model's ``reference`` in a table) with samples of the dense model now
    (None without a stored reference or samples)."""
    from hwprune.latency.timing import timing_of

    if not reference or not now_samples:
        return None
    now = timing_of(now_samples)
    return SpeedCheck(float(reference["median_us"]), float(reference.get("spread_pct", 0.0)),
                      int(reference.get("rounds", 1)), now.median_us, now.spread_pct, now.repeats)
