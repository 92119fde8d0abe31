"""Fused blocks: each layer timed together with the cheap operators that only it feeds.

A table entry of a bare layer misses what runs between layers: BatchNorm,
activations, pooling. Where layers are small (a launch-bound GPU, short 1-D
convolutions) that is most of a model's time, and it does not scale like the
layer's work, so the calibration cannot recover it. As nn-Meter does with
fused kernels, the profiler times a *block*: the layer followed by its
*epilogue*, the chain of operators that consume only its output, one after
another, up to the next layer, a merge (residual add, concatenation), a second
consumer or the model output (a residual sum joins, see ``add`` below).

:func:`trace_epilogues` finds each layer's chain by running the model once and
recording every module call and torch function call (so functional
``F.relu``, ``torch.flatten`` and in-place ops count, and Python control flow
is simply the path taken). Only operators from a fixed vocabulary join a
chain, each written as a short descriptor that goes into the table key and
rebuilds the operator at any channel count (:func:`build_epilogue`):

- ``bn``: BatchNorm over the layer's output channels (its width follows pruning);
- activations: ``relu``, ``relu6``, ``gelu``, ``silu``, ``sigmoid``, ``tanh``,
  ``hardswish``, ``hardsigmoid``, ``leakyrelu``, ``elu``, ``mish``;
- pooling after a convolution: ``maxpool.k<k>.s<s>.p<p>``,
  ``avgpool.k<k>.s<s>.p<p>``, ``amaxpool.o<size>``, ``aavgpool.o<size>``;
- ``add``: a residual sum with a tensor of the same shape made earlier (the
  shortcut), claimed by the chain whose operand arrives last so that each sum
  is in one block; the chain goes on after it (``bn+add+relu``).

Views (flatten, view, reshape) and eval-mode dropout are passed through (no
kernel). Anything else ends the chain and stays with the calibration's
per-element term.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["trace_epilogues", "build_epilogue", "ACTIVATIONS", "Residual"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "mish": nn.Mish,
}
_ACT_MODULES = {cls: name for name, cls in ACTIVATIONS.items()}
_ACT_FUNCS = {"relu": "relu", "relu6": "relu6", "hardtanh": None, "gelu": "gelu", "silu": "silu",
              "sigmoid": "sigmoid", "tanh": "tanh", "hardswish": "hardswish", "hardsigmoid": "hardsigmoid",
              "leaky_relu": "leakyrelu", "elu": "elu", "mish": "mish"}
_PASS_FUNCS = {"dropout", "dropout1d", "dropout2d", "feature_dropout"}
_PASS_MODULES = (nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_CONV_DIMS = {"conv1d": 1, "conv2d": 2}
_POOL_FUNCS = {"max_pool1d": "maxpool", "max_pool2d": "maxpool", "avg_pool1d": "avgpool", "avg_pool2d": "avgpool",
               "adaptive_avg_pool1d": "aavgpool", "adaptive_avg_pool2d": "aavgpool",
               "adaptive_max_pool1d": "amaxpool", "adaptive_max_pool2d": "amaxpool"}


def _j(t: Iterable[int]) -> str:
    return "x".join(str(int(v)) for v in t)


def _tuple(v: Any, n: int) -> tuple[int, ...] | None:
    if isinstance(v, int):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(e, int) for e in v):
        return tuple(v)
    return None


def _pool(kind: str, n: int, kernel: Any, stride: Any, padding: Any, dilation: Any = 1,
          ceil_mode: bool = False) -> str | None:
    """A pooling descriptor, or None when it is one the vocabulary does not rebuild."""
    if kind in ("aavgpool", "amaxpool"):
        out = _tuple(kernel, n)  # the output size
        return f"{kind}.o{_j(out)}" if out else None
    k = _tuple(kernel, n)
    s = _tuple(kernel if stride is None or stride == [] or stride == () else stride, n)
    p, d = _tuple(padding, n), _tuple(dilation, n)
    if not (k and s and p and d) or any(v != 1 for v in d) or ceil_mode:
        return None
    return f"{kind}.k{_j(k)}.s{_j(s)}.p{_j(p)}"


def _describe_module(m: nn.Module, op: str, cout: int, x: Any = None) -> str | None:
    """The descriptor of a leaf module in an epilogue ('' for a pass-through), None if it ends the chain.
    ``x``: the module's input in the traced pass (a BatchNorm must normalize the layer's output channels)."""
    conv_dims = _CONV_DIMS.get(op)
    if isinstance(m, _PASS_MODULES):
        return ""
    if type(m) in _ACT_MODULES:
        return _ACT_MODULES[type(m)]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        want = {"conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d, "linear": nn.BatchNorm1d}.get(op)
        shape_ok = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == cout and \
            (op != "linear" or x.dim() == 2)
        return "bn" if want is not None and type(m) is want and m.num_features == cout and shape_ok else None
    if conv_dims is None:
        return None
    pools = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
             2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)}[conv_dims]
    if isinstance(m, pools[0]):
        if m.return_indices:
            return None
        return _pool("maxpool", conv_dims, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if isinstance(m, pools[1]):
        if not m.count_include_pad or getattr(m, "divisor_override", None) is not None:
            return None
        return _pool("avgpool", conv_dims, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
    if isinstance(m, pools[2]):
        return _pool("aavgpool", conv_dims, m.output_size, None, 0)
    if isinstance(m, pools[3]):
        return None if m.return_indices else _pool("amaxpool", conv_dims, m.output_size, None, 0)
    return None


def _name(func: Any) -> str:
    """A torch function's name without dunder or in-place underscores (``__iadd__`` -> ``iadd``, ``relu_`` ->
    ``relu``, ``_max_pool2d`` -> ``max_pool2d``)."""
    return getattr(func, "__name__", "").rstrip("_").lstrip("_")


def _describe_func(func: Any, args: tuple, kwargs: dict, op: str) -> str | None:
    name = _name(func)
    if name in ("flatten", "view", "reshape"):
        return ""
    if name in _PASS_FUNCS:  # dropout: a pass-through only when it does not drop (eval mode)
        return None if (args[2] if len(args) > 2 else kwargs.get("training", True)) else ""
    if name in _ACT_FUNCS:
        if name == "hardtanh":  # F.relu6 is hardtanh(0, 6)
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return "relu6" if (lo, hi) == (0.0, 6.0) else None
        return _ACT_FUNCS[name]
    conv_dims = _CONV_DIMS.get(op)
    kind = _POOL_FUNCS.get(name.replace("_with_indices", ""))
    if kind is None or conv_dims is None or not name.endswith(f"{conv_dims}d"):
        return None
    a = list(args[1:])
    get = lambda i, key, default: a[i] if len(a) > i else kwargs.get(key, default)  # noqa: E731
    if kind in ("aavgpool", "amaxpool"):
        if get(1, "return_indices", False):
            return None
        return _pool(kind, conv_dims, get(0, "output_size", None), None, 0)
    if kind == "maxpool":
        if get(5, "return_indices", False):
            return None
        return _pool(kind, conv_dims, get(0, "kernel_size", None), get(1, "stride", None), get(2, "padding", 0),
                     get(3, "dilation", 1), get(4, "ceil_mode", False))
    if not get(4, "count_include_pad", True) or get(5, "divisor_override", None) is not None:
        return None
    return _pool(kind, conv_dims, get(0, "kernel_size", None), get(1, "stride", None), get(2, "padding", 0), 1,
                 get(3, "ceil_mode", False))


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    return []


class _Op:
    __slots__ = ("kind", "what", "args", "kwargs", "ins", "users", "is_output")

    def __init__(self, kind: str, what: Any, args: tuple, kwargs: dict, ins: list[int]) -> None:
        self.kind, self.what, self.args, self.kwargs, self.ins = kind, what, args, kwargs, ins
        self.users: list[int] = []
        self.is_output = False


class _Recorder(TorchFunctionMode):
    """Records leaf module calls and top-level torch function calls with which earlier op made each input."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.made: dict[int, int] = {}  # id(tensor) -> the op that last wrote it
        self.alive: list[Any] = []  # every tensor seen stays alive, so ids are never reused
        self.depth = 0

    def add(self, kind: str, what: Any, args: tuple, kwargs: dict, out: Any) -> None:
        outs = _flat(out)
        if not outs:  # x.size(), x.dim(), ...: reads no values
            return
        ins = [t for t in _flat(args) + _flat(list(kwargs.values()))]
        src = []
        for t in ins:
            i = self.made.get(id(t), -1)
            if i not in src:
                src.append(i)
        idx = len(self.ops)
        op = _Op(kind, what, args, kwargs, src)
        for i in src:
            if i >= 0:
                self.ops[i].users.append(idx)
        self.ops.append(op)
        for t in outs:
            self.made[id(t)] = idx
        self.alive.extend(ins + outs)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.add("fn", func, tuple(args), dict(kwargs), out)
        return out


