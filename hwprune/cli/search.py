"""``hwprune search``, ``pareto`` and ``export``."""
from __future__ import annotations

import argparse
from typing import Any

from hwprune.cli._common import (RUNTIME_CHOICES, TARGET_CHOICES, device, emit, example, log, model_help,
                                 parse_exclude, positive)

_SEARCH_FLAGS = ("model", "data", "target", "budget", "trials", "sampler", "seed", "finetune_steps", "storage",
                 "study", "out", "backend", "ray_address", "workers", "cpus_per_trial", "gpus_per_trial", "batch_size",
                 "threads", "tables", "table", "weights", "lr", "importance", "channel_multiple", "early_stop_margin",
                 "uniform_seeds", "allow_foreign_table", "profile", "budget_margin", "device", "runtime", "task",
                 "train_batch_size", "val_subset", "num_classes", "screen", "keep_levels",
                 "costs", "objective", "seed_trials", "finish", "grow", "gate", "race", "way_out", "depth",
                 "distill")


def _print_front(summary: dict[str, Any]) -> None:
    limit = summary.get("limit_ms", summary["budget_ms"])
    kept = f", priced at most {limit:.4f} ms" if limit < summary["budget_ms"] else ""
    print(f"Pareto front of {summary['study']} (budget {summary['budget_ms']:.4f} ms{kept}; feasible points only):")
    metric = summary.get("metric", "accuracy")
    print(f"{'trial':>6} {metric:>10} {'predicted ms':>13}  seed")
    for p in summary["pareto"]:
        print(f"{p['trial']:>6} {p[metric]:>10.4f} {p['predicted_latency_ms']:>13.4f}  {p.get('seed', '')}")


def build_spec(args: argparse.Namespace) -> Any:
    """The search spec of parsed ``hwprune search`` arguments: ``--spec`` read first, flags override it."""
    from hwprune.models import parse_model_args
    from hwprune.search import SearchSpec, load_spec

    spec = load_spec(args.spec) if args.spec else SearchSpec()
    for name in _SEARCH_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(spec, name, value)
    if args.model_args is not None:
        spec.model_args = parse_model_args(args.model_args)
    if args.exclude is not None:
        spec.exclude = parse_exclude(args.exclude)
    return spec


def cmd_search(args: argparse.Namespace) -> int:
    from hwprune.search import run_search

    summary = run_search(build_spec(args), log)
    if not args.json:
        _print_front(summary)
        metric = summary.get("metric", "accuracy")
        if summary["best"]:
            b = summary["best"]
            print(f"best feasible: trial {b['trial']}, val {metric} {b[metric]:.4f}, predicted "
                  f"{b['predicted_latency_ms']:.4f} ms -> {summary['out']}/best_policy.json")
        elif summary["pareto"]:
            print("no best point: the measured finish timed every feasible trial it reached over the budget")
        for name, u in summary["uniform_seeds"].items():
            print(f"baseline {name}: val {metric} {u[metric]:.4f}, predicted {u['predicted_latency_ms']:.4f} ms")
    emit(args, summary)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from hwprune.search import load_front

    summary = load_front(args.run_dir, args.storage)
    if not args.json:
        _print_front(summary)
    emit(args, summary)
    return 0



def cmd_export(args: argparse.Namespace) -> int:
    from hwprune.export import export_run

    s = export_run(args.run_dir, args.trial, args.finetune_steps, args.schedule, args.out, args.repeats,
                   args.measure_here, log=log, storage=args.storage, device=args.device, trust_code=args.trust_code,
                   distill=args.distill)
    if not args.json:
        m = s["measured_latency_ms"]
        mt, split = s.get("metric", "accuracy"), s["test_split"].split(" ")[0]
        print(f"trial {s['trial']}: {split} {mt} {s[f'test_{mt}']:.4f} (dense {s[f'dense_test_{mt}']:.4f}); "
              f"predicted {s['predicted_latency_ms']:.4f} ms, measured "
              + (f"{m:.4f} ms (spread {s['measurement']['spread_pct']:.1f}%)" if m is not None else "- (not on the target)")
              + f", budget {s['budget_ms']:.4f} ms")
        print("artifacts: " + ", ".join(f"{k} {v}" for k, v in s["artifacts"].items()))
    emit(args, s)
    return 0


