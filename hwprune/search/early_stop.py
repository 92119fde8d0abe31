"""Stop fine-tunes that are clearly losing: dominated at a checkpoint by a finished trial, by a margin.

Accuracy after a fine-tune is the search's slow objective, so a trial
evaluates validation accuracy at checkpoints (a third and two thirds of the
steps). It stops when a finished trial that is at least as fast (predicted
latency) had, at the same checkpoint, an accuracy higher by ``margin`` or
more, and finished higher by the margin as well: such a trial is very unlikely
to reach the front. This is a multi-objective rule (an accuracy-only rule like
median stopping would kill the small, fast candidates the front needs), so it
is hwprune's own: Optuna's pruners need ``Trial.report``, which multi-objective
studies do not support. The local backend applies it in the objective (state
PRUNED); on Ray, :class:`hwprune.search.ray_backend.DominanceScheduler` applies
the same rule as a Tune scheduler. The uniform seed trials are never stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["checkpoints", "DominanceRule", "Reference"]


def checkpoints(steps: int, enabled: bool = True) -> list[int]:
    """Steps at which a fine-tune of ``steps`` steps is evaluated (none under 30 steps)."""
    if not enabled or steps < 30:
        return []
    return [steps // 3, (2 * steps) // 3]


@dataclass
class Reference:
    """A finished trial: its predicted latency, accuracy at each checkpoint, and final accuracy."""

    trial: int
    latency_ms: float
    curve: dict[int, float]
    final: float


@dataclass
class DominanceRule:
    """``margin`` on the score (higher is better: a perplexity's score is its negative); ``metric`` and ``sign``
    name and recover the metric in messages (``sign * score``)."""

    margin: float = 0.05
    refs: list[Reference] = field(default_factory=list)
    metric: str = "accuracy"
    sign: float = 1.0

    def add(self, trial: int, latency_ms: float, curve: dict[int, float] | dict[str, float], final: float) -> None:
        self.refs.append(Reference(trial, latency_ms, {int(k): float(v) for k, v in curve.items()}, final))

    def check(self, latency_ms: float, step: int, accuracy: float) -> str | None:
        """A reason to stop (naming the dominating trial), or None to go on."""
        if self.margin <= 0:
            return None
        best: Reference | None = None
        for r in self.refs:
            at = r.curve.get(step)
            if at is None or r.latency_ms > latency_ms + 1e-12:
                continue
            if at >= accuracy + self.margin and r.final >= accuracy + self.margin:
                if best is None or at > best.curve[step]:
                    best = r
        if best is None:
            return None
        return (f"stopped at step {step}: val {self.metric} {self.sign * accuracy:.4f}, while trial {best.trial} "
                f"(predicted {best.latency_ms:.4f} ms <= {latency_ms:.4f} ms) had {self.sign * best.curve[step]:.4f} "
                f"there")
