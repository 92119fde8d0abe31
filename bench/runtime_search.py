"""The same search in every cpu runtime: does the runtime change the best policy, and what does it buy?

For one search spec (default: the built-in cnn1d spec at 50%), ``hwprune search --runtime R`` then ``hwprune export
--trial best`` in eager, ONNX Runtime and OpenVINO (each with its own table, profiled on demand): the exported
artifact measured in that runtime against the dense model in the same rounds (speedup, test metric). Then every
runtime's best policy is measured in every runtime, all in the same interleaved rounds (the policy deployed on that
runtime's kernels; a policy with a format the runtime does not run is marked n/a), so the table shows whether the
best policy of one runtime is also the fastest in another. Writes bench/results/runtime_search_<fingerprint>.md.

    python bench/runtime_search.py [--spec search/cnn1d-mnist1d-cpu.yaml] [--trials 16] [--budget 50%]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("eager", "onnxruntime", "openvino")


def hw(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "hwprune", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"hwprune {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def cross_measure(exports: dict[str, dict], spec: dict, repeats: int) -> dict[str, dict[str, dict]]:
    """Every runtime's best policy deployed and measured in every runtime, with each runtime's dense model, all
    in the same interleaved rounds."""
    import torch

    from hwprune import inputs
    from hwprune.apply import apply_policy
    from hwprune.device.deploy import deploy
    from hwprune.device.targets import get_target
    from hwprune.latency.profiler import round_plan
    from hwprune.latency.rounds import measure_in_rounds
    from hwprune.policy import Policy
    from hwprune.resolve import resolve

    from hwprune.models import default_latency_batch

    s = resolve(spec["model"], spec["data"], None, spec.get("model_args") or {})
    x = s.inputs(int(spec.get("batch_size") or default_latency_batch(spec["model"])))
    samplers, out = {}, {}
    for rt in RUNTIMES:
        target = get_target("cpu", threads=1, runtime=rt)
        with target.settings():
            run = target.prepare(s.model.eval(), x)
        samplers[("dense", rt)] = target.sampler(lambda run=run: inputs.call(run, x))
        for src, e in exports.items():
            pol = Policy.from_dict(e["policy"])
            model, rep = deploy(apply_policy(s.model, pol, s.example), target, s.example)
            if rep.simulated:  # formats this runtime does not run: its shape measured in fp32 instead, and said
                out.setdefault(src, {})[rt] = {"fp32_shape": sorted(set(rep.simulated.values()))}
                model, rep = deploy(apply_policy(s.model, Policy(model=pol.model, keep=dict(pol.keep),
                                                                 channel_multiple=pol.channel_multiple),
                                                 s.example), target, s.example)
            with torch.no_grad():
                run = target.prepare(model.eval(), x)
            samplers[(src, rt)] = target.sampler(lambda run=run: inputs.call(run, x))
    torch.set_num_threads(1)
    with torch.no_grad():
        res = measure_in_rounds(samplers, round_plan(repeats))
    for (src, rt) in samplers:
        if src != "dense":
            t, d = res.timing((src, rt)), res.timing(("dense", rt))
            out.setdefault(src, {}).setdefault(rt, {}).update({"median_ms": t.median_us / 1e3, "spread_pct": t.spread_pct,
                                            "dense_ms": d.median_us / 1e3, "ratio_to_dense": t.median_us / d.median_us})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="search/cnn1d-mnist1d-cpu.yaml")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds of the cross measurement")
    ap.add_argument("--name", default="runtime_search", help="results file stem (default runtime_search)")
    ap.add_argument("--work", default=None, help="run folder (default: a new temporary one); a runtime whose "
                                                 "search and export are already there is reused, not searched again")
    args = ap.parse_args()
    import torch
    import yaml

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    spec = yaml.safe_load((ROOT / args.spec).read_text())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hwprune-rtsearch-"))
    print(f"runs in {work}", file=sys.stderr, flush=True)
    exports, t0, times = {}, time.time(), {}
    for rt in RUNTIMES:
        t = time.time()
        run = work / rt
        done = sorted(run.glob("export-*/export.json"))
        if done:  # a finished search + export of an earlier invocation (--work): its summary as it was written
            print(f"{rt}: reusing {done[0]}", file=sys.stderr, flush=True)
            e = json.loads(done[0].read_text())
            info = json.loads((run / "run.json").read_text())
            e["search"] = {"budget_ms": info.get("budget_ms"), "reused": str(done[0])}
            exports[rt], times[rt] = e, float("nan")
            continue
        print(f"{rt}: search and export ...", file=sys.stderr, flush=True)
        s = hw(["search", "--spec", args.spec, "--runtime", rt, "--budget", args.budget, "--trials",
                str(args.trials), "--out", str(run)])
        e = hw(["export", str(run), "--trust-code", "--trial", "best"])
        e["search"] = {k: s[k] for k in ("budget_ms", "dense_predicted_ms", "seconds") if k in s}
        exports[rt] = e
        times[rt] = time.time() - t
    cross = cross_measure(exports, spec, args.repeats)
    metric = exports["eager"]["metric"]
    lines = [f"# One search in every cpu runtime — {fp['cpu']} ({platform.machine()}), 1 thread, torch "
             f"{torch.__version__}", "",
             f"Made by `python bench/runtime_search.py --spec {args.spec} --budget {args.budget} --trials "
             f"{args.trials}" + (f" --work {args.work}" if args.work else "") + f"` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"({(time.time() - t0) / 60:.0f} min" + ("; searches and exports found in --work were reused, not run "
                                                     "again" if any(t != t for t in times.values()) else "")
             + "). Each runtime "
             "profiles its own table, searches, and exports its best point; the export is measured in its runtime "
             "(ONNX runtimes: the model.onnx file) against the dense model in the same rounds.", "",
             f"Fingerprint: `{json.dumps(fp)}`", "",
             f"| runtime | dense ms (that runtime) | best policy ms | speedup over its dense | over eager's dense | "
             f"test {metric} (dense) | formats | search + export s |", "|---|---|---|---|---|---|---|---|"]
    eager_dense = exports["eager"]["measurement"]["dense_now_ms"]
    for rt, e in exports.items():
        m = e["measurement"]
        fmts = sorted(set(e["policy"].get("formats", {}).values())) or ["fp32"]
        lines.append(f"| {rt} | {m['dense_now_ms']:.3f} | {m['median_ms']:.3f} | {m['dense_now_ms'] / m['median_ms']:.2f}x"
                     f" | {eager_dense / m['median_ms']:.2f}x | {e[f'test_{metric}']:.4f} ({e[f'dense_test_{metric}']:.4f}) | "
                     f"{', '.join(fmts)} | {'reused' if times[rt] != times[rt] else f'{times[rt]:.0f}'} |")
    lines += ["", f"Every runtime's best policy measured in every runtime ({args.repeats} interleaved rounds, ms and "
              "share of that runtime's dense model; a policy whose formats a runtime does not run is measured there "
              "with its keep ratios in fp32, marked):", "",
              "| best policy of \\ measured in | " + " | ".join(RUNTIMES) + " |", "|---|" + "---|" * len(RUNTIMES)]
    for src in RUNTIMES:
        cells = []
        for rt in RUNTIMES:
            c = cross.get(src, {}).get(rt, {})
            shape = f" fp32 shape (no {'/'.join(c['fp32_shape'])} here)" if c.get("fp32_shape") else ""
            cells.append(f"{c['median_ms']:.3f} ({c['ratio_to_dense']:.2f}){shape}")
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    same = len({json.dumps(e["policy"], sort_keys=True) for e in exports.values()}) == 1
    lines += ["", "The three searches chose " + ("the same policy." if same else "different policies.")]
    out = write_results(args.name, fp, {"exports": exports, "cross": {k: v for k, v in cross.items()},
                                               "args": vars(args)}, lines)
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
