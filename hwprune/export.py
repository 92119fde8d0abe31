"""Export one point of a search: fine-tune it longer, deploy it on the target's kernels, measure it, save it.

``export_run`` reads a run directory written by ``hwprune search``, applies the
chosen trial's policy to the dense model, fine-tunes (all at once, or
gradually: pruning toward the policy in stages, as progressive pruning does),
evaluates on the test split, replaces simulated formats by the target's real
kernels, measures end-to-end latency when this machine is the run's target,
and writes:

- ``policy.json``: the policy plus provenance (``hwprune apply --policy`` reads it);
- ``model.pt2`` (``torch.export``) and/or ``model.ts`` (TorchScript): loadable
  by plain ``torch`` (``torch.export.load(p).module()`` / ``torch.jit.load(p)``),
  each checked against the in-memory model before it is kept;
- ``model_aoti.pt2`` (runtime ``compile`` only): an AOTInductor package of the
  deployed model at the latency batch size, compiled ahead of time, checked and
  measured like the others (``torch._inductor.aoti_load_package(p)``);
- ``pruned.pt``: the hwprune artifact (pruned state dict + policy, simulated
  formats), for further training with hwprune;
- ``report.md`` and ``export.json`` (the summary ``--json`` prints).

An export directory is written once: the same command again prints the stored
summary; a different export into the same directory is refused.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from hwprune._compat import torchscript
from hwprune._io import read_json, relocated, staged_dir, write_atomic
from hwprune import inputs
from hwprune._modelcopy import copy_model
from hwprune.errors import HwpruneError, one_line
from hwprune.policy import Policy, keep_units

__all__ = ["export_run", "SCHEDULES", "gradual_keeps", "finetune_policy", "pick_trial"]

SCHEDULES = ("oneshot", "gradual")
DEFAULT_STEPS = 1000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gradual_keeps(final: dict[str, float], stages: int) -> list[dict[str, float]]:
    """Keep ratios per stage, cubic from 1.0 to ``final`` (Zhu & Gupta's schedule); the last is ``final``.

    >>> [round(s["g"], 4) for s in gradual_keeps({"g": 0.5}, 3)]
    [0.6481, 0.5185, 0.5]
    """
    out = []
    for k in range(1, stages + 1):
        f = (1 - k / stages) ** 3
        out.append({g: r + (1 - r) * f for g, r in final.items()})
    return out


def _loss_of(task: Any) -> Any:
    from hwprune.tasks import get_task

    return get_task(task).loss


def finetune_policy(dense: nn.Module, policy: Policy, example: torch.Tensor, train: Any, steps: int, *,
                    schedule: str = "oneshot", stages: int = 4, exclude: list[str] | None = None,
                    importance: str = "l1", lr: float = 1e-3, seed: int = 0, batches: Any = None,
                    log: Callable[[str], None] | None = None, device: str | None = None,
                    task: Any = None, batch_size: int = 128, distill: float = 0.0) -> nn.Module:
    """Prune ``dense`` to ``policy`` and fine-tune ``steps`` steps in total (``distill`` > 0: every step also
    learns from ``dense``'s outputs with that weight, :func:`hwprune.train.finetune`).

    ``oneshot`` prunes once and fine-tunes with the policy's (simulated) formats.
    ``gradual`` spends half the steps pruning in ``stages`` stages toward the
    policy's units (each stage prunes the current model by importance, then
    fine-tunes), then sets the formats and fine-tunes the other half. Both end
    in the same architecture: the policy's units, rounded as the policy rounds.
    """
    from hwprune.apply import apply_formats, apply_policy, prune_model
    from hwprune.space import build_space
    from hwprune.train import finetune

    exclude = list(exclude or [])
    if schedule not in SCHEDULES:
        raise HwpruneError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if schedule == "oneshot":
        model = apply_policy(dense, policy, example, exclude=exclude, importance=importance, batches=batches,
                             loss=_loss_of(task))
        return finetune(model, train, steps, lr=lr, batch_size=batch_size, seed=seed, device=device, task=task,
                        teacher=dense, distill=distill)
    space = build_space(dense, example, exclude, blocks=False)  # widths only: no block is asked for
    dense_units = {g.name: g.units for g in space.groups}
    final = policy.units(space)
    per_stage = max(1, steps // (2 * stages)) if steps else 0
    model = dense
    if policy.drop:  # depth at once, then the widths in stages on the model without those blocks
        model = prune_model(dense, Policy(drop=policy.drop, channel_multiple=policy.channel_multiple), example,
                            exclude=exclude, importance=importance, batches=batches, loss=_loss_of(task))
    plan = gradual_keeps({g: policy.keep.get(g, 1.0) for g in dense_units}, stages)
    for k, keeps in enumerate(plan, start=1):
        target = {g: final[g] if k == stages else max(final[g], keep_units(r, dense_units[g], policy.channel_multiple))
                  for g, r in keeps.items()}
        current = {g.name: g.units for g in build_space(model, example, exclude, blocks=False).groups}
        rel = Policy({g: target[g] / current[g] for g in target if g in current and target[g] < current[g]}, {}, 1,
                     policy.model)  # a group inside a dropped block is gone
        if rel.keep:
            model = prune_model(model, rel, example, exclude=exclude, importance=importance, batches=batches,
                                loss=_loss_of(task))
        if log:
            log(f"hwprune: gradual stage {k}/{stages}: {sum(target.values())} of {sum(dense_units.values())} units")
        if k < stages:
            finetune(model, train, per_stage, lr=lr, batch_size=batch_size, seed=seed + k, device=device, task=task,
                     teacher=dense, distill=distill)
    model = apply_formats(model, policy.formats)
    return finetune(model, train, max(0, steps - per_stage * (stages - 1)), lr=lr, batch_size=batch_size, seed=seed,
                    device=device, task=task, teacher=dense, distill=distill)


def pick_trial(trials: list[Any], which: str, budget_ms: float, over: Any = (), met: Any = (),
               prefer: int | None = None) -> Any:
    """``best`` (the most accurate feasible point, passing over the trials the measured finish timed ``over`` the
    budget) or a trial number that completed."""
    from hwprune.search.rundir import best_point, front

    if which == "best":
        pts = front(trials, budget_ms)
        if not pts:
            raise HwpruneError("the run has no feasible completed trial to export yet")
        best = best_point(pts, over, trials, budget_ms, met, prefer)
        if best is None:
            raise HwpruneError("the run has no best point: its measured finish timed every feasible trial over the "
                               "budget on the search's machine; export one by number (--trial N, see trials.csv) "
                               "to measure it again")
        return best
    try:
        n = int(which)
    except ValueError:
        raise HwpruneError(f"--trial must be 'best' or a trial number, got {which!r}") from None
    done = sorted(t.number for t in trials if t.state.name == "COMPLETE")
    for t in trials:
        if t.number == n:
            if t.state.name != "COMPLETE":
                raise HwpruneError(f"trial {n} is {t.state.name.lower()}, not complete; completed trials: "
                                   f"{_ranges(done)}")
            return t
    raise HwpruneError(f"the run has no trial {n}; completed trials: {_ranges(done)}")


def _ranges(nums: list[int]) -> str:
    if not nums:
        return "none"
    out, start = [], nums[0]
    for a, b in zip(nums, nums[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _fingerprint_diff(run_fp: dict[str, Any], here: dict[str, Any] | None) -> list[str]:
    """The fingerprint keys in which this machine is not the run's device (:func:`fingerprint_diff`, the one
    definition of the same device)."""
    from hwprune.latency.table import fingerprint_diff

    if here is None:
        return ["device (the target is not this machine)"]
    return sorted(d.split(":")[0] for d in fingerprint_diff(run_fp, here))


def output_diff(got: Any, ref: Any) -> tuple[float, float]:
    """Largest absolute difference between two outputs of any structure (tensors in tuples, lists, dicts) and
    the reference's largest magnitude; a structure mismatch is an infinite difference."""
    from torch.utils._pytree import tree_leaves

    a = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    b = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(u.shape != v.shape for u, v in zip(a, b)) or not b:
        return float("inf"), 1.0
    diff = max(float((u.float() - v.float()).abs().max()) if u.numel() else 0.0 for u, v in zip(a, b))
    scale = max(float(v.float().abs().max()) if v.numel() else 0.0 for v in b)
    return diff, scale


