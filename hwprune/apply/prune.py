"""Turn a dense model into a physically smaller one under a policy."""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch import nn

from hwprune._modelcopy import copy_model
from hwprune.apply.importance import (Batches, accumulate_grads, cnn_scores, mean_activation, needs_data,
                                      rnn_scores)
from hwprune.errors import HwpruneError, one_line
from hwprune.policy import Policy, keep_units
from hwprune.space import Space, build_space, drop_blocks, is_recurrent, prepare_model, rnn_plans
from hwprune.space._cnn import CNNGroup, cnn_groups, unmapped_reshapes
from hwprune.space._rnn import RNNGroupPlan
from hwprune.space._cut import cut_plans
from hwprune.space._rnnstack import CELL_TYPES

__all__ = ["prune_model", "kept_indices", "unit_scores"]


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending order (ties: lower index wins)."""
    order = torch.argsort(-scores, stable=True)
    return torch.sort(order[:keep]).values


def _recurrent_scores(model: nn.Module, example: torch.Tensor, exclude: set[str], criterion: str,
                      batches: list | None, ties: dict[str, tuple[str, ...]] | None = None
                      ) -> list[tuple[RNNGroupPlan, torch.Tensor]]:
    plans = rnn_plans(model, example, exclude, ties)
    mods = dict(model.named_modules())
    acts = mean_activation(model, {n: mods[n] for p in plans for n in (p.producer,) + p.coupled + p.joined}, batches) \
        if criterion == "activation" else None
    return [(plan, rnn_scores(mods, plan, criterion, acts)) for plan in plans]


def _prune_recurrent(model: nn.Module, example: torch.Tensor, policy: Policy, exclude: set[str],
                     criterion: str, batches: list | None, ties: dict[str, tuple[str, ...]] | None = None) -> None:
    cuts = []
    for plan, scores in _recurrent_scores(model, example, exclude, criterion, batches, ties):
        keep = keep_units(policy.keep.get(plan.producer, 1.0), plan.units, policy.channel_multiple)
        if keep < plan.units:
            cuts.append((plan, kept_indices(scores, keep)))
    mods = dict(model.named_modules())
    cut = cut_plans(model, cuts)
    _runs_pruned(model, example, [n for n in cut if isinstance(mods[n], CELL_TYPES)])


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
    dg, groups = cnn_groups(model, example, exclude, verify=False)  # the policy was validated on the checked space
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
    with unmapped_reshapes():
        for g, drop in todo:
            dg.get_pruning_group(g.root, g.handler, idxs=drop).prune()


def _prepared(model: nn.Module, example: torch.Tensor, exclude: set[str], importance: str,
              batches: Batches | None, loss: Any = None) -> tuple[nn.Module, list | None]:
    data = list(batches) if batches is not None else None
    if needs_data(importance) and not data:
        raise HwpruneError(f"importance {importance!r} needs a few data batches (give --data)")
    model = prepare_model(copy_model(model))
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
    original = model
    model, data = _prepared(model, example, excl, importance, batches, loss)
    if is_recurrent(model):
        ties = _checked_space(original, model, example, excl).ties
        return {plan.producer: s for plan, s in _recurrent_scores(model, example, excl, importance, data, ties)}
    return {g.name: s for g, s in _conv_scores(model, example, excl, importance, data)[1]}


# model -> {(structure, exclude, example shapes): its checked space}. build_space cuts every group once to check it;
# a search prunes one dense model hundreds of times, and the check's answer depends only on the model's structure.
_SPACES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Space]]" = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    return tuple((n, type(m).__qualname__, tuple(tuple(t.shape) for t in m.parameters(recurse=False)))
                 for n, m in model.named_modules())


def _checked_space(original: nn.Module, prepared: nn.Module, example: Any, excl: set[str],
                   drop: tuple[str, ...] = ()) -> Space:
    """``build_space`` of ``prepared`` (a prepared copy of ``original``, with the blocks ``drop`` names dropped),
    remembered for ``original`` while its structure is unchanged. With blocks dropped, the space lists no
    droppable blocks: only its groups are asked for (and finding blocks drops each one on a copy)."""
    from hwprune import inputs

    key = (_structure(original), frozenset(excl), inputs.shape_of(example), drop)
    try:
        known = _SPACES.setdefault(original, {})
    except TypeError:  # a model that cannot be weakly referenced: checked every time
        return build_space(prepared, example, excl, blocks=not drop)
    if key not in known:
        if len(known) > 64 or any(k[0] != key[0] for k in known):  # another structure: forget the old one
            known.clear()
        known[key] = build_space(prepared, example, excl, blocks=not drop)
    return known[key]


def reduced_keep(space: Space, reduced: Space, policy: Policy) -> dict[str, float]:
    """``policy``'s keep ratios for the groups of the model with its blocks dropped (``reduced``): each such group
    lies inside one group of the dense model (its root layer is a member there; without a block, a group loses
    the layers inside it but no two groups merge), whose ratio it takes."""
    out = {}
    for g in reduced.groups:
        home = next((d for d in space.groups if d.name == g.name), None) or \
            next((d for d in space.groups if g.name in d.layers), None)
        if home is not None and home.name in policy.keep:
            out[g.name] = policy.keep[home.name]
    return out


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
    original = model
    model, data = _prepared(model, example, excl, importance, batches, loss)
    space = _checked_space(original, model, example, excl)
    policy.validate(space)
    if policy.drop:  # depth first; the widths are then cut on the model without those blocks
        drop_blocks(model, policy.drop)
        reduced = _checked_space(original, model, example, excl, policy.drop)
        policy = Policy(reduced_keep(space, reduced, policy), {}, policy.channel_multiple, policy.model)
        space = reduced
    if is_recurrent(model):
        _prune_recurrent(model, example, policy, excl, importance, data, space.ties)
    else:
        _prune_conv(model, example, policy, excl, importance, data)
    model.zero_grad(set_to_none=True)
    return model
