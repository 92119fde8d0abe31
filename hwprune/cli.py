"""The ``hwprune`` command line: train, inspect, apply.

Every user error is one line on stderr (``hwprune: error: ...``) and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
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


def _emit(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))


def cmd_train(args: argparse.Namespace) -> int:
    from hwprune.train import DEFAULT_EPOCHS, TrainConfig, cache_key, evaluate, load_cached, save_cached, train_model

    s = _setup(args, use_cache=False)
    assert s.data is not None
    key = cache_key(args.model, args.data, args.seed, s.model_args)
    hit = load_cached(key)
    if hit is not None and not args.retrain:
        _log(f"hwprune: using cached model {hit[0]} (trained {hit[1].get('epochs')} epochs; --retrain to train again)")
        summary = hit[1]
    else:
        epochs = args.epochs or DEFAULT_EPOCHS.get(args.model, 20)
        if epochs <= 0:
            raise HwpruneError(f"--epochs must be a positive integer, got {epochs}")
        cfg = TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        _log(f"hwprune: training {args.model} on {args.data} for {epochs} epochs "
             f"({len(s.data.train)} train / {len(s.data.val)} val examples)")
        summary = train_model(s.model, s.data.train, s.data.val, cfg, log=None if args.quiet else _log)
        test = s.data.test if s.data.test is not None else s.data.val
        summary.update({"model": args.model, "data": args.data, "seed": args.seed, "epochs": epochs,
                        "model_args": s.model_args, "test_accuracy": evaluate(s.model, test),
                        "test_split": "test" if s.data.test is not None else "val"})
        summary["weights"] = str(save_cached(key, s.model, summary))
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
    space = build_space(s.model, s.example, [e for e in args.exclude.split(",") if e])
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
    import torch

    from hwprune.apply import apply_policy, save_pruned
    from hwprune.measure import model_stats
    from hwprune.policy import load_policy, uniform_policy
    from hwprune.space import build_space
    from hwprune.train import evaluate, finetune

    s = _setup(args)
    exclude = [e for e in args.exclude.split(",") if e]
    space = build_space(s.model, s.example, exclude)
    if args.policy:
        policy = load_policy(args.policy)
    else:
        policy = uniform_policy(space, args.uniform, args.format, args.channel_multiple, model=args.model)
    policy.validate(space)
    if s.weights == "random init":
        _log("hwprune: warning: no trained weights (give --weights or run 'hwprune train'); pruning a random init")
    batches = None
    if s.data is not None:
        loader = torch.utils.data.DataLoader(s.data.train, batch_size=64, shuffle=False)
        batches = [b for _, b in zip(range(4), loader)]
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
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train the dense base model and cache it (keyed by model, data, seed)")
    _add_model_args(t, data_required=True)
    t.add_argument("--epochs", type=int, default=None, help="epochs (default: per model, tuned to reach the README's accuracies)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one-cycle; default 3e-3)")
    t.add_argument("--batch-size", type=int, default=128)
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
    a.add_argument("--channel-multiple", type=int, default=8, help="with --uniform: round kept units to this multiple")
    a.add_argument("--importance", default="l1", choices=IMPORTANCES, help="which units to keep (default l1)")
    a.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps after pruning (needs --data)")
    a.add_argument("--out", default=None, help="write the pruned model artifact here (.pt)")
    a.set_defaults(fn=cmd_apply)
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