def register(sub: Any) -> None:
    from hwprune.apply.importance import IMPORTANCES
    from hwprune.search.spec import COSTS, OBJECTIVES, SAMPLERS

    se = sub.add_parser("search", help="search per-layer keep ratios and formats under a latency budget",
                        **example("hwprune search --spec search/cnn1d-mnist1d-cpu.yaml --out runs/demo-cnn1d",
                                  "hwprune search --model my_model.py:build --data my_data.py:load --target cpu "
                                  "--budget 50% --trials 30"))
    se.add_argument("--spec", help="a search spec (YAML, e.g. search/gru-mnist1d-cpu.yaml); flags override it")
    se.add_argument("--model", help=model_help())
    se.add_argument("--model-args", default=None, metavar="K=V,...", help="arguments for the model factory")
    se.add_argument("--data", help="built-in data (mnist1d, mnist5k, pydoc) or path/to/file.py:factory")
    se.add_argument("--task", help="classification (accuracy; default), language-model (perplexity) or "
                                   "path/to/file.py:factory; default: the data's own task")
    se.add_argument("--target", choices=TARGET_CHOICES, help="cpu, cuda or arm (default cpu)")
    se.add_argument("--budget", help="latency per forward pass at the spec's batch size: 10ms, 2.5 ms, 800us, "
                                     "0.01s, or 50%% of the dense model's predicted latency")
    se.add_argument("--trials", type=positive, help="fine-tunes wanted (default 20): finished trials, one stopped "
                                                     "early counting its share of the steps; a resumed study counts "
                                                     "the ones it has")
    se.add_argument("--sampler", choices=SAMPLERS, help="tpe (default), nsga2 or random")
    se.add_argument("--seed", type=int, help="seed for the sampler and the fine-tunes (default 0)")
    se.add_argument("--finetune-steps", type=int, help="fine-tune steps per trial (default 100)")
    se.add_argument("--lr", type=float, help="fine-tune learning rate (default 1e-3)")
    se.add_argument("--train-batch-size", type=positive, help="fine-tune batch size (default 128; the latency batch "
                                                               "is --batch-size)")
    se.add_argument("--val-subset", type=positive, help="score trials on this many validation items (a fixed, "
                                                         "seeded subset; default all); the export uses the full split")
    se.add_argument("--screen", type=int, metavar="N",
                    help="per fine-tune, sample N candidates, repair each to the budget and fine-tune only the one a "
                         "cheap proxy ranks best (BatchNorm re-estimation, or a few fine-tune steps without "
                         "BatchNorm; seconds each); 0: no proxy, 1: proxy recorded but nothing screened (default 4)")
    se.add_argument("--keep-levels", type=int, metavar="N",
                    help="keep ratios searched in steps of 1/N (rounded to --channel-multiple), below the table's "
                         "grid too; where this machine is the target (local backend, no --table) the layer "
                         "configurations a trial needs and the table lacks are measured before it trains and added "
                         "to the table; 0: the table's grid only (default 16)")
    se.add_argument("--costs", choices=COSTS,
                    help="the cost of cutting a group to a width or running a layer in a format: 'sensitivity' "
                         "measures it once per search with the proxy, that group or layer alone changed (default); "
                         "'importance' counts the importance of the units dropped, each group mean-normalized")
    se.add_argument("--objective", choices=OBJECTIVES,
                    help="what the sampler learns: 'metric' maximizes the task's metric with the price as a "
                         "constraint (default); 'front' the two-objective front (metric up, latency down). The "
                         "front is written either way")
    se.add_argument("--seed-trials", type=int, metavar="N",
                    help="fine-tune the N best-screened seeds of the portfolio (uniform, knapsack, threshold; fp32 and "
                         "per format; each filled to the budget); the fp32 uniform seed is always one (default 3)")
    se.add_argument("--finish", type=int, metavar="N",
                    help="time the N best trials against the dense model in interleaved rounds at the end and drop "
                         "any that measure over the budget (this machine the target); 0: none (default 3)")
    se.add_argument("--depth", action="store_true", default=None,
                    help="search depth as well: every block the model can lose whole ('hwprune inspect' lists them: "
                         "residual blocks with an identity shortcut, layers after the first of a stacked LSTM/GRU, "
                         "shape-keeping blocks of a Sequential) may be dropped, one level below its narrowest width; "
                         "reaches budgets below the floor of channel pruning")
    se.add_argument("--distill", type=float, metavar="W",
                    help="every fine-tune also learns from the dense model's outputs: loss = (1 - W) x task loss + "
                         "W x distillation loss (classification, language model: KL at temperature 2; a user task: "
                         "its 'distill' or the outputs' MSE). Costs one dense forward per step. Default 0 (off: it "
                         "did not help the built-in models' pruned policies, docs/search.md)")
    se.add_argument("--no-way-out", dest="way_out", action="store_false", default=None,
                    help="a budget below the smallest policy's price is refused at once, without first measuring "
                         "what would reach it (depth, the other runtimes, larger batches: seconds, more where "
                         "OpenVINO compiles)")
    se.add_argument("--no-grow", dest="grow", action="store_false", default=None,
                    help="with the finish, do not move the best trial to the budget as measured (by default it is "
                         "filled up to the budget less 3 times the timing's noise, or shrunk to it when it is not "
                         "clearly within and scores above the trials that are, timed again and, within the budget, "
                         "fine-tuned once more and added as trial 'finish-grown' or 'finish-shrunk')")
    se.add_argument("--no-gate", dest="gate", action="store_false", default=None,
                    help="with the finish, do not time each proposal against the dense model before its fine-tune "
                         "(by default one not clearly within the budget is shrunk by the ratio it measured, one "
                         "clearly within by more than 3%% is grown into that headroom, and either is timed again: "
                         "the table's errors differ from policy to policy, and the finish dropped the trials it "
                         "under-priced)")
    se.add_argument("--num-classes", type=positive, help="a built-in model's outputs when the data does not expose "
                                                          "its class count")
    se.add_argument("--importance", choices=IMPORTANCES, help="which units to keep (default l1)")
    se.add_argument("--race", type=int, metavar="ETA",
                    help="with --objective metric: successive halving at the checkpoints (1/3, 2/3 of the steps): a "
                         "fine-tune goes on only if its validation score is among the best 1/ETA of the trials that "
                         "reached that checkpoint (once ETA others did); the steps it saves buy more trials. 0: no "
                         "racing (default 3)")
    se.add_argument("--early-stop-margin", type=float,
                    help="with --objective front: stop a fine-tune at a checkpoint (1/3, 2/3 of the steps) when a "
                         "finished, no-slower trial was ahead there by this much validation score (accuracy; for a "
                         "lower-is-better metric such as perplexity, that metric) (default 0.05); 0 never stops a "
                         "fine-tune early, racing included")
    se.add_argument("--no-uniform-seeds", dest="uniform_seeds", action="store_false", default=None,
                    help="do not start with the uniform policies that just meet the budget (a plain sampler run)")
    se.add_argument("--storage", help="Optuna storage URL for many machines (e.g. postgresql://...); "
                                      "default: a journal file in the run directory")
    se.add_argument("--study", help="study name (default: model-data-target-budget)")
    se.add_argument("--out", help="run directory (default runs/<study>)")
    se.add_argument("--backend", choices=("local", "ray"), help="local (default) or ray")
    se.add_argument("--ray-address", help="with --backend ray: auto or host:port")
    se.add_argument("--workers", type=positive, help="with --backend ray: concurrent trials")
    se.add_argument("--cpus-per-trial", type=float, help="with --backend ray")
    se.add_argument("--gpus-per-trial", type=float, help="with --backend ray")
    se.add_argument("--batch-size", type=positive, help="latency batch (default: the model's)")
    se.add_argument("--runtime", choices=RUNTIME_CHOICES,
                    help="how the deployed model runs: eager (default); compile (torch.compile: the table, "
                         "calibration and the export's measurement are of compiled models, and export writes an "
                         "AOTInductor package); on cpu also onnxruntime, openvino and openvino-bf16 (OpenVINO's bf16 precision hint) (the model exported to ONNX and "
                         "run there: tables, calibration and export's measurement of model.onnx; int8 for Linear/LSTM "
                         "in onnxruntime); on cuda also cudagraph (CUDA graph replays)")
    se.add_argument("--device", type=device,
                    help="where base training and fine-tunes run: auto (the GPU when torch sees one, default), cpu, "
                         "cuda or cuda:N; Ray trials use the GPU --gpus-per-trial gives them")
    se.add_argument("--threads", type=positive, help="CPU threads of the table (default 1)")
    se.add_argument("--tables", help="folder of latency tables, used alone (default: $HWPRUNE_TABLES or "
                                     "~/.cache/hwprune/tables, then the reference tables shipped with hwprune)")
    se.add_argument("--table", help="the table file to use when several match")
    se.add_argument("--allow-foreign-table", action="store_true", default=None,
                    help="price with a table measured on another device or torch version though this machine is "
                         "the target (instead of profiling this one)")
    se.add_argument("--no-profile", dest="profile", action="store_false", default=None,
                    help="refuse when this machine has no table for the model, instead of profiling it first "
                         "(spec key 'profile: false')")
    se.add_argument("--budget-margin", type=float,
                    help="share of the budget kept free for prediction error: candidates are priced at most "
                         "budget / (1 + margin) (default: the 90th percentile of the table's leave-one-out "
                         "calibration errors |measured/predicted - 1|; 0 prices up to the budget)")
    se.add_argument("--weights", help="dense weights (default: the cached trained model; trained if missing)")
    se.add_argument("--channel-multiple", type=positive, help="kept units are multiples of this (default 8)")
    se.add_argument("--exclude", default=None, metavar="LAYER,...", help="layers never to prune")
    se.add_argument("--json", action="store_true", help="print a JSON summary (pareto, budget_ms, ...) at the end")
    se.set_defaults(fn=cmd_search)

    pa = sub.add_parser("pareto", help="print the Pareto front of a search run again",
                        **example("hwprune pareto runs/demo-cnn1d"))
    pa.add_argument("run_dir", help="the run directory (runs/<study>)")
    pa.add_argument("--storage", help="the study's storage URL, when it has a password (run.json keeps it masked)")
    pa.add_argument("--json", action="store_true", help="print JSON")
    pa.set_defaults(fn=cmd_pareto)

    ex = sub.add_parser("export", help="fine-tune a searched policy longer, deploy it on the target's kernels, "
                                       "measure it and save a model plain torch loads",
                        **example("hwprune export runs/demo-cnn1d --trial best"))
    ex.add_argument("run_dir", help="the run directory of 'hwprune search' (runs/<study>)")
    ex.add_argument("--trial", default="best", help="'best' (most accurate feasible point, default) or a trial number")
    ex.add_argument("--finetune-steps", type=int, default=None, help="fine-tune steps (default 1000)")
    ex.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                    help="oneshot: prune once, then fine-tune (default); gradual: prune toward the policy in 4 "
                         "stages over the first half of the steps")
    ex.add_argument("--distill", type=float, metavar="W", default=None,
                    help="weight of the dense model's outputs in the fine-tune's loss (default: the run's --distill)")
    ex.add_argument("--out", default=None, help="export directory (default RUN_DIR/export-trial<N>-<schedule>)")
    ex.add_argument("--repeats", type=positive, default=30,
                    help="rounds of the end-to-end measurement (default 30): the exported model, its reloaded "
                         "artifacts and the speed references (dense model, smallest policy) once per round in a "
                         "fresh order; half as many again for any whose spread is over 10%%")
    ex.add_argument("--measure-here", action="store_true",
                    help="measure even when this machine differs from the run's latency table (labelled so)")
    ex.add_argument("--storage", help="the study's storage URL, when it has a password (run.json keeps it masked)")
    ex.add_argument("--device", type=device, default=None,
                    help="where the fine-tune runs: auto, cpu, cuda or cuda:N (default: the run's --device)")
    ex.add_argument("--trust-code", action="store_true",
                    help="import and run the model/data/task code (file.py:factory, pkg.module:factory) that the "
                         "run's run.json names; without it a run of user code is refused, since a run directory "
                         "from elsewhere could name any code (built-in models and data need no trust)")
    ex.add_argument("--json", action="store_true", help="print the summary as JSON")
    ex.set_defaults(fn=cmd_export)
