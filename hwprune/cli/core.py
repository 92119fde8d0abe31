"""``hwprune train``, ``inspect`` and ``apply``: the dense model, its search space, one policy applied."""
from __future__ import annotations

import argparse
from typing import Any

from hwprune.cli._common import (add_model_args, add_shape_args, device, emit, example, keep_ratio, log,
                                 parse_exclude, positive, setup_from_args)
from hwprune.errors import HwpruneError

def cmd_train(args: argparse.Namespace) -> int:
    from hwprune.train import DEFAULT_EPOCHS, TrainConfig, cache_key, load_cached, train_and_cache

    s = setup_from_args(args, use_cache=False)
    assert s.data is not None
    key = cache_key(args.model, args.data, args.seed, s.model_args, s.task)
    hit = load_cached(key)
    if hit is not None and not args.retrain:
        log(f"hwprune: using cached model {hit[0]} (trained {hit[1].get('epochs')} epochs; --retrain to train again)")
        summary = hit[1]
    else:
        epochs = args.epochs or DEFAULT_EPOCHS.get(args.model, 20)
        cfg = TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.train_batch_size, seed=args.seed, device=args.device,
                          task=s.task)
        log(f"hwprune: training {args.model} on {args.data} for {epochs} epochs "
             f"({len(s.data.train)} train / {len(s.data.val)} val examples)")
        summary = train_and_cache(s.model, s.data, args.model, args.data, args.seed, s.model_args, cfg,
                                  log=None if args.quiet else log)
    if not args.json:
        metric = summary.get("metric", "accuracy")
        print(f"{args.model}/{args.data} seed {args.seed}: val {metric} {summary[f'val_{metric}']:.4f}  "
              f"{summary.get('test_split', 'test')} {metric} {summary[f'test_{metric}']:.4f}  -> {summary['weights']}")
    emit(args, summary)
    return 0


def _group_rows(space) -> list[str]:  # type: ignore[no-untyped-def]
    rows = [f"{'group':<34} {'kind':<9} {'units':>6}  layers"]
    for g in space.groups:
        rows.append(f"{g.name:<34} {g.kind:<9} {g.units:>6}  {', '.join(g.layers)}")
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    from hwprune.measure import model_stats
    from hwprune.space import build_space

    s = setup_from_args(args)
    space = build_space(s.model, s.example, parse_exclude(args.exclude))
    st = model_stats(s.model, s.example)
    if not args.json:
        print(f"model {args.model}  input {s.input_shape}  params {st.params:,}  FLOPs/example {st.flops:,} (MACs)")
        print(f"{len(space.groups)} prunable groups:")
        print("\n".join("  " + r for r in _group_rows(space)))
        print(f"{len(space.layers)} quantizable layers: " + ", ".join(f"{q.name} ({q.op})" for q in space.layers))
        for name, why in space.kept.items():
            print(f"kept whole, not searched: {name}: {why}")
        if space.blocks:
            print(f"{len(space.blocks)} droppable blocks (depth; 'drop' in a policy, --drop in apply): " + ", ".join(
                f"{b.name} ({b.kind}: {', '.join(b.layers)})" for b in space.blocks))
    emit(args, {"model": args.model, "input_shape": list(s.input_shape), "params": st.params, "flops": st.flops,
                 "size_bytes": st.size_bytes, **space.to_dict()})
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from hwprune.apply import apply_policy, save_pruned
    from hwprune.space import check_prunable
    from hwprune.measure import model_stats
    from hwprune.policy import load_policy, uniform_policy
    from hwprune.space import build_space
    from hwprune.train import evaluate, few_batches, finetune, refresh_batchnorm

    s = setup_from_args(args)
    exclude = parse_exclude(args.exclude)
    space = build_space(s.model, s.example, exclude)
    if args.policy:
        policy = load_policy(args.policy)
    else:
        policy = uniform_policy(space, args.uniform, args.format, args.channel_multiple, model=args.model)
    if args.drop:
        policy.drop = tuple(sorted(set(policy.drop) | {d.strip() for d in args.drop.split(",") if d.strip()}))
    policy.validate(space)
    check_prunable(space, policy)
    if s.weights == "random init":
        log("hwprune: warning: no trained weights (give --weights or run 'hwprune train'); pruning a random init")
    batches = few_batches(s.data.train) if s.data is not None else None
    pruned = apply_policy(s.model, policy, s.example, exclude=exclude, importance=args.importance, batches=batches,
                          loss=s.task.loss)
    before, after = model_stats(s.model, s.example), model_stats(pruned, s.example)
    summary: dict[str, Any] = {"model": args.model, "weights": s.weights, "policy": policy.to_dict(),
                               "params_before": before.params, "params_after": after.params,
                               "flops_before": before.flops, "flops_after": after.flops,
                               "units": policy.widths(space)}
    metric = s.task.metric
    if s.data is not None:
        summary["metric"] = metric
        summary[f"val_{metric}_before"] = evaluate(s.model, s.data.val, task=s.task)
        refresh_batchnorm(pruned, s.data.train, seed=args.seed)  # pruned: statistics of what it computes now
        summary[f"val_{metric}_pruned"] = evaluate(pruned, s.data.val, task=s.task)
        if args.finetune_steps:
            log(f"hwprune: fine-tuning {args.finetune_steps} steps")
            finetune(pruned, s.data.train, args.finetune_steps, seed=args.seed, device=args.device, task=s.task)
            summary[f"val_{metric}_after"] = evaluate(pruned, s.data.val, task=s.task)
        summary["finetune_steps"] = args.finetune_steps
    elif args.finetune_steps:
        raise HwpruneError("--finetune-steps needs --data")
    if args.out:
        save_pruned(args.out, pruned, policy, args.model, s.model_args, s.input_shape, s.num_classes, exclude,
                    {k: v for k, v in summary.items() if k != "policy"}, s.example)
        summary["out"] = args.out
    if not args.json:
        print(f"params {before.params:,} -> {after.params:,} ({after.params / before.params:.1%})   "
              f"FLOPs {before.flops:,} -> {after.flops:,} ({after.flops / max(before.flops, 1):.1%})")
        if f"val_{metric}_before" in summary:
            line = (f"val {metric} {summary[f'val_{metric}_before']:.4f} dense, "
                    f"{summary[f'val_{metric}_pruned']:.4f} pruned")
            if f"val_{metric}_after" in summary:
                line += f", {summary[f'val_{metric}_after']:.4f} after {args.finetune_steps} fine-tune steps"
            print(line)
        if args.out:
            print(f"wrote {args.out}")
    emit(args, summary)
    return 0



