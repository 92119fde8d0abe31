"""Predictor fidelity on this CPU: table predictor vs FLOPs proxy on random policies, every built-in model and the
user models of tests/assets/zoo.py, each validated twice back to back; optionally beside a noisy neighbour.

For each model, at its default latency batch: ``hwprune profile`` into a fresh table folder (the table is
measured by the code under test, minutes before it is judged, as a new user's would be), then ``hwprune
validate --samples N`` ``--runs`` times back to back. Writes bench/results/predictor_fidelity[-neighbour]_<fp>.md
and a .json with every measured policy.

``--neighbour``: a competing process pinned to the other core alternates ``--on`` seconds of memory-bound work
(streaming copies of a 64 MB array) with ``--off`` seconds of idle for the whole run, and hwprune's processes are
pinned to core 0: a noisy neighbour anyone can reproduce.

    python bench/predictor_fidelity.py [--samples 20] [--models cnn1d,gru,zoo:lstm3,lib:resnet18,...] [--neighbour]
        [--runtime eager|compile|onnxruntime|openvino|openvino-bf16] [--name predictor_fidelity_zoo]

``lib:NAME``: a library's model of bench/zoo_models.py (torchvision, timm, SpeechBrain: ``make bench-zoo``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("cnn1d", "resnet20", "mobilenetv2", "lstm", "gru", "lstm-lm")
ZOO = ("lstm3", "se_cnn", "tcn", "char_lm", "crnn")
# the field's libraries' models (bench/zoo_models.py; torchvision, timm and SpeechBrain installed: make bench-zoo)
LIB = {"resnet18": ["--input-shape", "3,64,64"], "mobilenet_v3_small": ["--input-shape", "3,64,64"],
       "timm_resnet10t": ["--input-shape", "3,64,64"], "crdnn_gru": ["--data", "bench/zoo_models.py:fbank_data"]}
NEIGHBOUR = """
import sys, time
import numpy as np
on, off = float(sys.argv[1]), float(sys.argv[2])
a = np.ones(16 * 1024 * 1024, dtype=np.float32); b = np.empty_like(a)
while True:
    t = time.time()
    while time.time() - t < on:
        np.copyto(b, a); np.copyto(a, b)
    time.sleep(off)
