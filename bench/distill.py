"""Does distillation from the dense model help a pruned model recover? The same pruned model, the same fine-tune
steps, seeds and data, with and without the dense model as teacher.

For each row (a model, its data, a policy — blocks dropped and widths cut — and the fine-tune's steps), the policy
is fine-tuned once per seed with each distillation weight (0 = the task's loss alone; w = (1 - w) x task loss +
w x the task's distillation loss against the dense model, :func:`hwprune.train.finetune`), deployed with its
formats, and scored on the test split. Verdict per weight against 0 by Welch's t (|t| < 2: a tie). Also reports
the fine-tune's seconds per arm (the teacher's forward passes are the extra cost). Writes
bench/results/distill_<fingerprint>.{md,json}.

    python bench/distill.py [--rows resnet20-30,lstm-b1-30,cnn1d-30] [--weights 0,0.5,0.9] [--seeds 5]
                            [--steps 150,1000,3000]   # each row at each fine-tune length instead of its own
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Policies the searches chose (bench/results/search_quality_resnet20_depth_*, search_quality_cnn1d_*, and
# docs/search.md's LSTM at batch 1): each row's model, data, model args, policy and fine-tune steps.
ROWS = {
    "resnet20-30": ("resnet20", "mnist5k", {}, 200, {
        "drop": ["layer1.0", "layer1.1", "layer1.2", "layer2.2", "layer3.2"],
        "keep": {"conv1": 0.75, "layer2.0.conv1": 0.875, "layer2.0.conv2": 0.375, "layer2.1.conv1": 0.375,
                 "layer3.0.conv1": 0.4375, "layer3.0.conv2": 0.6875, "layer3.1.conv1": 0.1875}}),
    "resnet20-50": ("resnet20", "mnist5k", {}, 200, {
        "drop": ["layer1.0", "layer1.2", "layer3.2"],
        "keep": {"conv1": 0.75, "layer1.1.conv1": 0.75, "layer2.0.conv1": 0.375, "layer2.0.conv2": 0.375,
                 "layer2.1.conv1": 0.375, "layer2.2.conv1": 0.375, "layer3.0.conv1": 0.6875,
                 "layer3.0.conv2": 0.9375, "layer3.1.conv1": 0.6875}}),
    "lstm-b1-30": ("lstm", "mnist1d", {"num_layers": 2}, 150, {
        "drop": ["rnn.layers.1"], "keep": {"rnn.layers.0": 0.375}}),
    "cnn1d-30": ("cnn1d", "mnist1d", {}, 200, {
        "keep": {"fc1": 0.5, "features.0": 0.0625, "features.3": 0.3125, "features.6": 0.1875},
        "formats": {"fc1": "bf16"}}),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_row(name: str, weights: list[float], seeds: list[int], steps: int | None = None) -> dict:
    from hwprune.device.deploy import deploy
    from hwprune.export import finetune_policy
    from hwprune.policy import Policy
    from hwprune.search.context import dense_setup
    from hwprune.search.spec import SearchSpec
    from hwprune.train import evaluate, few_batches
    from search_quality import welch

    model, data, margs, own, pol = ROWS[name]
    steps = own if steps is None else steps
    setup = dense_setup(SearchSpec(model=model, data=data, model_args=margs, budget="100%", finetune_steps=steps), log)
    task, d = setup.task, setup.data
    test = d.test if d.test is not None else d.val
    policy = Policy(pol["keep"], pol.get("formats", {}), 8, model, drop=pol.get("drop", []))
    batches = few_batches(d.train)
    dense = evaluate(setup.model, test, task=task)
    arms = {}
    for w in weights:
        scores, secs = [], []
        for s in seeds:
            t0 = time.time()
            m = finetune_policy(setup.model, policy, setup.example, d.train, steps, seed=s, batches=batches,
                                task=task, distill=w)
            secs.append(time.time() - t0)
            m, _ = deploy(copy.deepcopy(m).eval(), "cpu", setup.example)
            scores.append(evaluate(m, test, task=task))
            log(f"{name}: distill {w} seed {s}: test {task.metric} {scores[-1]:.4f} ({secs[-1]:.1f} s)")
        arms[str(w)] = {"test": scores, "mean": statistics.mean(scores),
                        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "seconds_mean": statistics.mean(secs)}
    base = arms[str(weights[0])]["test"]
    sign = 1 if task.direction == "max" else -1
    for w in weights[1:]:
        a = arms[str(w)]
        a["t"] = welch([sign * v for v in a["test"]], [sign * v for v in base])
        a["verdict"] = "tie" if abs(a["t"]) < 2 else ("helps" if a["t"] > 0 else "hurts")
    return {"row": name, "model": model, "data": data, "model_args": margs, "steps": steps, "policy": pol,
            "metric": task.metric, "direction": task.direction, "dense_test": dense, "arms": arms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="resnet20-30,lstm-b1-30,cnn1d-30", help=f"of: {', '.join(ROWS)}")
    ap.add_argument("--weights", default="0,0.5,0.9", help="distillation weights; the first is the baseline")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", default="", help="fine-tune lengths, each row at each (default: the row's own)")
    ap.add_argument("--name", default="distill")
    args = ap.parse_args(argv)
    import torch

    from _results import cpu_fingerprint, write_results

    torch.set_num_threads(1)
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown row {bad[0]!r}; known: {', '.join(ROWS)}")
    weights = [float(w) for w in args.weights.split(",")]
    t0 = time.time()
    lengths = [int(k) for k in args.steps.split(",") if k] or [None]
    out = [run_row(r, weights, list(range(args.seeds)), k) for r in rows for k in lengths]
    fp = cpu_fingerprint()
    lines = [f"# Distillation from the dense model during the fine-tune — {fp['cpu']}, torch {fp['torch']}", "",
             f"Made by `python bench/distill.py --rows {args.rows} --weights {args.weights} --seeds {args.seeds}"
             + (f" --steps {args.steps}" if args.steps else "") + "` "
             f"on {time.strftime('%Y-%m-%d')} ({(time.time() - t0) / 60:.1f} min). The same pruned model, fine-tune "
             f"steps, data and seeds 0–{args.seeds - 1} per arm; weight 0 is the task's loss alone, w mixes "
             "(1 − w) × task loss + w × KL to the dense model's outputs at temperature 2 (× 4). Test metric after "
             "deploying the policy's formats; Welch's t against weight 0 (|t| < 2: tie).", "",
             "| row | policy | steps | dense | " + " | ".join(f"w={w}" for w in weights) + " |",
             "|---|---|---|---|" + "---|" * len(weights)]
    for r in out:
        pol = (f"drop {', '.join(r['policy']['drop'])}; " if r["policy"].get("drop") else "") + \
            ", ".join(f"{g} {k:g}" for g, k in r["policy"]["keep"].items())
        cells = []
        for w in weights:
            a = r["arms"][str(w)]
            c = f"{a['mean']:.4f} ± {a['std']:.4f} ({a['seconds_mean']:.0f} s)"
            if "t" in a:
                c += f", t {a['t']:+.1f} {a['verdict']}"
            cells.append(c)
        lines.append(f"| {r['model']}/{r['data']} ({r['row']}) | {pol} | {r['steps']} | {r['dense_test']:.4f} | "
                     + " | ".join(cells) + " |")
    path = write_results(args.name, fp, {"rows": out, "weights": weights, "seeds": args.seeds}, lines)
    print(path)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
