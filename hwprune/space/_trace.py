"""Trace a model with ``torch.fx`` while running it on a real example ("concrete" tracing).

Plain symbolic tracing refuses what user models do all the time: loop over ``range(x.size(1))`` (a cell
loop), branch on ``x.dim()``, unpack ``B, T, _ = x.shape``. Here every traced value also carries the value
the example gives it, so sizes, ``len()``, ``bool()`` and iteration are answered from the example: loops
unroll for the sequence length the example has and shape branches take the example's branch. Each node keeps
its value's shape (``tensor_meta``, as :class:`torch.fx.passes.shape_prop.ShapeProp` would set it) and the
user's source line (``stack_trace``) for messages.

``pack_padded_sequence`` and friends are traced as single calls (their insides branch on values), so a
``PackedSequence`` flows through the graph as one value.
"""
from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.rnn as rnn_utils
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hwprune import inputs

__all__ = ["trace_concrete", "where", "defined_at", "raised_at", "PACKING"]

PACKING = (rnn_utils.pack_padded_sequence, rnn_utils.pad_packed_sequence, rnn_utils.pack_sequence,
           rnn_utils.pad_sequence)
_CONCRETE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse"}
_CONCRETE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "is_floating_point", "get_device",
                     "is_contiguous", "element_size"}


def _value(a: Any) -> Any:
    return map_aggregate(a, lambda v: v.meta["value"] if isinstance(v, fx.Node) else v)


class _ConcreteProxy(fx.Proxy):
    """A proxy that answers shape questions, ``len``, ``bool`` and iteration from its node's real value."""

    def _v(self) -> Any:
        return self.node.meta["value"]

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") and k.endswith("__"):  # protocol probes (torch.as_tensor asks for
            raise AttributeError(k)  # __cuda_array_interface__): a traced value has none of them
        if k in _CONCRETE_ATTRS and isinstance(self.node.meta.get("value"), torch.Tensor):
            return getattr(self._v(), k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        return len(self._v())

    def __bool__(self) -> bool:
        return bool(self._v())

    def __index__(self) -> int:
        return operator.index(self._v())

    def __int__(self) -> int:
        return int(self._v())

    def __float__(self) -> float:
        return float(self._v())

    def __setitem__(self, idx: Any, value: Any) -> None:
        # ``scores[:, j, :] = attn(...)`` (fairseq's decoder loop): one operator.setitem call in the graph, the
        # example's value written in place as the model writes it
        self.tracer.create_proxy("call_function", operator.setitem, (self, idx, value), {})

    def __iter__(self):  # type: ignore[no-untyped-def]
        v = self._v()
        n = len(v) if isinstance(v, (tuple, list)) else int(v.shape[0]) if isinstance(v, torch.Tensor) else None
        if n is None:
            return super().__iter__()
        return iter([self[i] for i in range(n)])


class ConcreteTracer(fx.Tracer):
    """``torch.fx`` tracing with each node's value computed on ``args`` as the graph is built."""

    def __init__(self, leaves: tuple[type, ...], args: tuple[Any, ...]) -> None:
        super().__init__(autowrap_functions=PACKING)
        self.record_stack_traces = True
        self._leaves = leaves
        self._args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # in-place ops stay here
        self._next_arg = 0
        self._computing = False  # computing a value: module calls run for real, nothing is traced

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_node(self, kind: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(kind, target, *args, **kwargs)
        if kind == "get_attr" and "value" not in node.meta:
            # a real tensor the model passes to a traced call (OpenNMT's sequence_mask gets the example's lengths
            # back from the encoder): fx stores it as a constant on the root, made here without create_proxy
            val = self.root
            for part in str(target).split("."):
                val = getattr(val, part, None)
            node.meta["value"] = val
        return node

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, *rest: Any, **more: Any) -> Any:
        if kind == "call_method" and target in _CONCRETE_METHODS and isinstance(args[0], _ConcreteProxy):
            return getattr(args[0]._v(), target)(*_value(self.create_arg(args[1:])), **_value(self.create_arg(kwargs)))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **more)
        node = proxy.node
        if kind == "placeholder":
            i, self._next_arg = self._next_arg, self._next_arg + 1
            val = self._args[i] if i < len(self._args) else (node.args[0] if node.args else None)
        elif kind == "get_attr":
            val = self.root
            for part in str(target).split("."):
                val = getattr(val, part)
        elif kind == "output":
            return proxy
        else:
            a, kw = _value(node.args), _value(node.kwargs)
            self._computing = True
            try:
                with torch.no_grad():
                    if kind == "call_function":
                        val = target(*a, **kw)
                    elif kind == "call_method":
                        val = getattr(a[0], target)(*a[1:], **kw)
                    else:
                        val = self.root.get_submodule(str(target))(*a, **kw)
            finally:
                self._computing = False
        node.meta["value"] = val
        meta = _meta(val)
        if meta is not None:
            node.meta["tensor_meta"] = meta
        if kind == "call_module" and type(val) in (tuple, list):
            return _unpacked(proxy, val)
        return proxy


