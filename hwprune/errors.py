"""The one root error of hwprune.

Every error a user can cause (bad name, bad file, bad shape, bad policy)
is an :class:`HwpruneError`. The CLI prints its message on one line and
exits non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["HwpruneError", "one_line", "is_oom", "is_own_bug"]


class HwpruneError(Exception):
    """A problem with the user's input, stated so that it can be fixed."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (for trials.csv and reports)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # a library's terminal colours
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def is_oom(exc: BaseException) -> bool:
    """Out of memory: host (``MemoryError``) or device (``torch.OutOfMemoryError``). Never a per-item failure to
    record and go on from."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def is_own_bug(exc: BaseException) -> bool:
    """A bug in hwprune: an exception other than :class:`HwpruneError` raised by hwprune's own code (the deepest
    frame of its traceback is in the ``hwprune`` package). One raised in the user's model, data or task code, or
    in torch under it, is the user's (a failed trial with its reason); a bug must stop the search with its
    traceback instead."""
    import os

    if isinstance(exc, (HwpruneError, MemoryError)) or is_oom(exc):
        return False
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    pkg = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return last is not None and os.path.abspath(last).startswith(pkg)
