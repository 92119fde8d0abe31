"""The floor of channel pruning, with and without depth, and what else reaches a budget below it (issue 36).

For every model (the built-ins, and every model of tests/assets with its data), at one batch: the droppable blocks
hwprune finds, then in one set of interleaved rounds against the dense model (the refusal's own measurement,
:func:`hwprune.search.floor.measure_way_out`): the smallest policy the search's grid allows (every group at the
lowest keep ratio, fp32), the same with every droppable block dropped, the dense model and that policy in every
installed runtime but compile, and the smallest policy at larger batches (per item). Nothing is trained: latency
does not depend on the weights. The verdict per model: whether a budget (default 50%) is reachable by depth, and
if not, what the refusal's paragraph says would reach it.

    python bench/depth_floor.py [--batch 16] [--budget 0.5] [--only resnet20,lstm3] [--name depth_floor]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
A = ROOT / "tests" / "assets"
PAT, ZOO, USER = f"{A / 'patterns.py'}", f"{A / 'zoo.py'}", f"{A / 'user_model.py'}"

# name, model, data (or shape:C,L / C,H,W for a model no data factory here fits), model args (the widths
# model_patterns.py raises them to)
MODELS = [
    ("cnn1d", "cnn1d", "mnist1d", ""),
    ("resnet20", "resnet20", "mnist5k", ""),
    ("mobilenetv2", "mobilenetv2", "mnist5k", ""),
    ("lstm x2", "lstm", "mnist1d", "num_layers=2"),
    ("gru x2", "gru", "mnist1d", "num_layers=2"),
    ("lstm-lm", "lstm-lm", "pydoc", ""),
    ("zoo lstm3", f"{ZOO}:lstm3", f"{ZOO}:make_seq_data", ""),
    ("zoo se_cnn", f"{ZOO}:se_cnn", f"{ZOO}:make_image_data", ""),
    ("zoo tcn", f"{ZOO}:tcn", "shape:8,64", ""),
    ("zoo crnn", f"{ZOO}:crnn", "shape:1,32,100", ""),
    ("seq2seq", f"{PAT}:seq2seq", f"{PAT}:seq2seq_data", "hidden=128,emb=32"),
    ("seq2seq_attn", f"{PAT}:seq2seq_attn", f"{PAT}:seq2seq_data", "hidden=128,emb=32"),
    ("packed_lstm", f"{PAT}:packed_lstm", f"{PAT}:packed_data", "hidden=128"),
    ("packed_gru", f"{PAT}:packed_gru", f"{PAT}:packed_data", "hidden=128"),
    ("seqfirst_lstm", f"{PAT}:seqfirst_lstm", f"{PAT}:seq_data", "hidden=128"),
    ("vanilla_rnn", f"{PAT}:vanilla_rnn", f"{PAT}:seq_data", "hidden=128"),
    ("grucell", f"{PAT}:grucell", f"{PAT}:seq_data", "hidden=128"),
    ("unet", f"{PAT}:unet", f"{PAT}:seg_data", "c=32"),
    ("se_cnn", f"{PAT}:se_cnn", f"{PAT}:image_data", ""),
    ("tcn", f"{PAT}:tcn", f"{PAT}:tcn_data", "c=64"),
    ("user mlp3", f"{USER}:mlp3", f"{USER}:make_mlp_data", ""),
    ("user gru2", f"{USER}:gru2", f"{USER}:make_seq_data", ""),
    ("user crnn", f"{USER}:crnn", f"{USER}:make_image_data", ""),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one(name: str, model: str, data: str, margs: str, batch: int, budget: float, rounds: int) -> dict:
    from hwprune.errors import one_line
    from hwprune.latency.profiler import DEFAULT_GRID
    from hwprune.models import parse_model_args
    from hwprune.policy import Policy
    from hwprune.resolve import resolve
    from hwprune.search.floor import floor_paragraph, measure_way_out
    from hwprune.space import build_space

    t0 = time.time()
    row: dict = {"name": name, "model": model, "model_args": margs, "batch": batch}
    try:
        shape = data[len("shape:"):] if data.startswith("shape:") else None
        s = resolve(model, None if shape else data, shape, parse_model_args(margs), None, 0, use_cache=False)
        space = build_space(s.model, s.example)
        row["blocks"] = [b.name for b in space.blocks]
        row["groups"] = len(space.groups)
        smallest = Policy({g.name: min(DEFAULT_GRID) for g in space.groups}, {}, 8)
        spec = SimpleNamespace(target="cpu", threads=1, runtime="eager", exclude=[], depth=False)
        w = measure_way_out(s.model, s.example, s.timing_pool(), smallest, row["blocks"], spec, batch, budget, log,
                            rounds=rounds)
    except Exception as exc:  # noqa: BLE001 - a row, not the end of the run
        row["error"] = one_line(exc, 200)
        return row
    row.update(floor=w.floor, depth=w.depth, runtimes=w.runtimes, batches=w.batches, paragraph=floor_paragraph(w),
               seconds=round(time.time() - t0, 1))
    ok = lambda r: r is not None and r <= budget  # noqa: E731
    row["reaches"] = ("channels" if ok(w.floor) else "depth" if ok(w.depth) else
                      next((f"--runtime {rt}" for rt, r in w.runtimes.items() if ok(r.get("smallest"))), None)
                      or next((f"--batch-size {b}" for b, r in w.batches if ok(r)), None) or "nothing measured")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.5, help="a share of the dense model (default 0.5)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", default="", help="comma-separated row names")
    ap.add_argument("--name", default="depth_floor")
    a = ap.parse_args(argv)
    import torch

    from _results import cpu_fingerprint, write_results

    torch.set_num_threads(1)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    t0 = time.time()
    rows = []
    for name, model, data, margs in MODELS:
        if only and name not in only:
            continue
        log(f"[{name}]")
        rows.append(one(name, model, data, margs, a.batch, a.budget, a.rounds))
        r = rows[-1]
        log(f"  {r.get('error') or r['paragraph']}")
    fp = cpu_fingerprint()
    lines = [f"# The floor with and without depth, and what reaches {a.budget:.0%} (batch {a.batch})", "",
             f"Command: `python bench/depth_floor.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Machine: {fp}", "",
             f"Every ratio is a median over {a.rounds} interleaved rounds against the dense model in eager, 1 thread, "
             f"batch {a.batch} (per item at larger batches). 'smallest': every group at keep "
             f"{0.25:g} (channel multiple 8), fp32. Nothing trained. Wall time {(time.time() - t0) / 60:.1f} min.",
             "", "| model | blocks | smallest | + depth | onnxruntime (dense / smallest) | openvino (dense / smallest) "
             "| per item at 2x/4x/8x/16x batch | reaches the budget by |", "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |  |  |  |  |  |  |")
            continue
        rt = lambda k: ("not measured" if "not_measured" in r["runtimes"].get(k, {"not_measured": 1}) else  # noqa
                        f"{pct(r['runtimes'][k]['dense'])} / {pct(r['runtimes'][k]['smallest'])}")
        lines.append(f"| {r['name']} | {len(r['blocks'])} | {pct(r['floor'])} | {pct(r['depth'])} | "
                     f"{rt('onnxruntime')} | {rt('openvino')} | {' / '.join(pct(v) for _, v in r['batches'])} | "
                     f"{r['reaches']} |")
    reach = sum(1 for r in rows if r.get("reaches") in ("channels", "depth"))
    lines += ["", f"Reach {a.budget:.0%} by channels or depth: **{reach} of {len(rows)}**; the others: what the "
              f"refusal's paragraph names (a runtime, a batch, or nothing measured).", "", "## The paragraphs", ""]
    lines += [f"- **{r['name']}**: {r.get('paragraph') or r.get('error')}" for r in rows]
    out = write_results(a.name, fp, {"args": vars(a), "rows": rows}, lines)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
