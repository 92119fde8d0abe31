"""The space: prunable groups and quantizable layers of a model.

CNNs go through Torch-Pruning's dependency graph; models with LSTM/GRU layers
through hwprune's own tracing (multi-layer stacks are split into per-layer
modules first, so each layer is its own group).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import nn

from hwprune import inputs
from hwprune._modelcopy import copy_model
from hwprune.errors import HwpruneError, one_line
from hwprune.space._cnn import cnn_groups, shapes as _shapes
from hwprune.space._cut import cut_plans
from hwprune.space._depth import DepthBlock, drop_blocks, droppable_blocks
from hwprune.space._rnn import RNNGroupPlan, analyze_rnn_model
from hwprune.space._rnnstack import CELL_TYPES, RNN_TYPES, RNNStack, split_rnn_stacks
from hwprune.space._trace import raised_at
from hwprune.space._types import PrunableGroup, QuantLayer, Space

__all__ = ["PrunableGroup", "QuantLayer", "Space", "RNNStack", "DepthBlock", "drop_blocks", "build_space", "prepare_model",
           "is_recurrent", "quant_layers", "rnn_plans", "check_input", "check_prunable"]

_OPS = ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Linear, "linear"), (nn.LSTM, "lstm"), (nn.GRU, "gru"),
        (nn.ConvTranspose1d, "convt1d"), (nn.ConvTranspose2d, "convt2d"), (nn.LSTMCell, "lstmcell"),
        (nn.GRUCell, "grucell"), (nn.RNNCell, "rnncell"), (nn.RNN, "rnn"))


def prepare_model(model: nn.Module) -> nn.Module:
    """Split multi-layer LSTM/GRU stacks into per-layer modules, in place (numerically identical)."""
    return split_rnn_stacks(model)


def is_recurrent(model: nn.Module) -> bool:
    """Holds an LSTM/GRU layer or cell: analysed by hwprune's own tracing (Torch-Pruning's graph otherwise)."""
    return any(isinstance(m, RNN_TYPES + CELL_TYPES) for m in model.modules())


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """Every conv/linear/LSTM/GRU layer, in module order."""
    out = []
    for name, mod in model.named_modules():
        for cls, op in _OPS:
            if type(mod) is cls:  # a ReLU RNN is another kernel than a tanh one: its own op
                out.append(QuantLayer(name, op + ("relu" if getattr(mod, "nonlinearity", "") == "relu" else "")))
    return out


def check_input(model: nn.Module, example: Any) -> None:
    """Run one forward pass; inputs that do not fit become a one-line error."""
    try:
        with torch.no_grad():
            inputs.call(model.eval(), example)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HwpruneError(f"{inputs.describe(example)} does not fit the model: {msg}") from exc


def check_prunable(space: Space, policy: Any = None) -> None:
    """Refuse a command that would prune nothing: no prunable group (and no format to set), or a policy that
    keeps every unit of every group and sets no format."""
    if not space.groups and not (policy is not None and (policy.formats or policy.drop)):
        why = f" (excluded: {', '.join(space.excluded)})" if space.excluded else ""
        if space.kept:
            first = next(iter(space.kept.items()))
            why += f" (kept whole: {', '.join(space.kept)}; {first[0]}: {first[1]})"
        raise HwpruneError(f"nothing to prune: the model has no prunable group{why}; remove layers from --exclude, "
                           f"or check 'hwprune inspect'")
    if policy is not None and not policy.formats and not policy.drop and \
            all(policy.units(space)[g.name] == g.units for g in space.groups):
        raise HwpruneError("nothing to prune: the policy keeps every unit of every group and sets no format")


def rnn_plans(model: nn.Module, example: Any, exclude: Iterable[str] = (),
              ties: dict[str, tuple[str, ...]] | None = None) -> list[RNNGroupPlan]:
    """Every plan the analysis finds (not cut-checked: build_space's groups are the checked ones, and a policy is
    validated against them), with the readers ``ties`` (the checked space's :attr:`Space.ties`) tied to theirs."""
    plans = analyze_rnn_model(model, example, set(exclude), {})  # layers kept whole: see build_space's Space.kept
    by_producer = {p.producer: p for p in plans}
    gone: set[str] = set()
    for name, readers in (ties or {}).items():
        if name in by_producer:
            for c in readers:
                if c in by_producer:
                    by_producer[name] = _tie(by_producer[name], by_producer[c])
                    gone.add(c)
    return [by_producer[p.producer] for p in plans if p.producer not in gone]


def _tie(p: RNNGroupPlan, q: RNNGroupPlan) -> RNNGroupPlan:
    """Group ``p`` with the outputs of its reader ``q`` (a Linear, its own features group) cut to p's indices."""
    return replace(p, consumers=tuple(dict.fromkeys(p.consumers + q.consumers)), tied=p.tied + (q.producer,),
                   state_consumers=p.state_consumers + q.state_consumers,
                   reader_copies=p.reader_copies + q.reader_copies)


def _cuttable(model: nn.Module, example: Any, plans: list[RNNGroupPlan], kept: dict[str, str]) -> list[RNNGroupPlan]:
    """The plans that can be cut: each cut alone to every other unit on a copy of the model, which must run and
    give the dense model's output shapes. One that does not (the model's own code holds the width as a number,
    e.g. ``x[:, :, :self.n_hidden]``) is kept whole, with the user's line that failed, in ``kept``.

    A hidden-unit group that fails is tried once more with a reader's outputs tied to it: a Linear reading the
    units whose output is as wide as they are, cut to the same indices with its own readers (OpenNMT's attention
    reshapes its output with the memory bank's width, ``.view(batch, tgt_len, dim)``: the two widths are one)."""
    if not plans:
        return plans
    was = model.training
    try:
        with torch.no_grad():
            want = _shapes(inputs.call(model.eval(), example))

        def fails(plan: RNNGroupPlan) -> str | None:
            trial = copy_model(model)
            try:
                cut_plans(trial, [(plan, torch.arange(0, plan.units, 2))])
                with torch.no_grad():
                    got = _shapes(inputs.call(trial.eval(), example))
                return None if got == want else f"the model's output shapes change from {want} to {got}"
            except Exception as exc:  # noqa: BLE001 - the model's own code fails once cut: reported, kept whole
                return f"the model fails{raised_at(exc)}: {one_line(exc, 160)}"

        why = {p.producer: fails(p) for p in plans}
        by_producer = {p.producer: p for p in plans}
        merged: dict[str, RNNGroupPlan] = {}
        absorbed: set[str] = set()
        for p in plans:
            if why[p.producer] is None or p.kind != "hidden":
                continue
            for c in p.consumers:
                q = by_producer.get(c)
                if q is None or q.kind != "features" or q.units != p.units * p.dirs or c in absorbed:
                    continue
                tied = _tie(p, q)
                if fails(tied) is None:
                    merged[p.producer], why[p.producer] = tied, None
                    absorbed.add(c)
                    break
        ok = []
        for plan in plans:
            if plan.producer in absorbed:
                continue
            if why[plan.producer] is None:
                ok.append(merged.get(plan.producer, plan))
            else:
                kept[plan.producer] = (f"cut to half, {why[plan.producer]} (the model's code likely holds its width "
                                       f"as a number, e.g. a state built with a fixed size or a fixed slice; take it "
                                       f"from the layer, e.g. self.rnn.hidden_size); kept whole")
        return ok
    finally:
        model.train(was)


def build_space(model: nn.Module, example: Any, exclude: Iterable[str] = (), blocks: bool = True) -> Space:
    """Find the prunable groups and quantizable layers of ``model``.

    Args:
        model: the model, left as it was (its training mode too): multi-layer LSTM/GRU stacks are split into
            one module per layer on a copy, and the groups are named as in that copy (what ``prune_model``
            prunes; :func:`prepare_model` splits a model in place).
        example: one batch of input (batch size 1 is enough).
        exclude: module names never to prune.
        blocks: find the blocks a policy may drop (each dropped once on a copy of the model); False: the space
            lists none (the space of a model whose blocks are already dropped, where nothing asks for them).
    """
    excl = set(exclude)
    stacks = [n for n, m in model.named_modules() if isinstance(m, RNN_TYPES) and m.num_layers > 1]
    was = model.training
    try:
        return _build_space(model, example, excl, stacks, blocks)
    finally:
        model.train(was)


def _build_space(model: nn.Module, example: Any, excl: set[str], stacks: list[str], blocks: bool = True) -> Space:
    if stacks:  # the input is blamed only when the model as the user gave it fails on it
        check_input(model, example)
        model = copy_model(model)  # split on a copy: the caller's model keeps its nn.LSTM/nn.GRU
    prepare_model(model)
    known = {n for n, _ in model.named_modules()}
    unknown = sorted(excl - known)
    if unknown:
        raise HwpruneError(f"excluded layer {unknown[0]!r} is not in the model")
    if not stacks:
        check_input(model, example)
    else:
        try:
            with torch.no_grad():
                inputs.call(model.eval(), example)
        except Exception as exc:  # noqa: BLE001 - the model ran before the split: hwprune's RNNStack lacks what
            raise HwpruneError(  # the model asks of it (an attribute of nn.LSTM/nn.GRU it does not mirror)
                f"the model runs, but not with its multi-layer RNN(s) {', '.join(map(repr, stacks))} split into "
                f"one module per layer (hwprune's RNNStack, so each layer is pruned alone): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (a gap in hwprune: please "
                f"report it with the model)") from exc
    kept: dict[str, str] = {}
    ties: dict[str, tuple[str, ...]] = {}
    if is_recurrent(model):
        plans = _cuttable(model, example, analyze_rnn_model(model, example, excl, kept), kept)
        groups = [PrunableGroup(p.producer, p.units, (p.producer,) + p.coupled + p.joined + p.through + p.members +
                                tuple(n for n, _ in p.norms) + p.consumers + p.state_consumers, p.kind) for p in plans]
        ties = {p.producer: p.tied for p in plans if p.tied}
    else:
        _, cg = cnn_groups(model, example, excl, kept)
        groups = [PrunableGroup(g.name, g.units, g.layers, "channels" if not isinstance(g.root, nn.Linear)
                                else "features") for g in cg]
    return Space(groups, quant_layers(model), sorted(excl), kept,
                 droppable_blocks(model, example, excl) if blocks else [], ties)
