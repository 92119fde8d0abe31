"""Real CUDA kernels for low-precision and sparse formats (GPU only; imported lazily).

fp16/bf16: the module in that dtype. int8 and fp8 Linear: torchao's dynamic
quantization configs (extra ``cuda``: ``pip install hwprune[cuda]``). ``sp24``:
2:4 semi-structured sparsity in fp16 via ``torch.sparse.to_sparse_semi_structured``
(the two smallest of every four weights in a row are zeroed first).
"""
from __future__ import annotations

import torch
from torch import nn

from hwprune.apply.formats import mask_2_4
from hwprune.errors import HwpruneError

__all__ = ["realize"]


def _torchao():  # type: ignore[no-untyped-def]
    try:
        import torchao.quantization as q
    except ImportError as exc:  # pragma: no cover
        raise HwpruneError("int8/fp8 on CUDA need torchao: pip install 'hwprune[cuda]'") from exc
    return q


def realize(module: nn.Module, fmt: str) -> nn.Module:  # pragma: no cover - needs a GPU
    from hwprune.latency.targets import CastModule

    if fmt == "fp32":
        return module
    if fmt in ("fp16", "bf16"):
        return CastModule(module, torch.float16 if fmt == "fp16" else torch.bfloat16)
    if not isinstance(module, nn.Linear):
        raise HwpruneError(f"cuda {fmt!r} kernels cover Linear only, not {type(module).__name__}")
    if fmt in ("int8", "fp8"):
        q = _torchao()
        cfg = q.Int8DynamicActivationInt8WeightConfig() if fmt == "int8" else \
            q.Float8DynamicActivationFloat8WeightConfig()
        wrapped = CastModule(module, torch.bfloat16)
        q.quantize_(wrapped.inner, cfg)
        w = wrapped.inner.weight
        if type(w) in (torch.Tensor, nn.Parameter):  # torchao leaves shapes it cannot quantize in bf16, silently
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
