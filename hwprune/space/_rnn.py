"""Dependency analysis for recurrent models by tracing with ``torch.fx``.

A group is one producer (a single-layer LSTM/GRU, or a Linear) and the layers
that read its output features. Between producer and consumer only ops that keep
the feature (last) dimension are allowed: indexing of other dims, dropout,
activations, reductions over other dims. Anything else is reported, never
guessed.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from hwprune.errors import HwpruneError
from hwprune.space._rnnstack import CELL_TYPES, RNN_TYPES, RNNStack
from hwprune.space._depth import Dropped
from hwprune.space._trace import PACKING, trace_concrete, where

__all__ = ["RNNGroupPlan", "analyze_rnn_model"]

_PASS_MODULES = (nn.Dropout, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Identity, nn.ReLU6, nn.LeakyReLU,
                 nn.ELU, nn.SiLU)
_PASS_FUNCS = {torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.gelu,
               nn.functional.dropout, torch.mean, torch.sum, torch.amax, nn.functional.silu,
               torch.squeeze, torch.flatten, nn.functional.hardtanh, nn.functional.relu6, nn.functional.leaky_relu,
               nn.functional.elu, torch.clamp, *PACKING}
_PAD_PACKED = nn.utils.rnn.pad_packed_sequence  # returns (padded, lengths): only [0] carries the features
_JOIN = {torch.stack, torch.cat}  # a list of step outputs joined along a dim other than the features'
_STATE_TAKING = RNN_TYPES + (RNNStack,) + CELL_TYPES
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "mean", "sum", "amax", "squeeze", "clone",
                 "flatten", "float", "clamp"}
_SHAPE_ONLY = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "new", "size", "dim"}
_SHAPE_ATTRS = {"data", "shape", "dtype", "device"}  # getattr(x, ...) read for a shape, a dtype, a device
_MOVES = {"transpose", "permute"}  # pass when the last dim stays last (T x N x H <-> N x T x H)


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
    state_consumers: tuple[str, ...] = ()  # layers reading units-wide blocks: the final state h_n / c_n (one
    # direction), or the output with its directions added (DeepSpeech's x[..., :n] + x[..., n:])
    members: tuple[str, ...] = ()  # per-channel layers between a conv and its readers (BatchNorm), sliced with it
    stride: int = 1  # features per unit at the readers (a conv's channel flattened with its height: C*H inputs)
    outer: int = 1  # blocks of units x stride features at the readers (channels last, merged with the dims
    # before them: SpeechBrain's (B, T, F, C) -> (B, T, F*C), F blocks of C)
    norms: tuple[tuple[str, int], ...] = ()  # LayerNorms over the units (and other dims): (layer, axis of the
    # units in its normalized shape)
    coupled: tuple[str, ...] = ()  # RNN layers whose hidden units are the producer's (a decoder started from its
    # final state): their output units are kept alike, in the same order
    reader_copies: tuple[tuple[str, int], ...] = ()  # readers that see the units several times side by side
    # ([dec | context] after attention): (reader, copies of the dirs-wide block)
    joined: tuple[str, ...] = ()  # one-direction RNN layers started from a bidirectional producer's final state
    # with its directions joined side by side (OpenNMT's _fix_enc_hidden): their hidden units are [dir0 | dir1]
    # of the producer's, dirs x units wide, kept alike in both halves
    through: tuple[str, ...] = ()  # square Linear layers that map the units onto themselves (general attention's
    # linear_in: its output is contracted with the units): inputs and outputs cut alike
    tied: tuple[str, ...] = ()  # readers whose output width the model's code takes from the units' width
    # (OpenNMT's attention output, ``.view(batch, tgt_len, dim)`` with ``dim`` the memory bank's): their outputs
    # are cut to the same [dir0 | dir1] indices, and their own readers (in ``consumers``) read them so

    def copies(self, reader: str) -> int:
        return dict(self.reader_copies).get(reader, 1)


LEAVES = (RNNStack,) + RNN_TYPES + CELL_TYPES


def describe(node: fx.Node, mods: dict[str, nn.Module] | None = None) -> str:
    """A node of the traced forward pass in words, with the user's source line (never an fx node dump)."""
    return _what(node, mods) + where(node)


def _what(node: fx.Node, mods: dict[str, nn.Module] | None = None) -> str:
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


def _hx_nodes(call: fx.Node) -> list[fx.Node]:
    """The nodes an RNN / cell call takes as its initial state (``hx``: its second argument)."""
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    out: list[fx.Node] = []
    fx.node.map_arg(hx, out.append)
    return out


_ARITH = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add, torch.sub}
_ARITH_METHODS = {"mul", "div", "add", "sub", "__mul__", "__truediv__"}


def _scaled(user: fx.Node, node: fx.Node, width: int) -> bool:
    """``x / n``, ``x * mask``: arithmetic with a scalar or with a tensor that is constant along the features
    (last dim 1, e.g. ``lengths[:, None]``), which keeps every feature where it was."""
    if not ((user.op == "call_function" and user.target in _ARITH) or
            (user.op == "call_method" and user.target in _ARITH_METHODS)):
        return False
    args = list(user.args)
    if sum(a is node for a in args) != 1 or _last_dim(user) != width:
        return False
    other = [a for a in args if a is not node]
    for o in other:
        if isinstance(o, fx.Node):
            if _last_dim(o) not in (1, None) or _rank(o) is None:
                return False
        elif not isinstance(o, (int, float)):
            return False
    return True


