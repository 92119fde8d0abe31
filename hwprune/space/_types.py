"""Plain data describing what can be pruned and quantized in a model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PrunableGroup", "QuantLayer", "Space"]


@dataclass(frozen=True)
class PrunableGroup:
    """Units (channels / hidden units / features) that must be removed together.

    Attributes:
        name: the producing layer's module name; policies key on it.
        units: how many units the group has in the dense model.
        layers: every module the group touches.
        kind: ``channels`` (conv), ``hidden`` (LSTM/GRU) or ``features`` (Linear).
    """

    name: str
    units: int
    layers: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class QuantLayer:
    """A layer whose numeric format a policy may set (op: conv1d, conv2d, linear, lstm, gru)."""

    name: str
    op: str


@dataclass
class Space:
    """The prunable groups and quantizable layers of one model."""

    groups: list[PrunableGroup]
    layers: list[QuantLayer]
    excluded: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # layers kept whole (not searched) -> why, in words
    blocks: list[Any] = field(default_factory=list)  # hwprune.space._depth.DepthBlock: what a policy may drop
    ties: dict[str, tuple[str, ...]] = field(default_factory=dict)  # RNN group -> readers whose outputs the
    # model ties to its width, found by cutting (see hwprune.space._cuttable); pruning asks the analysis for them

    def group(self, name: str) -> PrunableGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [asdict(g) for g in self.groups], "layers": [asdict(q) for q in self.layers],
                "excluded": list(self.excluded), "kept_whole": dict(self.kept),
                "blocks": [asdict(b) for b in self.blocks]}
