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

__all__ = ["is_factory_ref", "load_factory", "source_digest", "refuse_untrusted"]


def source_digest(ref: str) -> str:
    """A hash of the source file a factory reference names (``file.py:name``, or ``pkg.module:name`` through
    its module's file), '' for a registry name or a source that cannot be found: what a cache of models
    trained from user code must key on besides the reference, so an edited file is not served stale weights."""
    from hwprune._io import file_digest

    if not is_factory_ref(ref):
        return ""
    target = ref.rpartition(":")[0]
    path: Path | None = Path(target) if target.endswith(".py") or "/" in target else None
    if path is None:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        path = Path(found.origin) if found is not None and found.origin and found.origin.endswith(".py") else None
    return file_digest(path)[:12] if path is not None else ""  # the cache keys of earlier versions: 12 digits


def refuse_untrusted(refs: dict[str, Any], source: str, how: str) -> None:
    """Refuse to run code that a file names (an artifact, a run directory) when the caller did not name it.

    A file's ``model: "os:system"`` must not become a call: ``torch.load(weights_only=True)`` keeps pickled code
    out, and this keeps named code out. Registry names (``resnet20``, ``mnist1d``, ``classification``) are fine.

    Args:
        refs: what the file names, e.g. ``{"model": "my_model.py:build", "data": "mnist1d"}``.
        source: the file, for the message.
        how: what the caller passes to trust it (``--trust-code``, ``trust_code=True``).
    """
    code = [f"{k} {v!r}" for k, v in refs.items() if isinstance(v, str) and is_factory_ref(v)]
    if code:
        raise HwpruneError(f"{source} names user code ({', '.join(code)}); loading it would import and run that "
                           f"code: pass {how} if you trust whoever wrote the file")


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
