"""Every use of the deprecated TorchScript (``torch.jit``) lives here.

Export writes ``model.ts`` because the dynamic int8 CPU kernels of ``torch.ao.quantization`` (see
:mod:`hwprune._compat.ao`) serialize only through TorchScript in torch 2.13; when that goes, this is the one file to
drop. Its deprecation warnings are silenced for these calls only.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["traced_bytes", "load"]


def traced_bytes(model: nn.Module, args: tuple[Any, ...]) -> bytes:
    """``model`` traced on ``args`` and saved: the bytes of a ``.ts`` file."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.trace(model, args, check_trace=False), buf)
    return buf.getvalue()


def load(path: Any) -> Any:
    """A saved TorchScript module (a path or a file object)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(path)
