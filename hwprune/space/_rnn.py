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


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (RNNStack,) + RNN_TYPES) or super().is_leaf_module(m, qualname)


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
            raise HwpruneError(f"cannot tell how {start.target!s} output reaches {user.format_node()!s}; "
                               f"exclude that layer (--exclude) or restructure the model")
    return tuple(consumers)


def _rnn_output(node: fx.Node) -> fx.Node | None:
    """The output-sequence node of an RNN call (``out`` of ``out, h = rnn(x)``)."""
    out = None
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
            out = user
        elif user.op == "call_function" and user.target is operator.getitem and not user.users:
            continue
        else:
            raise HwpruneError(f"{node.target!s}: only the output sequence of an RNN can be traced; "
                               f"its final state is used by {user.format_node()} (use out[:, -1] instead, "
                               f"or --exclude {node.target!s})")
    return out


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
        if isinstance(mod, RNNStack):
            d = mod.dirs
            for k in range(len(mod.layers) - 1):
                plans.append(RNNGroupPlan(f"{name}.layers.{k}", mod.layers[k].hidden_size, d,
                                          (f"{name}.layers.{k + 1}",), "hidden"))
            out = _rnn_output(node)
            last = mod.layers[-1]
            cons = _follow(gm, out, last.hidden_size * d, mods) if out is not None else ()
            if cons is not None:
                plans.append(RNNGroupPlan(f"{name}.layers.{len(mod.layers) - 1}", last.hidden_size, d, cons, "hidden"))
        elif isinstance(mod, RNN_TYPES):
            d = 2 if mod.bidirectional else 1
            out = _rnn_output(node)
            cons = _follow(gm, out, mod.hidden_size * d, mods) if out is not None else ()
            if cons is not None:
                plans.append(RNNGroupPlan(name, mod.hidden_size, d, cons, "hidden"))
        elif isinstance(mod, nn.Linear):
            cons = _follow(gm, node, mod.out_features, mods)
            if cons is not None:
                plans.append(RNNGroupPlan(name, mod.out_features, 1, cons, "features"))
    return [p for p in plans if p.producer not in exclude and not (set(p.consumers) & exclude)]
