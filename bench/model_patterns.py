"""Models as people write them, end to end on this machine: ``inspect -> profile -> search -> export`` through
the CLI for every pattern in tests/assets/patterns.py (several inputs, encoder-decoder RNNs, packed sequences,
sequence-first LSTMs, cell loops, a U-Net with ConvTranspose2d, SE gating, a dilated TCN).

Each row: the groups hwprune found (and what it kept whole), params before/after, the exported policy's predicted
and measured latency (export's interleaved rounds, raw and at the table's speed), the test metric against the
dense model's. Widths are raised from the test defaults (``--model-args``) so that the work, not the Python
overhead, dominates at the latency batch; all runs share one fresh table folder and model cache.

    python bench/model_patterns.py [--only seq2seq,grucell] [--trials 8] [--budget 70%] [--batch 64]
    python bench/model_patterns.py --zoo --budget 50% --batch 16   # the libraries' models (bench/zoo_models.py)
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
sys.path.insert(0, str(ROOT / "bench"))
PAT = str(ROOT / "tests" / "assets" / "patterns.py")

# name, data factory, task (None: classification), model args[, budget when the default cannot be met: the
# smallest policy of se_cnn measures ~70% of the dense model at batch 64]
PATTERNS = [
    ("seq2seq", "seq2seq_data", "language-model", "hidden=128,emb=32"),
    ("seq2seq", "seq2seq_dict_data", "language-model", "hidden=128,emb=32"),
    ("seq2seq2", "seq2seq_data", "language-model", "hidden=128,emb=32"),
    ("seq2seq_attn", "seq2seq_data", "language-model", "hidden=128,emb=32"),
    ("packed_lstm", "packed_data", None, "hidden=128"),
    ("packed_gru", "packed_data", None, "hidden=128"),
    ("seqfirst_lstm", "seq_data", None, "hidden=128"),
    ("vanilla_rnn", "seq_data", None, "hidden=128"),
    ("grucell", "seq_data", None, "hidden=128"),
    ("lstmcell", "seq_data", None, "hidden=128"),
    ("unet", "seg_data", f"{PAT}:pixel_task", "c=32"),
    ("se_cnn", "image_data", None, "", "85%"),
    ("tcn", "tcn_data", None, "c=64"),
]
ZOO_FILE = str(ROOT / "bench" / "zoo_models.py")
# --zoo: the field's libraries' own model classes (bench/zoo_models.py; installed by make bench-zoo); run with
# --budget 50% --batch 16
ZOO = [
    ("resnet18", "image_data", None, ""),
    ("mobilenet_v3_small", "image_data", None, "", "70%"),  # at 32x32, batch 16 its smallest policy is 50-54%
    ("timm_resnet10t", "image_data", None, ""),
    # not torchaudio's Wav2Letter (23 M parameters, widths fixed by its code): on a 2-core VM its profile took 11 min
    # and its base training had not finished 10 min later; bench/zoo.py analyses and prunes it
    ("crdnn_gru", "fbank_data", None, ""),  # its convs prune since 2026-12-08 (were kept whole: smallest ~71%, 80%)
    # hidden 256 (OpenNMT's default is 500): at 64 the model is overhead-bound, its smallest policy 77% of dense
    ("opennmt_gru", "reverse_data", "language-model", "hidden=256,emb=64"),
    ("fairseq_lstm", "reverse_lengths_data", "language-model", ""),
]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "hwprune", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)


def run_one(name: str, data: str, task: str | None, margs: str, work: Path, a: argparse.Namespace,
            budget: str) -> dict:
    env = {"HWPRUNE_CACHE": str(work / "cache")}
    src = ZOO_FILE if a.zoo else PAT
    common = ["--model", f"{src}:{name}", "--data", f"{src}:{data}"] + (["--task", task] if task else []) + \
        (["--model-args", margs] if margs else [])
    row: dict = {"model": name, "data": data, "task": task or "classification", "model_args": margs, "budget": budget}
    ins = _cli("inspect", *common, "--json", env=env)
    if ins.returncode:
        return {**row, "error": ins.stderr.strip().splitlines()[-1]}
    info = json.loads(ins.stdout)
    row.update(groups=[(g["name"], g["units"]) for g in info["groups"]], kept_whole=list(info.get("kept_whole", {})),
               params_dense=info["params"])
    where = ["--target", "cpu", "--tables", str(work / "tables"), "--batch-size", str(a.batch)]
    t0 = time.time()
    prof = _cli("profile", *common, *where, env=env)
    if prof.returncode:
        return {**row, "error": prof.stderr.strip().splitlines()[-1]}
    out = work / f"run-{name}-{data}"
    srch = _cli("search", *common, *where, "--budget", budget, "--trials", str(a.trials), "--finetune-steps",
                str(a.steps), "--out", str(out), "--json", env=env)
    if srch.returncode:
        return {**row, "error": srch.stderr.strip().splitlines()[-1]}
    exp = _cli("export", str(out), "--trust-code", "--trial", "best", "--finetune-steps", str(a.export_steps), env=env)
    if exp.returncode:
        return {**row, "error": exp.stderr.strip().splitlines()[-1]}
    rep = json.loads(next(out.glob("export-*/export.json")).read_text())
    metric = rep["metric"]
    m = rep["measurement"]
    row.update(seconds=round(time.time() - t0), params_after=rep["params"], budget_ms=rep["budget_ms"],
               predicted_ms=rep["predicted_latency_ms"], measured_ms=rep["measured_latency_ms"],
               adjusted_ms=m.get("adjusted_ms"), spread_pct=m.get("spread_pct"),
               dense_ms=m.get("dense_now_ms"), metric=metric,
               test=rep[f"test_{metric}"], dense_test=rep[f"dense_test_{metric}"], units=rep["units"],
               formats=rep["policy"].get("formats", {}))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--export-steps", type=int, default=300)
    ap.add_argument("--budget", default="70%")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--zoo", action="store_true", help="the libraries' models of bench/zoo_models.py instead of the "
                    "patterns (results: model_patterns_zoo_*)")
    a = ap.parse_args()
    patterns = ZOO if a.zoo else PATTERNS
    stem = "model_patterns_zoo" if a.zoo else "model_patterns"
    import torch

    from _results import cpu_fingerprint, write_results

    fp = cpu_fingerprint()
    only = set(filter(None, a.only.split(",")))
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, data, task, margs, *budget in patterns:
            if only and name not in only:
                continue
            print(f"{name} ({data}) ...", file=sys.stderr, flush=True)
            rows.append(run_one(name, data, task, margs, Path(tmp), a, budget[0] if budget else a.budget))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if only:  # the other models' rows from the last full run, in the patterns' order
        from hwprune.device.targets import fingerprint_slug

        old = ROOT / "bench" / "results" / f"{stem}_{fingerprint_slug(fp)}.json"
        done = {(r["model"], r["data"]): r for r in rows}
        prev = {(r["model"], r["data"]): r for r in json.loads(old.read_text())["rows"]} if old.exists() else {}
        rows = [done.get(k) or prev[k] for k in ((p[0], p[1]) for p in patterns) if k in done or k in prev]
    lines = [f"# Models as people write them, end to end — {fp['cpu']} ({platform.machine()}), 1 thread, "
             f"torch {torch.__version__}", "",
             f"Made by `python bench/model_patterns.py{' --zoo' if a.zoo else ''} --trials {a.trials} --budget "
             f"{a.budget} --batch {a.batch}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} ({(time.time() - t0) / 60:.0f} min"
             + (f"; rows of {', '.join(sorted(only))} from this run, the others from earlier runs: git log bench/results" if only else "")
             + f"): inspect, profile, search ({a.trials} trials, {a.steps} fine-tune steps, budget {a.budget} of the "
             f"dense latency unless the row says), export ({a.export_steps} steps) per model; latency at batch "
             f"{a.batch}, measured by export in interleaved rounds (raw, and at the table's speed).", "",
             f"Fingerprint: `{json.dumps(fp)}`", "",
             "| model (data) | groups (units dense→kept) | kept whole | params dense → pruned | dense ms (same "
             "rounds) | budget ms | predicted ms | measured ms (at table speed, spread) | test metric: pruned / dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} ({r['data']}{', budget ' + r['budget'] if r.get('budget', a.budget) != a.budget else ''}) | "
        if "error" in r:
            lines.append(head + f"error: {r['error']} | | | | | | | |")
            continue
        groups = ", ".join(f"{g} {u}→{r['units'].get(g, u)}" for g, u in r["groups"])
        lines.append(head + f"{groups} | {', '.join(r['kept_whole']) or '—'} | {r['params_dense']:,} → "
                     f"{r['params_after']:,} | {r['dense_ms']:.3f} | {r['budget_ms']:.3f} | {r['predicted_ms']:.3f} | "
                     f"{r['measured_ms']:.3f} ({r['adjusted_ms']:.3f}, {r['spread_pct']:.0f}%) | "
                     f"{r['metric']} {r['test']:.4f} / {r['dense_test']:.4f} |")
    out_md = write_results(stem, fp, {"rows": rows, "args": vars(a)}, lines)
    print("\n".join(lines))
    print(f"wrote {out_md}", file=sys.stderr)


if __name__ == "__main__":
    main()
