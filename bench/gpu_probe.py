"""Fine-tune throughput on the GPU against the CPU: the same pruned model, data, steps and seed (issue 13).

    python bench/gpu_probe.py [--model resnet20 --data mnist5k --steps 100]
Prints JSON: steps/s on each device and the ratio.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for the CPU fine-tune (default: torch's)")
    args = ap.parse_args()
    from hwprune.apply import apply_policy
    from hwprune.policy import Policy
    from hwprune.resolve import resolve
    from hwprune.train import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    s = resolve(args.model, args.data, use_cache=False)
    out = {"model": args.model, "data": args.data, "steps": args.steps, "cpu_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        model = apply_policy(s.model, Policy({}, {}, 8), s.example)  # the dense model, as a trial copy
        finetune(model, s.data.train, 3, device=dev)  # warm-up (cuDNN autotune, allocator)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        finetune(model, s.data.train, args.steps, device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        out[f"{dev}_steps_per_s"] = round(args.steps / (time.perf_counter() - t0), 2)
    if "cuda_steps_per_s" in out:
        out["gpu_over_cpu"] = round(out["cuda_steps_per_s"] / out["cpu_steps_per_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
