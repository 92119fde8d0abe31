"""``hwprune profile``, ``predict`` and ``validate``: latency tables and the predictor."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from hwprune.cli._common import (RUNTIME_CHOICES, TARGET_CHOICES, add_model_args, add_shape_args, emit, example, grid,
                                 log, parse_exclude, positive, setup_from_args)
from hwprune.errors import HwpruneError
from hwprune.device.targets import fingerprint_line

def _add_latency_args(p: argparse.ArgumentParser, cmd: str) -> None:
    """The latency flags of ``cmd`` (profile, predict or validate): profile and validate measure on this machine,
    predict and validate read a table."""
    measure, reads = cmd in ("profile", "validate"), cmd in ("predict", "validate")
    p.add_argument("--target", required=True, choices=TARGET_CHOICES, help="device kind: cpu, cuda or arm")
    p.add_argument("--batch-size", type=positive, default=None,
                   help="batch size the latency is for (default: the model's, 512 for cnn1d, 16 otherwise)")
    p.add_argument("--threads", type=positive, default=1,
                   help="CPU threads (part of the table's fingerprint; default 1)")
    p.add_argument("--runtime", default=None,
                   choices=RUNTIME_CHOICES + (("all",) if cmd == "profile" else ()),
                   help="how the model runs on the target, part of the table's fingerprint: eager (default); "
                        "compile (torch.compile: every layer and model compiled before it is timed; compiled "
                        "kernels are cached under ~/.cache/hwprune/inductor); on cpu also onnxruntime, openvino and openvino-bf16 (OpenVINO's bf16 precision hint) "
                        "(every layer and model exported to ONNX and run there, fp32; the onnx / openvino extras); "
                        "on cuda also cudagraph (every layer and model timed as the replay of a captured CUDA graph)"
                        + ("; all: measure the dense model in every runtime that runs here, side by side, and stop "
                           "(no table is written)" if cmd == "profile" else ""))
    p.add_argument("--tables", default=None, metavar="DIR",
                   help="folder of latency tables, used alone (default: $HWPRUNE_TABLES or ~/.cache/hwprune/tables "
                        "for this machine's tables, then the reference tables shipped with hwprune)")
    p.add_argument("--channel-multiple", type=positive, default=8, help="kept units are multiples of this (default 8)")
    if measure:
        p.add_argument("--repeats", type=positive, default=10,
                       help="rounds of interleaved timing (default 10): every item (layer configuration or whole "
                            "model, and the dense model as the speed reference) is timed once per round in a fresh "
                            "random order, its median over rounds kept; items whose spread is over 10%% after them "
                            "get half as many rounds again")
        p.add_argument("--emulate", action="store_true",
                       help="--target arm on a non-ARM machine: use the qnnpack engine here; the table is marked emulated")
    if reads:
        p.add_argument("--table", default=None, help="the table file to use when several match")
        p.add_argument("--allow-missing", action="store_true",
                       help="price configurations missing from the table by interpolation, flagged as estimated")
        p.add_argument("--allow-foreign-table", action="store_true",
                       help="use a table measured on another device/torch version though this machine is the target")
        p.add_argument("--no-profile", dest="profile", action="store_false",
                       help="refuse when this machine has no table for the model, instead of profiling it first")


def _latency_setup(args: argparse.Namespace, measure: bool):  # type: ignore[no-untyped-def]
    from hwprune.latency import analyze_layers, get_target, model_key
    from hwprune.models import default_latency_batch

    target = get_target(args.target, threads=args.threads, emulate=getattr(args, "emulate", False),
                        runtime=args.runtime)
    if args.batch_size is None:
        args.batch_size = default_latency_batch(args.model)
    if measure:
        target.check_can_measure()
        target.setup()
    s = setup_from_args(args)
    exclude = parse_exclude(args.exclude)
    layers = analyze_layers(s.model, s.example, exclude, args.channel_multiple)
    key = model_key(args.model, s.model_args, s.input_shape, exclude, args.channel_multiple)
    return target, s, exclude, layers, key


def _job(args: argparse.Namespace, s: Any, exclude: list[str], layers: Any, key: str) -> Any:
    from hwprune.latency import ProfileJob

    return ProfileJob(s.model, s.example, layers, key, tuple(s.input_shape), exclude,
                      getattr(args, "grid", ()), getattr(args, "calibration", 20), getattr(args, "repeats", 10),
                      s.timing_pool())


def _warn_headroom(pred: Any, batch: int, summary: dict[str, Any]) -> None:
    """Say it (and put it in the JSON) when pruning barely changed the measured latency."""
    note = pred.headroom_note(batch)
    if note:
        summary["warning"] = note
        log(f"hwprune: warning: {note}")


def run_compare(args: argparse.Namespace, log: Callable[[str], None] = log) -> tuple[dict[str, Any], list[str]]:
    """``profile --runtime all``: the dense model in every runtime of the target, in the same rounds; the summary
    and its printed form."""
    from hwprune.latency.compare import compare_runtimes, format_comparison

    t0 = time.time()
    args.runtime = None
    target, s, _, _, _ = _latency_setup(args, measure=True)
    x = s.inputs(args.batch_size)
    log(f"hwprune: the dense {args.model} at batch {args.batch_size} in every {args.target} runtime, "
        f"{args.threads} thread(s), {args.repeats} interleaved rounds")
    with target.settings():
        rows = compare_runtimes(s.model, x, args.target, args.threads, args.repeats, log)
    summary = {"model": args.model, "target": args.target, "batch_size": args.batch_size, "threads": args.threads,
               "runtimes": rows, "seconds": round(time.time() - t0, 1)}
    return summary, [format_comparison(rows)]


def run_profile(args: argparse.Namespace, log: Callable[[str], None] = log) -> tuple[dict[str, Any], list[str]]:
    """``hwprune profile`` (parsed arguments): measure the model's table; the summary and its printed form."""
    from hwprune.latency import LatencyTable, Predictor, table_path, user_tables_dir
    from hwprune.latency.ondemand import profile_model
    from hwprune.latency.table import fingerprint_diff
    from hwprune.latency.profiler import NOISY_MACHINE_PCT

    if args.runtime == "all":
        return run_compare(args, log)
    t0 = time.time()
    target, s, exclude, layers, key = _latency_setup(args, measure=True)
    fp = target.fingerprint()
    path = table_path(args.tables or user_tables_dir(), fp, args.batch_size)
    table = LatencyTable.load(path) if path.exists() else LatencyTable(fp, args.batch_size, path=path)
    if fingerprint_diff(table.fingerprint, fp):
        raise HwpruneError(f"table {str(path)!r} was measured on another device "
                           f"({'; '.join(fingerprint_diff(table.fingerprint, fp))}); move it away first")
    table.command = "hwprune " + " ".join(sys.argv[1:]) if sys.argv[1:] else table.command
    log(f"hwprune: profiling {args.model} for {fingerprint_line(fp)} at batch {args.batch_size} -> {path}")
    if target.format_note():
        log(f"hwprune: {target.format_note()}")
    counts = profile_model(table, target, _job(args, s, exclude, layers, key), log)
    measured, cal = counts["measured_now"], counts["calibration_measured_now"]
    pred = Predictor(table, layers, key)
    summary = {"table": str(path), "fingerprint": fp, "model_key": key, **counts, "entries_in_table": len(table.entries),
               "calibration_fit": {"layer_scale": pred.coef[0], "us_per_output_element": pred.coef[1],
                                   "overhead_us": pred.coef[2]},
               "seconds": round(time.time() - t0, 1)}
    _warn_headroom(pred, table.batch_size, summary)
    lines = [f"{counts['configurations']} configurations ({measured} measured now), {len(pred.calibration)} calibration "
             f"runs ({cal} now); fit: latency = {pred.coef[0]:.3f} x layer sum + {pred.coef[1] * 1e3:.3f} ns x output "
             f"elements + {pred.coef[2]:.1f} us; {summary['seconds']} s -> {path}"]
    ref = table.models.get(key, {}).get("reference")
    if ref:
        summary["reference_ms"] = ref["median_us"] / 1e3
        lines.append(f"speed reference: the dense model, {ref['median_us'] / 1e3:.4f} ms, spread "
                     f"{ref['spread_pct']:.1f}% over {ref['rounds']} rounds"
                     + (" (a noisy machine: see the warning above)" if ref["spread_pct"] > NOISY_MACHINE_PCT else ""))
    return summary, lines


