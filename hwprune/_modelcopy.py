"""Copies of user models that always work.

A model may keep tensors from its last forward as plain attributes (OpenNMT-py's decoder keeps its state in a
dict); after a forward with autograd on (a training step, a Taylor-importance backward pass) they carry autograd
history, and ``copy.deepcopy`` refuses them ("Only Tensors created explicitly by the user (graph leaves) support
the deepcopy protocol"). :func:`copy_model` detaches them first (values kept), then copies.
"""
from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["copy_model", "release_graph"]

M = TypeVar("M", bound=nn.Module)


def copy_model(model: M) -> M:
    """``copy.deepcopy(model)`` after :func:`release_graph`."""
    release_graph(model)
    return copy.deepcopy(model)


_MODULE_DICTS = {"_parameters", "_buffers", "_modules"}


def release_graph(model: nn.Module) -> int:
    """Detach the tensors ``model``'s modules keep as plain attributes (in dicts, lists and tuples too) that
    carry autograd history; values are kept. Returns how many were detached."""
    n = 0

    def fix(v: Any) -> Any:
        nonlocal n
        if isinstance(v, torch.Tensor) and v.grad_fn is not None:
            n += 1
            return v.detach()
        if isinstance(v, dict):
            for k, item in v.items():
                new = fix(item)
                if new is not item:
                    v[k] = new
            return v
        if isinstance(v, list):
            for i, item in enumerate(v):
                new = fix(item)
                if new is not item:
                    v[i] = new
            return v
        if isinstance(v, tuple) and not hasattr(v, "_fields"):
            items = [fix(item) for item in v]
            return tuple(items) if any(a is not b for a, b in zip(items, v)) else v
        return v

    for m in model.modules():
        for k, v in list(vars(m).items()):
            if k in _MODULE_DICTS or k.startswith("__"):
                continue
            new = fix(v)
            if new is not v:
                setattr(m, k, new)
    return n
