"""Do exported points land under the budget? The search without a margin (before) and with it (after).

For each built-in spec (cnn1d is the demo's), ``hwprune search`` twice in one run, same seed, trials and
table: ``--budget-margin 0`` (how hwprune priced before issue 12: up to the budget) and the automatic margin
(the 90th percentile of the calibration runs' leave-one-out |measured/predicted - 1|). Then every point of
each front is deployed on this CPU and measured end to end (``hwprune export --finetune-steps 0``: latency
does not depend on the weights), and the best point is exported as ``make demo`` does (1000 fine-tune steps).
Counts how many measured at or under the budget. Tables are this machine's (profiled on demand if missing).
Writes bench/results/budget_margin_<fingerprint>.{md,json}.

    python bench/budget_margin.py [--specs search/a.yaml,...] [--trials N] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = "search/cnn1d-mnist1d-cpu.yaml,search/gru-mnist1d-cpu.yaml,search/resnet20-mnist5k-cpu.yaml"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(spec_path: str, margin: float | None, trials: int | None, repeats: int, tmp: Path) -> dict:
    from hwprune.export import export_run
    from hwprune.search import load_spec, run_search

    spec = load_spec(spec_path)
    label = "auto" if margin is None else f"{margin:g}"
    spec.out = str(tmp / f"{Path(spec_path).stem}-m{label}")
    spec.budget_margin = margin
    if trials:
        spec.trials = trials
    s = run_search(spec, _log)
    points = []
    for p in s["pareto"]:
        e = export_run(spec.out, str(p["trial"]), 0, out=Path(spec.out) / f"lat-{p['trial']}", repeats=repeats, log=_log, trust_code=True)
        points.append({"trial": p["trial"], "predicted_ms": p["predicted_latency_ms"],
                       "measured_ms": e["measured_latency_ms"], "met": e["measured_latency_ms"] <= s["budget_ms"]})
    best = export_run(spec.out, "best", None, repeats=repeats, log=_log, trust_code=True)
    return {"spec": spec_path, "margin_asked": label, "margin": s["budget_margin"], "budget_ms": s["budget_ms"],
            "limit_ms": s["limit_ms"], "dense_predicted_ms": s["dense_predicted_ms"], "front": points,
            "best": {"trial": best["trial"], "predicted_ms": best["predicted_latency_ms"],
                     "measured_ms": best["measured_latency_ms"], "met": not best["over_budget"],
                     "test_accuracy": best["test_accuracy"], "val_accuracy_search": best["search_val_accuracy"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=SPECS)
    ap.add_argument("--trials", type=int, default=None, help="override the specs' trial counts")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.specs.split(","):
            for margin in (0.0, None):
                _log(f"== {spec}, margin {'auto' if margin is None else margin}")
                rows.append(run_one(spec, margin, args.trials, args.repeats, Path(tmp)))
    lines = [f"# Budget margin: exports under the budget, before and after — {fp['cpu']}, torch {fp['torch']}", "",
             f"Made by `python bench/budget_margin.py` on {time.strftime('%Y-%m-%d')} in {time.time() - t0:.0f} s. "
             "Before: `--budget-margin 0` (candidates priced up to the budget). After: the automatic margin "
             "(candidates priced at most budget / (1 + m), m = 90th percentile of the calibration runs' "
             "leave-one-out |measured/predicted - 1|). Each front point deployed and measured on this CPU "
             f"(median of {args.repeats}, 1 thread); the best point also exported with 1000 fine-tune steps.", "",
             "| spec | margin | budget ms | limit ms | front points met | best: predicted ms | best: measured ms | "
             "best met | best test acc |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = sum(p["met"] for p in r["front"])
        b = r["best"]
        lines.append(f"| {Path(r['spec']).stem} | {r['margin']:.1%} ({r['margin_asked']}) | {r['budget_ms']:.4f} | "
                     f"{r['limit_ms']:.4f} | {met}/{len(r['front'])} | {b['predicted_ms']:.4f} | "
                     f"{b['measured_ms']:.4f} | {'yes' if b['met'] else '**no**'} | {b['test_accuracy']:.4f} |")
    for label, want in (("before (margin 0)", "0"), ("after (auto margin)", "auto")):
        sel = [r for r in rows if r["margin_asked"] == want]
        pts = [p for r in sel for p in r["front"]]
        lines.append(f"\n{label}: front points under budget {sum(p['met'] for p in pts)}/{len(pts)}; best points "
                     f"{sum(r['best']['met'] for r in sel)}/{len(sel)}.")
    write_results("budget_margin", fp, {"rows": rows, "seconds": round(time.time() - t0, 1)}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
