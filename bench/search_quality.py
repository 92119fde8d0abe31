"""Search quality at equal measured budgets: hwprune against uniform, global magnitude, random and FLOPs-guided.

For each model row and each budget (a fraction of the dense model's latency *measured* here, batch of the
row's table, 1 thread), five methods choose a policy:

  hwprune  the search: TPE, uniform seeds first, candidates priced by the latency table, N trials
  uniform  one keep ratio for every group, fp32 (Torch-Pruning's default): the largest ratio, in steps of
           1/32, whose *measured* latency meets the budget
  global   one L1-magnitude ranking across all groups (each group's scores divided by their mean, as
           Torch-Pruning's global pruning with its default mean normalizer; for RNNs the hidden units), fp32:
           the largest kept fraction, in steps of 1/32, whose measured latency meets the budget
  random   the same search with the random sampler and no uniform seeds, N trials
  flops    the same search (TPE, its uniform fp32 seed) pricing candidates by FLOPs instead of the table,
           fp32 only (FLOPs cannot tell formats apart); budget converted at the dense model's FLOPs per
           measured ms

Uniform and global are tuned against measured latency (prune, measure, adjust: what a user does by hand),
the three searches against their cost model. Every chosen policy then gets the same one-shot prune and
fine-tune of F steps from the dense weights with each of the seeds, deployed (real int8 kernels) and
evaluated on the test split; its latency is measured once after deployment (median of R repeats). A
policy whose measured latency exceeds the budget is a miss, not a point. The searches run once (seed 0);
the seeds are the final fine-tunes'. Writes bench/results/search_quality_<fingerprint>.{md,json,png}.

    python bench/search_quality.py                  # the full run (make bench)
    python bench/search_quality.py --quick ...      # the test suite's smoke run
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import ROOT, write_results  # noqa: E402

METHODS = ("hwprune", "uniform", "global", "random", "flops")
# model | data | model_args | search fine-tune steps  (the built-in specs' steps)
ROWS = ("cnn1d|mnist1d||150;gru|mnist1d|num_layers=2|200;lstm|mnist5k|num_layers=2|200;"
        "resnet20|mnist5k||100")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Row:
    model: str
    data: str
    model_args: dict[str, Any]
    steps: int

    @property
    def label(self) -> str:
        def short(ref: str) -> str:  # file.py:factory -> file:factory
            return f"{Path(ref.split(':')[0]).stem}:{ref.split(':')[1]}" if ":" in ref else ref

        args = ",".join(f"{k}={v}" for k, v in self.model_args.items())
        return f"{short(self.model)}{'[' + args + ']' if args else ''}/{short(self.data).split(':')[0]}"


def parse_rows(text: str) -> list[Row]:
    from hwprune.models import parse_model_args

    rows = []
    for part in filter(None, text.split(";")):
        model, data, args, steps = part.split("|")
        rows.append(Row(model, data, parse_model_args(args or None), int(steps)))
    return rows


class FlopsPricer:
    """Prices a policy by its MACs (formats ignored), in ms at the dense model's measured ms per MAC."""

    def __init__(self, inner: Any, ms_per_mac: float) -> None:
        self.inner, self.table, self.ms_per_mac = inner, inner.table, ms_per_mac

    def price(self, policy: Any, by_layer: bool = False) -> Any:
        from hwprune.policy import Policy

        p = self.inner.price(Policy(dict(policy.keep), {}, policy.channel_multiple, policy.model))
        return SimpleNamespace(latency_ms=p.macs * self.ms_per_mac, macs=p.macs)

    def runnable(self, policy: Any) -> Any:
        """Every policy runs: this pricer searches fp32 only (formats are ignored)."""
        return policy