def _join_ok(user: fx.Node, node: fx.Node, width: int) -> bool:
    """``torch.stack(steps, dim)`` / ``torch.cat(steps, dim)`` of step outputs along a dim other than the
    features' (the result keeps ``width`` features in its last dim)."""
    if user.op != "call_function" or user.target not in _JOIN or not user.args:
        return False
    seq = user.args[0]
    if not isinstance(seq, (list, tuple)) or node not in seq:
        return False
    rank = _rank(user)
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
    return rank is not None and isinstance(dim, int) and dim % rank != rank - 1 and _last_dim(user) == width


def _last_dim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) else None


_MATMUL = {torch.bmm, torch.matmul, operator.matmul}


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL) or \
        (node.op == "call_method" and node.target in ("bmm", "matmul"))


def _swaps_last_two(node: fx.Node) -> bool:
    """``x.transpose(1, 2)`` / ``x.transpose(-1, -2)`` / ``x.mT`` of a rank-3 tensor: the features move to
    dim -2, where a matmul contracts them."""
    if node.op not in ("call_method", "call_function") or not node.args:
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    r = _rank(node)
    if name != "transpose" or r is None:
        return False
    dims = sorted(d % r for d in _dims_arg(node)[:2])
    return dims == [r - 2, r - 1]


def _keeps_last(user: fx.Node, node: fx.Node) -> bool:
    """``x.transpose(0, 1)`` / ``x.permute(1, 0, 2)``: dims moved, the last one left where it is."""
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    r = _rank(node)
    if name not in _MOVES or r is None or not user.args or user.args[0] is not node:
        return False
    dims = [d % r for d in _dims_arg(user)]
    if name == "transpose":
        return len(dims) >= 2 and r - 1 not in dims[:2]
    return len(dims) == r and dims[-1] == r - 1


def _half(user: fx.Node, node: fx.Node, width: int) -> int | None:
    """0 or 1 when ``user`` is ``node[..., :width // 2]`` or ``node[..., width // 2:]`` (every other dim whole),
    else None."""
    if not _is_getitem(user) or user.args[0] is not node or width % 2 or _rank(node) is None:
        return None
    idx = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    whole = slice(None)
    if not idx or any(i not in (whole, Ellipsis) for i in idx[:-1]):
        return None
    if Ellipsis not in idx and len(idx) != _rank(node):
        return None
    last, n = idx[-1], width // 2
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    if last.start in (None, 0) and last.stop == n:
        return 0
    if last.start == n and last.stop in (None, width):
        return 1
    return None


def _direction_sum(user: fx.Node, node: fx.Node, width: int) -> fx.Node | None:
    """DeepSpeech's ``x[:, :, :n] + x[:, :, n:]`` of a bidirectional output (``width`` = 2n): the add node when
    ``user`` is one half and its only use adds it to the other half, else None. Unit i of both directions lands
    on feature i: the readers after it see one n-wide block of the units."""
    side = _half(user, node, width)
    if side is None or len(user.users) != 1:
        return None
    add = next(iter(user.users))
    if not (add.op == "call_function" and add.target in (operator.add, torch.add)) and \
            not (add.op == "call_method" and add.target in ("add", "__add__")):
        return None
    parts = [a for a in add.args if isinstance(a, fx.Node)]
    if len(parts) != 2 or len(add.args) != 2 or add.kwargs:
        return None
    other = parts[1] if parts[0] is user else parts[0]
    return add if _half(other, node, width) == 1 - side and len(other.users) == 1 else None


