"""Every use of the deprecated ``torch.ao.quantization`` lives here.

Its dynamic int8 kernels for Linear/LSTM/GRU (fbgemm/x86 on x86, qnnpack on
ARM) are still the fastest CPU path in torch 2.13; when they go, this is the
one file to migrate (torchao's ``Int8DynamicActivationInt8WeightConfig``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["quantize_dynamic_int8", "quantized_engine", "DYNAMIC_INT8_TYPES", "dequantized_linear"]

DYNAMIC_INT8_TYPES = (nn.Linear, nn.LSTM, nn.GRU)


def quantized_engine() -> str:
    """The active quantized engine (``x86``, ``fbgemm``, ``qnnpack``, ...)."""
    return str(torch.backends.quantized.engine)


def quantize_dynamic_int8(module: nn.Module) -> nn.Module:
    """A dynamically quantized int8 copy of one Linear/LSTM/GRU (real int8 kernels)."""
    if not isinstance(module, DYNAMIC_INT8_TYPES):
        raise TypeError(f"dynamic int8 covers Linear/LSTM/GRU, not {type(module).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        wrapped = quantize_dynamic(nn.Sequential(module).eval(), {type(module)}, dtype=torch.qint8)
    return wrapped[0]


def dequantized_linear(module: nn.Module) -> nn.Linear | None:
    """An fp32 ``nn.Linear`` computing what a dynamic int8 Linear of :func:`quantize_dynamic_int8` computes with its
    int8 weights dequantized (activations in fp32); None for any other module. For exporters that cannot take
    packed int8 weights (torch.export, ONNX)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if not isinstance(module, DynamicLinear):
        return None
    w = module.weight().dequantize()
    b = module.bias()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin.eval()