def flops_prepare(dense_ms: float):  # type: ignore[no-untyped-def]
    """A ``prepare`` for run_search that swaps the table predictor for :class:`FlopsPricer` (fp32 only)."""
    from hwprune.errors import HwpruneError
    from hwprune.policy import Policy
    from hwprune.search.budget import parse_budget
    from hwprune.search.context import prepare_context

    def prepare(spec: Any, logf: Any) -> Any:
        ctx = prepare_context(dataclasses.replace(spec, budget="100%"), logf)  # floor checked below, by FLOPs
        ctx.spec = spec
        dense = ctx.predictor.price(Policy(channel_multiple=spec.channel_multiple))
        ctx.predictor = FlopsPricer(ctx.predictor, dense_ms / dense.macs)
        ctx.menus = {}
        ctx.margin = 0.0  # FLOPs are priced up to the budget: the table's calibration errors say nothing of them
        ctx.dense_ms = dense_ms
        ctx.budget_ms = parse_budget(spec.budget, dense_ms)
        floor = ctx.price_ms(ctx.smallest())
        if floor > ctx.budget_ms:
            raise HwpruneError(f"budget {ctx.budget_ms:.4f} ms cannot be met by FLOPs: the smallest policy is "
                               f"{floor:.4f} ms-equivalent")
        return ctx
    return prepare


