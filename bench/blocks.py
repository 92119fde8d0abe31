"""Fused blocks against bare layers: predictor fidelity side by side, on this machine.

For each model: profile its layers twice into fresh tables, once as bare layers (how tables were profiled
before) and once as fused blocks (each layer with its epilogue: BatchNorm, activation, pooling); measure the
calibration runs once and give both tables the same runs; then measure random policies end to end (twice
each) and price every one with both predictors and the FLOPs proxy. Only the layer entries differ, so the
difference in fidelity is what the blocks bring. Writes bench/results/blocks_<fingerprint>.{md,json}.

    python bench/blocks.py [--models cnn1d,resnet20,...] [--samples 30] [--target cuda --runtime cudagraph
                           --batch-size 4096] [--model-args num_layers=2] [--input-shape 28,28]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ("cnn1d", "resnet20", "mobilenetv2", "lstm", "gru")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_model(name: str, args: argparse.Namespace, target, tmp: Path) -> dict:  # type: ignore[no-untyped-def]
    from hwprune.latency import LatencyTable, Predictor, analyze_layers, model_key, table_path
    from hwprune.latency.profiler import (DEFAULT_GRID, calibration_policies, layer_configs, measure_model,
                                         random_policy, timing_batch, try_measure)
    from hwprune.latency.table import Entry
    from hwprune.latency.validate import _errors
    from hwprune.models import default_latency_batch
    from hwprune.resolve import resolve
    from hwprune.apply import apply_policy
    from hwprune.device.deploy import deploy

    from hwprune.models import parse_model_args

    s = resolve(name, input_shape=args.input_shape, model_args=parse_model_args(args.model_args), use_cache=False)
    batch = args.batch_size or default_latency_batch(name)
    layers = analyze_layers(s.model, s.example)
    key = model_key(name, s.model_args, s.input_shape, [], 8)
    fp = target.fingerprint()
    # 1. layer entries: block and bare configurations measured in one shuffled pass (this VM drifts by 5-15%
    #    over minutes; interleaving keeps drift from favouring either kind), each into the table(s) it belongs to
    tables = {m: LatencyTable(fp, batch, path=table_path(tmp / m, fp, batch)) for m in ("fused", "layers")}
    want = {m: {c.key: c for c in layer_configs(layers, DEFAULT_GRID, target, batch, fused=(m == "fused"))}
            for m in tables}
    todo = {**want["layers"], **want["fused"]}
    order = list(todo)
    random.Random(args.seed).shuffle(order)
    t0 = time.time()
    for i, k in enumerate(order):
        got = try_measure(todo[k], target, args.repeats)
        for m, t in tables.items():
            if k in want[m] and isinstance(got, Entry):
                t.entries[k] = got
            elif k in want[m] and got.permanent:  # a transient failure is left out, not marked unsupported
                t.unsupported[k] = got.why
        if (i + 1) % 200 == 0:
            log(f"{name}: {i + 1}/{len(order)} configurations")
    profile_s = round(time.time() - t0, 1)
    for m, t in tables.items():
        t.models[key] = {"blocks": m, "grid": list(DEFAULT_GRID)}
    # 2. calibration and validation policies, measured end to end in one shuffled pass (twice each)
    pre = Predictor(tables["fused"], layers, key)
    menus = pre.menus()
    bare = Predictor(tables["layers"], layers, key)
    fix = lambda p: bare.runnable(pre.runnable(p))  # noqa: E731
    cal = calibration_policies(layers, DEFAULT_GRID, menus, args.calibration, fix=fix)
    rng = random.Random(args.seed)
    val = [fix(random_policy(layers, DEFAULT_GRID, menus, rng)) for _ in range(args.samples)]
    runs = [("cal", i) for i in range(len(cal))] + [("val", i) for i in range(len(val))]
    random.Random(args.seed + 1).shuffle(runs)
    x = timing_batch(s.example, batch, s.timing_pool())
    took: dict[tuple[str, int], tuple[float, float, float]] = {}
    for n, (kind, i) in enumerate(runs):
        pol = (cal if kind == "cal" else val)[i]
        m, _ = deploy(apply_policy(s.model, pol, s.example), target, s.example)
        t1 = measure_model(m, x, target, args.repeats)
        t2 = measure_model(m, x, target, args.repeats)
        took[(kind, i)] = ((t1.median_us + t2.median_us) / 2, t1.iqr_us, 100 * abs(t1.median_us - t2.median_us)
                           / ((t1.median_us + t2.median_us) / 2))
        if (n + 1) % 10 == 0:
            log(f"{name}: {n + 1}/{len(runs)} end-to-end runs")
    for t in tables.values():
        t.models[key]["calibration"] = [{"policy": p.to_dict(), "measured_us": took[("cal", i)][0],
                                         "iqr_us": took[("cal", i)][1]} for i, p in enumerate(cal)]
    preds = {m: Predictor(t, layers, key) for m, t in tables.items()}
    fused = preds["fused"]
    rows = []
    for i, pol in enumerate(val):
        p = {mode: pr.price(pol) for mode, pr in preds.items()}
        rows.append({"policy": pol.to_dict(), "measured_us": took[("val", i)][0], "rerun_diff_pct": took[("val", i)][2],
                     "fused_us": p["fused"].latency_us, "layers_us": p["layers"].latency_us,
                     "flops_us": fused.price_flops(p["fused"].macs)})
    seconds = {"layer_entries": profile_s, "fused_entries": len(want["fused"]), "bare_entries": len(want["layers"])}
    meas = [r["measured_us"] for r in rows]
    blocks = sorted({"+".join(f.base.post) for f in layers.layers if f.base.post})
    out = {"model": name, "batch": batch, "n_layers": len(layers.layers),
           "with_epilogue": sum(1 for f in layers.layers if f.base.post), "epilogues": blocks,
           "entries": {m: len(t.entries) for m, t in tables.items()}, "profile": seconds,
           "calibration_runs": len(cal),
           "fit": {m: list(pr.coef) for m, pr in preds.items()},
           "noise_pct": sorted(r["rerun_diff_pct"] for r in rows)[len(rows) // 2], "rows": rows}
    for mode in ("fused", "layers", "flops"):
        out[mode] = _errors([r[f"{mode}_us"] for r in rows], meas)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calibration", type=int, default=20)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--runtime", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--model-args", default=None, help="k=v,... for every model given")
    ap.add_argument("--input-shape", default=None, help="C,L / C,H,W / T,F for every model given")
    ap.add_argument("--name", default="blocks", help="results file name prefix (default blocks)")
    ap.add_argument("--out", default=None, help="folder for the results (default bench/results)")
    args = ap.parse_args()
    import torch

    from hwprune.latency import get_target
    from bench._results import write_results

    target = get_target(args.target, threads=1, runtime=args.runtime)
    target.check_can_measure()
    target.setup()
    fp = target.fingerprint()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_model(m, args, target, Path(tmp)) for m in args.models.split(",")]
    lines = [
        f"# Fused blocks vs bare layers — {fp.get('cpu') or fp.get('gpu')}, torch {torch.__version__}",
        "",
        f"Made by `python bench/blocks.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')} "
        f"({time.time() - t0:.0f} s). Per model: two fresh tables, bare layers and fused blocks (layer + epilogue), "
        f"their entries measured in one shuffled pass; up to {args.calibration} calibration policies and "
        f"{args.samples} random validation policies measured end to end in one shuffled pass (twice each, median of "
        f"{args.repeats} repeats), both tables calibrated on the same runs; each validation policy priced by both "
        "predictors and the FLOPs proxy. Shuffling keeps this VM's drift (5-15% over minutes) from favouring one "
        "side. Goal: >= 95% within +-10% and Kendall tau >= 0.9.",
        "",
        f"Fingerprint: `{fp}`",
        "",
        "| model | batch | layers with epilogue | entries (blocks / bare) | measured (ms) | **blocks**: ±10% / τ / MAPE "
        "/ worst | bare layers: ±10% / τ / MAPE / worst | FLOPs: ±10% / τ | fit a (blocks / bare) | noise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        meas = [row["measured_us"] / 1e3 for row in r["rows"]]
        cell = lambda e: f"{e['within_10pct']:.0%} / {e['kendall_tau']:.3f} / {e['mape']:.1%} / {e['worst']:.1%}"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['with_epilogue']} of {r['n_layers']} | {r['profile']['fused_entries']} / "
            f"{r['profile']['bare_entries']} | {min(meas):.3f}–{max(meas):.3f} | "
            f"**{cell(r['fused'])}** | {cell(r['layers'])} | {r['flops']['within_10pct']:.0%} / "
            f"{r['flops']['kendall_tau']:.3f} | {r['fit']['fused'][0]:.2f} / {r['fit']['layers'][0]:.2f} | "
            f"{r['noise_pct']:.1f}% |")
    lines += ["", "Epilogues seen: " + "; ".join(f"{r['model']}: {', '.join(r['epilogues']) or 'none'}"
                                               for r in results),
              "", "`fit a`: the calibration's scale on the layer sum (1.0: the entries add up to the model). "
              "`noise`: median difference between the two end-to-end measurements of one policy.", ""]
    out = write_results(args.name, fp, {"results": results, "args": vars(args)}, lines,
                        Path(args.out) if args.out else None)
    print("\n".join(lines))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