def _follow(start: fx.Node | list[fx.Node], width: int, mods: dict[str, nn.Module],
            skip: set[fx.Node] = frozenset(), copies: dict[str, int] | None = None,  # type: ignore[assignment]
            dirs: int = 1, summed: set[str] | None = None, through: list[str] | None = None
            ) -> tuple[str, ...] | None:
    """Consumers reading the last dim (of size ``width``) of ``start`` (one node or several: a cell loop's steps,
    an encoder's and its decoder's outputs); None if it reaches the model output. Calls in ``skip`` (a cell
    loop's next steps) are not readers.

    Besides ops that keep the feature dim: ``torch.stack``/``torch.cat`` of step outputs along another dim;
    ``torch.cat([a, b], -1)`` of two tensors of these features (a reader then sees the units twice: ``copies``
    gets the reader's count); dot-product attention, ``bmm(q, k.transpose(1, 2))`` (the features contracted
    between two tensors of these units: nothing to read on) and ``bmm(weights, v)`` (the features stay last).
    Every other operand of a join or a contraction must itself be reached from ``start``.

    With ``dirs`` 2 (a bidirectional output, ``width`` = 2 x units), the two directions' halves added
    (``x[..., :n] + x[..., n:]``) are followed too: the readers after the sum see one units-wide block, and go to
    ``summed`` as well as to the result.

    With ``through`` (a list), a square Linear (``width`` in and out) whose output is the query of such a
    contraction (general attention's ``linear_in``: ``bmm(linear_in(dec), enc.transpose(1, 2))``) maps the units
    onto themselves: it goes to ``through`` and its output is followed as the units."""
    consumers: list[str] = []
    starts = start if isinstance(start, list) else [start]
    frontier = [(n, 1, 1) for n in starts]  # (node, copies of the block side by side, directions summed: 1 or 2)
    seen: set[fx.Node] = set(starts)
    joins: list[fx.Node] = []
    need: list[tuple[fx.Node, fx.Node]] = []  # (an operand that must be reached, the op needing it)
    while frontier:
        node, k, m = frontier.pop()
        w = width * k // m
        for user in node.users:
            if user in seen or user in skip:
                continue
            if node.op == "call_function" and node.target is _PAD_PACKED:
                if _is_getitem(user, 0):
                    seen.add(user)
                    frontier.append((user, k, m))
                continue  # [1]: the lengths
            seen.add(user)
            if user.op == "output":
                return None
            if user.op == "call_method" and user.target in _SHAPE_ONLY and user.args[0] is node:
                continue  # x.new_zeros(...): only x's dtype and device are read
            if dirs == 2 and m == 1 and k == 1 and summed is not None:
                add = _direction_sum(user, node, w)
                if add is not None:
                    seen.update(a for a in add.args if isinstance(a, fx.Node))
                    seen.add(add)
                    frontier.append((add, 1, 2))
                    continue
            if _join_ok(user, node, w):
                joins.append(user)
                frontier.append((user, k, m))
                continue
            if _cat_features(user, node, w):  # [a | b] along the features: the units twice
                joins.append(user)
                frontier.append((user, k * len(user.args[0]), m))
                continue
            if _swaps_last_two(user) and user.users and all(_is_matmul(u) and u.args[1] is user for u in user.users):
                for u in user.users:  # q @ k^T: the features are contracted with q's, which must be ours
                    seen.add(u)
                    need.append((u.args[0], u))
                continue
            if _is_matmul(user) and user.args[0] is node and isinstance(user.args[1], fx.Node) and \
                    _swaps_last_two(user.args[1]):
                need.append((user.args[1].args[0], user))
                continue
            if _is_matmul(user) and user.args[1] is node and _last_dim(user) == w and user.args[0] is not node:
                frontier.append((user, k, m))  # attention weights @ values: the features stay last
                continue
            if user.op == "call_module":
                mod = mods[str(user.target)]
                read = None
                if through is not None and k == 1 and m == 1 and isinstance(mod, nn.Linear) and \
                        mod.in_features == mod.out_features == w and _queries(user):
                    through.append(str(user.target))
                    frontier.append((user, k, m))
                    continue
                if isinstance(mod, nn.Linear) and mod.in_features == w:
                    read = str(user.target)
                elif isinstance(mod, RNNStack) and mod.layers[0].input_size == w:
                    read = f"{user.target}.layers.0"
                elif isinstance(mod, RNN_TYPES) and mod.input_size == w:
                    read = str(user.target)
                if read is not None:
                    consumers.append(read)
                    if k > 1 and copies is not None:
                        copies[read] = k
                    if m > 1 and summed is not None:
                        summed.add(read)
                    continue
                if isinstance(mod, _PASS_MODULES):
                    frontier.append((user, k, m))
                    continue
            ok = (user.op == "call_function" and (user.target in _PASS_FUNCS or user.target is operator.getitem)) \
                or (user.op == "call_method" and user.target in _PASS_METHODS)
            if user.op == "call_function" and user.target is _PAD_PACKED and user.args and user.args[0] is node:
                frontier.append((user, k, m))
                continue
            if _keeps_last(user, node):
                frontier.append((user, k, m))
                continue
            if ok and _last_dim(user) == w and sum(a is node for a in user.args) == 1:
                frontier.append((user, k, m))
                continue
            if _scaled(user, node, w):
                frontier.append((user, k, m))
                continue
            if _reshape_keeps_last(user, node, w) or _unsqueeze_keeps_last(user, node):
                frontier.append((user, k, m))
                continue
            raise HwpruneError(f"cannot tell how the {w} features of {_name(starts[0])} reach "
                               f"{describe(user, mods)} (only ops that keep the feature dimension are followed); "
                               f"exclude that layer (--exclude {_layer(starts[0])}) and the rest of the model is "
                               f"searched, or restructure the model")
    for j in joins:
        others = [a for a in j.args[0] if isinstance(a, fx.Node) and a not in seen]
        if others:
            raise HwpruneError(f"the features of {_name(starts[0])} are joined with {_name(others[0])}'s by "
                               f"{describe(j, mods)}; exclude one of them (--exclude {_layer(starts[0])})")
    for operand, op in need:
        if operand not in seen:
            raise HwpruneError(f"the features of {_name(starts[0])} are multiplied with {_name(operand)}'s by "
                               f"{describe(op, mods)}, which hwprune cannot prune alike (attention is followed "
                               f"between an encoder and the decoder started from its state); exclude that layer "
                               f"(--exclude {_layer(starts[0])}) and the rest of the model is searched")
    return tuple(consumers)


def _reshape_keeps_last(user: fx.Node, node: fx.Node, width: int) -> bool:
    """``x.view(b * t, h)`` / ``x.reshape(-1, h)`` / ``torch.reshape(x, ...)`` that leaves the last dim ``width``
    wide (OpenNMT's attention, ``.view(batch * tgt_len, dim)``): a reshape keeps the elements' order, so every row
    of ``width`` features stays one row, whatever it does to the other dims."""
    name = user.target if user.op == "call_method" else user.target if user.op == "call_function" else None
    if name not in ("view", "reshape", torch.reshape) or not user.args or user.args[0] is not node:
        return False
    return _last_dim(node) == width and _last_dim(user) == width and _rank(user) is not None


