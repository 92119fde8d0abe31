"""Stop fine-tunes that are losing: racing (successive halving) under a budget, dominance on the front.

**Racing** (:class:`RacingRule`, a budgeted search's default, ``--race ETA``): every candidate is projected
into the budget, so under a budget they all compete on the metric alone. At each checkpoint a fine-tune goes
on only if its score is among the best ``1/ETA`` of the scores every trial had at that checkpoint (finished,
stopped or still running, within the limit); successive halving, as Optuna's ``SuccessiveHalvingPruner``
promotes, except that nothing is stopped before ``ETA`` others reached the checkpoint. A stopped trial costs
only the steps it ran: ``--trials`` counts fine-tunes' worth of steps (:func:`spent`), so what racing saves
buys more candidates and the search never spends more steps than ``trials x finetune_steps``.

**Dominance** (:class:`DominanceRule`, the front search, ``--objective front``): stop fine-tunes that are
clearly losing: dominated at a checkpoint by a finished trial, by a margin.

Accuracy after a fine-tune is the search's slow objective, so a trial
evaluates validation accuracy at checkpoints (a third and two thirds of the
steps). It stops when a finished trial that is at least as fast (predicted
latency) had, at the same checkpoint, an accuracy higher by ``margin`` or
more, and finished higher by the margin as well: such a trial is very unlikely
to reach the front. This is a multi-objective rule (an accuracy-only rule like
median stopping would kill the small, fast candidates the front needs), so it
is hwprune's own: Optuna's pruners need ``Trial.report``, which multi-objective
studies do not support (the study keeps the latency as its second value in
both modes, so racing is hwprune's own too). The local backend applies either
rule in the objective (state PRUNED); on Ray,
:class:`hwprune.search.ray_backend.StoppingScheduler` applies the same rule as
a Tune scheduler. The seed trials are never stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["checkpoints", "spent", "DominanceRule", "RacingRule", "Reference"]


def checkpoints(steps: int, enabled: bool = True) -> list[int]:
    """Steps at which a fine-tune of ``steps`` steps is evaluated (none under 30 steps)."""
    if not enabled or steps < 30:
        return []
    return [steps // 3, (2 * steps) // 3]


def spent(trials: list[Any], steps: int) -> float:
    """Fine-tunes' worth of steps the finished trials spent: 1 for a complete trial (a repeated policy too,
    so a search of repeats still ends), ``steps run / steps`` for one stopped early (1 when it did not say)."""
    total = 0.0
    for t in trials:
        ran = t.user_attrs.get("steps_run") if t.state.name == "PRUNED" else None
        total += min(1.0, ran / steps) if isinstance(ran, (int, float)) and steps > 0 else 1.0
    return total


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

    def check(self, latency_ms: float, step: int, accuracy: float, key: Any = None) -> str | None:
        """A reason to stop (naming the dominating trial), or None to go on. ``key`` (the trial) is unused here."""
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


@dataclass
class RacingRule:
    """Successive halving at the checkpoints, among trials within ``limit_ms``: a score goes on only if it is
    among the best ``1/eta`` of the scores at its checkpoint (its own included), once ``eta`` others are there.
    ``enabled`` False (``early_stop_margin`` 0) or ``eta`` < 2: never stops. Scores are higher-is-better;
    ``metric`` and ``sign`` name and recover the metric in messages."""

    eta: int = 3
    limit_ms: float = math.inf
    enabled: bool = True
    metric: str = "accuracy"
    sign: float = 1.0
    rungs: dict[int, dict[Any, float]] = field(default_factory=dict)

    def _record(self, key: Any, latency_ms: float, step: int, score: float) -> None:
        if latency_ms <= self.limit_ms * (1 + 1e-9):  # a trial over the limit competes with nobody
            self.rungs.setdefault(int(step), {})[key] = float(score)

    def add(self, trial: Any, latency_ms: float, curve: dict[int, float] | dict[str, float], final: float) -> None:
        """A finished (or stopped) trial's curve: its score at each checkpoint it reached."""
        for step, score in curve.items():
            self._record(trial, latency_ms, int(step), score)

    def check(self, latency_ms: float, step: int, accuracy: float, key: Any = None) -> str | None:
        """Record ``key``'s score at ``step`` and return a reason to stop it, or None to go on."""
        at = self.rungs.get(int(step), {})
        others = sorted((v for k, v in at.items() if key is None or k != key), reverse=True)
        if key is not None:
            self._record(key, latency_ms, step, accuracy)
        if not self.enabled or self.eta < 2 or len(others) < self.eta:
            return None
        scores = sorted(others + [float(accuracy)], reverse=True)
        keep = max(1, len(scores) // self.eta)
        bar = scores[keep - 1]
        if accuracy >= bar:
            return None
        return (f"stopped at step {step} (racing): val {self.metric} {self.sign * accuracy:.4f}, not among the best "
                f"{keep} of {len(scores)} trials there (the {_nth(keep)} had {self.sign * bar:.4f})")


def _nth(n: int) -> str:
    return {1: "best", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
