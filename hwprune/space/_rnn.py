"""Dependency analysis for recurrent models by tracing with ``torch.fx``.

A group is one producer (a single-layer LSTM/GRU, or a Linear) and the layers
that read its output features. Between producer and consumer only ops that keep
the feature (last) dimension are allowed: indexing of other dims, dropout,
activations, reductions over other dims. Anything else is reported, never
guessed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from hwprune.errors import HwpruneError
from hwprune.space._rnnstack import RNN_TYPES, RNNStack

__all__ = ["RNNGroupPlan", "analyze_rnn_model"]

_PASS_MODULES = (nn.Dropout, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Identity, nn.ReLU6, nn.LeakyReLU,
                 nn.ELU, nn.SiLU)
_PASS_FUNCS = {torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.gelu,
               nn.functional.dropout, torch.mean, torch.sum, torch.amax, nn.functional.silu,
               torch.squeeze, torch.flatten}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "mean", "sum", "amax", "squeeze", "clone",
                 "flatten", "float"}


@dataclass(frozen=True)
class RNNGroupPlan:
    """Producer and consumers of one hidden-unit or feature group.

    ``dirs`` is how many copies of the units the producer's output holds
    (2 for a bidirectional RNN); consumers' inputs are laid out [dir0 | dir1].
    """

    producer: str
    units: int
    dirs: int
    consumers: tuple[str, ...]
    kind: str
    state_consumers: tuple[str, ...] = ()  # layers reading the producer's final state h_n / c_n (one direction)
    members: tuple[str, ...] = ()  # per-channel layers between a conv and its readers (BatchNorm), sliced with it
    stride: int = 1  # features per unit at the readers (a conv's channel flattened with its height: C*H inputs)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (RNNStack,) + RNN_TYPES) or super().is_leaf_module(m, qualname)


def describe(node: fx.Node, mods: dict[str, nn.Module] | None = None) -> str:
    """A node of the traced forward pass in words (never an fx node dump)."""
    if node.op == "output":
        return "the model output"
    if node.op == "call_module":
        mod = (mods or {}).get(str(node.target))
        return f"layer {str(node.target)!r}" + (f" ({type(mod).__name__})" if mod is not None else "")
    if node.op == "call_method":
        return f"a '.{node.target}()' call"
    if node.op == "call_function":
        if node.target is operator.getitem:
            return f"indexing with [{node.args[1]!r}]"
        return f"a call to {getattr(node.target, '__name__', str(node.target))}()"
    return f"the input {node.target!s}" if node.op == "placeholder" else str(node.op)


def _last_dim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) else None


def _follow(gm: fx.GraphModule, start: fx.Node, width: int, mods: dict[str, nn.Module]) -> tuple[str, ...] | None:
    """Consumers reading ``start``'s last dim (of size ``width``); None if it reaches the model output."""
    consumers: list[str] = []
    frontier, seen = [start], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return None
            if user.op == "call_module":
                mod = mods[str(user.target)]
                if isinstance(mod, nn.Linear) and mod.in_features == width:
                    consumers.append(str(user.target))
                    continue
                if isinstance(mod, RNNStack) and mod.layers[0].input_size == width:
                    consumers.append(f"{user.target}.layers.0")
                    continue
                if isinstance(mod, RNN_TYPES) and mod.input_size == width:
                    consumers.append(str(user.target))
                    continue
                if isinstance(mod, _PASS_MODULES):
                    frontier.append(user)
                    continue
            ok = (user.op == "call_function" and (user.target in _PASS_FUNCS or user.target is operator.getitem)) \
                or (user.op == "call_method" and user.target in _PASS_METHODS)
            if ok and _last_dim(user) == width and sum(a is node for a in user.args) == 1:
                frontier.append(user)
                continue
            raise HwpruneError(f"cannot tell how the {width} features of {_name(start)} reach {describe(user, mods)} "
                               f"(only ops that keep the feature dimension are followed); exclude that layer "
                               f"(--exclude) or restructure the model")
    return tuple(consumers)


def _name(node: fx.Node) -> str:
    """The layer a traced value comes from (for messages)."""
    seen = node
    while seen.op == "call_function" and seen.target is operator.getitem and isinstance(seen.args[0], fx.Node):
        seen = seen.args[0]
    return repr(str(seen.target)) if seen.op == "call_module" else repr(seen.name)


def _is_getitem(node: fx.Node, index: object = None) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and \
        (index is None or node.args[1] == index)


def _rnn_output(node: fx.Node) -> fx.Node | None:
    """The output-sequence node of an RNN call (``out`` of ``out, h = rnn(x)``)."""
    out = None
    for user in node.users:
        if _is_getitem(user, 0):
            out = user
        elif _is_getitem(user, 1):
            continue  # the final state: _state_uses
        else:
            raise HwpruneError(f"layer {str(node.target)!r}: its (output, state) pair is used by {describe(user)}; "
                               f"hwprune follows 'out, h = rnn(x)' (or --exclude {node.target!s})")
    return out