def _unsqueeze_keeps_last(user: fx.Node, node: fx.Node) -> bool:
    """``x.unsqueeze(0)`` / ``torch.unsqueeze(x, 1)``: a new dim before the last one (OpenNMT keeps the last
    step's output as ``out[:, -1].unsqueeze(0)``)."""
    name = user.target if user.op == "call_method" else user.target if user.op == "call_function" else None
    if name not in ("unsqueeze", torch.unsqueeze) or len(user.args) < 2 or user.args[0] is not node:
        return False
    r, dim = _rank(user), user.args[1]
    return r is not None and isinstance(dim, int) and dim % r != r - 1


def _queries(linear: fx.Node) -> bool:
    """The output of ``linear`` is only the query of ``bmm(q, k.transpose(1, 2))`` (through reshapes and moves
    that keep the last dim): what attention contracts with the keys."""
    node = linear
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _is_matmul(user):
            return user.args[0] is node and isinstance(user.args[1], fx.Node) and _swaps_last_two(user.args[1])
        if not (_reshape_keeps_last(user, node, _last_dim(node) or -1) or _keeps_last(user, node)):
            return False
        node = user
    return False


def _cat_features(user: fx.Node, node: fx.Node, width: int) -> bool:
    """``torch.cat([a, b, ...], -1)`` where ``node`` is one of equally wide parts (the others checked later)."""
    if user.op != "call_function" or user.target is not torch.cat or not user.args:
        return False
    seq = user.args[0]
    if not isinstance(seq, (list, tuple)) or node not in seq or seq.count(node) != 1:
        return False
    rank = _rank(user)
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
    return rank is not None and isinstance(dim, int) and dim % rank == rank - 1 and \
        all(isinstance(a, fx.Node) and _last_dim(a) == width for a in seq) and _last_dim(user) == width * len(seq)


def _layer(node: fx.Node) -> str:
    """The layer a traced value comes from: its module name (through indexing of its outputs), or the node's."""
    seen = node
    while seen.op == "call_function" and seen.target is operator.getitem and isinstance(seen.args[0], fx.Node):
        seen = seen.args[0]
    return str(seen.target) if seen.op == "call_module" else seen.name


def _name(node: fx.Node) -> str:
    """The layer a traced value comes from, quoted (for messages)."""
    return repr(_layer(node))


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


def _direction_join(st: fx.Node) -> fx.Node | None:
    """OpenNMT's ``_fix_enc_hidden``: ``torch.cat([h[0:n:2], h[1:n:2]], -1)`` of a bidirectional RNN's final state
    (``n`` = layers x 2), each layer's two directions side by side, [fwd | bwd]. The cat node when ``st``'s two
    strided slices feed only it, in that order; else None."""
    total = _shape(st)[0] if _rank(st) else None
    parts: dict[int, fx.Node] = {}
    for u in st.users:
        if _is_getitem(u) and isinstance(u.args[1], slice) and u.args[1].step == 2 and \
                (u.args[1].start or 0) in (0, 1) and u.args[1].stop in (None, total):
            parts[u.args[1].start or 0] = u
    if set(parts) != {0, 1} or any(len(p.users) != 1 for p in parts.values()):
        return None
    cat = next(iter(parts[0].users))
    if cat is not next(iter(parts[1].users)) or cat.op != "call_function" or cat.target is not torch.cat:
        return None
    seq = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    r = _rank(cat)
    if not isinstance(seq, (list, tuple)) or list(seq) != [parts[0], parts[1]] or r is None or \
            not isinstance(dim, int) or dim % r != r - 1:
        return None
    return cat


def _shape_read(node: fx.Node) -> bool:
    """``node`` is read only for its shape, dtype or device (``x.size(1)``, ``x.data.new(b, h).zero_()``)."""
    if node.op == "call_method" and node.target in _SHAPE_ONLY:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and \
            node.args[1] in _SHAPE_ATTRS:
        return all(_shape_read(u) for u in node.users)
    return False


def _joined_starts(st: fx.Node, rnns: set[fx.Node] | None = None) -> list[fx.Node]:
    """The RNN calls started from ``st`` with its directions joined (see :func:`_direction_join`); [] when it is
    not joined that way. Any other read of the joined state than its shape is refused in words."""
    cat = _direction_join(st)
    if cat is None:
        return []
    starts = [u for u in cat.users if u.op == "call_module" and cat in _hx_nodes(u) and (rnns is None or u in rnns)]
    others = [u for u in cat.users if u not in starts and not _shape_read(u)]
    if others:
        raise HwpruneError(f"the final state of {_name(st)}, its directions joined by {describe(cat)}, is read by "
                           f"{describe(others[0])}; hwprune follows a joined state only into the LSTM/GRU layer it "
                           f"starts (a decoder of cells started per layer, as with input feeding, is not followed "
                           f"yet). --exclude {_layer(st)} (the rest is searched)")
    return starts