def register(sub: Any) -> None:
    from hwprune.apply.importance import IMPORTANCES
    from hwprune.policy import FORMATS

    t = sub.add_parser("train", help="train the dense base model and cache it (keyed by model, data, seed)",
                       **example("hwprune train --model gru --data mnist1d --epochs 5"))
    add_model_args(t, data_required=True)
    t.add_argument("--epochs", type=positive, default=None, help="epochs (default: per model, tuned to reach the accuracies in docs/cli.md)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one-cycle; default 3e-3)")
    t.add_argument("--train-batch-size", type=positive, default=128, help="training batch size (default 128)")
    t.add_argument("--retrain", action="store_true", help="train again even if a cached model exists (replaces it)")
    t.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    t.add_argument("--device", type=device, default="auto",
                   help="where to train: auto (the GPU when torch sees one, default), cpu, cuda or cuda:N")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("inspect", help="list prunable groups, quantizable layers, params and FLOPs",
                       **example("hwprune inspect --model path/to/my_model.py:build --input-shape 3,32,32"))
    add_model_args(i)
    add_shape_args(i)
    i.set_defaults(fn=cmd_inspect)

    a = sub.add_parser("apply", help="apply a policy (or a uniform keep ratio) and write the pruned model",
                       **example("hwprune apply --model cnn1d --data mnist1d --uniform 0.5 --finetune-steps 200 "
                                 "--out cnn1d-half.pt"))
    add_model_args(a)
    add_shape_args(a)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="policy JSON file")
    src.add_argument("--uniform", type=keep_ratio, metavar="KEEP", help="keep this fraction of every group, e.g. 0.5")
    a.add_argument("--format", default="fp32", choices=FORMATS, help="with --uniform: every layer's format")
    a.add_argument("--channel-multiple", type=positive, default=8, help="with --uniform: round kept units to this multiple")
    a.add_argument("--drop", default="", metavar="BLOCKS",
                   help="comma-separated blocks to remove whole (depth; 'hwprune inspect' lists the droppable ones), "
                        "added to the policy's own")
    a.add_argument("--importance", default="l1", choices=IMPORTANCES, help="which units to keep (default l1)")
    a.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps after pruning (needs --data)")
    a.add_argument("--out", default=None, help="write the pruned model artifact here (.pt)")
    a.add_argument("--device", type=device, default="auto",
                   help="where to fine-tune: auto (the GPU when torch sees one, default), cpu, cuda or cuda:N")
    a.set_defaults(fn=cmd_apply)