def cmd_profile(args: argparse.Namespace) -> int:
    compare = args.runtime == "all"
    summary, lines = run_profile(args)
    if not args.json:
        print("\n".join(lines))
    emit(args, summary)
    return 0 if not compare or any("median_ms" in r for r in summary["runtimes"]) else 1


def _predictor(args: argparse.Namespace, measure: bool):  # type: ignore[no-untyped-def]
    from hwprune.latency import Predictor, resolve_table

    target, s, exclude, layers, key = _latency_setup(args, measure)
    table = resolve_table(target, args.batch_size, layers, key, tables=args.tables, table=getattr(args, "table", None),
                          allow_foreign=args.allow_foreign_table,
                          profile=_job(args, s, exclude, layers, key) if args.profile else None, log=log)
    log(f"hwprune: latency table {table.path} ({fingerprint_line(table.fingerprint)})")
    pred = Predictor(table, layers, key, getattr(args, "allow_missing", False))
    if not pred.calibrated:
        log(f"hwprune: warning: the table has no end-to-end calibration for {key}; predicting the raw layer "
             f"sum (run 'hwprune profile' for this model)")
    return target, s, exclude, layers, key, table, pred


def cmd_predict(args: argparse.Namespace) -> int:
    from hwprune.policy import load_policy

    target, s, exclude, layers, key, table, pred = _predictor(args, measure=False)
    policy = load_policy(args.policy)
    policy.validate(layers.space)
    if policy.channel_multiple != args.channel_multiple:
        raise HwpruneError(f"policy rounds to multiples of {policy.channel_multiple}, the table was asked for "
                           f"--channel-multiple {args.channel_multiple}")
    t0 = time.perf_counter()
    p = pred.price(policy, by_layer=True)
    dt = (time.perf_counter() - t0) * 1e3
    summary = {"model": args.model, "target": args.target, "batch_size": table.batch_size, "table": str(table.path),
               "fingerprint": table.fingerprint, "predicted_latency_ms": p.latency_ms,
               "layer_sum_ms": p.layer_sum_us / 1e3, "calibrated": pred.calibrated, "estimated": p.estimated,
               "macs": p.macs, "pricing_ms": dt}
    if args.by_layer:
        summary["by_layer"] = p.by_layer
    if not args.json:
        if args.by_layer:
            for r in p.by_layer:
                print(f"{r['layer']:<28} {r['latency_us'] / 1e3:9.4f} ms{'  (estimated)' if r['estimated'] else ''}  {r['key']}")
        print(f"predicted {p.latency_ms:.4f} ms at batch {table.batch_size} on {args.target} "
              f"(layer sum {p.layer_sum_us / 1e3:.4f} ms; {len(p.estimated)} estimated entries)")
    emit(args, summary)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from hwprune.latency.ondemand import check_formats
    from hwprune.latency.validate import validate_predictor

    target, s, exclude, layers, key, table, pred = _predictor(args, measure=True)
    if not pred.calibrated:
        raise HwpruneError(f"table {str(table.path)!r} has no calibration for {key}; run 'hwprune profile' first")
    grid = tuple(table.models[key]["grid"])
    check_formats(pred, s.model, s.example, target, log)
    rep = validate_predictor(s.model, s.example, layers, pred, target, args.samples, args.seed, args.repeats,
                             exclude, grid, pred.menus(target), None if args.json else log, s.timing_pool())
    summary = {"model": args.model, "target": args.target, "batch_size": table.batch_size,
               "fingerprint": table.fingerprint, **rep.to_dict()}
    _warn_headroom(pred, table.batch_size, summary)
    if not args.json:
        print(f"{'':<22}{'table predictor':>16}{'FLOPs proxy':>14}")
        print(f"{'within +-10%':<22}{rep.within_10pct:>16.0%}{rep.flops_within_10pct:>14.0%}")
        print(f"{'Kendall tau':<22}{rep.kendall_tau:>16.3f}{rep.flops_kendall_tau:>14.3f}")
        print(f"{'MAPE':<22}{rep.mape:>16.1%}{rep.flops_mape:>14.1%}")
        print(f"{'worst case':<22}{rep.worst:>16.1%}{rep.flops_worst:>14.1%}")
        print(f"measurement noise: median odd/even-round difference {rep.noise_pct:.1f}%; noise floor +-"
              f"{rep.noise_floor_pct:.1f}% (twice the standard error of a measured median); {rep.samples} policies "
              f"in {rep.rounds} interleaved rounds")
        if not rep.resolvable:
            print(f"this machine is too noisy right now to resolve +-10%: a measured latency itself is uncertain "
                  f"by +-{rep.noise_floor_pct:.1f}%; run validate again when it is quieter, or with more --repeats")
    emit(args, summary)
    return 0