def _state_uses(node: fx.Node, layers: int, dirs: int, mods: dict[str, nn.Module]
                ) -> tuple[list[tuple[int, fx.Node]], list[fx.Node]]:
    """Every read of an RNN call's final state, as (layer index, node holding that layer's h_n or c_n), and the
    RNN calls that start from it (``decoder(y, h_n)``: an encoder-decoder, whose hidden units are coupled).

    Followed: ``h_n[i]`` (one layer and direction of the stacked state; ``c_n[i]`` for an LSTM), for a
    single-layer one-direction RNN ``h_n.squeeze(0)``, and the state passed whole as another RNN's initial
    state. Anything else that reads the whole stacked state is refused with the layer and the operation named.
    """
    name = str(node.target)
    states = []
    starts: list[fx.Node] = []
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
        joined = _joined_starts(st) if dirs == 2 else []
        starts += joined
        for u in st.users:
            if joined and _is_getitem(u) and isinstance(u.args[1], slice):
                continue  # a strided slice of the directions' join, into the RNN it starts
            if u.op == "call_module" and isinstance(mods.get(str(u.target)), RNN_TYPES + (RNNStack,)) \
                    and st in _hx_nodes(u):
                starts.append(u)
            elif _is_getitem(u) and isinstance(u.args[1], int):
                uses.append(((u.args[1] % (layers * dirs)) // dirs, u))
            elif layers * dirs == 1 and ((u.op == "call_method" and u.target == "squeeze") or
                                         (u.op == "call_function" and u.target is torch.squeeze)):
                uses.append((0, u))
            else:
                raise HwpruneError(f"layer {name!r}: its final state h_n is used by {describe(u, mods)}; hwprune "
                                   f"follows one layer's state, h_n[i] (or h_n.squeeze(0) for one layer), into the "
                                   f"layers that read it, and the whole state into another RNN's initial state. "
                                   f"Index the state that way, or --exclude {name} (the rest is searched)")
    return uses, list(dict.fromkeys(starts))


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


def _follow_channels(start: fx.Node, width: int, mods: dict[str, nn.Module]
                     ) -> tuple[tuple[str, ...], tuple[str, ...], int, int, tuple[tuple[str, int], ...]] | None:
    """Where a conv's output channels go: (readers, per-channel members such as BatchNorm, features per channel
    at the readers, copies of the channel block at the readers, LayerNorms over the channels with the channel's
    axis in their shape), or None when they reach the model output.

    Followed: BatchNorm, activations, pooling, dropout, padding of other dims, ``squeeze`` of a dim that is not 1;
    ``permute``/``transpose`` (the channel dim moves); a LayerNorm over trailing dims that include the channels
    (SpeechBrain's over frequency x channels: its weights are cut along the channel axis); ``flatten`` and a
    ``reshape`` that merges the channel dim with its neighbours: a reader sees ``outer`` blocks of ``C x stride``
    features, channel ``c`` at ``o*C*stride + c*stride + i`` (``(B, C, H, W) -> (B, W, C*H)`` in a CRNN: stride H;
    ``(B, T, F, C) -> (B, T, F*C)`` in SpeechBrain's CRDNN: outer F). Readers: convs (channels at dim 1), and
    Linear/LSTM/GRU layers (channels in the last dim).
    """
    readers: list[str] = []
    members: list[str] = []
    norms: list[tuple[str, int]] = []
    layouts: set[tuple[int, int]] = set()
    frontier = [(start, 1, 1, 1)]  # (node, channel dim, features per channel, channel blocks)
    seen: set[fx.Node] = set()
    while frontier:
        node, cdim, stride, outer = frontier.pop()
        plain = stride == 1 and outer == 1
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
                if isinstance(mod, nn.modules.conv._ConvNd) and cdim == 1 and plain and \
                        mod.in_channels == width and mod.groups == 1:
                    readers.append(str(user.target))
                    layouts.add((1, 1))
                    continue
                if isinstance(mod, _BN) and cdim == 1 and plain and mod.num_features == width:
                    members.append(str(user.target))
                    frontier.append((user, cdim, stride, outer))
                    continue
                if isinstance(mod, nn.LayerNorm) and r_node is not None:
                    first = r_node - len(mod.normalized_shape)
                    if cdim < first:  # over other dims only: each channel normalized on its own, untouched
                        frontier.append((user, cdim, stride, outer))
                        continue
                    if plain and mod.normalized_shape[cdim - first] == width:
                        norms.append((str(user.target), cdim - first))
                        frontier.append((user, cdim, stride, outer))
                        continue
                if isinstance(mod, _CHANNEL_PASS) and not _pools_dim(mod, user, cdim):
                    frontier.append((user, cdim, stride, outer))
                    continue
                feats = width * stride * outer
                if last and ((isinstance(mod, nn.Linear) and mod.in_features == feats) or
                             (isinstance(mod, RNN_TYPES) and mod.input_size == feats)):
                    readers.append(str(user.target))
                    layouts.add((stride, outer))
                    continue
                if last and isinstance(mod, RNNStack) and mod.layers[0].input_size == feats:
                    readers.append(f"{user.target}.layers.0")
                    layouts.add((stride, outer))
                    continue
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if user.op in ("call_method", "call_function") and user.args and user.args[0] is node and \
                    rank is not None:
                r_in = _rank(node)
                assert r_in is not None
                if name == "permute":
                    dims = [d % r_in for d in _dims_arg(user)]
                    frontier.append((user, dims.index(cdim), stride, outer))
                    continue
                if name == "transpose":
                    a, b = (d % r_in for d in _dims_arg(user)[:2])
                    frontier.append((user, b if cdim == a else a if cdim == b else cdim, stride, outer))
                    continue
                if name == "squeeze" and len(user.args) == 2 and isinstance(user.args[1], int):
                    d = user.args[1] % r_in
                    if _shape(node)[d] != 1:  # squeezing a dim that is not 1 does nothing
                        frontier.append((user, cdim, stride, outer))
                        continue
                    if d != cdim:
                        frontier.append((user, cdim - (d < cdim), stride, outer))
                        continue
                if name == "pad" and user.op == "call_function" and len(user.args) > 1 and \
                        isinstance(user.args[1], (list, tuple)) and cdim < r_in - len(user.args[1]) // 2:
                    frontier.append((user, cdim, stride, outer))  # padding the dims after the channels'
                    continue
                merged = _merged_dims(node, user, name)
                if merged is not None and plain:
                    s0, e0 = merged
                    if cdim < s0:
                        frontier.append((user, cdim, stride, outer))
                        continue
                    if cdim > e0:
                        frontier.append((user, cdim - (e0 - s0), stride, outer))
                        continue
                    shape = _shape(node)
                    inner = math.prod(shape[cdim + 1: e0 + 1])
                    blocks = math.prod(shape[s0: cdim])
                    frontier.append((user, s0, inner, blocks))
                    continue
            ok = (user.op == "call_function" and user.target in _CHANNEL_PASS_FUNCS) or \
                (user.op == "call_method" and user.target in _CHANNEL_PASS_METHODS)
            if ok and sum(a is node for a in user.args) == 1 and _rank(user) == _rank(node):
                frontier.append((user, cdim, stride, outer))
                continue
            raise HwpruneError(f"cannot tell how the {width} channels of {_name(start)} reach {describe(user, mods)} "
                               f"(followed: BatchNorm, LayerNorm, activations, pooling, padding, "
                               f"permute/transpose/flatten/reshape into conv, Linear, LSTM and GRU layers); exclude "
                               f"that conv (--exclude) or restructure the model")
    if len(layouts) > 1:
        raise HwpruneError(f"the channels of {_name(start)} reach its readers with different layouts; exclude it")
    stride, outer = layouts.pop() if layouts else (1, 1)
    return tuple(dict.fromkeys(readers)), tuple(dict.fromkeys(members)), stride, outer, tuple(dict.fromkeys(norms))


def _pools_dim(mod: nn.Module, call: fx.Node, dim: int) -> bool:
    """A pooling layer whose window spans more than one element along ``dim`` of its input (channels pooled
    together are not the same channels any more); False for every other layer."""
    pools = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool1d: 1,
             nn.AdaptiveMaxPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2}
    n = pools.get(type(mod))
    r = _rank(call)
    if n is None or r is None or dim < r - n:
        return False
    j = dim - (r - n)  # which of the pooled dims
    if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        src = call.args[0] if call.args and isinstance(call.args[0], fx.Node) else None
        return src is None or _shape(src)[dim] != _shape(call)[dim]
    k = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * n
    return k[j] > 1


def _merged_dims(node: fx.Node, user: fx.Node, name: str) -> tuple[int, int] | None:
    """``(first, last)`` dims of ``node`` that ``flatten`` or a ``reshape``/``view`` merges into one (the other dims
    kept), else None."""
    r_in = _rank(node)
    if r_in is None:
        return None
    if name == "flatten":
        args = _dims_arg(user)
        s0 = (args[0] if args else int(user.kwargs.get("start_dim", 0))) % r_in
        e0 = (args[1] if len(args) > 1 else int(user.kwargs.get("end_dim", -1))) % r_in
        return s0, e0
    if name not in ("reshape", "view", torch.reshape):
        return None
    a, b = _shape(node), _shape(user)
    if len(b) >= len(a):
        return None
    k = len(a) - len(b)  # dims merged: one run of k + 1 dims becomes one
    for s0 in range(len(b)):
        if a[:s0] == b[:s0] and a[s0 + k + 1:] == b[s0 + 1:] and math.prod(a[s0: s0 + k + 1]) == b[s0]:
            return s0, s0 + k
    return None


def _cell_loop(name: str, calls: list[fx.Node], mods: dict[str, nn.Module]) -> tuple[list[fx.Node], set[fx.Node]]:
    """A cell called once per step: each call after the first starts from the previous call's state. Returns the
    step outputs to follow (h, and c for an LSTMCell) and the calls (not readers of the units). A cell whose
    calls do not chain (two sequences, two places) is refused in words."""
    lstm = isinstance(mods[name], nn.LSTMCell)
    for prev, call in zip(calls, calls[1:]):
        hx = _hx_nodes(call)
        allowed = {prev} | {u for u in prev.users if _is_getitem(u, 0) or _is_getitem(u, 1)}
        if not hx or not set(hx) <= allowed or (lstm and len(hx) == 1 and hx[0] is not prev):
            raise HwpruneError(f"cell {name!r} ({type(mods[name]).__name__}) is called {len(calls)} times, but not "
                               f"as one loop over time (step by step from its own state): {describe(calls[0], mods)}"
                               f" and {describe(call, mods)}; a cell called from two places cannot be pruned on "
                               f"its own. --exclude {name} (the rest of the model is searched)")
    outs: list[fx.Node] = []
    for call in calls:
        if lstm:
            outs += [u for u in call.users if _is_getitem(u, 0) or _is_getitem(u, 1)]
            others = [u for u in call.users if not (_is_getitem(u, 0) or _is_getitem(u, 1)) and u not in calls]
            if others:
                raise HwpruneError(f"cell {name!r}: its (h, c) pair is used whole by {describe(others[0], mods)}; "
                                   f"read h = state[0] (or --exclude {name})")
        else:
            outs.append(call)
    return outs, set(calls)


def analyze_rnn_model(model: nn.Module, example: object, exclude: set[str],
                      unsearched: dict[str, str] | None = None) -> list[RNNGroupPlan]:
    """Groups of a model holding LSTM/GRU layers or cells (stacks already split).

    A layer whose units cannot be followed (an op that mixes features, a cell called from two places) is not
    a group: it is kept whole and the reason, naming the construct and its source line, goes to
    ``unsearched`` (layer -> reason), so the rest of the model is still searched. Without ``unsearched`` the
    first such reason is raised."""
    kept: dict[str, str] = {} if unsearched is None else unsearched
    try:
        graph = trace_concrete(model, example, LEAVES)
    except HwpruneError:
        raise
    except Exception as exc:
        raise HwpruneError(f"cannot trace the model with torch.fx for RNN analysis: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    mods = dict(model.named_modules())
    plans: list[RNNGroupPlan] = []
    calls = [n for n in graph.nodes if n.op == "call_module"]
    by_name: dict[str, list[fx.Node]] = {}
    for n in calls:
        by_name.setdefault(str(n.target), []).append(n)
    couples, joined = _couplings(calls, mods)
    for node in calls:
        name, mod = str(node.target), mods[str(node.target)]
        if name in exclude:
            continue
        try:
            _plan_one(node, name, mod, by_name, mods, plans, couples, joined)
        except HwpruneError as exc:
            if unsearched is None:
                raise
            for member in couples.get(node, [node]):  # an encoder-decoder pair is kept whole together
                kept[str(member.target)] = str(exc)
    plans = [p for p in plans if not ({p.producer, *p.coupled, *p.joined, *p.through} & exclude)]
    return [p for p in plans if p.producer not in exclude and not ((set(p.consumers) | set(p.state_consumers)) & exclude)]


def _couplings(calls: list[fx.Node], mods: dict[str, nn.Module]
               ) -> tuple[dict[fx.Node, list[fx.Node]], set[fx.Node]]:
    """RNN calls whose hidden units are one: a call started from another's final state (``decoder(y, h_n)``,
    ``(h_n, c_n)``, or a bidirectional state with its directions joined), transitively; each call of such a set
    -> the set in graph order; and the calls started from a joined state (their units are [dir0 | dir1])."""
    rnn = [n for n in calls if isinstance(mods.get(str(n.target)), RNN_TYPES + (RNNStack,))]
    root: dict[fx.Node, fx.Node] = {}

    def find(a: fx.Node) -> fx.Node:
        while root.get(a, a) is not a:
            a = root[a]
        return a

    joined: set[fx.Node] = set()
    for x in rnn:
        states = [u for u in x.users if _is_getitem(u, 1)]
        states += [k for s in list(states) for k in s.users if _is_getitem(k, 0) or _is_getitem(k, 1)]
        for st in states:
            for u in st.users:
                if u in rnn and st in _hx_nodes(u):
                    root[find(u)] = find(x)
            try:
                starts = _joined_starts(st, set(rnn))
            except HwpruneError:
                starts = []  # refused in words where the encoder is planned
            for u in starts:
                root[find(u)] = find(x)
                joined.add(u)
    sets: dict[fx.Node, list[fx.Node]] = {}
    for x in rnn:
        sets.setdefault(find(x), []).append(x)
    return {x: members for members in sets.values() if len(members) > 1 for x in members}, joined


def _plan_one(node: fx.Node, name: str, mod: nn.Module, by_name: dict[str, list[fx.Node]],
              mods: dict[str, nn.Module], plans: list[RNNGroupPlan], couples: dict[fx.Node, list[fx.Node]],
              joined: set[fx.Node] = frozenset()) -> None:  # type: ignore[assignment]
    """The group(s) one called module produces, appended to ``plans`` (see :func:`analyze_rnn_model`)."""
    if isinstance(mod, CELL_TYPES):
        if node is not by_name[name][0]:
            return
        outs, steps = _cell_loop(name, by_name[name], mods)
        cons = _follow(outs, mod.hidden_size, mods, skip=steps)
        if cons is None:
            return
        plans.append(RNNGroupPlan(name, mod.hidden_size, 1, cons, "hidden"))
        return
    if len(by_name[name]) > 1:
        return  # called twice (shared weights): not pruned on its own
    if isinstance(mod, (RNNStack,) + RNN_TYPES):
        members = couples.get(node, [node])  # an encoder and the decoders started from its state: one set
        if node is not members[0]:
            return  # planned with the first of its set

        def layers_of(call: fx.Node) -> tuple[list[nn.RNNBase], list[str]]:
            m = mods[str(call.target)]
            if isinstance(m, RNNStack):  # the layers that run (a dropped one's place is skipped), by their names
                live = [(layer, f"{call.target}.layers.{k}") for k, layer in enumerate(m.layers)
                        if not isinstance(layer, Dropped)]
                return [layer for layer, _ in live], [n for _, n in live]
            return [m], [str(call.target)]

        stack, names = layers_of(node)
        d = 2 if stack[0].bidirectional else 1
        all_names, joined_names = [names], []
        for other in members[1:]:
            ostack, onames = layers_of(other)
            if other in joined:  # started from the directions joined: one direction, d x the units
                if len(ostack) != len(stack) or ostack[0].bidirectional or \
                        any(b.hidden_size != d * a.hidden_size for a, b in zip(stack, ostack)):
                    raise HwpruneError(f"layer {name!r}: its final state, directions joined, starts "
                                       f"{describe(other, mods)}, which has other layers or widths; hwprune couples "
                                       f"a bidirectional encoder and a decoder {d} x as wide. --exclude {name}")
                reads, starts = _state_uses(other, len(ostack), 1, mods)
                if reads or starts:
                    raise HwpruneError(f"layer {name!r}: the final state of {describe(other, mods)}, started from "
                                       f"its directions joined, is read on; not followed yet. --exclude {name}")
                joined_names.append(onames)
                continue
            if len(ostack) != len(stack) or (2 if ostack[0].bidirectional else 1) != d or \
                    any(a.hidden_size != b.hidden_size for a, b in zip(stack, ostack)):
                raise HwpruneError(f"layer {name!r}: its final state starts {describe(other, mods)}, which has "
                                   f"other layers, directions or widths; hwprune couples an encoder and a "
                                   f"decoder of the same shape. --exclude {name}")
            all_names.append(onames)
        readers: dict[int, list[str]] = {}
        reaches_output: set[int] = set()
        outs = []
        by_layer: dict[int, list[fx.Node]] = {}
        for call in members:
            out = _rnn_output(call)
            if out is not None:
                outs.append(out)
            if call in joined:
                continue  # its state: refused above when read
            uses, _ = _state_uses(call, len(stack), d, mods)
            for k, use in uses:
                by_layer.setdefault(k, []).append(use)
        copies: dict[str, int] = {}
        for k, nodes in by_layer.items():  # every read of layer k's state at once: [h_n[-2] | h_n[-1]] is followed
            got = _follow(nodes, stack[k].hidden_size, mods, copies=copies)
            if got is None:
                reaches_output.add(k)
            else:
                readers.setdefault(k, []).extend(got)
        through: list[str] = []
        for k, layer in enumerate(stack):
            if k < len(stack) - 1:
                cons: tuple[str, ...] | None = tuple(n[k + 1] for n in all_names + joined_names)
            else:  # the last layer's output sequences, all at once: attention between them is followed
                summed: set[str] = set()
                cons = _follow(outs, layer.hidden_size * d, mods, copies=copies, dirs=d, summed=summed,
                               through=through) if outs else ()
                if cons is not None and summed:  # directions added: read as units-wide blocks, like h_n[i]
                    if summed & {c for c in cons if cons.count(c) > 1}:
                        raise HwpruneError(f"layer {names[k]!r}: a layer reads its output both with the directions "
                                           f"added and without; exclude one of them")
                    readers.setdefault(k, []).extend(sorted(summed))
                    cons = tuple(c for c in cons if c not in summed)
            if cons is None or k in reaches_output:
                continue  # a model output: its units are not ours to remove
            cons = tuple(dict.fromkeys(cons))
            state = tuple(dict.fromkeys(readers.get(k, [])))
            if set(state) & set(cons):
                raise HwpruneError(f"layer {names[k]!r}: {sorted(set(state) & set(cons))[0]!r} reads both its "
                                   f"output sequence and its final state; exclude one of them")
            mine = set(state) | (set(cons) if k == len(stack) - 1 else set())
            plans.append(RNNGroupPlan(names[k], layer.hidden_size, d, cons, "hidden", state,
                                      coupled=tuple(n[k] for n in all_names[1:]),
                                      reader_copies=tuple(sorted((c, n) for c, n in copies.items() if c in mine)),
                                      joined=tuple(n[k] for n in joined_names),
                                      through=tuple(dict.fromkeys(through)) if k == len(stack) - 1 else ()))
    elif isinstance(mod, nn.modules.conv._ConvNd) and mod.groups == 1 and not mod.transposed:  # a conv front end
        got = _follow_channels(node, mod.out_channels, mods)
        if got is not None and got[0]:
            plans.append(RNNGroupPlan(name, mod.out_channels, 1, got[0], "channels", members=got[1],
                                      stride=got[2], outer=got[3], norms=got[4]))
    elif isinstance(mod, nn.Embedding):  # the embedding width: its columns and the readers' inputs
        try:
            cons = _follow(node, mod.embedding_dim, mods)
        except HwpruneError:
            return
        if cons:
            plans.append(RNNGroupPlan(name, mod.embedding_dim, 1, cons, "embedding"))
    elif isinstance(mod, nn.Linear):
        try:
            cons = _follow(node, mod.out_features, mods)
        except HwpruneError:
            return  # a Linear whose features meet others (e.g. two heads added): kept whole, never guessed
        if cons is not None:
            plans.append(RNNGroupPlan(name, mod.out_features, 1, cons, "features"))


