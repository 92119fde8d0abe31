"""Depth: blocks a policy may drop whole (fewer operators, where channel pruning cannot go below their launch cost).

A block is droppable when removing it leaves a model that runs with the dense model's output shapes:

- a child of an ``nn.Sequential`` or ``nn.ModuleList`` that holds a prunable layer (conv, linear, RNN) and maps
  its one input tensor to an output of the same shape, called once per forward (a residual block whose shortcut
  is an identity, a repeated block). Dropped, it is an ``nn.Identity``: its input goes on unchanged. A block that
  changes the shape (a downsampling block with a projection shortcut) is never offered;
- a layer after the first of a multi-layer LSTM/GRU (hwprune's :class:`~hwprune.space._rnnstack.RNNStack`) whose
  input width equals its output width. Dropped, it is a :class:`Dropped` marker the stack skips: the next layer
  takes the previous one's output, and the final state has one layer fewer.

Every candidate is dropped alone on a copy of the model, which must run and give the dense output shapes (the
model's own code may count layers); one that does not is not offered. Names are module paths and stay stable
when blocks are dropped (the module is replaced, not removed), so a policy's groups keep their names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from hwprune import inputs
from hwprune._modelcopy import copy_model
from hwprune.errors import HwpruneError

__all__ = ["DepthBlock", "Dropped", "droppable_blocks", "drop_blocks", "dropped_layers"]

_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.RNNCellBase)


@dataclass(frozen=True)
class DepthBlock:
    """A block a policy may drop.

    Attributes:
        name: its module path (``layer1.1``, ``rnn.layers.1``).
        kind: ``block`` (a child of a Sequential/ModuleList whose output has its input's shape) or ``rnn-layer``.
        layers: the quantizable layers inside it (what dropping it removes from the price).
    """

    name: str
    kind: str
    layers: tuple[str, ...]


class Dropped(nn.Module):
    """The place of a dropped RNN layer in an :class:`~hwprune.space._rnnstack.RNNStack` (skipped by it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width  # the input (= output) width of the layer it replaced, for reading only

    def forward(self, x: Any, h0: Any = None) -> Any:  # never called by RNNStack; a pass-through otherwise
        return x, h0


def _layers_in(prefix: str, mod: nn.Module) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" if n else prefix for n, m in mod.named_modules() if isinstance(m, _LAYER_TYPES))


def _candidates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, kind, module) of every block shaped like a droppable one, before the shape and run checks."""
    from hwprune.space._rnnstack import RNNStack

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, RNNStack):
            for i, layer in enumerate(mod.layers):
                if i and isinstance(layer, nn.RNNBase) and \
                        layer.input_size == layer.hidden_size * (2 if layer.bidirectional else 1):
                    out.append((f"{name}.layers.{i}" if name else f"layers.{i}", "rnn-layer", layer))
        elif isinstance(mod, (nn.Sequential, nn.ModuleList)):
            for child_name, child in mod.named_children():
                full = f"{name}.{child_name}" if name else child_name
                if not isinstance(child, (nn.Identity, Dropped)) and _layers_in(full, child):
                    out.append((full, "block", child))
    return out


def _shape_preserving(model: nn.Module, example: Any, cands: list[tuple[str, str, nn.Module]]) -> set[str]:
    """The Sequential/ModuleList children called exactly once in a forward, with one tensor in and a tensor of the
    same shape out."""
    seen: dict[str, list[bool]] = {}
    hooks = []
    for name, kind, mod in cands:
        if kind != "block":
            continue

        def hook(m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            same = (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                    and out.shape == args[0].shape and out.dtype == args[0].dtype)
            seen.setdefault(name, []).append(same)
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            inputs.call(model.eval(), example)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, calls in seen.items() if calls == [True]}


def drop_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Drop the named blocks of ``model`` in place (see the module doc): a Sequential/ModuleList child becomes an
    ``nn.Identity``, an RNN layer a :class:`Dropped` marker. Names must be modules of the model."""
    from hwprune.space._rnnstack import RNNStack

    names = list(names)
    mods = dict(model.named_modules())
    for name in sorted(set(names), key=lambda n: n.count(".")):
        if name not in mods:
            if any(name.startswith(d + ".") for d in names if d != name):
                continue  # inside a block dropped already
            raise HwpruneError(f"cannot drop block {name!r}: the model has no such module")
        parent_name, _, child = name.rpartition(".")
        parent = mods[parent_name] if parent_name else model
        grand = mods.get(parent_name.rpartition(".")[0], model) if parent_name else None
        if isinstance(mods[name], nn.RNNBase) and isinstance(grand, RNNStack) and parent is grand.layers:
            setattr(parent, child, Dropped(mods[name].input_size))
        elif isinstance(parent, (nn.Sequential, nn.ModuleList)):
            setattr(parent, child, nn.Identity())
        else:
            raise HwpruneError(f"cannot drop block {name!r}: it is not a child of a Sequential, a ModuleList or a "
                               f"multi-layer RNN")
        mods = dict(model.named_modules())
    return model


def dropped_layers(blocks: Iterable[DepthBlock], names: Iterable[str]) -> set[str]:
    """The quantizable layers inside the named blocks."""
    want = set(names)
    return {q for b in blocks if b.name in want for q in b.layers}


def droppable_blocks(model: nn.Module, example: Any, exclude: Iterable[str] = (),
                     why_not: dict[str, str] | None = None) -> list[DepthBlock]:
    """The blocks of ``model`` (already split into per-layer RNN modules) that can be dropped, in module order.

    A block holding an excluded layer is not offered; one whose removal breaks the model (it fails, or the output
    shapes change) is not offered and, with ``why_not``, said there with the reason.
    """
    from hwprune.space._cnn import shapes
    from hwprune.space._trace import raised_at
    from hwprune.errors import one_line

    excl = set(exclude)
    cands = [(n, k, m) for n, k, m in _candidates(model)
             if not any(q in excl or any(q.startswith(e + ".") for e in excl) for q in _layers_in(n, m))
             and n not in excl]
    if not cands:
        return []
    was = model.training
    example = inputs.rows(example, slice(0, 1))  # shapes only: one row is enough
    try:
        ok_shape = _shape_preserving(model, example, cands)
        with torch.no_grad():
            want = shapes(inputs.call(model.eval(), example))
        out = []
        for name, kind, mod in cands:
            if kind == "block" and name not in ok_shape:
                continue
            trial = copy_model(model)
            try:
                drop_blocks(trial, [name])
                with torch.no_grad():
                    got = shapes(inputs.call(trial.eval(), example))
                why = None if got == want else f"the model's output shapes change from {want} to {got}"
            except Exception as exc:  # noqa: BLE001 - the model's own code counts the layers: not offered
                why = f"the model fails without it{raised_at(exc)}: {one_line(exc, 160)}"
            if why is None:
                out.append(DepthBlock(name, kind, _layers_in(name, mod)))
            elif why_not is not None:
                why_not[name] = why
        return out
    finally:
        model.train(was)
