"""Where the table's systematic error comes from: the dense model against the sum of its entries, and each layer
inside the model against its isolated entry, all measured in the same interleaved rounds.

For each model at its default latency batch, one set of rounds times (every item once per round, shuffled):
the dense model; the dense model with timing hooks around each layer (pre/post forward hooks: the layer's own
time inside the model, its inputs as the model leaves them in cache); every dense layer's table entry as a fused
block (layer + epilogue) and as the bare layer. Reported: measured dense time, block-entry sum and bare-entry
sum as shares of it (what no entry holds: 1 - share), and per layer kind the median of in-model time over
isolated bare entry (> 1: the isolated timing is optimistic, e.g. warm caches; < 1: pessimistic).

    python bench/entry_sum.py [--models cnn1d,resnet20,...,zoo:lstm3] [--rounds 15]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from predictor_fidelity import BUILTIN, ZOO, model_args  # noqa: E402


def _setup(name: str):  # type: ignore[no-untyped-def]
    from hwprune.cli import build_parser
    from hwprune.cli._common import setup_from_args

    ns = build_parser().parse_args(["inspect", *model_args(name)])
    return ns.model, setup_from_args(ns, use_cache=False)


def hooked_sampler(model, x, names, times):  # type: ignore[no-untyped-def]
    """A sampler of ``model(x)`` that also records each named layer's own time per call into ``times``."""
    import torch

    from hwprune.device.timing import cpu_sampler

    mods = dict(model.named_modules())
    start: dict[str, int] = {}
    handles = []
    for n in names:
        handles.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: start.__setitem__(n, time.perf_counter_ns())))
        handles.append(mods[n].register_forward_hook(
            lambda m, a, o, n=n: times[n].append((time.perf_counter_ns() - start[n]) / 1e3)))
    with torch.inference_mode():
        sample = cpu_sampler(lambda: model(x))
    for v in times.values():
        v.clear()  # warm-up calls do not count
    return sample, handles


def run_model(name: str, rounds: int) -> dict:
    from hwprune.latency import analyze_layers, get_target
    from hwprune.latency.profiler import REFERENCE, build_block, measure_rounds, model_sampler, timing_batch
    from hwprune.latency.rounds import RoundPlan
    from hwprune.models import default_latency_batch

    target = get_target("cpu", threads=1)
    target.setup()
    ref, s = _setup(name)
    batch = default_latency_batch(ref)
    model = copy.deepcopy(s.model).eval()
    layers = analyze_layers(model, s.example)  # splits RNN stacks in place: layer names refer to ``model``
    full = {g.name: g.units for g in layers.space.groups}
    x = timing_batch(s.example, batch, s.timing_pool())
    items, kinds = {}, {}
    for f in layers.layers:
        cfg = f.config(full, batch, "fp32", fused=True)
        for kind, c in (("block", cfg), ("bare", cfg.bare())):
            mod, xin = build_block(c, target)
            items[(kind, f.name)] = (lambda m=mod, xi=xin: target.sampler(lambda: m(xi)))
        kinds[f.name] = cfg.op
    times: dict[str, list[float]] = defaultdict(list)
    hooked = copy.deepcopy(model)
    items[("hooked", "model")] = lambda: hooked_sampler(hooked, x, [f.name for f in layers.layers], times)[0]
    res = measure_rounds(items, target, RoundPlan(rounds=rounds, extra_rounds=0), model_sampler(model, x, target))
    dense = res.timing(REFERENCE).median_us
    block = {n: res.timing(("block", n)).median_us for _, n in items if _ == "block"}
    bare = {n: res.timing(("bare", n)).median_us for _, n in items if _ == "bare"}
    inside = {n: statistics.median(v) for n, v in times.items() if v}
    by_kind: dict[str, list[float]] = defaultdict(list)
    for n, t in inside.items():
        by_kind[kinds[n]].append(t / bare[n])
    return {"model": name, "batch": batch, "dense_us": dense, "dense_spread_pct": res.timing(REFERENCE).spread_pct,
            "block_sum_us": sum(block.values()), "bare_sum_us": sum(bare.values()),
            "in_model_sum_us": sum(inside.values()), "hooked_model_us": res.timing(("hooked", "model")).median_us,
            "in_model_over_isolated": {k: statistics.median(v) for k, v in by_kind.items()},
            "layers": {n: {"op": kinds[n], "block_us": block[n], "bare_us": bare[n], "in_model_us": inside.get(n)}
                       for n in kinds}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BUILTIN + tuple(f"zoo:{z}" for z in ZOO)))
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    import torch

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    t0 = time.time()
    results = []
    for m in args.models.split(","):
        print(f"{m} ...", file=sys.stderr, flush=True)
        results.append(run_model(m, args.rounds))
    lines = [f"# Entry sums against the model — {fp['cpu']} ({platform.machine()}), 1 thread, torch {torch.__version__}",
             "", f"Made by `python bench/entry_sum.py --rounds {args.rounds}` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"({(time.time() - t0) / 60:.0f} min): every item of a model in the same {args.rounds} interleaved "
             "rounds (see the script's docstring).", "", f"Fingerprint: `{json.dumps(fp)}`", "",
             "| model | batch | dense ms (spread) | block entries / dense | bare entries / dense | layers inside the "
             "model / dense | in-model / isolated bare entry, by kind |", "|---|---|---|---|---|---|---|"]
    for r in results:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["in_model_over_isolated"].items()))
        lines.append(f"| {r['model']} | {r['batch']} | {r['dense_us'] / 1e3:.3f} ({r['dense_spread_pct']:.0f}%) | "
                     f"{r['block_sum_us'] / r['dense_us']:.2f} | {r['bare_sum_us'] / r['dense_us']:.2f} | "
                     f"{r['in_model_sum_us'] / r['hooked_model_us']:.2f} | {kinds} |")
    out_md = write_results("entry_sum", fp, {"results": results}, lines)
    print("\n".join(lines))
    print(f"wrote {out_md}", file=sys.stderr)


if __name__ == "__main__":
    main()
