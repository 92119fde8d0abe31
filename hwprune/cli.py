"""The ``hwprune`` command line: train, inspect, apply, profile, predict, validate, search, pareto.

Every user error is one line on stderr (``hwprune: error: ...``) and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from hwprune.errors import HwpruneError

__all__ = ["main", "build_parser"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    p.add_argument("--model", required=True,
                   help="built-in model (cnn1d, resnet20, mobilenetv2, lstm, gru) or path/to/file.py:factory "
                        "or package.module:factory returning an nn.Module")
    p.add_argument("--model-args", default=None, metavar="K=V,...",
                   help="arguments for the model factory, e.g. num_layers=2,bidirectional=true or width_mult=0.5")
    p.add_argument("--data", required=data_required,
                   help="built-in data (mnist1d, mnist5k) or path/to/file.py:factory returning (train, val) datasets")
    p.add_argument("--seed", type=int, default=0, help="seed for training and the cached base model (default 0)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout at the end")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", default=None, metavar="C,L|C,H,W|T,F",
                   help="one example's shape without batch (default: from --data, or the model's default)")
    p.add_argument("--weights", default=None,
                   help="state dict to load (torch.load weights_only=True); default: the model cached by "
                        "'hwprune train' for this model/data/seed, if any")
    p.add_argument("--exclude", default="", metavar="LAYER,...", help="layers never to prune")


def _setup(args: argparse.Namespace, use_cache: bool = True):  # type: ignore[no-untyped-def]
    from hwprune.models import parse_model_args
    from hwprune.setup import resolve

    return resolve(args.model, args.data, getattr(args, "input_shape", None), parse_model_args(args.model_args),
                   getattr(args, "weights", None), args.seed, use_cache)


def _exclude(text: str) -> list[str]:
    """``--exclude a,b`` -> ["a", "b"]."""
    return [e for e in text.split(",") if e]


def _emit(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))


def cmd_train(args: argparse.Namespace) -> int:
    from hwprune.train import DEFAULT_EPOCHS, TrainConfig, cache_key, load_cached, train_and_cache

    s = _setup(args, use_cache=False)
    assert s.data is not None
    key = cache_key(args.model, args.data, args.seed, s.model_args)
    hit = load_cached(key)
    if hit is not None and not args.retrain:
        _log(f"hwprune: using cached model {hit[0]} (trained {hit[1].get('epochs')} epochs; --retrain to train again)")
        summary = hit[1]
    else:
        epochs = args.epochs or DEFAULT_EPOCHS.get(args.model, 20)
        cfg = TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        _log(f"hwprune: training {args.model} on {args.data} for {epochs} epochs "
             f"({len(s.data.train)} train / {len(s.data.val)} val examples)")
        summary = train_and_cache(s.model, s.data, args.model, args.data, args.seed, s.model_args, cfg,
                                  log=None if args.quiet else _log)
    if not args.json:
        print(f"{args.model}/{args.data} seed {args.seed}: val {summary['val_accuracy']:.4f}  "
              f"test {summary['test_accuracy']:.4f}  -> {summary['weights']}")
    _emit(args, summary)
    return 0


def _group_rows(space) -> list[str]:  # type: ignore[no-untyped-def]
    rows = [f"{'group':<34} {'kind':<9} {'units':>6}  layers"]
    for g in space.groups:
        rows.append(f"{g.name:<34} {g.kind:<9} {g.units:>6}  {', '.join(g.layers)}")
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    from hwprune.measure import model_stats
    from hwprune.space import build_space

    s = _setup(args)
    space = build_space(s.model, s.example, _exclude(args.exclude))
    st = model_stats(s.model, s.example)
    if not args.json:
        print(f"model {args.model}  input {s.input_shape}  params {st.params:,}  FLOPs/example {st.flops:,} (MACs)")
        print(f"{len(space.groups)} prunable groups:")
        print("\n".join("  " + r for r in _group_rows(space)))
        print(f"{len(space.layers)} quantizable layers: " + ", ".join(f"{q.name} ({q.op})" for q in space.layers))
    _emit(args, {"model": args.model, "input_shape": list(s.input_shape), "params": st.params, "flops": st.flops,
                 "size_bytes": st.size_bytes, **space.to_dict()})
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from hwprune.apply import apply_policy, save_pruned
    from hwprune.measure import model_stats
    from hwprune.policy import load_policy, uniform_policy
    from hwprune.space import build_space
    from hwprune.train import evaluate, few_batches, finetune

    s = _setup(args)
    exclude = _exclude(args.exclude)
    space = build_space(s.model, s.example, exclude)
    if args.policy:
        policy = load_policy(args.policy)
    else:
        policy = uniform_policy(space, args.uniform, args.format, args.channel_multiple, model=args.model)
    policy.validate(space)
    if s.weights == "random init":
        _log("hwprune: warning: no trained weights (give --weights or run 'hwprune train'); pruning a random init")
    batches = few_batches(s.data.train) if s.data is not None else None
    pruned = apply_policy(s.model, policy, s.example, exclude=exclude, importance=args.importance, batches=batches)
    before, after = model_stats(s.model, s.example), model_stats(pruned, s.example)
    summary: dict[str, Any] = {"model": args.model, "weights": s.weights, "policy": policy.to_dict(),
                               "params_before": before.params, "params_after": after.params,
                               "flops_before": before.flops, "flops_after": after.flops,
                               "units": policy.units(space)}
    if s.data is not None:
        summary["val_accuracy_before"] = evaluate(s.model, s.data.val)
        summary["val_accuracy_pruned"] = evaluate(pruned, s.data.val)
        if args.finetune_steps:
            _log(f"hwprune: fine-tuning {args.finetune_steps} steps")
            finetune(pruned, s.data.train, args.finetune_steps, seed=args.seed)
            summary["val_accuracy_after"] = evaluate(pruned, s.data.val)
        summary["finetune_steps"] = args.finetune_steps
    elif args.finetune_steps:
        raise HwpruneError("--finetune-steps needs --data")
    if args.out:
        save_pruned(args.out, pruned, policy, args.model, s.model_args, s.input_shape, s.num_classes, exclude,
                    {k: v for k, v in summary.items() if k != "policy"})
        summary["out"] = args.out
    if not args.json:
        print(f"params {before.params:,} -> {after.params:,} ({after.params / before.params:.1%})   "
              f"FLOPs {before.flops:,} -> {after.flops:,} ({after.flops / max(before.flops, 1):.1%})")
        if "val_accuracy_before" in summary:
            line = f"val accuracy {summary['val_accuracy_before']:.4f} dense, {summary['val_accuracy_pruned']:.4f} pruned"
            if "val_accuracy_after" in summary:
                line += f", {summary['val_accuracy_after']:.4f} after {args.finetune_steps} fine-tune steps"
            print(line)
        if args.out:
            print(f"wrote {args.out}")
    _emit(args, summary)
    return 0


def _add_latency_args(p: argparse.ArgumentParser, measure: bool) -> None:
    p.add_argument("--target", required=True, help="device kind: cpu, cuda or arm")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="batch size the latency is for (default: the model's, 512 for cnn1d, 16 otherwise)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads (part of the table's fingerprint; default 1)")
    p.add_argument("--tables", default="latency_tables", metavar="DIR",
                   help="folder of latency tables (default ./latency_tables)")
    p.add_argument("--channel-multiple", type=_positive, default=8, help="kept units are multiples of this (default 8)")
    if measure:
        p.add_argument("--repeats", type=_positive, default=15, help="timed repeats per measurement (default 15)")
        p.add_argument("--emulate", action="store_true",
                       help="--target arm on a non-ARM machine: use the qnnpack engine here; the table is marked emulated")
    else:
        p.add_argument("--table", default=None, help="the table file to use when several match")
        p.add_argument("--allow-missing", action="store_true",
                       help="price configurations missing from the table by interpolation, flagged as estimated")
    if p.prog.split()[-1] != "profile":
        p.add_argument("--allow-foreign-table", action="store_true",
                       help="use a table measured on another device/torch version though this machine is the target")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _grid(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(sorted({float(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be comma-separated keep ratios, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals) or 1.0 not in vals:
        raise argparse.ArgumentTypeError(f"grid ratios must be in (0, 1] and include 1.0, got {text!r}")
    return vals


def _latency_setup(args: argparse.Namespace, measure: bool):  # type: ignore[no-untyped-def]
    from hwprune.latency import analyze_layers, get_target, model_key
    from hwprune.models import default_latency_batch

    target = get_target(args.target, threads=args.threads, emulate=getattr(args, "emulate", False))
    if args.batch_size is None:
        args.batch_size = default_latency_batch(args.model)
    if measure:
        target.check_can_measure()
        target.setup()
    s = _setup(args)
    exclude = _exclude(args.exclude)
    layers = analyze_layers(s.model, s.example, exclude, args.channel_multiple)
    key = model_key(args.model, s.model_args, s.input_shape, exclude, args.channel_multiple)
    return target, s, exclude, layers, key


def cmd_profile(args: argparse.Namespace) -> int:
    from hwprune.latency import LatencyTable, Predictor, table_path
    from hwprune.latency.profiler import calibrate, calibration_policies, layer_configs, profile_layers

    t0 = time.time()
    target, s, exclude, layers, key = _latency_setup(args, measure=True)
    fp = target.fingerprint()
    path = table_path(args.tables, fp, args.batch_size)
    table = LatencyTable.load(path) if path.exists() else LatencyTable(fp, args.batch_size, path=path)
    if table.fingerprint != fp:
        raise HwpruneError(f"table {str(path)!r} holds another fingerprint than this device; move it away first")
    table.command = "hwprune " + " ".join(sys.argv[1:]) if sys.argv[1:] else table.command
    _log(f"hwprune: profiling {args.model} for {fingerprint_line(fp)} at batch {args.batch_size} -> {path}")
    configs = layer_configs(layers, args.grid, target, args.batch_size)
    measured = profile_layers(table, configs, target, args.repeats, _log)
    menus = Predictor(table, layers, key).menus(target)
    pols = calibration_policies(layers, args.grid, menus, args.calibration)
    cal = calibrate(table, key, s.model, s.example, pols, target, args.repeats, exclude, _log,
                    {"grid": list(args.grid), "input_shape": list(s.input_shape)})
    pred = Predictor(table, layers, key)
    summary = {"table": str(path), "fingerprint": fp, "model_key": key, "configurations": len(configs),
               "measured_now": measured, "calibration_measured_now": cal, "entries_in_table": len(table.entries),
               "calibration_fit": {"layer_scale": pred.coef[0], "us_per_output_element": pred.coef[1],
                                   "overhead_us": pred.coef[2]},
               "seconds": round(time.time() - t0, 1)}
    if not args.json:
        print(f"{len(configs)} configurations ({measured} measured now), {len(pred.calibration)} calibration runs "
              f"({cal} now); fit: latency = {pred.coef[0]:.3f} x layer sum + {pred.coef[1] * 1e3:.3f} ns x output "
              f"elements + {pred.coef[2]:.1f} us; "
              f"{summary['seconds']} s -> {path}")
    _emit(args, summary)
    return 0


def fingerprint_line(fp: dict[str, Any]) -> str:
    dev = fp.get("gpu") or fp.get("cpu")
    bits = [fp["target"], str(dev), fp.get("arch", "")]
    if fp.get("threads"):
        bits.append(f"{fp['threads']} thread(s)")
    bits += [f"torch {fp.get('torch')}", str(fp.get("engine") or fp.get("compute_capability") or "")]
    return ", ".join(b for b in bits if b) + (" [EMULATED]" if fp.get("emulated") else "")


def _predictor(args: argparse.Namespace, measure: bool):  # type: ignore[no-untyped-def]
    from hwprune.latency import Predictor, find_table

    target, s, exclude, layers, key = _latency_setup(args, measure)
    table = find_table(args.tables, target, args.batch_size, getattr(args, "table", None), args.allow_foreign_table)
    _log(f"hwprune: latency table {table.path} ({fingerprint_line(table.fingerprint)})")
    pred = Predictor(table, layers, key, getattr(args, "allow_missing", False))
    if not pred.calibrated:
        _log(f"hwprune: warning: the table has no end-to-end calibration for {key}; predicting the raw layer "
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
    _emit(args, summary)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from hwprune.latency.validate import validate_predictor

    target, s, exclude, layers, key, table, pred = _predictor(args, measure=True)
    if not pred.calibrated:
        raise HwpruneError(f"table {str(table.path)!r} has no calibration for {key}; run 'hwprune profile' first")
    grid = tuple(table.models[key]["grid"])
    rep = validate_predictor(s.model, s.example, layers, pred, target, args.samples, args.seed, args.repeats,
                             exclude, grid, pred.menus(target), None if args.json else _log)
    summary = {"model": args.model, "target": args.target, "batch_size": table.batch_size,
               "fingerprint": table.fingerprint, **rep.to_dict()}
    if not args.json:
        print(f"{'':<22}{'table predictor':>16}{'FLOPs proxy':>14}")
        print(f"{'within +-10%':<22}{rep.within_10pct:>16.0%}{rep.flops_within_10pct:>14.0%}")
        print(f"{'Kendall tau':<22}{rep.kendall_tau:>16.3f}{rep.flops_kendall_tau:>14.3f}")
        print(f"{'MAPE':<22}{rep.mape:>16.1%}{rep.flops_mape:>14.1%}")
        print(f"{'worst case':<22}{rep.worst:>16.1%}{rep.flops_worst:>14.1%}")
        print(f"measurement noise (median re-run difference): {rep.noise_pct:.1f}%; {rep.samples} policies")
    _emit(args, summary)
    return 0


_SEARCH_FLAGS = ("model", "data", "target", "budget", "trials", "sampler", "seed", "finetune_steps", "storage",
                 "study", "out", "backend", "ray_address", "workers", "cpus_per_trial", "gpus_per_trial", "batch_size",
                 "threads", "tables", "table", "weights", "lr", "importance", "channel_multiple")


def _print_front(summary: dict[str, Any]) -> None:
    print(f"Pareto front of {summary['study']} (budget {summary['budget_ms']:.4f} ms; feasible points only):")
    print(f"{'trial':>6} {'accuracy':>9} {'predicted ms':>13}  seed")
    for p in summary["pareto"]:
        print(f"{p['trial']:>6} {p['accuracy']:>9.4f} {p['predicted_latency_ms']:>13.4f}  {p.get('seed', '')}")


def cmd_search(args: argparse.Namespace) -> int:
    from hwprune.models import parse_model_args
    from hwprune.search import SearchSpec, load_spec, run_search

    spec = load_spec(args.spec) if args.spec else SearchSpec()
    for name in _SEARCH_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(spec, name, value)
    if args.model_args is not None:
        spec.model_args = parse_model_args(args.model_args)
    if args.exclude is not None:
        spec.exclude = _exclude(args.exclude)
    summary = run_search(spec, _log)
    if not args.json:
        _print_front(summary)
        if summary["best"]:
            b = summary["best"]
            print(f"best feasible: trial {b['trial']}, val accuracy {b['accuracy']:.4f}, predicted "
                  f"{b['predicted_latency_ms']:.4f} ms -> {summary['out']}/best_policy.json")
        for name, u in summary["uniform_seeds"].items():
            print(f"baseline {name}: val accuracy {u['accuracy']:.4f}, predicted {u['predicted_latency_ms']:.4f} ms")
    _emit(args, summary)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from hwprune.search import load_front

    summary = load_front(args.run_dir)
    if not args.json:
        _print_front(summary)
    _emit(args, summary)
    return 0


def _keep(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {text!r}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"hwprune: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from hwprune.apply.importance import IMPORTANCES
    from hwprune.policy import FORMATS

    p = _Parser(prog="hwprune", description="Hardware-aware pruning and quantization search for PyTorch.")
    p.add_argument("--version", action="version", version="hwprune " + __import__("hwprune").__version__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train the dense base model and cache it (keyed by model, data, seed)")
    _add_model_args(t, data_required=True)
    t.add_argument("--epochs", type=_positive, default=None, help="epochs (default: per model, tuned to reach the README's accuracies)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one-cycle; default 3e-3)")
    t.add_argument("--batch-size", type=_positive, default=128, help="training batch size (default 128)")
    t.add_argument("--retrain", action="store_true", help="train again even if a cached model exists (replaces it)")
    t.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("inspect", help="list prunable groups, quantizable layers, params and FLOPs")
    _add_model_args(i)
    _add_shape_args(i)
    i.set_defaults(fn=cmd_inspect)

    a = sub.add_parser("apply", help="apply a policy (or a uniform keep ratio) and write the pruned model")
    _add_model_args(a)
    _add_shape_args(a)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="policy JSON file")
    src.add_argument("--uniform", type=_keep, metavar="KEEP", help="keep this fraction of every group, e.g. 0.5")
    a.add_argument("--format", default="fp32", choices=FORMATS, help="with --uniform: every layer's format")
    a.add_argument("--channel-multiple", type=_positive, default=8, help="with --uniform: round kept units to this multiple")
    a.add_argument("--importance", default="l1", choices=IMPORTANCES, help="which units to keep (default l1)")
    a.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps after pruning (needs --data)")
    a.add_argument("--out", default=None, help="write the pruned model artifact here (.pt)")
    a.set_defaults(fn=cmd_apply)

    pr = sub.add_parser("profile", help="measure every reachable layer configuration of a model on this device")
    _add_model_args(pr)
    _add_shape_args(pr)
    _add_latency_args(pr, measure=True)
    from hwprune.latency.profiler import DEFAULT_GRID

    pr.add_argument("--grid", type=_grid, default=DEFAULT_GRID, metavar="R,R,...",
                    help="keep ratios to profile (default " + ",".join(map(str, DEFAULT_GRID)) + ")")
    pr.add_argument("--calibration", type=_positive, default=20,
                    help="end-to-end runs (dense, uniform, random policies) that calibrate the predictor (default 20)")
    pr.set_defaults(fn=cmd_profile)

    pd = sub.add_parser("predict", help="price a policy from a latency table (no measuring)")
    _add_model_args(pd)
    _add_shape_args(pd)
    _add_latency_args(pd, measure=False)
    pd.add_argument("--policy", required=True, help="policy JSON file")
    pd.add_argument("--by-layer", action="store_true", help="list each layer's table entry")
    pd.set_defaults(fn=cmd_predict)

    v = sub.add_parser("validate", help="measure random policies end to end and compare with the predictor")
    _add_model_args(v)
    _add_shape_args(v)
    _add_latency_args(v, measure=True)
    v.add_argument("--samples", type=_positive, default=20, help="random policies to measure (default 20)")
    v.set_defaults(fn=cmd_validate)

    se = sub.add_parser("search", help="search per-layer keep ratios and formats under a latency budget")
    se.add_argument("--spec", help="a search spec (YAML, e.g. search/gru-mnist1d-cpu.yaml); flags override it")
    se.add_argument("--model", help="built-in model or path/to/file.py:factory")
    se.add_argument("--model-args", default=None, metavar="K=V,...", help="arguments for the model factory")
    se.add_argument("--data", help="built-in data (mnist1d, mnist5k) or path/to/file.py:factory")
    se.add_argument("--target", help="cpu, cuda or arm (default cpu)")
    se.add_argument("--budget", help="latency per forward pass at the spec's batch size: 10ms, 2.5 ms, 800us, "
                                     "0.01s, or 50%% of the dense model's predicted latency")
    se.add_argument("--trials", type=_positive, help="completed trials wanted (default 20; a resumed study counts "
                                                     "the ones it has)")
    se.add_argument("--sampler", help="tpe (default), nsga2 or random")
    se.add_argument("--seed", type=int, help="seed for the sampler and the fine-tunes (default 0)")
    se.add_argument("--finetune-steps", type=int, help="fine-tune steps per trial (default 100)")
    se.add_argument("--lr", type=float, help="fine-tune learning rate (default 1e-3)")
    se.add_argument("--importance", choices=IMPORTANCES, help="which units to keep (default l1)")
    se.add_argument("--storage", help="Optuna storage URL for many machines (e.g. postgresql://...); "
                                      "default: a journal file in the run directory")
    se.add_argument("--study", help="study name (default: model-data-target-budget)")
    se.add_argument("--out", help="run directory (default runs/<study>)")
    se.add_argument("--backend", help="local (default) or ray")
    se.add_argument("--ray-address", help="with --backend ray: auto or host:port")
    se.add_argument("--workers", type=_positive, help="with --backend ray: concurrent trials")
    se.add_argument("--cpus-per-trial", type=float, help="with --backend ray")
    se.add_argument("--gpus-per-trial", type=float, help="with --backend ray")
    se.add_argument("--batch-size", type=_positive, help="latency batch (default: the model's)")
    se.add_argument("--threads", type=_positive, help="CPU threads of the table (default 1)")
    se.add_argument("--tables", help="folder of latency tables (default latency_tables)")
    se.add_argument("--table", help="the table file to use when several match")
    se.add_argument("--weights", help="dense weights (default: the cached trained model; trained if missing)")
    se.add_argument("--channel-multiple", type=_positive, help="kept units are multiples of this (default 8)")
    se.add_argument("--exclude", default=None, metavar="LAYER,...", help="layers never to prune")
    se.add_argument("--json", action="store_true", help="print a JSON summary (pareto, budget_ms, ...) at the end")
    se.set_defaults(fn=cmd_search)

    pa = sub.add_parser("pareto", help="print the Pareto front of a search run again")
    pa.add_argument("run_dir", help="the run directory (runs/<study>)")
    pa.add_argument("--json", action="store_true", help="print JSON")
    pa.set_defaults(fn=cmd_pareto)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except HwpruneError as exc:
        print(f"hwprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