class Bench:
    """One model row: the dense model, data, target and a latency cache by architecture."""

    def __init__(self, row: Row, args: argparse.Namespace) -> None:
        import torch

        from hwprune.latency.targets import get_target
        from hwprune.models import default_latency_batch
        from hwprune.search.context import dense_setup
        from hwprune.search.spec import SearchSpec
        from hwprune.train import few_batches

        self.row, self.args = row, args
        self.spec = SearchSpec(model=row.model, data=row.data, model_args=row.model_args, budget="100%",
                               finetune_steps=row.steps, tables=args.tables, batch_size=args.batch_size)
        self.setup = dense_setup(self.spec, log)
        self.target = get_target("cpu", threads=1)
        self.target.setup()
        self.batch = args.batch_size or default_latency_batch(row.model)
        torch.manual_seed(0)
        self.x = torch.randn(self.batch, *self.setup.input_shape)
        self.batches = few_batches(self.setup.data.train)
        self._lat: dict[str, tuple[float, float]] = {}

    def measure(self, policy: Any, repeats: int, tag: str = "scan") -> tuple[float, float]:
        """(median ms, spread %) of the deployed, pruned model; cached by what it builds and ``tag``.

        Final latencies are a measurement of their own (tag ``final``), not the scan's that chose the policy.
        """
        from hwprune.apply import apply_policy
        from hwprune.apply.formats import deploy
        from hwprune.latency.profiler import measure_model
        from hwprune.space import build_space

        units = policy.units(build_space(self.setup.model, self.setup.example, []))
        key = json.dumps([units, policy.formats, repeats, tag], sort_keys=True)
        if key not in self._lat:
            model = apply_policy(self.setup.model, policy, self.setup.example, batches=self.batches)
            deployed, _ = deploy(model.eval(), "cpu", self.setup.example)
            t = measure_model(deployed, self.x, self.target, repeats)
            self._lat[key] = (t.median_us / 1e3, t.spread_pct)
        return self._lat[key]

    def scan(self, policies: list[tuple[float, Any]], budget_ms: float) -> dict[str, Any]:
        """The first (largest) policy whose measured latency meets the budget."""
        t0 = time.time()
        for knob, pol in policies:
            ms, _ = self.measure(pol, self.args.scan_repeats)
            if ms <= budget_ms:
                return {"policy": pol.to_dict(), "knob": knob, "scan_ms": ms, "seconds": round(time.time() - t0, 1)}
        return {"infeasible": f"no ratio down to {policies[-1][0]:.4f} meets {budget_ms:.4f} ms measured",
                "seconds": round(time.time() - t0, 1)}

    def uniform(self, budget_ms: float) -> dict[str, Any]:
        from hwprune.policy import Policy
        from hwprune.space import build_space

        groups = [g.name for g in build_space(self.setup.model, self.setup.example, []).groups]
        pols = [(k / 32, Policy({g: k / 32 for g in groups}, {}, 8, self.row.model)) for k in range(32, 1, -1)]
        return self.scan(pols, budget_ms)

    def global_magnitude(self, budget_ms: float) -> dict[str, Any]:
        import torch

        from hwprune.apply import unit_scores
        from hwprune.policy import Policy

        scores = unit_scores(self.setup.model, self.setup.example, importance="l1")
        norm = {g: s / s.mean().clamp_min(1e-12) for g, s in scores.items()}
        everything = torch.sort(torch.cat(list(norm.values())), descending=True).values
        pols = []
        for k in range(32, 1, -1):
            thr = everything[max(0, math.ceil(k / 32 * len(everything)) - 1)]
            keep = {g: max(1, int((s >= thr).sum())) / len(s) for g, s in norm.items()}
            pols.append((k / 32, Policy(keep, {}, 8, self.row.model)))
        return self.scan(pols, budget_ms)

    def search(self, method: str, budget_ms: float, dense_ms: float, out: Path) -> dict[str, Any]:
        from hwprune.errors import HwpruneError
        from hwprune.search import run_search
        from hwprune.search.context import prepare_context

        spec = dataclasses.replace(self.spec, budget=f"{budget_ms:.6f}ms", trials=self.args.trials,
                                   sampler="random" if method == "random" else "tpe",
                                   uniform_seeds=method != "random", out=str(out), study=out.name)
        prepare = flops_prepare(dense_ms) if method == "flops" else prepare_context
        t0 = time.time()
        try:
            s = run_search(spec, lambda m: None, prepare=prepare)
        except HwpruneError as exc:
            return {"infeasible": str(exc), "seconds": round(time.time() - t0, 1)}
        res = {"seconds": round(time.time() - t0, 1), "trials": s["trials"], "failed": s["failed"],
               "budget_priced": s["budget_ms"]}
        if not s["best"]:
            return {**res, "infeasible": "no feasible trial"}
        pol = json.loads((out / "best_policy.json").read_text())
        res.update(policy=pol, search_val_accuracy=s["best"]["accuracy"],
                   priced=s["best"]["predicted_latency_ms"], trial=s["best"]["trial"])
        if method == "hwprune":
            import csv

            rows = [r for r in csv.DictReader(open(out / "trials.csv")) if r["state"] == "COMPLETE"]
            res["int8_trials"] = sum(1 for r in rows if "int8" in r["formats"])
            res["complete_trials"] = len(rows)
        return res

    def finals(self, policy_dict: dict[str, Any], seeds: list[int], cache: dict[str, Any]) -> dict[str, Any]:
        """Fine-tune the policy with each seed, deploy, test accuracy; measured latency once."""
        from hwprune.apply.formats import deploy
        from hwprune.export import finetune_policy
        from hwprune.policy import Policy
        from hwprune.train import evaluate

        key = json.dumps(policy_dict, sort_keys=True)
        if key in cache:
            return cache[key]
        pol = Policy.from_dict(policy_dict)
        data = self.setup.data
        test = data.test if data.test is not None else data.val
        accs = []
        for s in seeds:
            model = finetune_policy(self.setup.model, pol, self.setup.example, data.train, self.args.final_steps,
                                    seed=s, batches=self.batches)
            deployed, _ = deploy(copy.deepcopy(model).eval(), "cpu", self.setup.example)
            accs.append(evaluate(deployed, test))
        ms, spread = self.measure(pol, self.args.repeats, "final")
        cache[key] = {"test_accuracies": accs, "mean": statistics.mean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "measured_ms": ms, "spread_pct": spread}
        return cache[key]

    def int8_report(self, menus: dict[str, list[str]]) -> dict[str, Any] | None:
        """Dense fp32 against dense with int8 on every layer that offers it: measured latency, test accuracy."""
        from hwprune.apply import apply_policy
        from hwprune.apply.formats import deploy
        from hwprune.policy import Policy
        from hwprune.train import evaluate

        fmts = {layer: "int8" for layer, menu in menus.items() if "int8" in menu}
        if not fmts:
            return None
        data = self.setup.data
        test = data.test if data.test is not None else data.val
        out = {"layers": sorted(fmts)}
        for name, pol in (("fp32", Policy({}, {}, 8)), ("int8", Policy({}, fmts, 8))):
            model, _ = deploy(apply_policy(self.setup.model, pol, self.setup.example).eval(), "cpu", self.setup.example)
            ms, spread = self.measure(pol, self.args.repeats)
            out[name] = {"measured_ms": ms, "spread_pct": spread, "test_accuracy": evaluate(model, test)}
        out["speedup"] = out["fp32"]["measured_ms"] / out["int8"]["measured_ms"]
        return out


