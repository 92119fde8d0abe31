"""Policies: one keep ratio per prunable group and one format per quantizable layer.

A policy is versioned JSON::

    {"format_version": 1, "model": "resnet20", "channel_multiple": 8,
     "keep": {"layer1.0.conv1": 0.5}, "formats": {"fc": "int8"}, "drop": ["layer2.2"]}

Groups and layers it does not name keep every unit and stay fp32. ``drop`` (optional) names blocks removed whole
(depth: :mod:`hwprune.space._depth`); keep ratios and formats of what lies inside a dropped block do not apply.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hwprune._io import read_json, write_atomic
from hwprune.errors import HwpruneError
from hwprune.space import Space

__all__ = ["FORMATS", "FORMAT_VERSION", "Policy", "keep_units", "uniform_policy", "load_policy", "save_policy"]

FORMAT_VERSION = 1
FORMATS = ("fp32", "bf16", "fp16", "int8", "int4", "fp8", "sp24")
"""Numeric formats: int4 is weight-only; fp8 (e4m3) and sp24 (2:4 semi-structured sparse fp16) are CUDA formats."""
_KEYS = {"format_version", "model", "channel_multiple", "keep", "formats", "provenance", "drop"}
"""``provenance`` (where an exported policy came from) is informational: read, checked to be an object, not kept."""


def keep_units(ratio: float, units: int, multiple: int = 8) -> int:
    """Units a group keeps at ``ratio``: rounded to ``multiple``, at least one multiple (or all if fewer).

    >>> keep_units(0.5, 64), keep_units(0.1, 64), keep_units(0.3, 10, 1), keep_units(1.0, 20)
    (32, 8, 3, 20)
    """
    n = int(math.floor(ratio * units / multiple + 0.5)) * multiple
    return max(min(multiple, units), min(units, n), 1)


@dataclass
class Policy:
    """Per-group keep ratios and per-layer formats.

    Attributes:
        keep: group name -> keep ratio in (0, 1].
        formats: layer name -> one of :data:`FORMATS`.
        channel_multiple: kept units are rounded to this multiple (1 allowed).
        model: the model reference this policy was made for (informational).
        drop: blocks removed whole (module names of the space's ``blocks``), sorted.
    """

    keep: dict[str, float] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    channel_multiple: int = 8
    model: str = ""
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.drop = tuple(sorted(set(self.drop)))

    def to_dict(self) -> dict[str, Any]:
        out = {"format_version": FORMAT_VERSION, "model": self.model, "channel_multiple": self.channel_multiple,
               "keep": dict(self.keep), "formats": dict(self.formats)}
        if self.drop:  # absent when nothing is dropped: policies (and their digests) as before depth
            out["drop"] = list(self.drop)
        return out

    def dropped(self, name: str) -> bool:
        """``name`` (a layer or group) lies inside a dropped block."""
        return any(name == d or name.startswith(d + ".") for d in self.drop)

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> "Policy":
        """Parse and type-check the JSON form (not yet against a model: see :meth:`validate`)."""
        if not isinstance(data, dict):
            raise HwpruneError(f"{source}: expected a JSON object, got {type(data).__name__}")
        extra = sorted(set(data) - _KEYS)
        if extra:
            raise HwpruneError(f"{source}: unknown key {extra[0]!r}; known: {', '.join(sorted(_KEYS))}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise HwpruneError(f"{source}: format_version {version!r} is not supported (this hwprune reads {FORMAT_VERSION})")
        mult = data.get("channel_multiple", 8)
        if not isinstance(mult, int) or isinstance(mult, bool) or mult < 1:
            raise HwpruneError(f"{source}: channel_multiple must be an integer >= 1, got {mult!r}")
        keep, formats = data.get("keep", {}), data.get("formats", {})
        if not isinstance(keep, dict) or not isinstance(formats, dict):
            raise HwpruneError(f"{source}: 'keep' and 'formats' must be JSON objects")
        for name, r in keep.items():
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0 < r <= 1):
                raise HwpruneError(f"{source}: keep ratio of group {name!r} must be in (0, 1], got {r!r}")
        for name, f in formats.items():
            if f not in FORMATS:
                raise HwpruneError(f"{source}: format of layer {name!r} must be one of {', '.join(FORMATS)}, got {f!r}")
        if not isinstance(data.get("provenance", {}), dict):
            raise HwpruneError(f"{source}: 'provenance' must be a JSON object")
        model = data.get("model", "")
        if not isinstance(model, str):
            raise HwpruneError(f"{source}: 'model' must be a string, got {model!r}")
        drop = data.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(d, str) and d for d in drop):
            raise HwpruneError(f"{source}: 'drop' must be a list of block names, got {drop!r}")
        return cls({k: float(v) for k, v in keep.items()}, dict(formats), mult, model, tuple(drop))

    def validate(self, space: Space, allowed_formats: Iterable[str] | None = None) -> None:
        """Check every entry against the model's space (and the target's format menu)."""
        blocks = {b.name for b in space.blocks}
        for name in self.drop:
            if name not in blocks:
                raise HwpruneError(f"policy drops block {name!r}, which the model cannot drop (droppable blocks: "
                                   f"{', '.join(sorted(blocks)[:8]) or 'none'}{', ...' if len(blocks) > 8 else ''})")
        names = {g.name for g in space.groups}
        for name in self.keep:
            if name not in names:
                hint = "; it is excluded" if name in space.excluded else ""
                raise HwpruneError(f"policy names group {name!r}, which the model does not have{hint} "
                                   f"(groups: {', '.join(sorted(names)[:8])}{', ...' if len(names) > 8 else ''})")
        layers = {q.name for q in space.layers}
        allowed = set(allowed_formats) if allowed_formats is not None else set(FORMATS)
        for name, fmt in self.formats.items():
            if name not in layers:
                raise HwpruneError(f"policy sets the format of layer {name!r}, which the model does not have")
            if fmt not in allowed:
                raise HwpruneError(f"policy sets layer {name!r} to {fmt!r}, which the target does not offer "
                                   f"(offered: {', '.join(sorted(allowed))})")

    def units(self, space: Space) -> dict[str, int]:
        """Units each group keeps under this policy."""
        return {g.name: keep_units(self.keep.get(g.name, 1.0), g.units, self.channel_multiple) for g in space.groups}

    def widths(self, space: Space) -> dict[str, int]:
        """The units each group has in the pruned model: :meth:`units`, and 0 for a group inside a dropped block."""
        return {g: 0 if self.dropped(g) else u for g, u in self.units(space).items()}


def uniform_policy(space: Space, keep: float, fmt: str = "fp32", channel_multiple: int = 8,
                   model: str = "") -> Policy:
    """The same keep ratio for every group and the same format for every layer."""
    if not (0.0 < keep <= 1.0):
        raise HwpruneError(f"uniform keep ratio must be in (0, 1], got {keep!r}")
    if fmt not in FORMATS:
        raise HwpruneError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    formats = {} if fmt == "fp32" else {q.name: fmt for q in space.layers}
    return Policy({g.name: keep for g in space.groups}, formats, channel_multiple, model)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy JSON file."""
    p = Path(path)
    return Policy.from_dict(read_json(p, "policy file"), source=f"policy {str(p)!r}")


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Write a policy atomically (temporary file, then rename)."""
    write_atomic(Path(path), json.dumps(policy.to_dict(), indent=2, sort_keys=True) + "\n")
