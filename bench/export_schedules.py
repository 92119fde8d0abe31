"""One-shot against gradual pruning at export: the same trial, fine-tune steps, seed and data, side by side.

For each search run given (default: the runs of the built-in specs under runs/),
``hwprune export RUN --trial best --schedule S --finetune-steps K`` for both
schedules into fresh directories; reports test accuracy (target kernels),
predicted and measured latency. Writes bench/results/export_schedules_<fingerprint>.{md,json}.

    python bench/export_schedules.py [--steps 1000] [--runs runs/demo-cnn1d,runs/gru-mnist1d-cpu-50]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = "runs/demo-cnn1d,runs/gru-mnist1d-cpu-50,runs/resnet20-mnist5k-cpu-50"


def export(run: str, schedule: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "hwprune", "export", run, "--trust-code", "--trial", "best", "--schedule", schedule,
           "--finetune-steps", str(steps), "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{run}/{schedule}: {proc.stderr.strip().splitlines()[-1]}")
    s = json.loads(proc.stdout)
    return {k: s[k] for k in ("run", "trial", "schedule", "finetune_steps", "test_accuracy", "dense_test_accuracy",
                              "predicted_latency_ms", "measured_latency_ms", "budget_ms", "seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--runs", default=RUNS)
    args = ap.parse_args()
    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            for sched in ("oneshot", "gradual"):
                print(f"{run} / {sched} ...", file=sys.stderr, flush=True)
                rows.append(export(run, sched, args.steps, Path(tmp) / f"{Path(run).name}-{sched}"))
    lines = [f"# Export: one-shot vs gradual pruning — {fp['cpu']}, torch {fp['torch']}", "",
             f"Made by `python bench/export_schedules.py --steps {args.steps}` on {time.strftime('%Y-%m-%d')}. "
             "Each run's best feasible trial, exported twice with the same fine-tune budget, seed and data: "
             "one-shot (prune once, fine-tune all steps) and gradual (4 cubic stages over the first half of the "
             "steps, then the formats and the second half). Accuracy on the test split with the target's kernels; "
             "latency measured on this CPU (median of 30).", "",
             "| run | trial | schedule | test acc | dense test acc | predicted ms | measured ms | budget ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['run']).name} | {r['trial']} | {r['schedule']} | {r['test_accuracy']:.4f} | "
                     f"{r['dense_test_accuracy']:.4f} | {r['predicted_latency_ms']:.4f} | "
                     f"{r['measured_latency_ms']:.4f} | {r['budget_ms']:.4f} |")
    out_md = write_results("export_schedules", fp, {"rows": rows}, lines)
    print(out_md)


if __name__ == "__main__":
    main()