def _state_uses(node: fx.Node, layers: int, dirs: int) -> list[tuple[int, fx.Node]]:
    """Every read of an RNN call's final state, as (layer index, node holding that layer's h_n or c_n).

    Followed: ``h_n[i]`` (one layer and direction of the stacked state; ``c_n[i]`` for an LSTM) and, for a
    single-layer one-direction RNN, ``h_n.squeeze(0)``. Anything else that reads the whole stacked state is
    refused with the layer and the operation named.
    """
    name = str(node.target)
    states = []
    for user in node.users:
        if not _is_getitem(user, 1):
            continue
        kids = list(user.users)
        if kids and all(_is_getitem(k) and k.args[1] in (0, 1) for k in kids):  # LSTM: (h_n, c_n)
            states += kids
        else:
            states.append(user)
    uses = []
    for st in states:
        for u in st.users:
            if _is_getitem(u) and isinstance(u.args[1], int):
                uses.append(((u.args[1] % (layers * dirs)) // dirs, u))
            elif layers * dirs == 1 and ((u.op == "call_method" and u.target == "squeeze") or
                                         (u.op == "call_function" and u.target is torch.squeeze)):
                uses.append((0, u))
            else:
                raise HwpruneError(f"layer {name!r}: its final state h_n is used by {describe(u)}; hwprune follows "
                                   f"one layer's state, h_n[i] (or h_n.squeeze(0) for one layer), into the "
                                   f"layers that read it. Index the state that way, or --exclude {name}")
    return uses


_CHANNEL_PASS = _PASS_MODULES + (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Dropout2d, nn.Dropout1d,
                                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
# elementwise ops that keep every dim (reductions and reshapes are handled, or refused, on their own)
_CHANNEL_PASS_FUNCS = _PASS_FUNCS - {torch.mean, torch.sum, torch.amax, torch.squeeze, torch.flatten}
_CHANNEL_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "clone", "float"}


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(v) for v in node.meta["tensor_meta"].shape)


def _dims_arg(node: fx.Node) -> list[int]:
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if "dims" in node.kwargs:
        args = list(node.kwargs["dims"])
    return [int(a) for a in args]


def _follow_channels(gm: fx.GraphModule, start: fx.Node, width: int, mods: dict[str, nn.Module]
                     ) -> tuple[tuple[str, ...], tuple[str, ...], int] | None:
    """Where a conv's output channels go: (readers, per-channel members such as BatchNorm, features per channel
    at the readers), or None when they reach the model output.

    Followed: BatchNorm, activations, pooling, dropout; ``permute``/``transpose`` (the channel dim moves) and
    ``flatten`` (the channel dim merges with the dims after it: a reader sees channel-major features, ``stride``
    per channel, as ``(B, C, H, W) -> (B, W, C*H)`` in a CRNN). Readers: convs (channels at dim 1), and
    Linear/LSTM/GRU layers (channels in the last dim).
    """
    readers: list[str] = []
    members: list[str] = []
    strides: set[int] = set()
    frontier = [(start, 1, 1)]
    seen: set[fx.Node] = set()
    while frontier:
        node, cdim, stride = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            rank = _rank(user)
            if user.op == "output":
                return None
            if user.op == "call_module":
                mod = mods[str(user.target)]
                r_node = _rank(node)
                last = r_node is not None and cdim == r_node - 1
                if isinstance(mod, nn.modules.conv._ConvNd) and cdim == 1 and stride == 1 and \
                        mod.in_channels == width and mod.groups == 1:
                    readers.append(str(user.target))
                    strides.add(1)
                    continue
                if isinstance(mod, _BN) and cdim == 1 and stride == 1 and mod.num_features == width:
                    members.append(str(user.target))
                    frontier.append((user, cdim, stride))
                    continue
                if isinstance(mod, _CHANNEL_PASS):
                    frontier.append((user, cdim, stride))
                    continue
                feats = width * stride
                if last and ((isinstance(mod, nn.Linear) and mod.in_features == feats) or
                             (isinstance(mod, RNN_TYPES) and mod.input_size == feats)):
                    readers.append(str(user.target))
                    strides.add(stride)
                    continue
                if last and isinstance(mod, RNNStack) and mod.layers[0].input_size == feats:
                    readers.append(f"{user.target}.layers.0")
                    strides.add(stride)
                    continue
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if user.op in ("call_method", "call_function") and name in ("permute", "transpose", "flatten") and \
                    user.args and user.args[0] is node and rank is not None:
                r_in = _rank(node)
                assert r_in is not None
                if name == "permute":
                    dims = [d % r_in for d in _dims_arg(user)]
                    frontier.append((user, dims.index(cdim), stride))
                    continue
                if name == "transpose":
                    a, b = (d % r_in for d in _dims_arg(user)[:2])
                    frontier.append((user, b if cdim == a else a if cdim == b else cdim, stride))
                    continue
                args = _dims_arg(user)
                s0 = (args[0] if args else int(user.kwargs.get("start_dim", 0))) % r_in
                e0 = (args[1] if len(args) > 1 else int(user.kwargs.get("end_dim", -1))) % r_in
                if cdim < s0:
                    frontier.append((user, cdim, stride))
                    continue
                if cdim > e0:
                    frontier.append((user, cdim - (e0 - s0), stride))
                    continue
                if cdim == s0:
                    inner = 1
                    for v in _shape(node)[cdim + 1: e0 + 1]:
                        inner *= v
                    frontier.append((user, s0, stride * inner))
                    continue
            ok = (user.op == "call_function" and user.target in _CHANNEL_PASS_FUNCS) or \
                (user.op == "call_method" and user.target in _CHANNEL_PASS_METHODS)
            if ok and sum(a is node for a in user.args) == 1 and _rank(user) == _rank(node):
                frontier.append((user, cdim, stride))
                continue
            raise HwpruneError(f"cannot tell how the {width} channels of {_name(start)} reach {describe(user, mods)} "
                               f"(followed: BatchNorm, activations, pooling, permute/transpose/flatten into "
                               f"conv, Linear, LSTM and GRU layers); exclude that conv (--exclude) or restructure "
                               f"the model")
    if len(strides) > 1:
        raise HwpruneError(f"the channels of {_name(start)} reach its readers with different layouts; exclude it")
    return tuple(dict.fromkeys(readers)), tuple(dict.fromkeys(members)), (strides.pop() if strides else 1)


def analyze_rnn_model(model: nn.Module, example: torch.Tensor, exclude: set[str]) -> list[RNNGroupPlan]:
    """Groups of a model holding LSTM/GRU layers (stacks already split)."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
        ShapeProp(gm).propagate(example)
    except HwpruneError:
        raise
    except Exception as exc:
        raise HwpruneError(f"cannot trace the model with torch.fx for RNN analysis: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    mods = dict(model.named_modules())
    plans: list[RNNGroupPlan] = []
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    counts: dict[str, int] = {}
    for n in calls:
        counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    for node in calls:
        name, mod = str(node.target), mods[str(node.target)]
        if counts[name] > 1 or name in exclude:
            continue  # excluded, or called twice: not pruned on its own
        if isinstance(mod, (RNNStack,) + RNN_TYPES):
            stack = list(mod.layers) if isinstance(mod, RNNStack) else [mod]
            names = [f"{name}.layers.{k}" for k in range(len(stack))] if isinstance(mod, RNNStack) else [name]
            d = 2 if stack[0].bidirectional else 1
            out = _rnn_output(node)
            readers: dict[int, list[str]] = {}
            reaches_output = set()
            for k, use in _state_uses(node, len(stack), d):
                got = _follow(gm, use, stack[k].hidden_size, mods)
                if got is None:
                    reaches_output.add(k)
                else:
                    readers.setdefault(k, []).extend(got)
            for k, layer in enumerate(stack):
                if k < len(stack) - 1:
                    cons: tuple[str, ...] | None = (names[k + 1],)
                else:
                    cons = _follow(gm, out, layer.hidden_size * d, mods) if out is not None else ()
                if cons is None or k in reaches_output:
                    continue  # a model output: its units are not ours to remove
                state = tuple(dict.fromkeys(readers.get(k, [])))
                if set(state) & set(cons):
                    raise HwpruneError(f"layer {names[k]!r}: {sorted(set(state) & set(cons))[0]!r} reads both its "
                                       f"output sequence and its final state; exclude one of them")
                plans.append(RNNGroupPlan(names[k], layer.hidden_size, d, cons, "hidden", state))
        elif isinstance(mod, nn.modules.conv._ConvNd) and mod.groups == 1:  # a conv front end (CRNN)
            got = _follow_channels(gm, node, mod.out_channels, mods)
            if got is not None and got[0]:
                plans.append(RNNGroupPlan(name, mod.out_channels, 1, got[0], "channels", members=got[1],
                                          stride=got[2]))
        elif isinstance(mod, nn.Embedding):  # the embedding width: its columns and the readers' inputs
            try:
                cons = _follow(gm, node, mod.embedding_dim, mods)
            except HwpruneError:
                continue
            if cons:
                plans.append(RNNGroupPlan(name, mod.embedding_dim, 1, cons, "embedding"))
        elif isinstance(mod, nn.Linear):
            try:
                cons = _follow(gm, node, mod.out_features, mods)
            except HwpruneError:
                continue  # a Linear whose features meet others (e.g. two heads added): kept whole, never guessed
            if cons is not None:
                plans.append(RNNGroupPlan(name, mod.out_features, 1, cons, "features"))
    return [p for p in plans if p.producer not in exclude and not ((set(p.consumers) | set(p.state_consumers)) & exclude)]