def _residual_add(op: _Op, cur: int) -> bool:
    """``op`` adds ``cur``'s output to one other tensor of the same shape made earlier (a residual sum): the add
    belongs to the chain whose operand arrives last, so each sum is timed in one block only."""
    if op.kind != "fn" or _name(op.what) not in ("add", "iadd", "radd") or len(op.ins) != 2 or cur not in op.ins:
        return False
    other = op.ins[0] if op.ins[1] == cur else op.ins[1]
    ts = _flat(op.args)
    alpha = op.kwargs.get("alpha", 1)
    return other < cur and len(ts) == 2 and ts[0].shape == ts[1].shape and alpha == 1


def trace_epilogues(model: nn.Module, example: torch.Tensor, layers: dict[str, str],
                    couts: dict[str, int]) -> dict[str, tuple[str, ...]] | None:
    """Each layer's epilogue (descriptors, see the module docstring) from one forward pass on ``example[:1]``.

    ``layers`` maps layer names to their op (``conv2d``, ``linear``, ...), ``couts`` to their output width.
    A layer called more than once (shared weights) gets no epilogue. None when the pass fails (no blocks:
    bare layers are timed).
    """
    rec = _Recorder()
    mods = dict(model.named_modules())
    layer_ops: dict[str, list[int]] = {}

    def pre(_m: nn.Module, _inp: tuple) -> None:
        rec.depth += 1

    def post(name: str):  # type: ignore[no-untyped-def]
        def fn(m: nn.Module, inp: tuple, out: Any) -> None:
            rec.depth -= 1
            if rec.depth == 0:
                if name in layers:
                    layer_ops.setdefault(name, []).append(len(rec.ops))
                rec.add("mod", name, tuple(inp), {}, out)
        return fn

    leaves = {n: m for n, m in mods.items() if n and (n in layers or not list(m.children()))}
    leaves = {n: m for n, m in leaves.items() if not any(n.startswith(l + ".") for l in layers)}
    handles = []
    for n, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post(n)))
    was_training = model.training
    try:
        with torch.no_grad(), rec:
            from hwprune import inputs

            out = inputs.call(model.eval(), inputs.rows(example, slice(0, 1)))
    except Exception:  # noqa: BLE001 - the forward ran before; blocks are a refinement, bare layers still work
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for t in _flat(out):
        i = rec.made.get(id(t))
        if i is not None:
            rec.ops[i].is_output = True

    result: dict[str, tuple[str, ...]] = {}
    for name, op in layers.items():
        calls = layer_ops.get(name, [])
        if len(calls) != 1 or op in ("lstm", "gru", "rnn", "rnnrelu", "lstmcell", "grucell", "rnncell", "rnncellrelu"):
            result[name] = ()
            continue
        cur, chain = calls[0], []
        while True:
            here = rec.ops[cur]
            if here.is_output or len(here.users) != 1:
                break
            nxt = rec.ops[here.users[0]]
            desc: str | None
            if nxt.ins != [cur]:  # a merge: only a residual sum joins, and only the chain that reaches it last
                if not _residual_add(nxt, cur):
                    break
                desc = "add"
            elif nxt.kind == "mod":
                desc = _describe_module(mods[nxt.what], op, couts[name], nxt.args[0] if nxt.args else None)
            else:
                desc = _describe_func(nxt.what, nxt.args, nxt.kwargs, op)
            if desc is None:
                break
            if desc:
                chain.append(desc)
            cur = here.users[0]
        while chain and chain[-1] == "":
            chain.pop()
        result[name] = tuple(chain)
    return result


