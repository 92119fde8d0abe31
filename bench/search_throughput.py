"""Search throughput on this machine: trials per hour per spec, controller overhead, Ray (2 workers) vs local.

For each spec in search/: a fresh search of ``--trials`` trials (the spec's
fine-tune steps, early stopping off so every trial does the same work) with
the local backend, and the same with ``--backend ray --workers 2``, one after
the other on the same machine. Per run it reports trials per hour (from the
wall time of the trial loop, not counting base-model training or Ray start-up,
which are reported apart) and the share of that loop spent outside the
fine-tunes (sampler, repair, pricing, journal, trials.csv): the controller
overhead. Writes bench/results/search_throughput_<fingerprint>.{md,json}.

    python bench/search_throughput.py [--trials 8] [--specs cnn1d-mnist1d-cpu,gru-mnist1d-cpu] [--no-ray]
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(spec: str, trials: int, backend: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "hwprune", "search", "--spec", f"search/{spec}.yaml", "--trials", str(trials),
           "--early-stop-margin", "0", "--backend", backend, "--out", str(out), "--json"]
    if backend == "ray":
        cmd += ["--workers", "2"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{spec}/{backend}: {proc.stderr.strip().splitlines()[-1]}")
    s = json.loads(proc.stdout)
    rows = list(csv.DictReader(open(out / "trials.csv")))
    trained = [float(r["train_seconds"]) for r in rows if r["train_seconds"]]
    loop = s["seconds"]
    return {"spec": spec, "backend": backend, "trials": s["trials"], "duplicates": s["duplicates"],
            "loop_seconds": loop, "process_seconds": round(wall, 1), "trials_per_hour": round(s["trials"] / loop * 3600),
            "finetune_seconds_mean": round(sum(trained) / max(1, len(trained)), 3),
            "finetune_seconds_sum": round(sum(trained), 2),
            # local: the loop is serial, so everything outside the fine-tunes is controller + bookkeeping
            "overhead_pct": round(100 * (loop - sum(trained)) / loop, 2) if backend == "local" else None,
            "best_accuracy": s["best"]["accuracy"] if s["best"] else None,
            "command": "hwprune " + " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--specs", default="cnn1d-mnist1d-cpu,gru-mnist1d-cpu,resnet20-mnist5k-cpu")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    import torch

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.specs.split(","):
            for backend in ("local",) + (() if args.no_ray else ("ray",)):
                print(f"{spec} / {backend} ...", file=sys.stderr, flush=True)
                results.append(run(spec, args.trials, backend, Path(tmp) / f"{spec}-{backend}"))
                print(f"  {results[-1]}", file=sys.stderr, flush=True)
    lines = [f"# Search throughput — {fp['cpu']} ({platform.machine()}, 2 cores), torch {torch.__version__}", "",
             f"Made by `python bench/search_throughput.py --trials {args.trials}` on {time.strftime('%Y-%m-%d')}: "
             "each spec searched from scratch with the local backend, then with `--backend ray --workers 2` "
             "(a local Ray of 2 CPUs, 1 CPU per trial), early stopping off, the spec's fine-tune steps. "
             "Trials/hour use the wall time of the trial loop (base-model training and Ray start-up excluded; "
             "the whole process time is shown too). Controller overhead: the share of the local loop outside "
             "the fine-tunes (sampler, budget repair, pricing, journal writes, trials.csv, duplicate checks).", "",
             "| spec | backend | trials | loop s | process s | trials/hour | mean fine-tune s | controller overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        oh = f"{r['overhead_pct']:.2f}%" if r["overhead_pct"] is not None else "-"
        lines.append(f"| {r['spec']} | {r['backend']} | {r['trials']} | {r['loop_seconds']} | {r['process_seconds']} | "
                     f"{r['trials_per_hour']} | {r['finetune_seconds_mean']} | {oh} |")
    by = {(r["spec"], r["backend"]): r for r in results}
    ratios = [f"{s}: {by[(s, 'ray')]['trials_per_hour'] / by[(s, 'local')]['trials_per_hour']:.2f}x"
              for s in args.specs.split(",") if (s, "ray") in by]
    if ratios:
        lines += ["", "Ray (2 workers) / local trials per hour: " + ", ".join(ratios) + "."]
    out_md = write_results("search_throughput", fp, {"results": results}, lines)
    print(out_md)


if __name__ == "__main__":
    main()
