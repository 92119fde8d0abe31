"""Which runtime? The dense model of every built-in (and the zoo's user models) in every cpu runtime this machine
has, side by side: ``hwprune profile --runtime all`` per model (eager, torch.compile, ONNX Runtime, OpenVINO, all
timed in the same interleaved rounds, 1 thread), written to bench/results/runtimes_<fingerprint>.md / .json.

    python bench/runtimes.py [--models cnn1d,gru,...] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from predictor_fidelity import BUILTIN, ZOO, hw, model_args

RUNTIMES = ("eager", "compile", "onnxruntime", "openvino", "openvino-bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(BUILTIN + tuple(f"zoo:{z}" for z in ZOO)))
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds per model (default 20)")
    args = ap.parse_args()
    import torch

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    results, t0 = [], time.time()
    for m in args.models.split(","):
        print(f"{m}: every runtime ...", file=sys.stderr, flush=True)
        r = hw(["profile", "--target", "cpu", "--runtime", "all", "--repeats", str(args.repeats), *model_args(m)], None)
        r["model"] = m
        results.append(r)
    lines = [f"# The dense models in every cpu runtime — {fp['cpu']} ({platform.machine()}), 1 thread, torch "
             f"{torch.__version__}", "",
             f"Made by `python bench/runtimes.py --repeats {args.repeats}` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"({(time.time() - t0) / 60:.0f} min): `hwprune profile --runtime all` per model at its default latency "
             "batch, every runtime timed in the same interleaved rounds (medians in ms, spread = IQR / median, "
             "speedup = eager's median / the runtime's). ONNX Runtime (CPU execution provider) and OpenVINO (f32 "
             "precision hint; openvino-bf16: the bf16 hint) run the model exported by torch's dynamo-based ONNX "
             "exporter; compile is torch.compile (inductor, default mode).", "",
             f"Fingerprint: `{json.dumps(fp)}`", "",
             "| model | batch | " + " | ".join(RUNTIMES) + " | fastest | max abs diff to eager (f32 runtimes) | "
             "bf16's |", "|---|---|" + "---|" * len(RUNTIMES) + "---|---|---|"]
    for r in results:
        rows = {x["runtime"]: x for x in r["runtimes"]}
        cells = []
        for rt in RUNTIMES:
            x = rows.get(rt, {})
            cells.append(f"{x['median_ms']:.3f} ({x['spread_pct']:.0f}%, {x['speedup_vs_eager']:.2f}x)"
                         if "median_ms" in x else f"— ({(x.get('error') or x.get('skipped') or 'absent')[:60]})")
        ran = [x for x in r["runtimes"] if "median_ms" in x]
        fastest = min(ran, key=lambda x: x["median_ms"])["runtime"] if ran else "—"
        diff = max((x["max_abs_diff"] for x in ran if x["runtime"] != "openvino-bf16"), default=float("nan"))
        bf16 = next((x["max_abs_diff"] for x in ran if x["runtime"] == "openvino-bf16"), float("nan"))
        lines.append(f"| {r['model']} | {r['batch_size']} | " + " | ".join(cells) + f" | {fastest} | {diff:.1e} | "
                     f"{bf16:.1e} |")
    out = write_results("runtimes", fp, {"results": results, "args": vars(args)}, lines)
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