class Residual(nn.Module):
    """``x + other``: the other branch of a residual sum, a fixed random tensor of ``x``'s shape and dtype made on
    the first call (:func:`hwprune.latency.profiler.build_block` makes that call before anything is timed)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("other", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.other
        if o is None or o.shape != x.shape or o.dtype != x.dtype or o.device != x.device:
            self.other = o = torch.randn_like(x)
        return x + o


def build_epilogue(post: Iterable[str], op: str, cout: int) -> nn.Module:
    """The modules of an epilogue for a layer of kind ``op`` with ``cout`` outputs (eval mode, CPU, fp32)."""
    mods: list[nn.Module] = []
    dims = _CONV_DIMS.get(op, 1)
    for d in post:
        kind, *fields = d.split(".")
        vals = {f[0]: tuple(int(v) for v in f[1:].split("x")) for f in fields}
        if kind == "bn":
            mods.append((nn.BatchNorm2d if op == "conv2d" else nn.BatchNorm1d)(cout))
        elif kind in ACTIVATIONS:
            mods.append(ACTIVATIONS[kind]())
        elif kind == "add":
            mods.append(Residual())
        elif kind == "maxpool":
            mods.append((nn.MaxPool1d, nn.MaxPool2d)[dims - 1](vals["k"], vals["s"], vals["p"]))
        elif kind == "avgpool":
            mods.append((nn.AvgPool1d, nn.AvgPool2d)[dims - 1](vals["k"], vals["s"], vals["p"]))
        elif kind == "aavgpool":
            mods.append((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[dims - 1](vals["o"]))
        elif kind == "amaxpool":
            mods.append((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)[dims - 1](vals["o"]))
        else:
            raise ValueError(f"unknown epilogue operator {d!r}")
    return nn.Sequential(*mods).eval()