def register(sub: Any) -> None:
    pr = sub.add_parser("profile", help="measure every reachable layer configuration of a model on this device",
                        **example("hwprune profile --target cpu --model resnet20",
                                  "hwprune profile --target cpu --model cnn1d --runtime all   # which runtime is fastest here?"))
    add_model_args(pr)
    add_shape_args(pr)
    _add_latency_args(pr, "profile")
    from hwprune.latency.profiler import DEFAULT_GRID

    pr.add_argument("--grid", type=grid, default=DEFAULT_GRID, metavar="R,R,...",
                    help="keep ratios to profile (default " + ",".join(map(str, DEFAULT_GRID)) + ")")
    pr.add_argument("--calibration", type=positive, default=20,
                    help="end-to-end runs (dense, uniform, random policies) that calibrate the predictor (default 20)")
    pr.set_defaults(fn=cmd_profile)

    pd = sub.add_parser("predict", help="price a policy from a latency table (this machine is profiled first if it "
                                        "is the target and has no table for the model)",
                        **example("hwprune predict --target cpu --model cnn1d --policy runs/demo-cnn1d/best_policy.json --by-layer"))
    add_model_args(pd)
    add_shape_args(pd)
    _add_latency_args(pd, "predict")
    pd.add_argument("--policy", required=True, help="policy JSON file")
    pd.add_argument("--by-layer", action="store_true", help="list each layer's table entry")
    pd.set_defaults(fn=cmd_predict)

    v = sub.add_parser("validate", help="measure random policies end to end and compare with the predictor",
                       **example("hwprune validate --target cpu --model gru --samples 20"))
    add_model_args(v)
    add_shape_args(v)
    _add_latency_args(v, "validate")
    v.add_argument("--samples", type=positive, default=20, help="random policies to measure (default 20)")
    v.set_defaults(fn=cmd_validate)
