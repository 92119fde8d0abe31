"""Load user code given as ``path/to/file.py:factory`` or ``package.module:factory``.

User factories are code by design: loading one runs it, with the user's rights.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from hwprune.errors import HwpruneError

__all__ = ["is_factory_ref", "load_factory"]


def is_factory_ref(ref: str) -> bool:
    """True when ``ref`` looks like ``something:factory`` rather than a registry name."""
    return ":" in ref


def load_factory(ref: str) -> Callable[..., Any]:
    """Import the callable named by ``ref``.

    Args:
        ref: ``path/to/file.py:name`` or ``package.module:name``.

    Raises:
        HwpruneError: the file or module is missing, or has no such callable.
    """
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise HwpruneError(f"factory {ref!r} must look like 'path/to/file.py:name' or 'pkg.module:name'")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise HwpruneError(f"factory file {target!r} does not exist (from {ref!r})")
        mod_name = f"hwprune_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise HwpruneError(f"cannot import {target!r} as a Python file (from {ref!r})")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # user code: report it on one line
            raise HwpruneError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise HwpruneError(f"cannot import module {target!r} (from {ref!r}): {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise HwpruneError(f"{target!r} has no callable {attr!r} (from {ref!r})")
    return fn