def _unpacked(proxy: fx.Proxy, val: Any) -> Any:
    """A layer's ``(out, (h_n, c_n))`` as a real tuple of proxies (indexing nodes), so that the model's own
    ``isinstance(state, tuple)`` sees a tuple (OpenNMT's encoder state); a named tuple (a PackedSequence) stays
    one value."""
    if type(val) not in (tuple, list):
        return proxy
    parts = [_unpacked(proxy[i], v) for i, v in enumerate(val)]
    return tuple(parts) if type(val) is tuple else parts


class _PatchedPacking:
    """``nn.utils.rnn.pack_padded_sequence(...)`` called through the module (fairseq) is traced as one call,
    as the names imported into a model's globals are (``autowrap_functions`` only patches globals); the module's
    functions are put back afterwards."""

    def __enter__(self) -> None:
        self._saved = {f.__name__: getattr(rnn_utils, f.__name__) for f in PACKING}
        for name, fn in self._saved.items():
            setattr(rnn_utils, name, _traced_call(fn))

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(rnn_utils, name, fn)


def _traced_call(fn: Any) -> Any:
    import functools

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        found: list[fx.Proxy] = []
        map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
        if not found:
            return fn(*args, **kwargs)
        return found[0].tracer.create_proxy("call_function", fn, args, kwargs)
    return call


def _meta(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return _extract_tensor_metadata(val)
    if isinstance(val, rnn_utils.PackedSequence):  # features in the last dim of .data, like a padded batch
        return _extract_tensor_metadata(val.data)
    if isinstance(val, (tuple, list)):
        return tuple(_meta(v) for v in val)
    return None


def trace_concrete(model: nn.Module, example: Any, leaves: tuple[type, ...]) -> fx.Graph:
    """The graph of ``model`` traced on ``example`` (a batch of inputs, :mod:`hwprune.inputs`), modules of
    ``leaves`` kept as single calls; raises what tracing raises.

    Only the graph is returned, for analysis: no ``GraphModule`` is generated from it (the generated code of a
    graph calling ``pack_padded_sequence`` registers that function's qualified name with ``torch.fx.wrap``,
    which breaks every later trace in the process in torch 2.13)."""
    was = model.training
    model.eval()
    try:
        with _PatchedPacking():
            return ConcreteTracer(leaves, inputs.positional(model, example)).trace(model)
    finally:
        model.train(was)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def where(node: fx.Node) -> str:
    """The user's source line a node was traced from (``' at file.py:12 (code)'``), '' when unknown."""
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None) or ""
    frames = [m for m in _FRAME.finditer(trace) if "/torch/" not in m.group(1) and "/hwprune/" not in m.group(1)]
    if not frames:
        return ""
    path, line, _fn, code = frames[-1].groups()
    return f" at {path.rsplit('/', 1)[-1]}:{line} ({code.strip()})"


def defined_at(model: nn.Module, name: str) -> str:
    """Where the user's code builds submodule ``name`` (``' at file.py:12 (self.b = nn.Sequential(...))'``):
    the nearest enclosing module of a class outside torch whose ``__init__`` assigns the attribute on the way to
    it; '' when the source cannot be read (a module built elsewhere, a REPL)."""
    import inspect

    mods = dict(model.named_modules())
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = mods.get(".".join(parts[:cut]))
        cls = type(owner)
        if owner is None or cls.__module__.startswith("torch"):
            continue
        attr = parts[cut]
        try:
            lines, first = inspect.getsourcelines(cls.__init__)
            path = inspect.getsourcefile(cls.__init__) or ""
        except (OSError, TypeError):
            return ""
        for k, text in enumerate(lines):
            if re.search(rf"\bself\.{re.escape(attr)}\s*(:[^=]*)?=", text):
                code = text.strip()
                return f" at {path.rsplit('/', 1)[-1]}:{first + k} ({code[:60] + '...' if len(code) > 60 else code})"
        return ""
    return ""


def raised_at(exc: BaseException) -> str:
    """The user's source line an exception was raised from (``' at file.py:12 (code)'``): the innermost frame of
    its traceback outside torch, Torch-Pruning and hwprune; '' when there is none."""
    import sysconfig
    import traceback

    import torch_pruning

    dirs = [str(Path(m.__file__).resolve().parent) for m in (torch, torch_pruning)]
    dirs.append(str(Path(__file__).resolve().parents[1]))
    stdlib = str(Path(sysconfig.get_paths()["stdlib"]).resolve())

    def ours(path: str) -> bool:
        path = str(Path(path).resolve())
        return any(path.startswith(d + "/") for d in dirs) or \
            (path.startswith(stdlib + "/") and "-packages/" not in path)

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not ours(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    code = (f.line or "").strip()
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno}" + (f" ({code[:60] + '...' if len(code) > 60 else code})"
                                                                 if code else "")
