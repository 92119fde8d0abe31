"""The one root error of hwprune.

Every error a user can cause (bad name, bad file, bad shape, bad policy)
is an :class:`HwpruneError`. The CLI prints its message on one line and
exits non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["HwpruneError", "one_line", "is_oom"]


class HwpruneError(Exception):
    """A problem with the user's input, stated so that it can be fixed."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (for trials.csv and reports)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def is_oom(exc: BaseException) -> bool:
    """Out of memory: host (``MemoryError``) or device (``torch.OutOfMemoryError``). Never a per-item failure to
    record and go on from."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))

