"""Which speed reference tracks a model's drift: the dense model itself, or a fixed canary?

In one process (1 thread, the tuned allocator), ``--rounds`` rounds ``--sleep`` seconds apart time, in a freshly
shuffled order, the dense cnn1d at batch 512 (the model whose prices must follow the machine), a 16 MB streaming
add (memory-bound), a 256x256 matmul (compute-bound) and one conv1d+BN+ReLU block (a typical entry). For each
candidate reference: its correlation with the dense model over rounds, and the round-to-round spread (cv) of
the dense model divided by it, against the dense model's own cv: a reference helps only if dividing by it makes
the model steadier. Writes bench/results/reference_tracking_<fingerprint>.{md,json}.

    python bench/reference_tracking.py [--rounds 40] [--sleep 0.5]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--sleep", type=float, default=0.5)
    args = ap.parse_args()
    import numpy as np
    import torch
    from torch import nn

    from _results import cpu_fingerprint, write_results
    from hwprune.device.targets import get_target
    from hwprune.device.timing import cpu_sampler
    from hwprune.models.cnn import CNN1d

    target = get_target("cpu", threads=1)
    fp = cpu_fingerprint()
    with target.settings():
        model = CNN1d(1, 40, 10).eval()
        x = torch.randn(512, 1, 40)
        big, out = torch.randn(4 * 1024 * 1024), torch.empty(4 * 1024 * 1024)
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        blk = nn.Sequential(nn.Conv1d(32, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU()).eval()
        xb = torch.randn(512, 32, 40)
        items = {"dense cnn1d b512": lambda: model(x), "16 MB streaming add": lambda: torch.add(big, 1.0, out=out),
                 "256x256 matmul": lambda: a @ b, "conv1d+BN+ReLU block": lambda: blk(xb)}
        samplers = {k: cpu_sampler(f) for k, f in items.items()}
        res: dict[str, list[float]] = {k: [] for k in items}
        rng = random.Random(0)
        t0 = time.time()
        for _ in range(args.rounds):
            order = list(items)
            rng.shuffle(order)
            for k in order:
                res[k].append(samplers[k]())
            time.sleep(args.sleep)
    dense = np.array(res["dense cnn1d b512"])
    cv = lambda v: float(np.std(v) / np.mean(v))  # noqa: E731
    rows = []
    for k, v in res.items():
        arr = np.array(v)
        row = {"item": k, "min_us": float(arr.min()), "median_us": float(statistics.median(v)),
               "max_us": float(arr.max()), "cv": cv(arr)}
        if k != "dense cnn1d b512":
            row.update(corr=float(np.corrcoef(dense, arr)[0, 1]), cv_dense_over_it=cv(dense / arr))
        rows.append(row)
    lines = [f"# Speed references — {fp['cpu']}, 1 thread, torch {torch.__version__}", "",
             f"Made by `python bench/reference_tracking.py --rounds {args.rounds} --sleep {args.sleep:g}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} ({time.time() - t0:.0f} s): every item once per round, shuffled.", "",
             f"Fingerprint: `{json.dumps(fp)}`", "",
             "| item | min ms | median ms | max ms | cv over rounds | corr. with dense | cv of dense / it |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['item']} | {r['min_us'] / 1e3:.3f} | {r['median_us'] / 1e3:.3f} | {r['max_us'] / 1e3:.3f} | "
                     f"{r['cv']:.3f} | {r.get('corr', float('nan')):.2f} | {r.get('cv_dense_over_it', float('nan')):.3f} |")
    lines += ["", f"The dense model's own cv is {cv(dense):.3f}: a reference whose `cv of dense / it` is not lower "
              "would only add its noise to every price."]
    out = write_results("reference_tracking", fp, {"rounds": res, "rows": rows, "args": vars(args)}, lines)
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