def _save_artifacts(model: nn.Module, x: Any, out: Path, x_other: Any = None, runtime: str = "eager",
                    calibration: list[Any] | None = None,
                    formats: Iterable[str] = ()) -> tuple[dict[str, str], dict[str, Any]]:
    """torch.export (``model.pt2``), TorchScript (``model.ts``) and ONNX (``model.onnx``) versions of ``model``
    made on ``x``, each kept only if it reloads (plain torch; ONNX Runtime, else OpenVINO, for the ONNX file) and
    computes what the model computes on ``x`` and on ``x_other`` (another batch size: the batch dimension of the
    torch.export and ONNX graphs is dynamic; a trace that baked in its example's batch, e.g. through a packed
    sequence's sort order, is not kept). In an ONNX ``runtime`` the ONNX file holds the formats that runtime runs
    (its int8 nodes, convolutions' activation scales from ``calibration`` inputs) and is checked there. ``checks`` holds each one's largest output difference or why it was not
    kept."""
    model.eval()
    args = inputs.positional(model, x)
    others = [inputs.positional(model, x_other)] if x_other is not None else []
    with torch.no_grad():
        refs = [model(*a) for a in [args] + others]
    kept: dict[str, str] = {}
    checks: dict[str, Any] = {}

    def check(name: str, path: Path, data: bytes, load: Callable[[io.BytesIO], Any], tol: float = 1e-5) -> None:
        loaded = load(io.BytesIO(data))
        diff, scale = 0.0, 1.0
        with torch.no_grad():
            for a, ref in zip([args] + others, refs):
                try:
                    got = loaded(*a)
                except Exception as exc:  # noqa: BLE001 - the artifact fails at another batch: not kept
                    checks[name] = {"error": f"fails at batch {len(a[0])}: {one_line(exc, 160)}"}
                    return
                d, s = output_diff(got, ref)
                diff, scale = max(diff, d), max(scale, s)
        checks[name] = {"max_abs_diff": diff}
        if diff <= tol * max(1.0, scale):
            write_atomic(path, data)
            kept[name] = str(path)
        else:
            checks[name]["error"] = "reloaded outputs differ"

    batch_dims = tuple({0: torch.export.Dim.AUTO} if a.dim() > 0 else None for a in args)

    def via_export() -> bytes:
        buf = io.BytesIO()
        torch.export.save(torch.export.export(model, args, dynamic_shapes=batch_dims), buf)
        return buf.getvalue()

    def via_torchscript() -> bytes:
        return torchscript.traced_bytes(model, args)

    from hwprune.device.onnxrt import (RUNTIMES as ONNX_RUNTIMES, Session, is_openvino, missing,
                                       runtime_onnx, to_onnx)

    from hwprune.device.onnxrt import RuntimeFormat

    onnx_rt = runtime if runtime in ONNX_RUNTIMES else next((rt for rt in ONNX_RUNTIMES if missing(rt) is None), None)
    # layers the runtime runs in int8: the ONNX file computes them in int8, the in-memory model (and the torch
    # artifacts) in fp32; the file is kept within 10% of the output's scale (a wrong graph is off by far more)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, RuntimeFormat))
    formats = set(formats)
    savers = [("torch.export", out / "model.pt2", via_export, lambda b: torch.export.load(b).module(), 1e-5),
              ("torchscript", out / "model.ts", via_torchscript, torchscript.load, 1e-5)]
    # the policy's formats set the tolerance against the deployed model: int8 anywhere 10% of the output's scale,
    # bf16/fp16 5% (a wrong graph is off by far more); fp32 only: 1e-5
    tol_q = 0.1 if quantized or "int8" in formats else 0.05 if formats & {"bf16", "fp16"} else 1e-5
    if onnx_rt == "onnxruntime":
        if runtime != onnx_rt:  # in the onnxruntime runtime the file is its own: _save_onnxruntime, below
            savers.append(("onnx", out / "model.onnx", lambda: runtime_onnx(model, args, onnx_rt, dynamic_batch=True,
                                                                          calibration=calibration),
                           lambda b: Session(onnx_rt, b.getvalue(), torch.get_num_threads()), tol_q))
    elif is_openvino(onnx_rt):  # the int8 of OpenVINO lives in its IR (model.xml): the ONNX file is the float graph,
        onnx_rt = "openvino"    # checked in f32
        savers.append(("onnx", out / "model.onnx", lambda: to_onnx(model, args, dynamic_batch=True),
                       lambda b: Session(onnx_rt, b.getvalue(), torch.get_num_threads()), 1e-5))
    else:
        checks["onnx"] = {"error": missing("onnxruntime")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, path, save, load, tol in savers:
            try:
                check(name, path, save(), load, tol)
            except Exception as exc:  # noqa: BLE001 - e.g. packed int8 weights torch.export cannot flatten
                checks[name] = {"error": one_line(exc, 200)}
        if runtime == "onnxruntime":  # checked against itself in memory; its int8 error reported beside
            _save_onnxruntime(model, args, others, refs, out, calibration, kept, checks)
        if "onnx" not in kept and onnx_rt is not None and "onnx" in checks:
            _onnx_in_fp32(model, args, out, onnx_rt, runtime, calibration, check, kept, checks)
        if "onnx" in checks:
            checks["onnx"]["checked_in"] = onnx_rt
        if is_openvino(runtime):  # checked against itself in memory; its bf16/int8 error reported beside
            _save_openvino(model, args, others, refs, out, calibration, kept, checks, runtime)
    if quantized:
        where = "model.xml" if is_openvino(runtime) else "model.onnx"
        for name in ("torch.export", "torchscript") + (("onnx",) if is_openvino(runtime) else ()):
            checks.get(name, {})["note"] = f"computes {', '.join(quantized)} in fp32 (int8 in {where} only)"
        checks.get("openvino" if is_openvino(runtime) else "onnx", {})["int8_layers"] = quantized
    return kept, checks


def check_runtime_file(mem: Any, loaded: Any, cases: list[tuple[tuple, Any]]) -> dict[str, Any]:
    """The runtime's own artifact checked as it ships: the file reloaded (``loaded``) against the same model as
    the runtime ran it in memory when it was measured (``mem``, e.g. the session of the same bytes), which must
    agree to 1e-5 of the output's scale; the difference to the float model (the reference of each case) is
    reported beside it (``diff_to_float``: int8 or bf16 error on these inputs), not judged."""
    reload_diff, float_diff, scale = 0.0, 0.0, 1.0
    for a, ref in cases:
        try:
            want, got = mem(*a), loaded(*a)
        except Exception as exc:  # noqa: BLE001 - the file fails at another batch: not kept
            return {"error": f"fails at batch {len(a[0])}: {one_line(exc, 160)}"}
        d, _ = output_diff(got, want)
        f, sc = output_diff(want, ref)
        reload_diff, float_diff, scale = max(reload_diff, d), max(float_diff, f), max(scale, sc)
    out = {"max_abs_diff": reload_diff, "diff_to_float": float_diff, "float_scale": scale}
    if not reload_diff <= 1e-5 * max(1.0, scale):
        out["error"] = "the reloaded file differs from the session that was measured"
    return out


_ARTIFACT_FILES = {"torch.export": "model.pt2", "torchscript": "model.ts", "onnx": "model.onnx",
                   "openvino": "model.xml"}


def _say_artifacts(artifacts: dict[str, str], checks: dict[str, Any], log: Callable[[str], None]) -> None:
    """One stderr line per artifact not written (which, and why), and per one written with layers in fp32."""
    for name, check in checks.items():
        fname = _ARTIFACT_FILES.get(name, name)
        if name not in artifacts and check.get("error"):
            log(f"hwprune: warning: no {fname}: {check['error']}"
                + (f" (retried with those layers in fp32: {check['fp32_retry']})" if check.get("fp32_retry") else ""))
        if name in artifacts and check.get("diff_to_float", 0.0) > 0.1 * max(1.0, check.get("float_scale", 1.0)):
            log(f"hwprune: note: {fname} (reloaded: identical to the session measured, max diff "
                f"{check['max_abs_diff']:.2g}) differs from the float model by up to {check['diff_to_float']:.3g} "
                f"({check['diff_to_float'] / max(1.0, check['float_scale']):.0%} of the output's scale) on the "
                f"export's inputs: its formats' error there; the test metric is measured on the file")
        if name in artifacts and check.get("fp32_layers"):
            layers = check["fp32_layers"]
            log(f"hwprune: note: {fname} computes {', '.join(f'{k} ({v})' for k, v in layers.items())} in fp32: "
                f"{check.get('first_try') or 'the exporter cannot take those formats'}")


def _onnx_in_fp32(model: nn.Module, args: tuple, out: Path, onnx_rt: str, runtime: str,
                  calibration: list[Any] | None, check: Callable[..., None], kept: dict[str, str],
                  checks: dict[str, Any]) -> None:
    """``model.onnx`` again, from a copy of the deployed model with the layers ONNX cannot take in their format
    (bf16/fp16 regions: ONNX Runtime has no bf16 convolution; torch.ao's packed int8 Linear: torch.export cannot
    flatten it) in fp32, when the first try failed and such layers exist; the file says so in its check
    (``fp32_layers``), checked against the deployed model within 10% of the output's scale."""
    from hwprune.device.kernels import fp32_copy
    from hwprune.device.onnxrt import Session, runtime_onnx, to_onnx

    fmodel, changed = fp32_copy(model)
    if not changed:
        return
    first = checks["onnx"].get("error")
    make = (lambda: runtime_onnx(fmodel, args, onnx_rt, dynamic_batch=True, calibration=calibration)) \
        if runtime == onnx_rt else (lambda: to_onnx(fmodel, args, dynamic_batch=True))
    try:
        check("onnx", out / "model.onnx", make(), lambda b: Session(onnx_rt, b.getvalue(), torch.get_num_threads()),
              0.1)
    except Exception as exc:  # noqa: BLE001 - not even in fp32: the first reason stays, the second beside it
        checks["onnx"] = {"error": first, "fp32_retry": one_line(exc, 200)}
        return
    checks["onnx"]["fp32_layers"] = changed
    checks["onnx"]["first_try"] = first


def _save_onnxruntime(model: nn.Module, args: tuple, others: list[tuple], refs: list[Any], out: Path,
                      calibration: list[Any] | None, kept: dict[str, str], checks: dict[str, Any]) -> None:
    """The ONNX Runtime runtime's artifact: ``model.onnx`` with its int8 nodes (:func:`runtime_onnx`, activation
    scales from ``calibration``), kept when ONNX Runtime reloads it and it computes what the session it was
    measured as computes (:func:`check_runtime_file`)."""
    from hwprune.device.onnxrt import Session, load, runtime_onnx

    path = out / "model.onnx"
    try:
        data = runtime_onnx(model, args, "onnxruntime", dynamic_batch=True, calibration=calibration)
        write_atomic(path, data)
        threads = torch.get_num_threads()
        checks["onnx"] = check_runtime_file(Session("onnxruntime", data, threads),
                                            load("onnxruntime", str(path), threads), list(zip([args] + others, refs)))
        if "error" not in checks["onnx"]:
            kept["onnx"] = str(path)
            return
    except Exception as exc:  # noqa: BLE001 - e.g. an op the runtime's quantizer does not take
        checks["onnx"] = {"error": one_line(exc, 200)}
    path.unlink(missing_ok=True)


def _save_openvino(model: nn.Module, args: tuple, others: list[tuple], refs: list[Any], out: Path,
                   calibration: list[Any] | None, kept: dict[str, str], checks: dict[str, Any],
                   runtime: str = "openvino") -> None:
    """The OpenVINO runtime's artifact: an IR (``model.xml`` + ``model.bin``, dynamic batch, fp32 weights) with its
    int8 layers quantized by NNCF on ``calibration`` inputs, kept when OpenVINO reloads it and it computes what the
    in-memory model it was saved from computes at both batch sizes, at ``runtime``'s precision (the IR itself
    holds no precision: a deployment asks for bf16 with OpenVINO's INFERENCE_PRECISION_HINT); its difference to
    the float model is reported (:func:`check_runtime_file`)."""
    from hwprune.device.onnxrt import Session, load, openvino_model, save_openvino_ir

    path = out / "model.xml"
    try:
        ovm = openvino_model(model, args, dynamic_batch=True, calibration=calibration)
        save_openvino_ir(ovm, str(path))
        threads = torch.get_num_threads()
        checks["openvino"] = {**check_runtime_file(Session(runtime, ovm, threads), load(runtime, str(path), threads),
                                                   list(zip([args] + others, refs))), "checked_in": runtime}
        if "error" not in checks["openvino"]:
            kept["openvino"] = str(path)
            return
    except Exception as exc:  # noqa: BLE001 - e.g. an op NNCF or the ONNX frontend does not take
        checks["openvino"] = {"error": one_line(exc, 200)}
    for p in (path, path.with_suffix(".bin")):
        p.unlink(missing_ok=True)


def _save_aoti(model: nn.Module, x: Any, out: Path, kept: dict[str, str], checks: dict[str, Any]) -> None:
    """An AOTInductor package of ``model`` for inputs shaped like ``x`` (``model_aoti.pt2``; load with
    ``torch._inductor.aoti_load_package``), kept only if it reloads and computes what the model computes."""
    import tempfile

    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            args = inputs.positional(model, x)
            with torch.no_grad():
                ref = model(*args)
                path = torch._inductor.aoti_compile_and_package(torch.export.export(model, args),
                                                                 package_path=str(Path(tmp) / "model_aoti.pt2"))
                got = torch._inductor.aoti_load_package(path)(*args)
            diff, scale = output_diff(got, ref)
            checks["aoti"] = {"max_abs_diff": diff, "batch": inputs.batch_len(x)}
            if diff <= 1e-3 * max(1.0, scale):
                write_atomic(out / "model_aoti.pt2", Path(path).read_bytes())
                kept["aoti"] = str(out / "model_aoti.pt2")
            else:
                checks["aoti"]["error"] = "reloaded outputs differ"
    except Exception as exc:  # noqa: BLE001 - e.g. an op inductor cannot compile ahead of time
        checks["aoti"] = {"error": one_line(exc, 200)}


def _identity(run_dir: Path, trial: int, steps: int, schedule: str, stages: int,
              distill: float = 0.0) -> dict[str, Any]:
    ident = {"run": str(run_dir.resolve()), "trial": trial, "finetune_steps": steps, "schedule": schedule,
             "stages": stages}
    if distill:  # without: the identity of older versions' exports
        ident["distill"] = distill
    return ident


def export_run(run_dir: str | Path, trial: str = "best", finetune_steps: int | None = None,
               schedule: str = "oneshot", out: str | Path | None = None, repeats: int = 30,
               measure_here: bool = False, stages: int = 4, log: Callable[[str], None] = _log,
               storage: str | None = None, device: str | None = None, trust_code: bool = False,
               distill: float | None = None) -> dict[str, Any]:
    """Export one trial of a search run; returns the summary ``hwprune export --json`` prints.

    ``distill``: the fine-tune's distillation weight (None: the search's, ``--distill``).
    A run whose model, data or task is user code (``file.py:factory``) is exported only with ``trust_code``:
    run.json names that code, and export imports and runs it (a run directory from elsewhere is untrusted input).
    """
    from hwprune.factory import refuse_untrusted
    from hwprune.apply import save_pruned
    from hwprune.device.deploy import deploy
    from hwprune.device.onnxrt import RUNTIMES as ONNX_RUNTIMES, SessionModule, is_openvino, load as load_onnx
    from hwprune.device.targets import fingerprint_line, get_target
    from hwprune.measure import model_stats
    from hwprune.search.context import dense_setup
    from hwprune.search.controller import open_study, run_limit, run_spec
    from hwprune.search.rundir import front, read_run
    from hwprune.space import build_space
    from hwprune.train import evaluate, few_batches

    run = Path(run_dir)
    info = read_run(run)  # no run.json, or a damaged one: one line
    if schedule not in SCHEDULES:
        raise HwpruneError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if finetune_steps is not None and finetune_steps < 0:
        raise HwpruneError(f"--finetune-steps must be >= 0, got {finetune_steps}")
    spec = run_spec(info, storage)
    distill = spec.distill if distill is None else distill
    if not 0 <= distill <= 1:
        raise HwpruneError(f"--distill must be a weight in [0, 1], got {distill}")
    if not trust_code:
        refuse_untrusted({"model": spec.model, "data": spec.data, "task": spec.task}, f"run {str(run)!r}",
                         "--trust-code (trust_code=True)")
    study = open_study(run, spec, load_only=True)
    trials = study.get_trials(deepcopy=False)
    fin = study.user_attrs.get("finish") or {}
    chosen = pick_trial(trials, trial, run_limit(info), fin.get("dropped", []), fin.get("met", []), fin.get("best"))
    steps = DEFAULT_STEPS if finetune_steps is None else finetune_steps
    dest = Path(out) if out else run / f"export-trial{chosen.number}-{schedule}"
    ident = _identity(run, chosen.number, steps, schedule, stages, distill)
    if (dest / "export.json").exists():
        old = read_json(dest / "export.json", "export summary")
        if isinstance(old, dict) and old.get("identity") == ident:
            log(f"hwprune: {dest} already holds this export; printing it (choose another --out to export again)")
            return old
        raise HwpruneError(f"{str(dest)!r} holds a different export; choose another --out")
    if dest.exists() and any(dest.iterdir()):
        raise HwpruneError(f"{str(dest)!r} exists and is not an hwprune export; choose another --out")

    policy = Policy.from_dict(chosen.user_attrs["policy"], source=f"trial {chosen.number}")
    target = get_target(spec.target, threads=spec.threads, runtime=spec.runtime)
    run_fp = info["table_fingerprint"]
    here = None
    if target.is_local():
        here = target.fingerprint()
    differs = _fingerprint_diff(run_fp, here)
    if differs:
        log(f"hwprune: note: the run's latency table was measured on {fingerprint_line(run_fp)}; this machine "
            f"{'is ' + fingerprint_line(here) if here else 'is not a ' + spec.target + ' device'} (differs in "
            f"{', '.join(differs)}). " + ("Measuring here anyway (--measure-here): the number is this machine's, "
                                          "not the target's." if measure_here and here else
                                          "Not measuring: export on the target device to measure it "
                                          "(or --measure-here for this machine's number)."))
    setup = dense_setup(spec, log)
    data = setup.data
    assert data is not None
    test = data.test if data.test is not None else data.val
    split = "test" if data.test is not None else "val (the data has no test split)"
    t0 = time.time()
    task = setup.task
    metric = task.metric
    dense_acc = evaluate(setup.model, test, task=task)
    log(f"hwprune: exporting trial {chosen.number} of {spec.name} (val {metric} {task.show(chosen.values[0]):.4f} after "
        f"{spec.finetune_steps} steps, predicted {chosen.values[1]:.4f} ms); {schedule} fine-tune, {steps} steps")
    model = finetune_policy(setup.model, policy, setup.example, data.train, steps, schedule=schedule, stages=stages,
                            exclude=spec.exclude, importance=spec.importance, lr=spec.lr, seed=spec.seed,
                            batches=few_batches(data.train), log=log, device=device or spec.device, task=task,
                            batch_size=spec.train_batch_size, distill=distill)
    space = build_space(setup.model, setup.example, spec.exclude)
    sim_acc = evaluate(model, test, task=task)
    val_acc = evaluate(model, data.val, task=task)
    # built in a hidden sibling and renamed into place when complete: a killed export leaves no half-written
    # folder, and the same command runs again
    with staged_dir(dest) as work:
        save_pruned(work / "pruned.pt", model, policy, spec.model, setup.model_args, setup.input_shape,
                    setup.num_classes, spec.exclude, {"schedule": schedule, "finetune_steps": steps}, setup.example)
        stats = model_stats(model, setup.example)
        # the table's threads, engine and allocator from deploying to measuring (the fingerprint includes them); the
        # process's own come back after (the fine-tune above ran with them)
        with target.settings() if target.is_local() else contextlib.nullcontext():
            if target.is_local():
                deployed, rep = deploy(copy_model(model).eval(), target, setup.example)
                deployed = deployed.to(target.device)
            else:
                deployed, rep = model.eval(), None
                log(f"hwprune: the {spec.target} kernels need the device; the exported model keeps simulated formats")
            test_acc = evaluate(deployed, test, task=task) if rep is not None else sim_acc  # batch by batch, on the model's device
            x = inputs.to_device(setup.inputs(info["batch_size"]), target.device if rep is not None else "cpu")  # real inputs (token ids too)
            calib = [inputs.positional(deployed, inputs.to_device(xb, target.device if rep is not None else "cpu"))
                     for xb, _ in few_batches(data.train)]  # real inputs: the ONNX file's static int8 scales
            artifacts, checks = _save_artifacts(deployed, inputs.rows(x, slice(0, 8)), work, x, spec.runtime, calib,
                                                policy.formats.values())
            _say_artifacts(artifacts, checks, log)
            own = "openvino" if is_openvino(spec.runtime) else "onnx"  # the file the runtime loads
            if spec.runtime in ONNX_RUNTIMES and rep is not None:
                if own in artifacts:  # the test metric of what that runtime runs (its int8 layers in int8)
                    test_acc = evaluate(SessionModule(load_onnx(spec.runtime, artifacts[own],
                                                                target.threads or torch.get_num_threads())), test, task=task)
                else:  # its reason was said above; no number for a file nobody can deploy
                    log(f"hwprune: warning: the {spec.runtime} runtime deploys {_ARTIFACT_FILES[own]}, which was not "
                        f"written: the test {metric} is the in-memory model's, and nothing is measured")
            if spec.runtime == "compile" and rep is not None:
                log(f"hwprune: compiling the AOTInductor package for batch {inputs.batch_len(x)} (the compile runtime's artifact)")
                _save_aoti(deployed, x, work, artifacts, checks)
            measured = None
            unwritten = spec.runtime in ONNX_RUNTIMES and rep is not None and own not in artifacts
            if here is not None and (not differs or measure_here) and not unwritten:
                torch.manual_seed(0)
                measured = _measure_export(deployed, artifacts, x, target, repeats, info, spec, setup, chosen.values[1],
                                           log)
        pred_ms = chosen.values[1]
        over = measured is not None and measured["adjusted_ms"] > info["budget_ms"]
        if measured is not None:
            raw_over = measured["median_ms"] > info["budget_ms"]
            if over or raw_over:
                both = (f"measured {measured['median_ms']:.4f} ms, {measured['adjusted_ms']:.4f} ms at the table's "
                        f"speed (factor {measured['speed_factor']:.3f})")
                log(f"hwprune: warning: {both}; budget {info['budget_ms']:.4f} ms (predicted {pred_ms:.4f} ms): "
                    + (f"over the budget by {measured['adjusted_ms'] / info['budget_ms'] - 1:.1%} at the speed the "
                       f"table was measured at; export a faster point of the front (hwprune pareto), or search again "
                       f"with a larger --budget-margin" if over else
                       "over the budget as measured, within it at the table's speed: this machine is slower now than "
                       "when it was profiled"))
        prov = {"run": str(run), "study": spec.name, "trial": chosen.number, "model": spec.model,
                "model_args": setup.model_args, "data": spec.data, "weights": setup.weights, "target": spec.target,
                "batch_size": info["batch_size"], "table": info.get("table"), "table_fingerprint": run_fp,
                "predicted_latency_ms": pred_ms, "budget_ms": info["budget_ms"],
                f"search_val_{metric}": task.show(chosen.values[0]), f"test_{metric}": test_acc, "schedule": schedule,
                "task": task.name, "metric": metric,
                "finetune_steps": steps}
        write_atomic(work / "policy.json", json.dumps({**policy.to_dict(), "provenance": prov}, indent=2,
                                                      sort_keys=True) + "\n")
        summary: dict[str, Any] = {
            "identity": ident, "run": str(run), "trial": chosen.number, "out": str(dest), "schedule": schedule,
            "runtime": spec.runtime,
            "finetune_steps": steps, "distill": distill, "policy": policy.to_dict(), "units": policy.widths(space),
            "predicted_latency_ms": pred_ms, "budget_ms": info["budget_ms"], "limit_ms": run_limit(info),
            "measured_latency_ms": measured["median_ms"] if measured else None, "measurement": measured,
            "over_budget": over if measured is not None else None,
            "fingerprint_matches": not differs, "fingerprint_differs_in": differs,
            "task": task.name, "metric": metric, "direction": task.direction,
            "test_split": split, f"dense_test_{metric}": dense_acc, f"test_{metric}": test_acc,
            f"test_{metric}_simulated": sim_acc, f"val_{metric}": val_acc, f"search_val_{metric}": task.show(chosen.values[0]),
            "params": stats.params, "flops": stats.flops,
            "formats_real": rep.real if rep else {}, "formats_simulated": rep.simulated if rep else dict(policy.formats),
            "precision_regions": rep.regions if rep else None, "casts": rep.casts if rep else None,
            "artifacts": {**relocated(artifacts, work, dest), "hwprune": str(dest / "pruned.pt"), "policy": str(dest / "policy.json"),
                          "report": str(dest / "report.md")},
            "artifact_checks": relocated(checks, work, dest), "seconds": round(time.time() - t0, 1)}
        pts = front(trials, run_limit(info))
        write_atomic(work / "report.md", _report(summary, spec, info, pts, run_fp, here))
        write_atomic(work / "export.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def _measure_export(deployed: nn.Module, artifacts: dict[str, str], x: torch.Tensor, target: Any, repeats: int,
                    info: dict[str, Any], spec: Any, setup: Any, predicted_ms: float,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The deployed model, its reloaded artifacts, the dense model and the smallest policy (the speed curve's
    anchors, :mod:`hwprune.latency.speed`) in interleaved rounds; the speed-adjusted latency (``adjusted_ms``) is
    the measurement divided by the curve's factor at the predicted latency, or, for a budget given as a share of
    the dense latency, by the dense model's factor (the share is of the dense model's time now:
    :func:`hwprune.search.context.price_scale`)."""
    from hwprune.latency.predictor import model_key
    from hwprune.latency.profiler import REFERENCE, model_sampler
    from hwprune.latency.speed import measure_with_anchors
    from hwprune.latency.table import LatencyTable

    from hwprune.device.onnxrt import RUNTIMES as ONNX_RUNTIMES, is_openvino, load

    own = "openvino" if is_openvino(spec.runtime) else "onnx"
    if spec.runtime in ONNX_RUNTIMES and own in artifacts:  # what that runtime loads: the exported file
        items = {"deployed": model_sampler(load(spec.runtime, artifacts[own], target.threads or torch.get_num_threads()),
                                           x, target, as_runtime=False)}
    else:
        items = {"deployed": model_sampler(deployed, x, target)}
    if "torchscript" in artifacts:
        items["torchscript"] = model_sampler(torchscript.load(artifacts["torchscript"]), x, target, as_runtime=False)
    if "aoti" in artifacts:
        items["aoti"] = model_sampler(torch._inductor.aoti_load_package(artifacts["aoti"]), x, target,
                                      as_runtime=False)
    try:
        table = LatencyTable.load(info["table"])
    except (HwpruneError, KeyError, TypeError):
        table = None
    key = model_key(spec.model, setup.model_args, setup.input_shape, spec.exclude, spec.channel_multiple)
    res, speed = measure_with_anchors(items, table, key, setup.model, setup.example, x, target, spec.exclude, repeats)
    t = res.timing("deployed")
    out: dict[str, Any] = {"median_ms": t.median_us / 1e3, "spread_pct": t.spread_pct, "repeats": t.repeats,
                           "rounds": t.repeats, "on_target": True, "interleaved": target.interleaved,
                           "measured": (f"{Path(artifacts[own]).name} in {spec.runtime}" if spec.runtime in
                                        ONNX_RUNTIMES and own in artifacts else f"the deployed model ({spec.runtime})")}
    for name, k in (("torchscript", "torchscript_median_ms"), ("aoti", "aoti_median_ms")):
        if name in items:
            out[k] = res.timing(name).median_us / 1e3
    out["dense_now_ms"] = res.timing(REFERENCE).median_us / 1e3
    if speed is not None:
        log(f"hwprune: {speed.line()}")
        # a share of the dense latency is judged against the dense model now (its factor); an absolute budget at
        # the factor where the exported model's price lies (the curve: small policies move more than the dense)
        share = str(spec.budget).strip().endswith("%")
        out.update(speed=speed.to_dict(), speed_factor=speed.verdict_factor(predicted_ms * 1e3, share),
                   dense_at_profile_ms=speed.dense.then_us / 1e3, machine_drift_pct=100 * (speed.dense.ratio - 1))
    else:
        out["speed_factor"] = 1.0
    out["adjusted_ms"] = out["median_ms"] / out["speed_factor"]
    return out


def _report(s: dict[str, Any], spec: Any, info: dict[str, Any], pts: list[Any], run_fp: dict[str, Any],
            here: dict[str, Any] | None) -> str:
    from hwprune.device.targets import fingerprint_line

    m = s["measurement"]
    mt = s["metric"]
    lines = [f"# Export of trial {s['trial']} — {spec.name}", "",
             f"Model `{spec.model}` on `{spec.data}`, target `{spec.target}` ({spec.runtime} runtime), "
             f"batch {info['batch_size']}; "
             f"budget {s['budget_ms']:.4f} ms; {s['schedule']} fine-tune of {s['finetune_steps']} steps.", "",
             "## Latency", "",
             "| | ms |", "|---|---|",
             f"| predicted (table) | {s['predicted_latency_ms']:.4f} |"]
    if m:
        lines.append(f"| measured, deployed model (median of {m['repeats']} interleaved rounds, spread "
                     f"{m['spread_pct']:.1f}%) | {m['median_ms']:.4f} |")
        if "adjusted_ms" in m:
            lines.append(f"| measured, at the table's speed (/ speed factor {m['speed_factor']:.3f}) | "
                         f"{m['adjusted_ms']:.4f} |")
        if "torchscript_median_ms" in m:
            lines.append(f"| measured, reloaded TorchScript | {m['torchscript_median_ms']:.4f} |")
        lines += ["", f"Measured / predicted: {m['median_ms'] / s['predicted_latency_ms']:.3f}; "
                      f"measured / budget: {m['median_ms'] / s['budget_ms']:.3f}."
                  + ("" if m["on_target"] else " **Measured on a machine other than the table's target.**")]
        if "machine_drift_pct" in m:
            sp = m["speed"]
            lines += ["", f"The dense model (the speed reference, timed in the same rounds) measures "
                          f"{m['dense_now_ms']:.4f} ms now and measured {m['dense_at_profile_ms']:.4f} ms when the "
                          f"table was profiled ({m['machine_drift_pct']:+.1f}%; noise +-{sp['noise_pct']:.1f}%: "
                          + ("a real change" if sp["significant"] else "within the noise")
                          + f"; the measurement is also given at the table's speed, factor {m['speed_factor']:.3f} at "
                            f"the predicted latency)."]
        if s.get("over_budget"):
            lines += ["", f"**Over budget:** {m['adjusted_ms']:.4f} ms at the table's speed > budget "
                          f"{s['budget_ms']:.4f} ms (by {m['adjusted_ms'] / s['budget_ms'] - 1:.1%}; measured "
                          f"{m['median_ms']:.4f} ms as is)."]
        elif m["median_ms"] > s["budget_ms"]:
            lines += ["", f"**Over budget as measured, within it at the table's speed:** {m['median_ms']:.4f} ms "
                          f"measured, {m['adjusted_ms']:.4f} ms at the table's speed, budget {s['budget_ms']:.4f} ms "
                          f"(this machine runs slower now than when the table was profiled)."]
    else:
        lines.append("| measured | not measured: this machine is not the run's target |")
    lines += ["", f"Table measured on: {fingerprint_line(run_fp)}.",
              f"This machine: {fingerprint_line(here) if here else 'not a ' + spec.target + ' device'}"
              + ("" if s["fingerprint_matches"] else f" (differs in {', '.join(s['fingerprint_differs_in'])})") + ".",
              "", f"## {mt.capitalize()} ({'higher' if s['direction'] == 'max' else 'lower'} is better)", "",
              f"Split: {s['test_split']}.", "", f"| | {mt} |", "|---|---|",
              f"| dense model | {s[f'dense_test_{mt}']:.4f} |",
              f"| search (val, {spec.finetune_steps} fine-tune steps) | {s[f'search_val_{mt}']:.4f} |",
              f"| exported, simulated formats | {s[f'test_{mt}_simulated']:.4f} |",
              f"| exported, target kernels | {s[f'test_{mt}']:.4f} |", "",
              f"Params {s['params']:,}, FLOPs {s['flops']:,} per example. Real kernels: "
              f"{', '.join(f'{k}:{v}' for k, v in sorted(s['formats_real'].items())) or 'none (all fp32)'}; "
              f"simulated: {', '.join(f'{k}:{v}' for k, v in sorted(s['formats_simulated'].items())) or 'none'}."
              + (f" bf16/fp16 layers: {s['precision_regions']}, {s['casts']} dtype cast(s) per forward pass."
                 if s.get("precision_regions") not in (None, "none") else ""), "",
              "## Policy", "", "| group | units |", "|---|---|"]
    lines += [f"| {g} | {u or 'dropped (its block is gone)'} |" for g, u in s["units"].items()]
    lines += ["", "## Front of the search", "", f"| trial | val {mt} | predicted ms | |", "|---|---|---|---|"]
    lines += [f"| {t.number} | {(t.values[0] if s['direction'] == 'max' else -t.values[0]):.4f} | {t.values[1]:.4f} | "
              f"{'**chosen**' if t.number == s['trial'] else ''} |" for t in pts]
    if all(t.number != s["trial"] for t in pts):  # priced over the limit, measured within the budget (grown)
        lines.append(f"| {s['trial']} | {s[f'search_val_{mt}']:.4f} | {s['predicted_latency_ms']:.4f} | **chosen** "
                     f"(grown into measured headroom by the search's finish) |")
    lines += ["", "## Artifacts", ""]
    for name, path in s["artifacts"].items():
        lines.append(f"- {name}: `{Path(path).name}`")
    for name, c in s["artifact_checks"].items():
        lines.append(f"- {name} check: " + (f"not written ({c['error']})" if "error" in c else
                                            f"reloaded with {c.get('checked_in', 'plain torch')}, max |diff| "
                                            f"{c['max_abs_diff']:.2e}"))
    loads = {"torchscript": "`torch.jit.load('model.ts')`",
             "torch.export": "`torch.export.load('model.pt2').module()` (any batch size)",
             "aoti": "`torch._inductor.aoti_load_package('model_aoti.pt2')` (compiled ahead of time, this batch size)",
             "onnx": "`onnxruntime.InferenceSession('model.onnx')` or `openvino.Core().read_model('model.onnx')` "
                     "(any batch size)",
             "openvino": "`openvino.Core().read_model('model.xml')` (OpenVINO IR with its int8 layers, any batch size; "
                         "compile it with the precision hint it was measured in: f32, bf16 for openvino-bf16)"}
    how = [loads[k] for k in s["artifacts"] if k in loads]
    lines += ["", "Load without hwprune: " + (" or ".join(how) if how else "no plain-torch artifact could be written")
              + "."]
    return "\n".join(lines) + "\n"
