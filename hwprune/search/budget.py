"""Latency budgets: ``10ms``, ``2.5 ms``, ``800us``, ``0.01s`` or ``50%`` of the dense model's latency."""
from __future__ import annotations

import re

from hwprune.errors import HwpruneError

__all__ = ["parse_budget"]

_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ms|us|µs|s|%)\s*$", re.IGNORECASE)
_TO_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}
ACCEPTED = "a latency such as 10ms, 2.5 ms, 800us, 0.01s, or a share of the dense latency such as 50%"


def parse_budget(text: str | float | int, dense_ms: float | None = None) -> float:
    """The budget in milliseconds.

    Args:
        text: the budget as written by the user.
        dense_ms: the dense model's predicted latency, needed for ``%`` budgets.
    """
    m = _RE.match(str(text))
    if not m:
        raise HwpruneError(f"budget {str(text)!r} is not {ACCEPTED}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise HwpruneError(f"budget {str(text)!r} must be positive ({ACCEPTED})")
    if unit == "%":
        if value > 100:
            raise HwpruneError(f"budget {str(text)!r}: a share of the dense latency must be at most 100%")
        if dense_ms is None:
            raise HwpruneError(f"budget {str(text)!r} is relative, but the dense latency is not known")
        return dense_ms * value / 100.0
    return value * _TO_MS[unit]
