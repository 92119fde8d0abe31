"""Dependency groups of convolutional models, from Torch-Pruning's graph.

Torch-Pruning traces the model and ties together every channel that must go
at once: a conv's outputs with its BN and consumers, all members of a residual
sum, depthwise convs with their inputs, concatenations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hwprune import inputs
from hwprune.errors import HwpruneError

__all__ = ["CNNGroup", "cnn_groups", "output_layers"]

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class CNNGroup:
    """One Torch-Pruning group, named by its root module."""

    name: str
    units: int
    layers: tuple[str, ...]
    root: nn.Module
    handler: Any
    group: Any


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers that produce the model output (the classifier).

    The last conv/linear layer run in the forward pass.
    """
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with torch.no_grad():
            inputs.call(model, example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def cnn_groups(model: nn.Module, example: torch.Tensor, exclude: set[str]) -> tuple[Any, list[CNNGroup]]:
    """Build the dependency graph of ``model`` and its prunable groups, in module order."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    classifier = set(output_layers(model, example))
    ignored = [m for m, n in names.items() if n in classifier or n in exclude]
    was_training = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs.positional(model, example),
                                                  verbose=False)
        raw = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES))
    except Exception as exc:
        raise HwpruneError(f"dependency analysis failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    order = {n: i for i, n in enumerate(names.values())}
    groups = []
    for g in raw:
        root = g[0].dep.target.module
        members = sorted({names[d.target.module] for d, _ in g if d.target.module in names}, key=order.get)
        if exclude & set(members):
            continue
        if any(names.get(d.target.module) in classifier and "out_channels" in getattr(d.handler, "__name__", "")
               for d, _ in g):
            continue
        producers = [names[d.target.module] for d, _ in g if d.target.module in names
                     and isinstance(d.target.module, PRUNABLE_TYPES)
                     and "out_channels" in getattr(d.handler, "__name__", "")]
        label = min(producers, key=order.get) if producers else names[root]
        groups.append(CNNGroup(label, len(g[0].idxs), tuple(members), root, g[0].dep.handler, g))
    groups.sort(key=lambda c: order[c.name])
    return dg, groups
