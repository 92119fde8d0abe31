"""Interleaved measurement: every item once per round, in a freshly shuffled order; statistics over rounds.

A shared machine's speed drifts: on a 2-core cloud VM the dense cnn1d (batch 512) had round medians from
4.8 to 6.3 ms within one minute while a plain matmul stayed within 3%. Timing items one after the other
(all repeats of one, then all of the next) lands that drift in some items and not in others, as if it were
their cost. Here every item is prepared once (built, warmed up, its inner count fixed: a *sampler*), then
each round takes one sample of every item in a new random order; an item's value is the median over its
rounds, so slow drift moves every item alike.

Re-measure rule: items whose spread over their rounds (IQR / median) is above ``noisy_pct`` get
``extra_rounds`` more rounds, interleaved among themselves and the ``always`` items (the speed reference);
those still above it are reported as noisy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Mapping

from hwprune.device.timing import Timing, timing_of

__all__ = ["RoundPlan", "RoundResult", "measure_in_rounds"]


@dataclass(frozen=True)
class RoundPlan:
    """How many rounds, and when an item is measured again.

    Args:
        rounds: samples every item gets (one per round).
        extra_rounds: more rounds for items whose spread is above ``noisy_pct`` after ``rounds`` (0: none).
        noisy_pct: the spread (IQR / median, %) above which an item is re-measured.
        seed: seeds the shuffles (the same plan gives the same orders).
    """

    rounds: int = 10
    extra_rounds: int = 10
    noisy_pct: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.extra_rounds < 0 or self.noisy_pct <= 0:
            raise ValueError(f"a round plan needs rounds >= 1, extra_rounds >= 0 and noisy_pct > 0, got {self}")


@dataclass
class RoundResult:
    """Samples per item (one per round it took part in), and which items were re-measured or stayed noisy."""

    samples: dict[Hashable, list[float]]
    inner: dict[Hashable, int] = field(default_factory=dict)
    remeasured: list[Hashable] = field(default_factory=list)
    noisy: list[Hashable] = field(default_factory=list)
    orders: list[list[Hashable]] = field(default_factory=list)  # the order of every round, as run

    def timing(self, key: Hashable) -> Timing:
        """The item's median and IQR over its rounds."""
        return timing_of(self.samples[key], self.inner.get(key, 1))

    def spread_pct(self, key: Hashable) -> float:
        return self.timing(key).spread_pct


def _round(keys: list[Hashable], samplers: Mapping[Hashable, Callable[[], float]], rng: random.Random,
           out: RoundResult) -> None:
    order = list(keys)
    rng.shuffle(order)
    for k in order:
        out.samples[k].append(float(samplers[k]()))
    out.orders.append(order)


def measure_in_rounds(samplers: Mapping[Hashable, Callable[[], float]], plan: RoundPlan,
                      always: Iterable[Hashable] = (),
                      on_round: Callable[[int, int], None] | None = None) -> RoundResult:
    """Sample every item once per round, in a freshly shuffled order, ``plan.rounds`` times; then re-measure the
    noisy ones (see the module docstring). ``always``: items that take part in every round, extra rounds too
    (a speed reference). ``on_round(done, total)`` is called after each round (progress)."""
    keys = list(samplers)
    always = [k for k in always if k in samplers]
    rng = random.Random(plan.seed)
    out = RoundResult({k: [] for k in keys}, {k: int(getattr(samplers[k], "inner", 1)) for k in keys})
    total = plan.rounds + (plan.extra_rounds if plan.extra_rounds else 0)
    for r in range(plan.rounds):
        _round(keys, samplers, rng, out)
        if on_round:
            on_round(r + 1, total)
    if plan.extra_rounds:
        noisy = [k for k in keys if k not in always and out.spread_pct(k) > plan.noisy_pct]
        if noisy:
            out.remeasured = noisy
            for r in range(plan.extra_rounds):
                _round(noisy + always, samplers, rng, out)
                if on_round:
                    on_round(plan.rounds + r + 1, total)
    out.noisy = [k for k in keys if out.spread_pct(k) > plan.noisy_pct]
    return out