"""


def _pin(core: int):  # type: ignore[no-untyped-def]
    def fn() -> None:
        if hasattr(os, "sched_setaffinity") and core in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {core})
    return fn


def model_args(name: str) -> list[str]:
    if name.startswith("zoo:"):
        sys.path.insert(0, str(ROOT / "tests" / "assets"))
        from zoo import SHAPES

        short = name.split(":", 1)[1]
        return ["--model", f"tests/assets/zoo.py:{short}", "--input-shape", SHAPES[short]]
    if name.startswith("lib:"):
        short = name.split(":", 1)[1]
        return ["--model", f"bench/zoo_models.py:{short}", *LIB[short]]
    return ["--model", name] + (["--input-shape", "64"] if name == "lstm-lm" else [])


def hw(args: list[str], pin: int | None) -> dict:
    cmd = [sys.executable, "-m", "hwprune", *args, "--json"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=_pin(pin) if pin is not None else None)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    out["seconds"] = round(time.time() - t0, 1)
    out["command"] = "hwprune " + " ".join(args)
    out["log"] = [line for line in proc.stderr.splitlines() if line.startswith("hwprune:")]
    return out


def run_model(name: str, args: argparse.Namespace, tables: Path, pin: int | None) -> dict:
    common = ["--target", "cpu", "--runtime", args.runtime, *model_args(name),
              "--tables", str(tables / name.replace(":", "-"))]
    prof = hw(["profile", *common], pin)
    runs = [hw(["validate", *common, "--samples", str(args.samples), "--seed", str(args.seed), "--no-profile"], pin)
            for _ in range(args.runs)]
    return {"model": name, "profile": prof, "runs": runs}


def _small(sp: dict) -> str:
    s = sp.get("smallest")
    return f" / {s['ratio']:.3f}{'*' if s['significant'] else ''}" if s else ""


def _row(name: str, prof: dict, k: int, r: dict, goal: tuple[float, float]) -> str:
    ok = r["within_10pct"] >= goal[0] and r["kendall_tau"] >= goal[1]
    beats = r["kendall_tau"] > r["flops_kendall_tau"] and r["mape"] < r["flops_mape"]
    sp = r.get("speed") or {}
    ref = (prof.get("reference") or {}).get("spread_pct")
    return (f"| {name} | {r['batch_size']} | {k} | **{r['within_10pct']:.0%}** | **{r['kendall_tau']:.3f}** | "
            f"{r['mape']:.1%} | {r['bias']:+.1%} | {r['flops_within_10pct']:.0%} | {r['flops_kendall_tau']:.3f} | "
            f"{r['flops_mape']:.1%} | {'yes' if beats else 'no'} | ±{r['noise_floor_pct']:.1f}% | "
            f"{r['noise_pct']:.1f}% | {'' if ref is None else f'{ref:.1f}%'} | "
            f"{sp.get('ratio', float('nan')):.3f}{'*' if sp.get('significant') else ''}"
            f"{_small(sp)} | "
            f"{'met' if ok else 'missed'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=2, help="validations back to back per model (default 2)")
    ap.add_argument("--models", default=",".join(BUILTIN + tuple(f"zoo:{z}" for z in ZOO)))
    ap.add_argument("--neighbour", action="store_true", help="run beside a reproducible noisy neighbour")
    ap.add_argument("--on", type=float, default=3.0, help="neighbour: seconds of memory-bound work (default 3)")
    ap.add_argument("--off", type=float, default=3.0, help="neighbour: seconds of idle (default 3)")
    ap.add_argument("--tables", default=None, help="table folder (default: a fresh temporary one)")
    ap.add_argument("--name", default=None, help="results file stem (default predictor_fidelity[-neighbour][-RUNTIME])")
    ap.add_argument("--runtime", default="eager", choices=("eager", "compile", "onnxruntime", "openvino", "openvino-bf16"),
                    help="the cpu runtime the tables are profiled and the policies validated in (default eager)")
    args = ap.parse_args()
    import torch

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    neighbour, pin = None, None
    if args.neighbour:
        if len(cores) < 2:
            raise SystemExit("--neighbour needs two cores")
        pin = cores[0]
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(args.on), str(args.off)],
                                     preexec_fn=_pin(cores[-1]))
    tables = Path(args.tables or tempfile.mkdtemp(prefix="hwprune-fidelity-"))
    results, t0 = [], time.time()
    try:
        for m in args.models.split(","):
            print(f"{m}: profiling and validating ...", file=sys.stderr, flush=True)
            results.append(run_model(m, args, tables, pin))
            r = results[-1]["runs"]
            print(f"{m}: " + "; ".join(f"{x['within_10pct']:.0%} / tau {x['kendall_tau']:.3f}" for x in r),
                  file=sys.stderr, flush=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
    goal = (0.90, 0.85) if args.neighbour else (0.95, 0.90)
    name = args.name or ("predictor_fidelity" + ("-neighbour" if args.neighbour else "")
                         + ("" if args.runtime == "eager" else f"-{args.runtime}"))
    lines = [
        f"# Predictor fidelity{' beside a noisy neighbour' if args.neighbour else ''} — {fp['cpu']} "
        f"({platform.machine()}), 1 thread, torch {torch.__version__}, runtime {args.runtime}", "",
        f"Made by `python bench/predictor_fidelity.py --samples {args.samples} --seed {args.seed} --runs {args.runs}"
        f"{'' if args.runtime == 'eager' else ' --runtime ' + args.runtime}"
        f"{'' if args.models == ap.get_default('models') else ' --models ' + args.models}"
        f"{'' if args.name is None else ' --name ' + args.name}"
        f"{f' --neighbour --on {args.on:g} --off {args.off:g}' if args.neighbour else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} ({(time.time() - t0) / 60:.0f} min). Each model: `hwprune profile` into a "
        f"fresh table folder, then `hwprune validate --samples {args.samples}` {args.runs} times back to back: random "
        "policies measured end to end in interleaved rounds with the dense model as the speed reference. Goal: "
        f">= {goal[0]:.0%} within +-10% and Kendall tau >= {goal[1]}, and the table beating the FLOPs proxy (tau "
        "and MAPE) in every row."
        + (f" Neighbour: a process pinned to core {cores[-1]} alternating {args.on:g} s of streaming copies of a "
           f"64 MB array and {args.off:g} s idle; hwprune pinned to core {pin}." if args.neighbour else ""), "",
        f"Fingerprint: `{json.dumps(fp)}`", "",
        "| model | batch | run | within ±10% | Kendall τ | MAPE | bias | FLOPs ±10% | FLOPs τ | FLOPs MAPE | table "
        "beats FLOPs | noise floor | odd/even rounds | profile reference spread | speed now/then (dense / smallest) | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for k, r in enumerate(res["runs"], 1):
            lines.append(_row(res["model"], res["profile"], k, r, goal))
    lines += ["", "`noise floor`: the median over policies of twice the standard error of their measured median "
              "(a measured latency is itself this uncertain); `odd/even rounds`: median difference between the "
              "medians of a policy's odd and even rounds; `profile reference spread`: the dense model's IQR / "
              "median over the calibration rounds at profiling; `speed now/then`: the dense model at validation "
              "over at profiling, and the smallest policy's (* = beyond the noise); predictions are scaled by the "
              "speed curve between them either way (hwprune/latency/speed.py).", "",
              "| model | profile s | configurations | re-measured | still noisy |", "|---|---|---|---|---|"]
    for res in results:
        p = res["profile"]
        lines.append(f"| {res['model']} | {p['seconds']:.0f} | {p['configurations']} | {p.get('remeasured', '')} | "
                     f"{p.get('still_noisy', '')} |")
    out_md = write_results(name, fp, {"results": results, "args": vars(args)}, lines)
    print("\n".join(lines))
    print(f"wrote {out_md}", file=sys.stderr)


if __name__ == "__main__":
    main()
