"""Per-layer numeric formats: simulated for accuracy, real kernels for deployment.

Simulation (during search and fine-tune): ``int8`` = per-channel symmetric
fake-quant of weights + per-tensor dynamic fake-quant of input activations;
``int4`` = weight-only per-channel fake-quant; ``bf16``/``fp16``/``fp8`` = casts
of weights, inputs and outputs (fp8 as e4m3); ``sp24`` = fp16 with the two
smallest of every four weights zeroed. Gradients pass straight through.

Deployment (:func:`deploy`): each layer goes through the target's ``realize``
(the same code the profiler times), e.g. on CPU dynamic int8 for
Linear/LSTM/GRU and bf16 modules; bf16/fp16 layers then form precision regions
(:mod:`hwprune.kernels`): casts only where the dtype changes. Every (layer,
format) without a real kernel stays simulated and is listed in the report,
never hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hwprune import inputs
from hwprune.errors import HwpruneError, is_oom
from hwprune.kernels import mask_2_4, on_data

__all__ = ["FormatSim", "apply_formats", "strip_formats", "mask_2_4", "fake_quant_weight", "fake_quant_act", "deploy",
           "deploy_cpu", "DeployReport"]

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
    import copy

    plain = copy.deepcopy(model)
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, FormatSim):
            plain.set_submodule(name, mod.inner)
    return plain


@dataclass
class DeployReport:
    """Which layers run a real kernel in their format, and which stay simulated."""

    real: dict[str, str] = field(default_factory=dict)
    simulated: dict[str, str] = field(default_factory=dict)
    regions: str = "none"  # "regions", "islands (why)", or "none" (no bf16/fp16 layer)
    casts: int = 0  # dtype casts the deployed forward pass runs


def _layer_names(model: nn.Module) -> list[str]:
    """Every layer a format can apply to: the simulated ones and the plain conv/linear/LSTM/GRU layers."""
    from hwprune.space import quant_layers

    sim = [n for n, m in model.named_modules() if isinstance(m, FormatSim)]
    inside = lambda n: any(n.startswith(s + ".") for s in sim)  # noqa: E731
    return sim + [q.name for q in quant_layers(model) if not inside(q.name) and q.name not in sim]


def deploy(model: nn.Module, target: Any = "cpu", example: torch.Tensor | None = None
           ) -> tuple[nn.Module, DeployReport]:
    """Replace simulated formats by the target's real kernels where it has them, with bf16/fp16 layers joined
    into precision regions; returns the deployed model (``model`` itself is changed).

    ``target`` is a :class:`~hwprune.latency.targets.Target` (its ``realize`` is what the profiler timed) or
    a target name. ``example`` (an input batch) is needed to plan the regions; without it, or when the
    planned model does not run, each bf16/fp16 layer is an island (cast in and back out), as the report says.
    """
    import copy

    from hwprune.errors import one_line
    from hwprune.kernels import Sources, apply_regions, dtype_sources, plan_regions, region_dtype

    if isinstance(target, str):
        from hwprune.latency.targets import get_target

        target = get_target(target)
    formats = {n: m.fmt for n, m in model.named_modules() if isinstance(m, FormatSim)}
    names = _layer_names(model)
    src = None
    if example is not None and any(region_dtype(f) != torch.float32 for f in formats.values()):
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        src = dtype_sources(model, inputs.to_device(example, dev), names)
    backup = copy.deepcopy(model) if src is not None else None
    model, report = _realize_all(model, target)
    compute = {n: region_dtype(f) for n, f in report.real.items()}
    if not any(d != torch.float32 for d in compute.values()):
        return model, report
    why = "no example input to plan them" if example is None else \
        "the model's forward could not be traced with autograd" if src is None else ""
    if src is not None:
        plan = plan_regions(compute, src)
        apply_regions(model, plan)
        try:
            model = model.to(target.device)
            with torch.no_grad():
                inputs.call(model.eval(), inputs.to_device(inputs.rows(example, slice(0, 2)), target.device))
            report.regions, report.casts = "regions", plan.casts
            return model, report
        except Exception as exc:  # noqa: BLE001 - e.g. an op in the user's forward that needs matching dtypes
            if is_oom(exc):
                raise
            why = f"the model does not run with regions: {one_line(exc, 120)}"
            assert backup is not None
            model, report = _realize_all(backup, target)
    src = src or Sources({n: () for n in names}, tuple(names))  # islands need no graph
    plan = plan_regions(compute, src, islands=True)
    apply_regions(model, plan)
    report.regions, report.casts = f"islands ({why})", plan.casts
    return model, report


def _realize_all(model: nn.Module, tgt: Any) -> tuple[nn.Module, DeployReport]:
    report = DeployReport()
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, FormatSim):
            continue
        try:
            real = tgt.realize(mod.inner, mod.fmt)
        except Exception as exc:  # noqa: BLE001 - no kernel, or one that rejects this shape: stays simulated
            if is_oom(exc):
                raise
            report.simulated[name] = mod.fmt
            continue
        model.set_submodule(name, real)
        report.real[name] = mod.fmt
    return model, report


def deploy_cpu(model: nn.Module, example: torch.Tensor | None = None) -> tuple[nn.Module, DeployReport]:
    """:func:`deploy` on the ``cpu`` target."""
    return deploy(model, "cpu", example)
