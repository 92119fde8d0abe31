"""The real kernels behind each numeric format, for one layer: a leaf module.

``apply`` (deployment) and ``latency`` (profiling) both go through here, so a
table entry is the time of exactly the module a deployed model runs. Nothing
here imports the rest of hwprune but its errors and the deprecated-API shim.

- CPU: fp32 as is; bf16 as a :class:`CastModule`; int8 as torch.ao's dynamic
  int8 Linear/LSTM/GRU (through :mod:`hwprune._compat.ao`).
- CUDA: fp16/bf16 as a :class:`CastModule`; int8/fp8 Linear through torchao's
  dynamic configs (the ``cuda`` extra), refused when torchao leaves the layer
  in bf16; 2:4 sparse (``sp24``) fp16 Linear through
  ``torch.sparse.to_sparse_semi_structured`` with :func:`mask_2_4`.
- :func:`cuda_shape_rule`: the shapes those CUDA kernels reject, known up front.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hwprune.errors import HwpruneError

__all__ = ["CastModule", "mask_2_4", "realize_cpu", "realize_cuda", "cuda_shape_rule", "DTYPES"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CastModule(nn.Module):
    """A module run in a low-precision dtype: input cast in, output cast back to fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(x.to(self.dtype), *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].float(),) + tuple(out[1:])
        return out.float()


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
        return CastModule(module, torch.bfloat16)
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
        return CastModule(module, DTYPES[fmt])
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
