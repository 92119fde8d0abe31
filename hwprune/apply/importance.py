"""Importance of the units of a group: which channels / hidden units to keep.

Criteria: ``l1`` (default) and ``l2`` weight magnitude, ``taylor`` (first-order
|w * dL/dw| over a few batches) and ``activation`` (mean |output|: neuron
pruning). For CNN groups the magnitude and Taylor scores come from
Torch-Pruning's group importances; recurrent/linear groups are scored here,
over every weight that reads or writes the unit.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from hwprune import inputs
from hwprune.errors import HwpruneError
from hwprune.space._rnn import RNNGroupPlan
from hwprune.space._rnnstack import CELL_TYPES, RNN_TYPES

__all__ = ["IMPORTANCES", "needs_data", "rnn_scores", "cnn_scores", "accumulate_grads", "mean_activation"]

IMPORTANCES = ("l1", "l2", "taylor", "activation")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def needs_data(criterion: str) -> bool:
    if criterion not in IMPORTANCES:
        raise HwpruneError(f"importance {criterion!r} is not known; choose one of {', '.join(IMPORTANCES)}")
    return criterion in ("taylor", "activation")


def accumulate_grads(model: nn.Module, batches: Batches, loss: Callable | None = None) -> None:
    """Sum the gradient of the task's ``loss(output, target)`` (default: cross-entropy) over ``batches`` into
    ``.grad`` (for Taylor importance)."""
    fn = loss or nn.functional.cross_entropy
    model.zero_grad(set_to_none=True)
    model.eval()
    for x, y in batches:
        fn(inputs.call(model, x), y).backward()
    from hwprune._modelcopy import release_graph

    release_graph(model)  # a state the model kept from the last forward (OpenNMT-py's decoder) holds its graph


def mean_activation(model: nn.Module, modules: dict[str, nn.Module], batches: Batches) -> dict[str, torch.Tensor]:
    """Mean |output| per feature (last dim for Linear/RNN, dim 1 for conv) of each module."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, mod: nn.Module) -> Callable:
        def fn(_m: nn.Module, _i: object, out: object) -> None:
            t = out[0] if isinstance(out, tuple) else out
            assert isinstance(t, torch.Tensor)
            if isinstance(mod, nn.modules.conv._ConvNd):
                v = t.detach().abs().transpose(0, 1).reshape(t.shape[1], -1).mean(1)
            else:
                v = t.detach().abs().reshape(-1, t.shape[-1]).mean(0)
            sums[name] = sums.get(name, 0) + v
        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in modules.items()]
    try:
        model.eval()
        with torch.no_grad():
            for x, _ in batches:
                inputs.call(model, x)
    finally:
        for h in handles:
            h.remove()
    return sums


def _saliency(p: torch.Tensor, criterion: str) -> torch.Tensor:
    if criterion == "l1":
        return p.detach().abs()
    if criterion == "l2":
        return p.detach() ** 2
    if p.grad is None:
        raise HwpruneError("taylor importance needs gradients: give calibration batches")
    return (p.detach() * p.grad).abs()


def rnn_scores(mods: dict[str, nn.Module], plan: RNNGroupPlan, criterion: str,
               activations: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-unit scores of a recurrent (or Linear-feature) group."""
    H, D = plan.units, plan.dirs
    if criterion == "activation":
        assert activations is not None
        return sum(activations[n].reshape(D, H).sum(0) for n in (plan.producer,) + plan.coupled + plan.joined
                   if n in activations)
    score = torch.zeros(H)
    for pname in (plan.producer,) + plan.coupled + plan.joined:  # a decoder coupled to its encoder
        prod = mods[pname]
        if isinstance(prod, RNN_TYPES + CELL_TYPES):
            W = prod.hidden_size  # H, or D x H for a decoder started from the directions joined ([dir0 | dir1])
            for name, p in prod.named_parameters():
                s = _saliency(p, criterion)
                rows = s.reshape(-1, W, *s.shape[1:])  # (gates, W, ...)
                per = rows.reshape(rows.shape[0], W, -1).sum((0, 2))
                if name.startswith("weight_hh"):
                    per = per + s.sum(0)
                score += per.reshape(-1, H).sum(0)
        elif isinstance(prod, nn.Embedding):  # unit = a column of the table
            score += _saliency(prod.weight, criterion).sum(0)
        else:
            for p in prod.parameters():
                s = _saliency(p, criterion)
                score += s.reshape(H, -1).sum(1)
    for tname in plan.through:  # attention's linear_in: the units are its rows and its columns
        s = _saliency(mods[tname].weight, criterion)
        score += (s.sum(1) + s.sum(0)).reshape(D, H).sum(0)
    for tname in plan.tied:  # a reader's outputs cut to the same indices: its rows
        for p in mods[tname].parameters():
            s = _saliency(p, criterion)
            score += s.reshape(D * H, -1).sum(1).reshape(D, H).sum(0)
    for cname, dirs in [(c, D * plan.copies(c)) for c in plan.consumers] + \
            [(c, plan.copies(c)) for c in plan.state_consumers]:
        cons = mods[cname]
        for name, p in cons.named_parameters():
            if name == "weight" or name.startswith("weight_ih"):
                s = _saliency(p, criterion).sum(0)
                s = s.reshape(s.shape[0], -1).sum(1) if s.dim() > 1 else s  # a conv reader: (in, k...) -> in
                score += s.reshape(dirs * plan.outer, H, plan.stride).sum((0, 2))
    return score


def cnn_scores(group: object, root: nn.Module, criterion: str,
               activations: dict[str, torch.Tensor] | None = None, root_name: str = "") -> torch.Tensor:
    """Per-channel scores of a Torch-Pruning group, indexed like the root's output channels."""
    import torch_pruning as tp

    if criterion == "activation":
        assert activations is not None
        return activations[root_name]
    if criterion == "taylor":
        imp = tp.importance.GroupTaylorImportance(normalizer=None)
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2, normalizer=None)
    return imp(group).detach().float()
