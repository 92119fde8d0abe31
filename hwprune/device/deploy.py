"""Deploying a model whose layers simulate their formats (:class:`hwprune.apply.formats.FormatSim`) on a
target's real kernels: each simulated layer realized by the target (what the profiler timed), bf16/fp16 layers
joined into precision regions (:mod:`hwprune.device.kernels`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hwprune import inputs
from hwprune.apply.formats import FormatSim
from hwprune.errors import is_oom

__all__ = ["DeployReport", "deploy", "deploy_cpu"]


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

    ``target`` is a :class:`~hwprune.device.targets.Target` (its ``realize`` is what the profiler timed) or
    a target name. ``example`` (an input batch) is needed to plan the regions; without it, or when the
    planned model does not run, each bf16/fp16 layer is an island (cast in and back out), as the report says.
    """
    from hwprune._modelcopy import copy_model

    from hwprune.errors import one_line
    from hwprune.device.kernels import Sources, apply_regions, dtype_sources, plan_regions, region_dtype

    if isinstance(target, str):
        from hwprune.device.targets import get_target

        target = get_target(target)
    formats = {n: m.fmt for n, m in model.named_modules() if isinstance(m, FormatSim)}
    names = _layer_names(model)
    src = None
    if example is not None and any(region_dtype(f) != torch.float32 for f in formats.values()):
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        src = dtype_sources(model, inputs.to_device(example, dev), names)
    backup = copy_model(model) if src is not None else None
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
