"""Turn a dense model into a physically smaller one under a policy."""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from hwprune.apply.importance import (Batches, accumulate_grads, cnn_scores, mean_activation, needs_data,
                                      rnn_scores)
from hwprune.errors import HwpruneError, one_line
from hwprune.policy import Policy, keep_units
from hwprune.space import build_space, is_recurrent, prepare_model, rnn_plans
from hwprune.space._cnn import CNNGroup, cnn_groups
from hwprune.space._rnn import RNNGroupPlan
from hwprune.space._rnnstack import CELL_TYPES, RNN_TYPES, gates_of, rebuild_cell, rebuild_rnn

__all__ = ["prune_model", "kept_indices", "unit_scores"]


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending order (ties: lower index wins)."""
    order = torch.argsort(-scores, stable=True)
    return torch.sort(order[:keep]).values


def _rnn_slices(mod: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Module:
    """An LSTM/GRU layer or a cell keeping the ``out_keep`` hidden units and ``in_keep`` inputs."""
    H = mod.hidden_size
    hk = out_keep if out_keep is not None else torch.arange(H)
    rows = torch.cat([g * H + hk for g in range(gates_of(mod))])
    params = {}
    for name, p in mod.named_parameters():
        t = p.detach()[rows]
        if name.startswith("weight_ih") and in_keep is not None:
            t = t[:, in_keep]
        elif name.startswith("weight_hh"):
            t = t[:, hk]
        params[name] = t
    in_size = len(in_keep) if in_keep is not None else mod.input_size
    new = (rebuild_cell if isinstance(mod, CELL_TYPES) else rebuild_rnn)(mod, in_size, len(hk), params)
    new.train(mod.training)
    return new


def _weight_slices(mod: nn.Linear | nn.modules.conv._ConvNd, out_keep: torch.Tensor | None,
                   in_keep: torch.Tensor | None) -> nn.Module:
    """A Linear or (groups=1) conv keeping the ``out_keep`` outputs and ``in_keep`` inputs, weights copied."""
    w = mod.weight.detach()
    b = mod.bias.detach() if mod.bias is not None else None
    if out_keep is not None:
        w, b = w[out_keep], (b[out_keep] if b is not None else None)
    if in_keep is not None:
        w = w[:, in_keep]
    if isinstance(mod, nn.Linear):
        new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        new = type(mod)(w.shape[1], w.shape[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation, 1,
                        b is not None, mod.padding_mode)
    new = new.to(w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(mod.training)
    return new


def _bn_slices(mod: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    new = type(mod)(len(keep), mod.eps, mod.momentum, mod.affine, mod.track_running_stats).to(
        next(iter(mod.buffers()), torch.zeros(0)).device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(mod, name)
            if src is not None:
                getattr(new, name).copy_(src.detach()[keep])
        if mod.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(mod.num_batches_tracked)
    new.train(mod.training)
    return new


def _recurrent_scores(model: nn.Module, example: torch.Tensor, exclude: set[str], criterion: str,
                      batches: list | None) -> list[tuple[RNNGroupPlan, torch.Tensor]]:
    plans = rnn_plans(model, example, exclude)
    mods = dict(model.named_modules())
    acts = mean_activation(model, {n: mods[n] for p in plans for n in (p.producer,) + p.coupled}, batches) \
        if criterion == "activation" else None
    return [(plan, rnn_scores(mods, plan, criterion, acts)) for plan in plans]


def _prune_recurrent(model: nn.Module, example: torch.Tensor, policy: Policy, exclude: set[str],
                     criterion: str, batches: list | None) -> None:
    mods = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    ins: dict[str, torch.Tensor] = {}
    for plan, scores in _recurrent_scores(model, example, exclude, criterion, batches):
        keep = keep_units(policy.keep.get(plan.producer, 1.0), plan.units, policy.channel_multiple)
        if keep >= plan.units:
            continue
        idx = kept_indices(scores, keep)
        outs[plan.producer] = idx
        cols = torch.cat([d * plan.units + idx for d in range(plan.dirs)])
        if plan.stride > 1:  # a conv's channel flattened with its height: channel-major features
            cols = (idx[:, None] * plan.stride + torch.arange(plan.stride)).reshape(-1)
        block = plan.units * plan.dirs * plan.stride
        for m in plan.members + plan.coupled:
            outs[m] = idx
        for c in plan.consumers:  # a reader of [dec | context] sees the units twice, block after block
            ins[c] = torch.cat([j * block + cols for j in range(plan.copies(c))])
        for c in plan.state_consumers:  # h_n[i]: one direction of one layer, the kept units (both: [h_n[-2] | h_n[-1]])
            ins[c] = torch.cat([j * plan.units + idx for j in range(plan.copies(c))])
    for name in sorted(set(outs) | set(ins)):
        mod = mods[name]
        if isinstance(mod, RNN_TYPES + CELL_TYPES):
            new: nn.Module = _rnn_slices(mod, outs.get(name), ins.get(name))
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            new = _weight_slices(mod, outs.get(name), ins.get(name))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and name in outs:
            new = _bn_slices(mod, outs[name])
        elif isinstance(mod, nn.Embedding) and name in outs and name not in ins:
            keep = outs[name]
            new = nn.Embedding(mod.num_embeddings, len(keep), padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                               norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq,
                               sparse=mod.sparse).to(mod.weight.device)
            with torch.no_grad():
                new.weight.copy_(mod.weight.detach()[:, keep])
            new.train(mod.training)
        else:  # pragma: no cover - analysis only yields RNN/Linear members
            raise HwpruneError(f"cannot prune layer {name!r} of type {type(mod).__name__}")
        model.set_submodule(name, new)
    _runs_pruned(model, example, [n for n in outs if isinstance(mods[n], CELL_TYPES)])


def _runs_pruned(model: nn.Module, example: Any, cells: list[str]) -> None:
    """A pruned cell loop must still run: its state is built by the model's own code, which must take the
    width from the cell (``cell.hidden_size``), not from a number of its own."""
    if not cells:
        return
    from hwprune import inputs

    try:
        with torch.no_grad():
            was = model.training
            inputs.call(model.eval(), inputs.rows(example, slice(0, 1)))
            model.train(was)
    except Exception as exc:
        raise HwpruneError(f"the model does not run with cell {cells[0]!r} pruned ({one_line(exc, 160)}): its "
                           f"initial state is likely built with a fixed width; build it from "
                           f"self.{cells[0]}.hidden_size, or --exclude {cells[0]}") from exc


def _conv_scores(model: nn.Module, example: torch.Tensor, exclude: set[str], criterion: str,
                 batches: list | None) -> tuple[Any, list[tuple[CNNGroup, torch.Tensor]]]:
    dg, groups = cnn_groups(model, example, exclude)
    names = {m: n for n, m in model.named_modules()}
    acts = mean_activation(model, {names[g.root]: g.root for g in groups}, batches) \
        if criterion == "activation" else None
    return dg, [(g, cnn_scores(g.group, g.root, criterion, acts, names[g.root])) for g in groups]


def _prune_conv(model: nn.Module, example: torch.Tensor, policy: Policy, exclude: set[str],
                criterion: str, batches: list | None) -> None:
    dg, scored = _conv_scores(model, example, exclude, criterion, batches)
    todo = []
    for g, scores in scored:
        keep = keep_units(policy.keep.get(g.name, 1.0), g.units, policy.channel_multiple)
        if keep >= g.units:
            continue
        kept = set(kept_indices(scores, keep).tolist())
        todo.append((g, [i for i in range(g.units) if i not in kept]))
    for g, drop in todo:
        dg.get_pruning_group(g.root, g.handler, idxs=drop).prune()


def _prepared(model: nn.Module, example: torch.Tensor, exclude: set[str], importance: str,
              batches: Batches | None, loss: Any = None) -> tuple[nn.Module, list | None]:
    data = list(batches) if batches is not None else None
    if needs_data(importance) and not data:
        raise HwpruneError(f"importance {importance!r} needs a few data batches (give --data)")
    model = prepare_model(copy.deepcopy(model))
    if importance == "taylor":
        accumulate_grads(model, data or [], loss)
    return model, data


def unit_scores(model: nn.Module, example: torch.Tensor, *, exclude: Iterable[str] = (), importance: str = "l1",
                batches: Batches | None = None, loss: Any = None) -> dict[str, torch.Tensor]:
    """The importance of every unit of every prunable group (group name -> one score per unit).

    The scores :func:`prune_model` ranks units by within a group; comparing them across groups
    (global pruning) needs a normalization, which is the caller's choice.
    """
    excl = set(exclude)
    model, data = _prepared(model, example, excl, importance, batches, loss)
    if is_recurrent(model):
        return {plan.producer: s for plan, s in _recurrent_scores(model, example, excl, importance, data)}
    return {g.name: s for g, s in _conv_scores(model, example, excl, importance, data)[1]}


def prune_model(model: nn.Module, policy: Policy, example: torch.Tensor, *, exclude: Iterable[str] = (),
                importance: str = "l1", batches: Batches | None = None, loss: Any = None) -> nn.Module:
    """A pruned copy of ``model`` (the original is untouched); formats are not applied here.

    Args:
        model: the dense model.
        policy: keep ratios (validated against the model's space).
        example: one input batch.
        exclude: layers never to prune.
        importance: ``l1``, ``l2``, ``taylor`` or ``activation``.
        batches: a few (x, y) batches; required by ``taylor`` and ``activation``.
        loss: the task's ``loss(output, target)`` that ``taylor`` differentiates (default: cross-entropy).
    """
    excl = set(exclude)
    model, data = _prepared(model, example, excl, importance, batches, loss)
    policy.validate(build_space(model, example, excl))
    if is_recurrent(model):
        _prune_recurrent(model, example, policy, excl, importance, data)
    else:
        _prune_conv(model, example, policy, excl, importance, data)
    model.zero_grad(set_to_none=True)
    return model
