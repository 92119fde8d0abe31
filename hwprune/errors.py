"""The one root error of hwprune.

Every error a user can cause (bad name, bad file, bad shape, bad policy)
is an :class:`HwpruneError`. The CLI prints its message on one line and
exits non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["HwpruneError"]


class HwpruneError(Exception):
    """A problem with the user's input, stated so that it can be fixed."""
