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

__all__ = ["DeployReport", "deploy", "deploy_cpu", "format_refusals"]


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


def _user_line(exc: BaseException) -> str:
    """The innermost frame of ``exc`` in the user's code (not torch's, not hwprune's): ``' at file.py:12 (code)'``,
    '' when there is none."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/hwprune/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({(f.line or '').strip()[:80]})"


def format_refusals(model: nn.Module, example: Any, menus: dict[str, list[str]], target: Any
                    ) -> dict[str, dict[str, str]]:
    """The formats on the layers' menus that the model cannot run with: ``{layer: {format: reason}}``.

    A model may depend on a layer's class (OpenNMT-py's decoder unwraps its state only ``if isinstance(self.rnn,
    nn.GRU)``), which neither a simulated layer nor torch's int8 GRU is. Each low-precision format is tried on
    every layer that offers it at once, on two rows of ``example``: simulated (what trials fine-tune) and, where the
    target is this machine, deployed on its kernels (what the profiler times). Where the model fails, the layers
    are halved until each failing one is found (layers that fail only together are all refused). The reason names
    the error and the user's source line. A failure in hwprune's own code is a bug and is raised."""
    from hwprune._modelcopy import copy_model
    from hwprune.apply.formats import apply_formats
    from hwprune.errors import is_own_bug, one_line

    x = inputs.rows(example, slice(0, 2))

    def fails(fmt: str, names: list[str]) -> str:
        sim = apply_formats(copy_model(model).eval(), {n: fmt for n in names})
        try:
            with torch.no_grad():
                inputs.call(sim, x)
                if target.is_local():
                    dep, _ = deploy(sim, target, example)
                    dev = next(iter(dep.parameters()), None)
                    inputs.call(dep.eval(), inputs.to_device(x, dev.device if dev is not None else "cpu"))
        except Exception as exc:  # noqa: BLE001 - the user's model cannot take the format: refused with the reason
            if is_oom(exc) or is_own_bug(exc):
                raise
            return one_line(exc, 120) + _user_line(exc)
        return ""

    def failing(fmt: str, names: list[str]) -> dict[str, str]:
        why = fails(fmt, names)
        if not why:
            return {}
        if len(names) == 1:
            return {names[0]: why}
        half = len(names) // 2
        found = {**failing(fmt, names[:half]), **failing(fmt, names[half:])}
        return found or {n: f"{why} (with the other layers in {fmt})" for n in names}

    out: dict[str, dict[str, str]] = {}
    for fmt in sorted({f for menu in menus.values() for f in menu if f != "fp32"}):
        for name, why in failing(fmt, sorted(n for n, menu in menus.items() if fmt in menu)).items():
            out.setdefault(name, {})[fmt] = why
    return out
