"""Predictor fidelity on this CPU: table predictor vs FLOPs proxy, on random policies.

For each built-in model: ``hwprune validate --target cpu --model M --samples N``
(its default batch; the tables in latency_tables/ must hold it: run
``hwprune profile`` first). Writes bench/results/predictor_fidelity_<fingerprint>.md
and a .json beside it with every measured policy.

    python bench/predictor_fidelity.py [--samples 30] [--models cnn1d,gru,...]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cnn1d", "resnet20", "mobilenetv2", "lstm", "gru")


def validate(model: str, samples: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "hwprune", "validate", "--target", "cpu", "--model", model, "--samples", str(samples),
           "--seed", str(seed), "--json"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{model}: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    out["seconds"] = round(time.time() - t0, 1)
    out["command"] = "hwprune " + " ".join(cmd[3:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    import torch

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    results = []
    for m in args.models.split(","):
        print(f"validating {m} ...", file=sys.stderr, flush=True)
        results.append(validate(m, args.samples, args.seed))
    lines = [
        f"# Predictor fidelity — {fp['cpu']} ({platform.machine()}), {fp['threads']} thread, torch {torch.__version__}",
        "",
        f"Made by `python bench/predictor_fidelity.py --samples {args.samples} --seed {args.seed}` on "
        f"{time.strftime('%Y-%m-%d')}. Each row: `hwprune validate --target cpu --model M --samples {args.samples}` "
        "with the committed table; each random policy (keep ratio per group from the grid, half the layers in a "
        "random format from the menu) measured end to end twice (median of 15 repeats each). Goal: >= 95% within "
        "+-10% and Kendall tau >= 0.9, and better than the FLOPs proxy (fitted on the same calibration runs).",
        "",
        f"Fingerprint: `{json.dumps(fp)}`",
        "",
        "| model | batch | measured range (ms) | within ±10% | Kendall τ | MAPE | worst | bias | FLOPs within ±10% "
        "| FLOPs τ | FLOPs MAPE | noise (re-run) | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        meas = [row["measured_us"] / 1e3 for row in r["rows"]]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {min(meas):.3f}–{max(meas):.3f} | **{r['within_10pct']:.0%}** | "
            f"**{r['kendall_tau']:.3f}** | {r['mape']:.1%} | {r['worst']:.1%} | {r['bias']:+.1%} | "
            f"{r['flops_within_10pct']:.0%} | {r['flops_kendall_tau']:.3f} | {r['flops_mape']:.1%} | "
            f"{r['noise_pct']:.1f}% | {r['seconds']:.0f} s |")
    lines += ["", "`bias` is the mean signed error (negative: predictions low). `noise` is the median difference "
              "between the two end-to-end measurements of the same policy.", ""]
    out_md = write_results("predictor_fidelity", fp, {"results": results}, lines)
    print("\n".join(lines))
    print(f"wrote {out_md}", file=sys.stderr)


if __name__ == "__main__":
    main()
