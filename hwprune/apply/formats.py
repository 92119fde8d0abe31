"""Per-layer numeric formats: simulated for accuracy, real kernels for deployment.

Simulation (during search and fine-tune): ``int8`` = per-channel symmetric
fake-quant of weights + per-tensor dynamic fake-quant of input activations;
``int4`` = weight-only per-channel fake-quant; ``bf16``/``fp16``/``fp8`` = casts
of weights, inputs and outputs (fp8 as e4m3); ``sp24`` = fp16 with the two
smallest of every four weights zeroed. Gradients pass straight through.

Deployment (:func:`hwprune.device.deploy.deploy`): each layer goes through the target's ``realize``
(the same code the profiler times), e.g. on CPU dynamic int8 for
Linear/LSTM/GRU and bf16 modules; bf16/fp16 layers then form precision regions
(:mod:`hwprune.device.kernels`): casts only where the dtype changes. Every (layer,
format) without a real kernel stays simulated and is listed in the report,
never hidden.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hwprune.errors import HwpruneError
from hwprune.device.kernels import mask_2_4, on_data

__all__ = ["FormatSim", "apply_formats", "strip_formats", "mask_2_4", "fake_quant_weight", "fake_quant_act"]

_QMAX = {"int8": 127, "int4": 7}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def fake_quant_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-row (output channel / gate row) symmetric fake-quant of a weight with ``fmt`` bits."""
    qmax = _QMAX[fmt]
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1).float()
    scale = (amax / qmax).clamp_min(1e-12)
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -qmax - 1, qmax)


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 fake-quant with a dynamic (per call) scale."""
    scale = float(x.detach().abs().amax().clamp_min(1e-12)) / 127.0
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)


def _cast(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.to(_DTYPES[fmt]).to(t.dtype)


class FormatSim(nn.Module):
    """Runs ``inner`` as if in format ``fmt`` (for accuracy); see the module docstring."""

    def __init__(self, inner: nn.Module, fmt: str) -> None:
        super().__init__()
        if fmt not in ("bf16", "fp16", "int8", "int4", "fp8", "sp24"):
            raise HwpruneError(f"cannot simulate format {fmt!r}")
        self.inner = inner
        self.fmt = fmt

    def _params(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.inner.named_parameters():
            if self.fmt == "sp24" and p.dim() >= 2 and p.shape[-1] % 4 == 0:
                out[name] = _cast(p * mask_2_4(p.detach()), "fp16")
            elif self.fmt in _DTYPES or self.fmt == "sp24":
                out[name] = _cast(p, "fp16" if self.fmt == "sp24" else self.fmt)
            elif p.dim() >= 2:
                out[name] = fake_quant_weight(p, self.fmt)
            else:
                out[name] = p
        return out

    def _in(self, x: Any) -> Any:
        if self.fmt in _DTYPES or self.fmt == "sp24":
            return on_data(x, lambda t: _cast(t, "fp16" if self.fmt == "sp24" else self.fmt))
        return on_data(x, fake_quant_act) if self.fmt == "int8" else x

    def forward(self, x: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = functional_call(self.inner, self._params(), (self._in(x),) + args, kwargs)
        if self.fmt in _DTYPES or self.fmt == "sp24":
            fmt = "fp16" if self.fmt == "sp24" else self.fmt
            if isinstance(out, tuple) and not isinstance(out, nn.utils.rnn.PackedSequence):
                return (on_data(out[0], lambda t: _cast(t, fmt)),) + out[1:]
            return on_data(out, lambda t: _cast(t, fmt))
        return out

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}"


def apply_formats(model: nn.Module, formats: dict[str, str]) -> nn.Module:
    """Wrap each named layer whose format is not fp32 in a :class:`FormatSim` (in place)."""
    for name, fmt in sorted(formats.items()):
        if fmt == "fp32":
            continue
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise HwpruneError(f"layer {name!r} is not in the model") from None
        model.set_submodule(name, FormatSim(mod, fmt))
    return model


def strip_formats(model: nn.Module) -> nn.Module:
    """A shallow-structured copy of ``model`` with every :class:`FormatSim` replaced by its layer.

    Formats do not change multiply-add counts; FLOP counting traces this copy.
    """
    if not any(isinstance(m, FormatSim) for m in model.modules()):
        return model
    from hwprune._modelcopy import copy_model

    plain = copy_model(model)
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, FormatSim):
            plain.set_submodule(name, mod.inner)
    return plain
