"""Which runtime? The dense model measured in every runtime of a target that can run here, side by side.

``hwprune profile --runtime all``: each runtime prepares the model once (eager: as is; compile: torch.compile;
onnxruntime / openvino: exported to ONNX and loaded there), checks its outputs against eager's on the timing batch,
then all of them are timed in the same interleaved rounds (a fresh random order each round), so a slow minute of a
noisy machine falls on every runtime alike and the ratios to eager hold better than the medians.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from hwprune import inputs
from hwprune.errors import one_line

__all__ = ["compare_runtimes", "format_comparison"]


def compare_runtimes(model: nn.Module, x: Any, target_name: str, threads: int | None, repeats: int,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per runtime of ``target_name``: median, spread and speedup over eager (measured in the same
    rounds), largest output difference to eager; a runtime that cannot run here says why (``skipped``) and one
    that fails on this model says how (``error``)."""
    from hwprune.device.onnxrt import RUNTIMES as ONNX_RUNTIMES, missing
    from hwprune.export import output_diff
    from hwprune.latency.profiler import round_plan
    from hwprune.latency.rounds import measure_in_rounds
    from hwprune.device.targets import TARGETS, get_target

    from torch.utils._pytree import tree_map

    model = model.eval()
    with torch.no_grad():
        ref = inputs.call(model.cpu(), inputs.to_device(x, "cpu"))
    rows: dict[str, dict[str, Any]] = {}
    samplers: dict[str, Callable[[], float]] = {}
    for rt in TARGETS.get(target_name).runtimes:
        row: dict[str, Any] = {"runtime": rt}
        rows[rt] = row
        why = missing(rt) if rt in ONNX_RUNTIMES else None
        if why:
            row["skipped"] = why
            continue
        target = get_target(target_name, threads=threads, runtime=rt)
        log(f"hwprune: preparing the dense model in {rt}")
        try:
            xx = inputs.to_device(x, target.device)
            with torch.no_grad():
                run = target.prepare(model.to(target.device), xx)
                got = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, inputs.call(run, xx))
            row["max_abs_diff"], _ = output_diff(got, ref)
            samplers[rt] = target.sampler(lambda run=run, xx=xx: inputs.call(run, xx))
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot take this model is a row, not the end
            row["error"] = one_line(exc, 200)
    if not samplers:
        return list(rows.values())
    with torch.no_grad():
        res = measure_in_rounds(samplers, round_plan(repeats))
    eager = res.timing("eager").median_us if "eager" in samplers else None
    for rt in samplers:
        t = res.timing(rt)
        rows[rt].update(median_ms=t.median_us / 1e3, spread_pct=t.spread_pct, rounds=len(res.samples[rt]))
        if eager:
            rows[rt]["speedup_vs_eager"] = eager / t.median_us
    return list(rows.values())


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table, fastest first, then the runtimes that did not run."""
    ran = sorted((r for r in rows if "median_ms" in r), key=lambda r: r["median_ms"])
    lines = [f"{'runtime':<14} {'median ms':>10} {'spread':>7} {'vs eager':>9} {'max |diff| to eager':>20}"]
    for r in ran:
        sp = r.get("speedup_vs_eager")
        lines.append(f"{r['runtime']:<14} {r['median_ms']:>10.4f} {r['spread_pct']:>6.1f}% "
                     f"{(f'{sp:.2f}x' if sp else '-'):>9} {r['max_abs_diff']:>20.2e}")
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['runtime']:<14} not measured: {r.get('skipped') or r.get('error')}")
    return "\n".join(lines)
