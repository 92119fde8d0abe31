"""Precision regions against cast islands, and eager against torch.compile, measured side by side on this CPU.

For each built-in model (dense; latency does not depend on the weights): fp32, every layer bf16 as islands
(each layer casts its input in and its output back: how hwprune deployed bf16 before regions), every layer
bf16 as one region (casts only at the ends; BatchNorm in bf16), each in eager and in the compile runtime
(``torch.compile``). Also ResNet-20 with one fp32 conv in the middle (regions split at the residual adds),
and the predictor's price of the all-bf16 policy from this machine's regions table (profiled on demand) next
to its measurement. Output error vs fp32 is reported too. Interleaved: each round times every variant once.

Writes bench/results/regions_<fingerprint>.{md,json}.

    python bench/regions.py [--repeats 30] [--rounds 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = [  # name, input shape, model args, batch (the models' default latency batches)
    ("resnet20", (1, 28, 28), {}, 16),
    ("cnn1d", (1, 40), {}, 512),
    ("gru", (40, 1), {"num_layers": 2}, 16),
    ("lstm", (28, 28), {"num_layers": 2}, 16),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def variants(name, shape, margs):  # type: ignore[no-untyped-def]
    from hwprune import build_model
    from hwprune.apply.formats import apply_formats
    from hwprune.device.deploy import deploy
    from hwprune.space import prepare_model, quant_layers

    torch.manual_seed(0)
    base = prepare_model(build_model(name, shape, 10, margs).eval())
    example = torch.randn(2, *shape)
    names = [q.name for q in quant_layers(base)]
    out = {"fp32": (base, None)}
    every = {n: "bf16" for n in names}
    out["bf16 islands"] = deploy(apply_formats(copy.deepcopy(base), every), "cpu")
    out["bf16 regions"] = deploy(apply_formats(copy.deepcopy(base), every), "cpu", example)
    if name == "resnet20":
        one = {n: "bf16" for n in names if n != "layer2.0.conv2"}
        out["bf16 regions, layer2.0.conv2 fp32"] = deploy(apply_formats(copy.deepcopy(base), one), "cpu", example)
    return base, example, names, out


def predicted(name, shape, margs, batch, base, example, names):  # type: ignore[no-untyped-def]
    """The all-bf16 and fp32 policies priced from this machine's eager regions table (profiled if missing)."""
    from hwprune.latency import ProfileJob, Predictor, analyze_layers, get_target, model_key, resolve_table
    from hwprune.policy import Policy

    target = get_target("cpu", threads=1)
    layers = analyze_layers(copy.deepcopy(base), example)
    key = model_key(name, margs, shape, [], 8)
    job = ProfileJob(copy.deepcopy(base), example, layers, key, shape)
    table = resolve_table(target, batch, layers, key, profile=job, log=_log)
    pred = Predictor(table, layers, key)
    pol = pred.runnable(Policy({}, {n: "bf16" for n in names}, 8))
    return {"fp32_ms": pred.price(Policy({}, {}, 8)).latency_ms, "bf16_ms": pred.price(pol).latency_ms,
            "bf16_layers_priced": len(pol.formats), "table": str(table.path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    from _results import cpu_fingerprint, write_results

    from hwprune.latency import get_target
    from hwprune.latency.profiler import measure_model

    fp = cpu_fingerprint()
    eager, comp = get_target("cpu", threads=1), get_target("cpu", threads=1, runtime="compile")
    eager.setup()
    comp.setup()
    t0 = time.time()
    rows = []
    for name, shape, margs, batch in MODELS:
        _log(f"== {name} (batch {batch})")
        base, example, names, out = variants(name, shape, margs)
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = base(x)
        runs = {}
        for label, (model, rep) in out.items():
            with torch.no_grad():
                err = float((model(x).float() - ref).abs().max() / ref.abs().max())
            runs[label] = {"casts": rep.casts if rep else 0, "regions": rep.regions if rep else "none",
                           "rel_err": err, "eager": [], "compile": []}
        compiled = {}
        if not args.no_compile:
            for label, (model, _) in out.items():
                _log(f"   compiling {label}")
                compiled[label] = comp.prepare(model, x)
        for r in range(args.rounds):
            for label, (model, _) in out.items():
                runs[label]["eager"].append(measure_model(model, x, eager, args.repeats).median_us / 1e3)
                if compiled:
                    runs[label]["compile"].append(
                        measure_model(compiled[label], x, eager, args.repeats, as_runtime=False).median_us / 1e3)
        for v in runs.values():
            v["eager_ms"] = statistics.median(v["eager"])
            v["compile_ms"] = statistics.median(v["compile"]) if v["compile"] else None
        pred = predicted(name, shape, margs, batch, base, example, names)
        rows.append({"model": name, "input": list(shape), "args": margs, "batch": batch, "runs": runs,
                     "predicted": pred})
        _log(f"   {[(k, round(v['eager_ms'], 3), v['compile_ms'] and round(v['compile_ms'], 3)) for k, v in runs.items()]}")
    lines = [f"# Precision regions vs cast islands, eager vs torch.compile — {fp['cpu']}, torch {fp['torch']}", "",
             f"Made by `python bench/regions.py` on {time.strftime('%Y-%m-%d')} in {time.time() - t0:.0f} s; 1 thread; "
             f"median over {args.rounds} interleaved rounds of medians of {args.repeats}. Dense models, random "
             "weights. 'casts': dtype casts per forward pass; 'rel err': max |output - fp32 output| / max |fp32 "
             "output|. Predicted: this machine's eager regions table (profiled on demand).", "",
             "| model | batch | variant | casts | eager ms | vs fp32 | compile ms | vs fp32 eager | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f32 = r["runs"]["fp32"]["eager_ms"]
        for label, v in r["runs"].items():
            c = f"{v['compile_ms']:.3f} | {f32 / v['compile_ms']:.2f}x" if v["compile_ms"] else "- | -"
            lines.append(f"| {r['model']} | {r['batch']} | {label} | {v['casts']} | {v['eager_ms']:.3f} | "
                         f"{f32 / v['eager_ms']:.2f}x | {c} | {v['rel_err']:.1e} |")
    lines += ["", "| model | predicted fp32 ms | measured | predicted all-bf16 (regions) ms | measured |",
              "|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted"]
        lines.append(f"| {r['model']} | {p['fp32_ms']:.3f} | {r['runs']['fp32']['eager_ms']:.3f} | {p['bf16_ms']:.3f} "
                     f"({p['bf16_layers_priced']} layers bf16) | {r['runs']['bf16 regions']['eager_ms']:.3f} |")
    path = write_results("regions", fp, {"rows": rows, "seconds": round(time.time() - t0, 1)}, lines)
    print("\n".join(lines))
    _log(f"-> {path}")


if __name__ == "__main__":
    main()
