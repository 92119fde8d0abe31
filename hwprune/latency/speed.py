"""The machine's speed now against its speed when the table was profiled, from the speed reference.

Profiling times the dense model (at the table's batch) in every round of the calibration runs and stores its
median, spread and round count with the model (``models[key]["reference"]``). ``search``, ``validate`` and
``export`` time it again; the ratio now/then is the *speed factor*, and absolute prices are multiplied by it.
``validate`` and ``export`` time the reference in the same rounds as what they measure, so the scaled
comparison is a comparison of ratios to the dense model within rounds. Whether the change is beyond the noise
of the two medians (twice their combined standard error, ``1.2533 * sigma / sqrt(n)`` with
``sigma = IQR / 1.349``, a normal approximation) decides what the one line says: a machine slower or faster
than at profiling, or a change within the noise (applied all the same: on one cnn1d validation a 9.5% speed-up
judged within the noise of a 33%-spread reference was left out and the predictions stayed 11.7% high).

Why the dense model and not a fixed canary: the dense model is the very thing whose speed the prices need, so
timing it again measures the factor instead of inferring it from a proxy. A canary only follows it loosely:
in two runs of ``bench/reference_tracking.py`` (40 rounds) a 16 MB streaming add correlated 0.61 and 0.69 with
the dense cnn1d, a 256x256 matmul 0.54 both times, a conv+BN+ReLU block 0.25 and 0.64; dividing the dense
model by the streaming add raised its round-to-round cv in the first run (0.134 -> 0.160) and lowered it in the
second (0.173 -> 0.128).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SpeedCheck", "SpeedCurve", "median_se_pct", "speed_check", "model_reference", "smallest_reference",
           "speed_curve", "SMALLEST", "measure_with_anchors"]

SMALLEST = "__smallest__"  # the smallest policy's key in a round, the second anchor of the speed curve


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
        """What absolute prices are multiplied by: the ratio (see the module docstring)."""
        return self.ratio

    def line(self) -> str:
        """One line for the user."""
        head = (f"the dense model measures {self.now_us / 1e3:.4f} ms now (spread {self.now_spread_pct:.1f}%, "
                f"{self.now_rounds} rounds) against {self.then_us / 1e3:.4f} ms when the table was profiled "
                f"(spread {self.then_spread_pct:.1f}%, {self.then_rounds} rounds)")
        if not self.significant:
            return (f"{head}: {self.ratio:.3f}, within the noise (+-{self.noise_pct:.1f}%); absolute prices are scaled "
                    f"by it")
        how = "slower" if self.ratio > 1 else "faster"
        return (f"{head}: this machine is {abs(self.ratio - 1):.1%} {how} now than at profiling (more than the "
                f"+-{self.noise_pct:.1f}% noise), so absolute prices are scaled by {self.ratio:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "noise_pct": self.noise_pct, "factor": self.factor,
                "significant": self.significant}


def speed_check(reference: dict[str, Any] | None, now_samples: list[float]) -> SpeedCheck | None:
    """Compare the stored ``reference`` (a model's ``reference`` in a table) with samples of the dense model now
    (None without a stored reference or samples)."""
    from hwprune.device.timing import timing_of

    if not reference or not now_samples:
        return None
    now = timing_of(now_samples)
    return SpeedCheck(float(reference["median_us"]), float(reference.get("spread_pct", 0.0)),
                      int(reference.get("rounds", 1)), now.median_us, now.spread_pct, now.repeats)


def smallest_reference(table: Any, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The smallest policy profiling measured for ``key`` (``models[key]["smallest"]``, a calibration run timed
    in the reference's rounds) and its measurement as a reference; None for a table without one."""
    from hwprune.latency.table import calibration_key

    model = table.models.get(key, {})
    pol, ref = model.get("smallest"), model.get("reference")
    if not pol or not ref:
        return None
    want = calibration_key(pol)
    for run in model.get("calibration", []):
        if calibration_key(run["policy"]) == want:
            m = float(run["measured_us"])
            return pol, {"kind": "smallest policy", "median_us": m, "iqr_us": float(run.get("iqr_us", 0.0)),
                         "spread_pct": 100 * float(run.get("iqr_us", 0.0)) / m, "rounds": int(ref.get("rounds", 5))}
    return None


@dataclass(frozen=True)
class SpeedCurve:
    """The speed factor as a function of latency, from two anchors timed in the same rounds: the dense model and
    the smallest policy the grid allows.

    Measured on this VM: between profiling and validating the built-in LSTM minutes later, the dense model ran
    12% faster and the smallest policy 34% faster: the drift is not uniform (small, overhead-bound models move
    more), and one factor from the dense model left the small policies 30% over-predicted. The factor for a
    latency ``p`` (at the table's speed) is interpolated between the anchors in log-log space and held constant
    beyond them. One anchor (a table without a measured smallest policy): the dense model's factor everywhere.
    """

    dense: SpeedCheck
    small: SpeedCheck | None = None

    def factor_at(self, predicted_us: float) -> float:
        """The factor for a policy priced at ``predicted_us`` (at the table's speed)."""
        d, s = self.dense, self.small
        if s is None or s.then_us >= d.then_us or predicted_us <= 0:
            return d.factor
        t = (math.log(predicted_us) - math.log(s.then_us)) / (math.log(d.then_us) - math.log(s.then_us))
        t = min(1.0, max(0.0, t))
        return math.exp((1 - t) * math.log(s.factor) + t * math.log(d.factor))

    def verdict_factor(self, predicted_us: float, share: bool) -> float:
        """What a measurement is divided by before it is compared with a budget on the table's scale: for a
        budget given as a share of the dense latency, the dense model's factor (the share is of the dense model's
        time now, whatever the policy's own factor); for an absolute budget, the factor at ``predicted_us``."""
        return self.factor if share else self.factor_at(predicted_us)

    @property
    def factor(self) -> float:
        """The dense model's factor (what a single reference gives)."""
        return self.dense.factor

    @property
    def significant(self) -> bool:
        return self.dense.significant or (self.small is not None and self.small.significant)

    def line(self) -> str:
        out = self.dense.line()
        if self.small is not None:
            s = self.small
            out += (f"; the smallest policy measures {s.now_us / 1e3:.4f} ms now against {s.then_us / 1e3:.4f} ms "
                    f"({s.ratio:.3f}{', beyond' if s.significant else ', within'} the +-{s.noise_pct:.1f}% noise): "
                    f"prices between the two are scaled by a factor interpolated between {s.ratio:.3f} and "
                    f"{self.dense.ratio:.3f}")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = self.dense.to_dict()
        if self.small is not None:
            out["smallest"] = self.small.to_dict()
        return out


def speed_curve(table: Any, key: str, samples: dict[Any, list[float]]) -> SpeedCurve | None:
    """The :class:`SpeedCurve` of model ``key`` from samples taken now in one set of rounds: the dense model's
    under ``REFERENCE``, the smallest policy's under :data:`SMALLEST` (None without a dense reference)."""
    from hwprune.latency.profiler import REFERENCE

    dense = speed_check(model_reference(table, key), samples.get(REFERENCE, []))
    if dense is None:
        return None
    got = smallest_reference(table, key)
    small = speed_check(got[1], samples.get(SMALLEST, [])) if got else None
    return SpeedCurve(dense, small)


def measure_with_anchors(items: dict[Any, Any], table: Any, key: str, model: Any, example: Any, x: Any, target: Any,
                         exclude: list[str], repeats: int, seed: int = 0) -> tuple[Any, SpeedCurve | None]:
    """``items`` (thunks returning samplers, :func:`~hwprune.latency.profiler.measure_rounds`) timed in interleaved
    rounds together with the speed curve's anchors: the dense ``model`` (the reference) and, where the table holds
    it, the smallest policy deployed as profiling measured it. Returns the rounds' result and the curve (None
    when ``table`` is None or holds no reference for ``key``)."""
    from hwprune._modelcopy import copy_model

    from hwprune.latency.profiler import deployed_for_timing, measure_rounds, model_sampler, round_plan
    from hwprune.policy import Policy

    items = dict(items)
    anchor = smallest_reference(table, key) if table is not None else None
    if anchor is not None:
        small, problem = deployed_for_timing(model, Policy.from_dict(anchor[0]), example, target, exclude,
                                             regions_priced=table.casts == "regions")
        if not problem:
            items[SMALLEST] = model_sampler(small, x, target)
    res = measure_rounds(items, target, round_plan(repeats, seed), model_sampler(copy_model(model), x, target))
    return res, (speed_curve(table, key, res.samples) if table is not None else None)
