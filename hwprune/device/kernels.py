"""The real kernels behind each numeric format, for one layer: a leaf module.

``apply`` (deployment) and ``latency`` (profiling) both go through here, so a
table entry is the time of exactly the module a deployed model runs. Nothing
here imports the rest of hwprune but its errors and the deprecated-API shim.

- CPU: fp32 as is; bf16 as a :class:`RegionLayer`; int8 as torch.ao's dynamic
  int8 Linear/LSTM/GRU (through :mod:`hwprune._compat.ao`).
- CUDA: fp16/bf16 as a :class:`RegionLayer`; int8/fp8 Linear through torchao's
  dynamic configs (the ``cuda`` extra), refused when torchao leaves the layer
  in bf16; 2:4 sparse (``sp24``) fp16 Linear through
  ``torch.sparse.to_sparse_semi_structured`` with :func:`mask_2_4` (these
  three are :class:`CastModule` islands: fp32 in, fp32 out).
- :func:`cuda_shape_rule`: the shapes those CUDA kernels reject, known up front.

Precision regions. A bf16/fp16 layer is a :class:`RegionLayer`: its weights
are in that dtype, it casts its input only when the input arrives in another
dtype, and it leaves its output in its dtype. So consecutive layers in one
dtype pass activations in it, and the modules between them (BatchNorm, norms,
PReLU: every parameter-holding leaf that is not a layer) are converted to the
dtype their input arrives in; activations, residual adds and pooling follow
their inputs' dtype (torch's type promotion: mixed inputs give fp32). Which
layer feeds which is read from the autograd graph of one forward pass
(:func:`dtype_sources`), and :func:`plan_regions` says where casts happen:
at a layer whose input dtype differs from its own, and at the layers that feed
the model's output (cast back to fp32). The predictor prices exactly those
casts from measured entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hwprune.errors import HwpruneError

__all__ = ["CastModule", "RegionLayer", "mask_2_4", "realize_cpu", "realize_cuda", "cuda_shape_rule", "DTYPES",
           "region_dtype", "promote", "Sources", "RegionPlan", "dtype_sources", "plan_regions", "apply_regions",
           "DTYPE_NAMES", "DTYPE_BY_NAME", "Cast"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the formats that run as precision regions
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


class Cast(nn.Module):
    """An activation cast to ``dtype``, as a module (what a precision region's boundary runs; profiled alone)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def region_dtype(fmt: str) -> torch.dtype:
    """The dtype a layer in ``fmt`` takes its input in and hands its output on in (fp32 for islands and fp32)."""
    return DTYPES.get(fmt, torch.float32)


def promote(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """What an elementwise op over tensors of these dtypes produces: the one dtype, or fp32 when they are mixed
    (or when there is none: the model's input)."""
    kinds = set(dtypes)
    return kinds.pop() if len(kinds) == 1 else torch.float32


def on_data(x: Any, fn: Any) -> Any:
    """``fn`` applied to a tensor, or to a ``PackedSequence``'s data (its lengths and order kept)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x._replace(data=fn(x.data))
    return fn(x)


def _cast_tree(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return on_data(x, lambda t: _cast_tree(t, dtype))
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple):
        return tuple(_cast_tree(v, dtype) for v in x)
    return x


class RegionLayer(nn.Module):
    """A layer inside a precision region: runs ``inner`` in ``dtype``, casting inputs only when they arrive in
    another dtype; ``out_dtype`` (None: leave as is) casts the outputs (the layers that feed the model output).

    ``inner`` must already be in ``dtype``.
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(_cast_tree(x, self.dtype), *_cast_tree(args, self.dtype), **kwargs)
        return out if self.out_dtype is None else _cast_tree(out, self.out_dtype)

    def extra_repr(self) -> str:
        out = f", out={DTYPE_NAMES.get(self.out_dtype, self.out_dtype)}" if self.out_dtype is not None else ""
        return f"dtype={DTYPE_NAMES.get(self.dtype, self.dtype)}{out}"


class CastModule(nn.Module):
    """A module run in a low-precision dtype: input cast in, output cast back to fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(on_data(x, lambda t: t.to(self.dtype)), *args, **kwargs)
        if isinstance(out, tuple) and not isinstance(out, nn.utils.rnn.PackedSequence):
            return (on_data(out[0], lambda t: t.float()),) + tuple(out[1:])
        return on_data(out, lambda t: t.float())


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """1 for the two largest-magnitude weights of every four along the last dim, else 0."""
    groups = w.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups).scatter(1, groups.argsort(1)[:, 2:], 1.0)
    return keep.reshape(w.shape)


def realize_cpu(module: nn.Module, fmt: str, target: str = "cpu") -> nn.Module:
    """``module`` in ``fmt`` with a real CPU kernel (the quantized engine is set by the target)."""
    from hwprune._compat.ao import DYNAMIC_INT8_TYPES, quantize_dynamic_int8

    if fmt == "fp32":
        return module
    if fmt == "bf16":
        return RegionLayer(module.to(torch.bfloat16), torch.bfloat16)
    if fmt == "int8" and isinstance(module, DYNAMIC_INT8_TYPES):
        return quantize_dynamic_int8(module)
    raise HwpruneError(f"target {target!r} has no {fmt!r} kernel for {type(module).__name__}")


def _torchao():  # type: ignore[no-untyped-def]
    try:
        import torchao.quantization as q
    except ImportError as exc:  # pragma: no cover - the cuda extra
        raise HwpruneError("int8/fp8 on CUDA need torchao: pip install 'hwprune[cuda]'") from exc
    return q


def realize_cuda(module: nn.Module, fmt: str) -> nn.Module:  # pragma: no cover - needs a GPU
    """``module`` (moved to the GPU) in ``fmt`` with a real CUDA kernel."""
    module = module.to("cuda")
    if fmt == "fp32":
        return module
    if fmt in DTYPES:
        return RegionLayer(module.to(DTYPES[fmt]), DTYPES[fmt])
    if not isinstance(module, nn.Linear):
        raise HwpruneError(f"cuda {fmt!r} kernels cover Linear only, not {type(module).__name__}")
    if fmt in ("int8", "fp8"):
        q = _torchao()
        cfg = q.Int8DynamicActivationInt8WeightConfig() if fmt == "int8" else \
            q.Float8DynamicActivationFloat8WeightConfig()
        wrapped = CastModule(module, torch.bfloat16)
        q.quantize_(wrapped.inner, cfg)
        if type(wrapped.inner.weight) in (torch.Tensor, nn.Parameter):  # torchao skips shapes it cannot quantize
            raise HwpruneError(f"torchao left this {module.out_features}x{module.in_features} Linear in bf16 "
                               f"({fmt} not applied): it would be a bf16 timing labelled {fmt}")
        return wrapped
    if fmt == "sp24":
        from torch.sparse import to_sparse_semi_structured

        wrapped = CastModule(module, torch.float16)
        with torch.no_grad():
            w = wrapped.inner.weight.detach()
            dense = w * mask_2_4(w)  # the same mask the simulation uses
            wrapped.inner.weight = nn.Parameter(to_sparse_semi_structured(dense), requires_grad=False)
        return wrapped
    raise HwpruneError(f"cuda has no {fmt!r} kernel")


def cuda_shape_rule(op: str, cin: int, cout: int, fmt: str, capability: tuple[int, int] | None) -> str | None:
    """Why a CUDA kernel for ``fmt`` cannot run a layer of this shape (None when it can).

    The rules of the kernels above (checked on an H100, see shared/gpu/FACTS.md): 2:4 sparse (cuSPARSELt
    through ``to_sparse_semi_structured``) needs both weight dims multiples of 16; torchao's fp8 needs
    multiples of 16 and sm_89+; torchao's int8 skips layers with 16 or fewer inputs; bf16 needs sm_80+.
    ``capability`` None: the device is unknown, only the shape rules apply.
    """
    cap = capability or (99, 0)
    if fmt in ("int8", "fp8", "sp24") and op != "linear":
        return f"cuda {fmt} kernels cover Linear layers only, not {op}"
    if fmt == "sp24":
        if cin % 16 or cout % 16:
            return f"2:4 sparse needs both weight dims to be multiples of 16, got {cout}x{cin}"
        if cap < (8, 0):
            return "2:4 sparse needs sm_80 or newer"
    if fmt == "fp8":
        if cin % 16 or cout % 16:
            return f"fp8 needs both weight dims to be multiples of 16, got {cout}x{cin}"
        if cap < (8, 9):
            return "fp8 needs sm_89 or newer"
    if fmt == "int8" and cin <= 16:
        return f"torchao int8 skips Linear layers with 16 or fewer inputs (this one has {cin})"
    if fmt == "bf16" and cap < (8, 0):
        return "bf16 needs sm_80 or newer"
    return None


# ---- precision regions -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sources:
    """Which layers feed what, as the autograd graph of one forward pass shows it.

    ``inputs[name]``: the layers whose outputs reach ``name``'s input through non-layer ops (empty: the model's
    input); keys are the layers and the followers. ``output``: the layers that reach the model output.
    ``followers``: the parameter-holding leaf modules that are not layers (BatchNorm, LayerNorm, PReLU, ...).
    """

    inputs: dict[str, tuple[str, ...]]
    output: tuple[str, ...]
    followers: tuple[str, ...] = ()


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _has_float_state(m: nn.Module) -> bool:
    return any(t.is_floating_point() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))


_IN_PLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                                "and", "or", "xor", "lshift", "rshift")}


class _InPlaceOps(TorchFunctionMode):
    """Records the autograd node of every in-place op on a tensor that has one (``add_``, ``+=``, ...)."""

    def __init__(self, nodes: set[int], keep: list[Any]) -> None:
        super().__init__()
        self.nodes, self.keep = nodes, keep

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        before = target.grad_fn if target is not None else None
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if target is not None and (name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))) \
                and target.grad_fn is not None and target.grad_fn is not before:  # a new node: the op wrote into it
            self.nodes.add(id(target.grad_fn))
            self.keep.append(target.grad_fn)
        return out


def dtype_sources(model: nn.Module, example: Any, layers: Iterable[str]) -> Sources | None:
    """Run ``model`` once on ``example[:1]`` with autograd on and read which of ``layers`` feed each layer, each
    follower and the output (see :class:`Sources`). The model's parameters and mode are restored afterwards.

    The graph is made by the parameters (set to require grad for the pass), never by the input, so a forward
    that changes its input in place still runs. An op in place (``result += x``: torchvision's residual blocks)
    keeps its first operand's dtype, so only that operand is a source of what follows it. None when the pass fails
    anyway: the caller treats the layers as islands.
    """
    names = [n for n in layers]
    mods = dict(model.named_modules())
    inside = lambda n: any(n == l or n.startswith(l + ".") for l in names if l)  # noqa: E731
    followers = [n for n, m in mods.items() if n and not inside(n) and not list(m.children()) and _has_float_state(m)]
    produced: dict[int, str] = {}
    keep: list[Any] = []  # grad_fn objects stay alive, so their ids stay theirs
    seen_in: dict[str, Any] = {}

    def hook(name: str, is_layer: bool):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, inp: tuple, out: Any) -> None:
            if name not in seen_in:
                ts = _tensors(inp)
                seen_in[name] = ts[0].grad_fn if ts else None
                keep.append(seen_in[name])
            if is_layer:
                for t in _tensors(out):
                    if t.grad_fn is not None:
                        produced.setdefault(id(t.grad_fn), name)
                        keep.append(t.grad_fn)
        return fn

    in_place: set[int] = set()  # autograd nodes of in-place ops: their result has their first operand's dtype
    params = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    handles = [mods[n].register_forward_hook(hook(n, True)) for n in names if n in mods] + \
              [mods[n].register_forward_hook(hook(n, False)) for n in followers]
    try:
        for p, _ in params:
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            from hwprune.inputs import call, rows

            with _InPlaceOps(in_place, keep):
                out = call(model.eval(), rows(example, slice(0, 1)))
    except Exception:  # noqa: BLE001 - the forward worked without autograd (checked before); regions are optional
        return None
    finally:
        for h in handles:
            h.remove()
        for p, rg in params:
            p.requires_grad_(rg)
        model.train(was_training)

    def walk(fn: Any) -> tuple[str, ...]:
        found, stack, seen = set(), [fn], set()
        while stack:
            f = stack.pop()
            if f is None or id(f) in seen:
                continue
            seen.add(id(f))
            if id(f) in produced:
                found.add(produced[id(f)])
                continue
            stack.extend(nf for nf, _ in (f.next_functions[:1] if id(f) in in_place else f.next_functions))
        return tuple(sorted(found))

    outs = _tensors(out)
    return Sources({n: walk(fn) for n, fn in seen_in.items()},
                   tuple(sorted({s for t in outs for s in walk(t.grad_fn)})), tuple(f for f in followers if f in seen_in))


@dataclass
class RegionPlan:
    """Where a policy's dtypes change: ``cast_in[layer] = (from, to)`` before a layer, ``cast_out[layer]``
    after a layer that feeds the model output, each follower's dtype, and each layer's output dtype (``act``)."""

    compute: dict[str, torch.dtype]
    act: dict[str, torch.dtype] = field(default_factory=dict)
    cast_in: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    cast_out: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    followers: dict[str, torch.dtype] = field(default_factory=dict)
    islands: bool = False

    @property
    def casts(self) -> int:
        return len(self.cast_in) + len(self.cast_out)


def plan_regions(compute: dict[str, torch.dtype], src: Sources, islands: bool = False) -> RegionPlan:
    """The casts a model needs when each layer runs in ``compute[layer]`` (missing: fp32).

    ``islands``: every low-precision layer casts its input in and its output back to fp32 (no regions;
    followers stay fp32).
    """
    f32 = torch.float32
    comp = {n: compute.get(n, f32) for n in src.inputs if n not in src.followers}
    plan = RegionPlan(comp, islands=islands)
    for n, d in comp.items():
        plan.act[n] = f32 if islands or n in src.output else d
    for n, d in comp.items():
        have = promote(plan.act[s] for s in src.inputs[n])
        if have != d:
            plan.cast_in[n] = (have, d)
        if d != f32 and plan.act[n] != d:
            plan.cast_out[n] = (d, f32)
    for n in src.followers:
        d = promote(plan.act[s] for s in src.inputs[n])
        if d != f32:
            plan.followers[n] = d
    return plan


def apply_regions(model: nn.Module, plan: RegionPlan) -> nn.Module:
    """Wrap the layers that cast (a :class:`RegionLayer` already there gets its output dtype) and convert the
    followers to their region's dtype, in place."""
    for n, d in plan.compute.items():
        mod = model.get_submodule(n) if n else model
        out = plan.cast_out.get(n, (None, None))[1]
        if isinstance(mod, RegionLayer):
            mod.out_dtype = out
        elif n in plan.cast_in or out is not None:
            model.set_submodule(n, RegionLayer(mod, d, out))
    for n, d in plan.followers.items():
        model.get_submodule(n).to(d)
    return model


def fp32_copy(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of a deployed model with every layer a runtime or exporter cannot take in its real format put back
    in fp32: precision regions (bf16/fp16) and dynamic int8 Linears (weights dequantized). Returns the copy and
    {layer: the format it had}; an empty dict when nothing changed."""
    from hwprune._modelcopy import copy_model

    from hwprune._compat.ao import dequantized_linear

    out = copy_model(model)
    changed: dict[str, str] = {}
    for name, mod in list(out.named_modules()):
        if not name:
            continue
        new: nn.Module | None = None
        if isinstance(mod, (RegionLayer, CastModule)):
            new, fmt = mod.inner.float(), DTYPE_NAMES.get(mod.dtype, str(mod.dtype))
        elif (lin := dequantized_linear(mod)) is not None:
            new, fmt = lin, "int8"
        if new is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, new)
            if fmt != "fp32":  # an fp32 layer at a region's edge: its casts go, its format was fp32 all along
                changed[name] = fmt
    return out, changed