def run_row(row: Row, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from hwprune.policy import Policy

    b = Bench(row, args)
    dense_ms, dense_spread = b.measure(Policy({}, {}, 8), args.repeats, "dense")
    seeds = list(range(args.seeds))
    cache: dict[str, Any] = {}
    dense_final = b.finals(Policy({}, {}, 8).to_dict(), seeds, cache)  # the dense model fine-tuned alike
    out: dict[str, Any] = {"row": row.label, "model": row.model, "data": row.data, "model_args": row.model_args,
                           "batch": b.batch, "search_finetune_steps": row.steps, "dense_ms": dense_ms,
                           "dense_spread_pct": dense_spread, "dense": dense_final, "budgets": {}}
    menus: dict[str, list[str]] = {}
    for frac in args.budgets:
        budget = frac * dense_ms
        log(f"[{row.label}] budget {frac:.0%} = {budget:.4f} ms measured (dense {dense_ms:.4f} ms)")
        res: dict[str, Any] = {"budget_ms": budget}
        for method in METHODS:
            if method == "uniform":
                r = b.uniform(budget)
            elif method == "global":
                r = b.global_magnitude(budget)
            else:
                d = work / f"{Path(row.model.split(':')[0]).stem}-{int(frac * 100)}-{method}"
                r = b.search(method, budget, dense_ms, d)
                if method == "hwprune" and (d / "run.json").exists():
                    menus = json.loads((d / "run.json").read_text())["menus"]
            if "policy" in r:
                r["final"] = b.finals(r["policy"], seeds, cache)
                r["met_budget"] = r["final"]["measured_ms"] <= budget
            res[method] = r
            f = r.get("final")
            log(f"  {method:8s} " + (f"test {f['mean']:.4f} ± {f['std']:.4f}  {f['measured_ms']:.4f} ms "
                                      f"({'met' if r['met_budget'] else 'MISSED'})  {r['seconds']} s"
                                      if f else f"infeasible: {r['infeasible']}"))
        out["budgets"][f"{frac:g}"] = res
    out["int8"] = b.int8_report(menus)
    return out


def verdicts(row: dict[str, Any]) -> list[str]:
    """Per budget: does hwprune beat each baseline on mean test accuracy (misses and infeasible lose)?"""
    lines = []
    for frac, res in row["budgets"].items():
        h = res["hwprune"]
        hv = h["final"]["mean"] if h.get("met_budget") else None
        parts = []
        for m in METHODS[1:]:
            r = res[m]
            v = r["final"]["mean"] if r.get("met_budget") else None
            if hv is None and v is None:
                parts.append(f"{m}: both without a point")
            elif hv is None:
                parts.append(f"{m}: **loses** (hwprune has no point in budget)")
            elif v is None:
                parts.append(f"{m}: wins ({m} {'missed' if 'final' in r else 'infeasible'})")
            else:
                d = hv - v
                parts.append(f"{m}: {'wins' if d > 0 else 'ties' if d == 0 else '**loses**'} ({d * 100:+.2f} pts)")
        lines.append(f"- {row['row']} at {float(frac):.0%}: " + "; ".join(parts))
    return lines


def _fmt(r: dict[str, Any]) -> tuple[str, str, str, str]:
    f = r.get("final")
    if not f:
        return "—", "—", "infeasible", f"{r.get('seconds', 0)}"
    acc = f"{f['mean']:.4f} ± {f['std']:.4f}"
    ms = f"{f['measured_ms']:.4f} ({f['spread_pct']:.1f}%)"
    return acc, ms, "yes" if r["met_budget"] else "**MISSED**", f"{r['seconds']}"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, cmd: str, fp: dict[str, Any],
           versions: dict[str, str], wall: float) -> list[str]:
    lines = ["# Search quality at equal measured budgets", "", f"Command: `{cmd}`", "",
             f"Machine: {fp}", "", f"Versions: {versions}", "",
             f"Trials per search: {args.trials}; final fine-tune: {args.final_steps} steps one-shot, seeds "
             f"{list(range(args.seeds))}, test split; latency: median of {args.repeats} (scans {args.scan_repeats}), "
             f"1 thread, deployed model. Wall time of the whole run: {wall / 60:.1f} min.", ""]
    for row in rows:
        d = row["dense"]
        lines += [f"## {row['row']} (batch {row['batch']}; dense {row['dense_ms']:.4f} ms measured, "
                  f"test {d['mean']:.4f} ± {d['std']:.4f} after the same fine-tune)", "",
                  "| budget | method | test acc (mean ± std) | measured ms (spread) | met | search s | policy |",
                  "|---|---|---|---|---|---|---|"]
        for frac, res in row["budgets"].items():
            for m in METHODS:
                r = res[m]
                acc, ms, met, secs = _fmt(r)
                pol = r.get("policy")
                desc = (", ".join(f"{k}={v:g}" for k, v in sorted(pol["keep"].items())) +
                        ("; " + ", ".join(f"{k}:{v}" for k, v in sorted(pol["formats"].items()))
                         if pol.get("formats") else "")) if pol else r.get("infeasible", "")
                lines.append(f"| {float(frac):.0%} = {res['budget_ms']:.4f} ms | {m} | {acc} | {ms} | {met} | "
                             f"{secs} | {desc} |")
        lines.append("")
        if row.get("int8"):
            q = row["int8"]
            picks = [f"{float(fr):.0%}: {res['hwprune'].get('int8_trials', 0)}/{res['hwprune'].get('complete_trials', 0)}"
                     f" trials, best {'uses' if 'int8' in json.dumps(res['hwprune'].get('policy', {})) else 'no'} int8"
                     for fr, res in row["budgets"].items()]
            lines += [f"int8 (dynamic, on {', '.join(q['layers'])}) against fp32, dense weights, no fine-tune: "
                      f"{q['fp32']['measured_ms']:.4f} → {q['int8']['measured_ms']:.4f} ms = **{q['speedup']:.2f}×**, "
                      f"test {q['fp32']['test_accuracy']:.4f} → {q['int8']['test_accuracy']:.4f}. "
                      f"hwprune picked int8 in: {'; '.join(picks)}.", ""]
    lines += ["## Verdicts (hwprune's best point against each method, mean test accuracy; a miss or no point "
              "loses)", ""]
    for row in rows:
        lines += verdicts(row)
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = {"hwprune": "*", "uniform": "o", "global": "s", "random": "^", "flops": "D"}
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for m in METHODS:
            pts = [(r[m]["final"]["measured_ms"], r[m]["final"]["mean"], r[m]["final"]["std"], r[m]["met_budget"])
                   for r in row["budgets"].values() if r[m].get("final")]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=marks[m],
                            label=m, ms=9 if m == "hwprune" else 6, alpha=0.85, capsize=2,
                            mfc="none" if m != "hwprune" else None)
        for r in row["budgets"].values():
            ax.axvline(r["budget_ms"], color="grey", ls=":", lw=0.8)
        ax.set_title(row["row"], fontsize=9)
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=ROWS, help="model|data|model_args|search_steps;... (default: the four "
                                                 "built-in rows)")
    ap.add_argument("--budgets", default="0.3,0.5,0.7", help="fractions of the dense measured latency")
    ap.add_argument("--trials", type=int, default=10, help="trials per search (hwprune, random, flops)")
    ap.add_argument("--final-steps", type=int, default=200, help="fine-tune steps of every final model")
    ap.add_argument("--seeds", type=int, default=3, help="final fine-tunes per policy")
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats of a final latency")
    ap.add_argument("--scan-repeats", type=int, default=15, help="timed repeats while scanning uniform/global")
    ap.add_argument("--tables", default="latency_tables")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the report goes")
    ap.add_argument("--work", default=None, help="run directories of the searches (default runs/bench-quality-<time>)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 trials, 20 steps, 2 seeds, one budget")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.final_steps, args.seeds, args.repeats, args.scan_repeats = 3, 20, 2, 5, 3
        args.budgets = "0.7" if args.budgets == ap.get_default("budgets") else args.budgets
    args.budgets = [float(b) for b in args.budgets.split(",")]
    import optuna
    import torch

    work = Path(args.work or ROOT / "runs" / f"bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = [run_row(r, args, work) for r in parse_rows(args.rows)]
    wall = time.time() - t0
    from hwprune.latency.targets import get_target

    fp = get_target("cpu", threads=1).fingerprint()
    versions = {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__}
    cmd = "python bench/search_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = report(rows, args, cmd, fp, versions, wall)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    md = write_results("search_quality", fp, {"args": {k: v for k, v in vars(args).items()}, "versions": versions,
                                              "wall_seconds": wall, "rows": rows}, lines, results)
    plot(rows, md.with_suffix(".png"))
    print("\n".join(lines))
    log(f"wrote {md} (+ .json, .png) in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
