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
    out = wrapped[0]
    keeps = _WITH_API.get(type(out))
    if keeps is not None:
        out.__class__ = keeps
    return out


def _with_rnn_api() -> dict[type, type]:
    """torch's dynamic int8 LSTM/GRU with ``flatten_parameters()``, a no-op for packed weights: models call it
    on their RNN in every forward (SpeechBrain's RNN wrappers), and the quantized modules lack it."""
    from torch.ao.nn.quantized import dynamic as qd

    def flatten_parameters(self: nn.Module) -> None:
        """Nothing to flatten: the weights are packed int8 (``nn.RNNBase.flatten_parameters`` is for cuDNN)."""

    made = {}
    for base in (qd.LSTM, qd.GRU):
        cls = type(base.__name__, (base,), {"flatten_parameters": flatten_parameters, "__module__": __name__,
                                            "__qualname__": base.__name__})
        globals()[base.__name__] = cls  # importable by name, so a pickled module finds its class
        made[base] = cls
    return made


_WITH_API = _with_rnn_api()


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
