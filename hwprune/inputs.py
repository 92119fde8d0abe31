"""Model inputs of any structure: one tensor, a tuple/list of tensors, or a dict of tensors.

A data item is ``(inputs, target)``; a batch of inputs has the same structure with every tensor stacked along
dim 0 (PyTorch's default collate), and the model is called as ``model(x)``, ``model(*x)`` or ``model(**x)``.
Every place that builds an example, a timing batch or a training batch goes through these helpers, so lengths
tensors and masks ride along with the features, unpruned.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["Batch", "call", "positional", "rows", "to_device", "batch_len", "collate", "leaves", "all_float",
           "shape_of", "describe", "is_batch", "draw", "first_tensor"]

Batch = Any  # torch.Tensor | tuple/list[torch.Tensor] | dict[str, torch.Tensor]


def is_batch(x: Any) -> bool:
    """A tensor, or a non-empty tuple/list/dict whose values are all tensors."""
    if isinstance(x, torch.Tensor):
        return True
    vals = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (tuple, list)) else None
    return bool(vals) and all(isinstance(v, torch.Tensor) for v in vals)  # type: ignore[arg-type]


def leaves(x: Batch) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x.values()) if isinstance(x, dict) else list(x)


def _map(x: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return tuple(fn(v) for v in x)


def call(model: Callable[..., Any], x: Batch) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(x, torch.Tensor):
        return model(x)
    if isinstance(x, dict):
        return model(**x)
    return model(*x)


def positional(model: nn.Module, x: Batch) -> tuple[torch.Tensor, ...]:
    """The inputs as positional arguments of ``model.forward`` (a dict is ordered by the signature), for tools
    that take an args tuple (torch.fx, fvcore, torch.export, TorchScript)."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if not isinstance(x, dict):
        return tuple(x)
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params]
    missing = [k for k in x if k not in names]
    if missing:
        from hwprune.errors import HwpruneError

        raise HwpruneError(f"input {missing[0]!r} is not a positional parameter of {type(model).__name__}.forward "
                           f"(it takes {', '.join(names) or 'none'}); dict inputs must name forward's parameters")
    out = []
    for p in params:
        if p.name in x:
            out.append(x[p.name])
        elif p.default is not inspect.Parameter.empty and all(q.name not in x for q in params[len(out) + 1:]):
            break
        else:
            from hwprune.errors import HwpruneError

            raise HwpruneError(f"dict inputs skip {type(model).__name__}.forward's parameter {p.name!r}")
    return tuple(out)


def rows(x: Batch, index: Any) -> Batch:
    """The same rows (``index`` into dim 0) of every tensor."""
    return _map(x, lambda t: t[index])


def to_device(x: Batch, device: Any, non_blocking: bool = False) -> Batch:
    return _map(x, lambda t: t.to(device, non_blocking=non_blocking))


def batch_len(x: Batch) -> int:
    return int(leaves(x)[0].shape[0])


def first_tensor(x: Batch) -> torch.Tensor:
    return leaves(x)[0]


def collate(items: Sequence[Batch]) -> Batch:
    """Stack single items (each without a batch dim) into a batch, keeping the structure."""
    head = items[0]
    if isinstance(head, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(head, dict):
        return {k: torch.stack([it[k] for it in items]) for k in head}
    return tuple(torch.stack([it[i] for it in items]) for i in range(len(head)))


def all_float(x: Batch) -> bool:
    return all(t.is_floating_point() for t in leaves(x))


def shape_of(x: Batch) -> tuple:
    """One item's shape(s) without the batch dim: a tuple of ints for one tensor, else one tuple per input."""
    if isinstance(x, torch.Tensor):
        return tuple(int(v) for v in x.shape[1:])
    return tuple(tuple(int(v) for v in t.shape[1:]) for t in leaves(x))


def describe(x: Batch) -> str:
    """Shapes and dtypes of one item, in words (for messages)."""
    def one(t: torch.Tensor) -> str:
        return f"{tuple(t.shape[1:])}" + ("" if t.is_floating_point() else f" {str(t.dtype).replace('torch.', '')}")
    if isinstance(x, torch.Tensor):
        return f"input of shape {one(x)}"
    if isinstance(x, dict):
        return "inputs " + ", ".join(f"{k}: {one(v)}" for k, v in x.items())
    return "inputs " + ", ".join(one(t) for t in x)


def draw(example: Batch, n: int, pool: Batch | None = None, seed: int = 0) -> Batch:
    """``n`` inputs to time a model on: rows drawn (seeded, with replacement) from ``pool`` (real inputs) when
    given, else from ``example``'s rows when any input is not floating point (token ids, lengths, masks: random
    values would not be valid inputs), else standard normal."""
    g = torch.Generator().manual_seed(seed)
    src = pool if pool is not None and batch_len(pool) else (None if all_float(example) else example)
    if src is None:
        return _map(example, lambda t: torch.randn(n, *t.shape[1:], generator=g))
    return rows(src, torch.randint(batch_len(src), (n,), generator=g))
