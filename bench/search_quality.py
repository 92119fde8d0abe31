"""Search quality at equal *measured* latency: hwprune against the peers' own code and simple baselines.

For each model row and each budget (a share of the dense model's latency, *measured* here in interleaved
rounds with the dense model, batch of the row's table, 1 thread), each method chooses a pruned model:

  hwprune    the search: a screened portfolio of seeds, a single-objective sampler with local moves, candidates
             projected to the priced limit, costs of cutting measured by the proxy, a measured finish
  hwprune-fp32  the same search with every layer in fp32 (formats kept out: what the search finds by widths alone)
  hwprune-depth the same search with --depth: blocks the model can lose whole may be dropped too (issue 36)
  knapsack   hwprune's latency knapsack alone (fp32) over the measured costs of cutting: the least cost under the
             priced limit, its entries measured and the headroom filled as the search's seeds are; no fine-tune
             spent choosing
  uniform    one keep ratio for every group, fp32: the largest ratio, in steps of 1/32, whose measured
             latency meets the budget
  tp-global  Torch-Pruning's own pruner (``tp.pruner.BasePruner``, global pruning, isomorphic, round_to 8,
             group L2 magnitude, its defaults otherwise; the output layer ignored): its pruning ratio bisected
             until the pruned model measures under the budget
  fastnas    NVIDIA ModelOpt FastNAS (``mtp.prune(mode="fastnas")``, its default search space with channels
             rounded to 8 instead of 32, score: validation accuracy on 512 items):
             its FLOPs constraint bisected until the pruned model measures under the budget (models without
             RNN layers; needs the ``bench`` extra)
  random     the search with the random sampler and no seeds, N trials
  flops      the search pricing candidates by FLOPs instead of the table, fp32 only

Uniform, tp-global and fastnas are tuned against measured latency (prune, measure, adjust: what a user does
by hand with a tool that has no latency model); the searches and the knapsack against their cost model.
Every chosen model then gets the same fine-tune of F steps from its pruned weights with each seed (the same
data order, learning rate and batch), is deployed (real int8 kernels where a policy has int8) and evaluated
on the test split; its latency is measured once more, in interleaved rounds against the dense model: the
median of the per-round ratios. A model whose ratio exceeds the budget is a miss, not a point. The searches
run once (seed 0); the seeds are the final fine-tunes'. Writes bench/results/<name>_<fingerprint>.{md,json,png}.

    python bench/search_quality.py                          # cnn1d and ResNet-20 (make bench)
    python bench/search_quality.py --rows mobilenetv2 --name search_quality_mobilenetv2
    python bench/search_quality.py --rows rnn --name search_quality_rnn   # the 2-layer GRU and LSTM
    python bench/search_quality.py --rows lm --name search_quality_lm     # the LSTM language model
    python bench/search_quality.py --quick ...              # the test suite's smoke run
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import ROOT, write_results  # noqa: E402

METHODS = ("hwprune", "hwprune-fp32", "hwprune-depth", "knapsack", "uniform", "tp-global", "fastnas", "random", "flops")
SEARCHES = ("hwprune", "hwprune-fp32", "hwprune-depth", "random", "flops")  # methods run once per search seed
# model | data | model_args | search fine-tune steps  (the built-in specs' steps)
ROW_SETS = {
    "cnn": "cnn1d|mnist1d||150;resnet20|mnist5k||100",
    "mobilenetv2": "mobilenetv2|mnist5k||100",
    "rnn": "gru|mnist1d|num_layers=2|200;lstm|mnist5k|num_layers=2|200",
    "lm": "lstm-lm|pydoc||60",
}


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
        self.inner, self.table, self.key, self.ms_per_mac = inner, inner.table, inner.key, ms_per_mac

    def price(self, policy: Any, by_layer: bool = False) -> Any:
        from hwprune.policy import Policy

        p = self.inner.price(Policy(dict(policy.keep), {}, policy.channel_multiple, policy.model))
        return SimpleNamespace(latency_ms=p.macs * self.ms_per_mac, macs=p.macs)

    def runnable(self, policy: Any) -> Any:
        """Every policy runs: this pricer searches fp32 only (formats are ignored)."""
        return policy


def flops_prepare(dense_ms: float | None):  # type: ignore[no-untyped-def]
    """A ``prepare`` for run_search that swaps the table predictor for :class:`FlopsPricer` (fp32 only); FLOPs
    are put in ms at ``dense_ms`` for the dense model (None: its predicted latency; a share-of-dense budget is
    the same share of FLOPs either way)."""
    from hwprune.errors import HwpruneError
    from hwprune.policy import Policy
    from hwprune.search.budget import parse_budget
    from hwprune.search.context import prepare_context

    def prepare(spec: Any, logf: Any) -> Any:
        ctx = prepare_context(dataclasses.replace(spec, budget="100%"), logf)  # floor checked below, by FLOPs
        ctx.spec = spec
        dense = ctx.predictor.price(Policy(channel_multiple=spec.channel_multiple))
        ms = dense_ms or ctx.dense_ms
        ctx.predictor = FlopsPricer(ctx.predictor, ms / dense.macs)
        ctx.meter = None  # FLOPs need no table entries: keep ratios off the grid are priced as they are
        ctx.menus = {}
        ctx.margin = 0.0  # FLOPs are priced up to the budget: the table's calibration errors say nothing of them
        ctx.dense_ms = ms
        ctx.budget_ms = parse_budget(spec.budget, ms)
        floor = ctx.price_ms(ctx.smallest())
        if floor > ctx.budget_ms:
            raise HwpruneError(f"budget {ctx.budget_ms:.4f} ms cannot be met by FLOPs: the smallest policy is "
                               f"{floor:.4f} ms-equivalent")
        return ctx
    return prepare


def fp32_prepare(spec: Any, logf: Any) -> Any:
    """A ``prepare`` for run_search that searches widths only: every layer's menu is fp32."""
    from hwprune.search.context import prepare_context

    ctx = prepare_context(spec, logf)
    ctx.menus = {}
    return ctx


def _last_layer(model: Any, example: Any) -> Any:
    from hwprune.search.portfolio import output_layer

    return output_layer(model, example)


def _search_knob(measure: Any, grid: list[float], steps: int) -> dict[str, Any]:
    """A peer's knob tuned on measured latency: ``grid`` runs from least to most pruning; the first value that
    fits is found by a scan along it, then bisected against the value before it (``steps`` halvings).
    ``measure(knob)`` returns the measured ratio to dense, or raises (the peer cannot produce that model: a
    constraint outside its search space, an unsupported layer). Returns ``knob`` (the least pruning that fits;
    None if none) and the ``trace`` of (knob, ratio or error)."""
    trace: list[Any] = []

    def fits(k: float) -> bool:
        try:
            r = measure(k)
        except Exception as exc:  # noqa: BLE001 - the peer's limits are results
            trace.append((k, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"))
            return False
        trace.append((k, round(r, 4)))
        return r <= measure.frac

    def bisect(a: float, b: float, n: int) -> float:  # a does not fit, b fits
        for _ in range(n):
            mid = (a + b) / 2
            if fits(mid):
                b = mid
            else:
                a = mid
        return b

    prev = None
    for k in grid:
        before = len(trace)
        if fits(k):
            return {"knob": bisect(prev, k, steps) if prev is not None else k, "trace": trace}
        if isinstance(trace[before][1], str) and prev is not None:
            # the peer cannot go as far as k (FastNAS: "NOT all constraints can be satisfied"): its own limit lies
            # between prev (runs, too slow) and k; bisect for the most pruning it can produce, like any knob
            a, b = prev, k
            for i in range(steps):
                mid = (a + b) / 2
                n = len(trace)
                if fits(mid):
                    return {"knob": bisect(a, mid, steps - i - 1), "trace": trace}
                if isinstance(trace[n][1], str):
                    b = mid
                else:
                    a = mid
            return {"knob": None, "trace": trace}
        prev = k
    return {"knob": None, "trace": trace}


class Bench:
    """One model row: the dense model, data, task, target, and latency measured against the dense model."""

    def __init__(self, row: Row, args: argparse.Namespace) -> None:
        import torch

        from hwprune.device.deploy import deploy
        from hwprune.latency.profiler import timing_batch
        from hwprune.device.targets import get_target
        from hwprune.models import default_latency_batch
        from hwprune.search.context import dense_setup
        from hwprune.search.spec import SearchSpec
        from hwprune.train import few_batches, subset

        self.row, self.args = row, args
        self.spec = SearchSpec(model=row.model, data=row.data, model_args=row.model_args, budget="100%",
                               finetune_steps=row.steps, tables=args.tables, batch_size=args.batch_size)
        self.setup = dense_setup(self.spec, log)
        self.task = self.setup.task
        self.target = get_target("cpu", threads=1)
        self.target.setup()
        self.batch = args.batch_size or default_latency_batch(row.model)
        torch.manual_seed(0)
        self.x = timing_batch(self.setup.example, self.batch, self.setup.timing_pool())
        self.batches = few_batches(self.setup.data.train)
        self.dense_deployed, _ = deploy(copy.deepcopy(self.setup.model).eval(), "cpu", self.setup.example)
        self.val512 = subset(self.setup.data.val, 512, 0)
        self._lat: dict[str, dict[str, Any]] = {}
        self._built: dict[tuple[str, float], Any] = {}
        self._fastnas_gave_up = ""

    def versus_dense(self, model: Any, rounds: int, key: str | None = None) -> dict[str, Any]:
        """``model`` timed in interleaved rounds with the dense model: the median of the per-round ratios (and
        their IQR, the noise of this comparison), and both medians in ms."""
        from hwprune.latency.profiler import measure_rounds, model_sampler
        from hwprune.latency.rounds import RoundPlan

        if key is not None and key in self._lat:
            return self._lat[key]
        res = measure_rounds({"c": model_sampler(model, self.x, self.target),
                              "d": model_sampler(self.dense_deployed, self.x, self.target)}, self.target,
                             RoundPlan(rounds=rounds, extra_rounds=0, seed=len(self._lat)))
        c, d = res.samples["c"], res.samples["d"]
        ratios = sorted(a / b for a, b in zip(c, d))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        out = {"ratio": statistics.median(ratios), "ratio_iqr": q[2] - q[0], "ms": res.timing("c").median_us / 1e3,
               "dense_ms": res.timing("d").median_us / 1e3, "spread_pct": res.spread_pct("c"), "rounds": rounds}
        if key is not None:
            self._lat[key] = out
        return out

    def deployed(self, policy: Any) -> Any:
        from hwprune.apply import apply_policy
        from hwprune.device.deploy import deploy

        model = apply_policy(self.setup.model, policy, self.setup.example, batches=self.batches,
                             loss=self.task.loss)
        return deploy(model.eval(), "cpu", self.setup.example)[0]

    def policy_ratio(self, policy: Any, rounds: int, tag: str = "scan") -> dict[str, Any]:
        from hwprune.space import build_space

        units = policy.units(build_space(self.setup.model, self.setup.example, []))
        key = json.dumps([units, policy.formats, rounds, tag], sort_keys=True)
        if key in self._lat:
            return self._lat[key]
        return self.versus_dense(self.deployed(policy), rounds, key)

    # ---- methods tuned against measured latency ---------------------------------------------------------

    def uniform(self, frac: float) -> dict[str, Any]:
        from hwprune.policy import Policy
        from hwprune.space import build_space

        t0 = time.time()
        groups = [g.name for g in build_space(self.setup.model, self.setup.example, []).groups]
        for k in range(32, 1, -1):
            pol = Policy({g: k / 32 for g in groups}, {}, 8, self.row.model)
            m = self.policy_ratio(pol, self.args.scan_repeats)
            if m["ratio"] <= frac:
                return {"policy": pol.to_dict(), "knob": k / 32, "scan_ratio": m["ratio"],
                        "seconds": round(time.time() - t0, 1)}
        return {"infeasible": f"no ratio down to 2/32 measures under {frac:.0%} of dense",
                "seconds": round(time.time() - t0, 1)}

    def tp_model(self, ratio: float) -> Any:
        """The dense model pruned by Torch-Pruning's own global, isomorphic pruner at ``ratio``."""
        import torch
        import torch_pruning as tp

        from hwprune import inputs

        model = copy.deepcopy(self.setup.model).eval()
        ex = self.setup.example
        want = inputs.call(model, ex).shape
        pruner = tp.pruner.BasePruner(model, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=True, isomorphic=True, pruning_ratio=ratio, round_to=8,
                                      ignored_layers=[_last_layer(model, ex)])
        pruner.step()
        with torch.no_grad():
            got = inputs.call(model.eval(), ex).shape
        if got != want:
            raise RuntimeError(f"the pruned model's output is {tuple(got)}, not {tuple(want)}")
        return model

    def tp_global(self, frac: float) -> dict[str, Any]:
        t0 = time.time()

        def measure(r: float) -> float:
            return self.versus_dense(self.build(("tp", r)), self.args.scan_repeats, f"tp:{r:.5f}")["ratio"]

        measure.frac = frac  # type: ignore[attr-defined]
        got = _search_knob(measure, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], self.args.bisect_steps)
        return self._knob_result("tp", "pruning ratio", got, frac, t0)

    def _knob_result(self, kind: str, knob: str, got: dict[str, Any], frac: float, t0: float) -> dict[str, Any]:
        secs = round(time.time() - t0, 1)
        if got["knob"] is None:
            errors = [v for _, v in got["trace"] if isinstance(v, str)]
            if len(errors) == len(got["trace"]):
                return {"unsupported": errors[0], "bisection": got["trace"], "seconds": secs}
            return {"infeasible": f"no {knob} tried measures under {frac:.0%} of dense", "bisection": got["trace"],
                    "seconds": secs}
        return {"model": [kind, got["knob"]], "knob": round(got["knob"], 5), "bisection": got["trace"],
                "seconds": secs}

    def fastnas_model(self, flops_pct: float) -> Any:
        """FastNAS's model at ``flops_pct``, run in a forked child with ``--fastnas-timeout`` seconds (its
        pre-search scores every channel choice of every layer: on MobileNetV2 at 1 thread it had not finished
        one constraint after 8 minutes); a time-out raises, so the bisection records it as the peer's limit."""
        import multiprocessing as mp
        import pickle

        if self._fastnas_gave_up:  # one time-out per row is enough to know
            raise TimeoutError(self._fastnas_gave_up)
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)

        def work() -> None:
            try:
                child.send_bytes(pickle.dumps(("ok", self._fastnas_here(flops_pct))))
            except BaseException as exc:  # noqa: BLE001 - sent to the parent as the peer's error
                child.send_bytes(pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))

        proc = ctx.Process(target=work, daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(self.args.fastnas_timeout):
                self._fastnas_gave_up = f"FastNAS did not finish within {self.args.fastnas_timeout:g} s at 1 thread"
                raise TimeoutError(self._fastnas_gave_up)
            status, payload = pickle.loads(parent.recv_bytes())
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
        if status != "ok":
            raise RuntimeError(payload)
        return payload

    def _fastnas_here(self, flops_pct: float) -> Any:
        import modelopt.torch.prune as mtp
        from torch.utils.data import DataLoader

        from hwprune.train import evaluate

        model = copy.deepcopy(self.setup.model)
        loader = DataLoader(self.setup.data.train, batch_size=128, shuffle=True)
        ckpt = Path(self.args.work_dir) / f"fastnas-{Path(self.row.model.split(':')[0]).stem}.pth"
        from modelopt.torch.prune.fastnas import _get_fastnas_default_rules

        rules = {}  # its default search space (ratios 0.05..1) at divisor 8, as hwprune's and Torch-Pruning's
        for kind, rule in _get_fastnas_default_rules().items():  # rounding (its default 32 leaves a 64-channel
            rule = dict(rule)  # layer two choices)
            for k in ("channel_divisor", "feature_divisor"):
                if k in rule:
                    rule[k] = 8
            rules[kind] = {"*": rule}
        pruned, _ = mtp.prune(model, mode=[("fastnas", rules)], constraints={"flops": f"{flops_pct:.2f}%"},
                              dummy_input=self.setup.example,
                              config={"data_loader": loader, "checkpoint": str(ckpt),
                                      "score_func": lambda m: evaluate(m, self.val512, task=self.task)})
        dyn = [type(m).__name__ for m in pruned.modules() if "Dynamic" in type(m).__name__]
        if dyn:
            raise RuntimeError(f"FastNAS left dynamic modules: {dyn[:3]}")
        return pruned.eval()

    def fastnas(self, frac: float) -> dict[str, Any]:
        from hwprune.space import is_recurrent

        t0 = time.time()
        if is_recurrent(self.setup.model):
            return {"unsupported": "FastNAS prunes Conv/Linear/BatchNorm, not RNN layers", "seconds": 0.0}
        try:
            import modelopt.torch.prune  # noqa: F401
        except ImportError as exc:
            return {"unsupported": f"nvidia-modelopt not installed ({exc}); pip install -e '.[bench]'",
                    "seconds": 0.0}
        import contextlib
        import io
        import warnings

        def measure(pct: float) -> float:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = self.build(("fastnas", pct))
            return self.versus_dense(model, self.args.scan_repeats, f"fastnas:{pct:.3f}")["ratio"]

        measure.frac = frac  # type: ignore[attr-defined]
        got = _search_knob(measure, [90.0, 75.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 5.0], self.args.bisect_steps)
        return self._knob_result("fastnas", "FLOPs constraint", got, frac, t0)

    # ---- methods tuned against their cost model ----------------------------------------------------------

    def knapsack(self, frac: float) -> dict[str, Any]:
        from hwprune.errors import HwpruneError
        from hwprune.search.context import prepare_context
        from hwprune.search.portfolio import knapsack_seed

        t0 = time.time()
        spec = dataclasses.replace(self.spec, budget=f"{frac * 100:g}%", screen=0)
        try:
            ctx = prepare_context(spec, lambda m: None)
        except HwpruneError as exc:
            return {"infeasible": str(exc), "seconds": round(time.time() - t0, 1)}
        pol = knapsack_seed(ctx, "fp32")
        if pol is None:
            return {"infeasible": "no fp32 allocation under the priced limit", "seconds": round(time.time() - t0, 1)}
        pol, _ = ctx.settle(pol, lambda m: None)  # keep ratios off the grid: measured, then repaired and filled
        return {"policy": pol.to_dict(), "priced": ctx.price_ms(pol), "seconds": round(time.time() - t0, 1)}

    def search(self, method: str, frac: float, out: Path, seed: int = 0) -> dict[str, Any]:
        from hwprune.errors import HwpruneError
        from hwprune.search import run_search
        from hwprune.search.context import prepare_context

        ours = method.startswith("hwprune")
        spec = dataclasses.replace(self.spec, budget=f"{frac * 100:g}%", trials=self.args.trials,
                                   sampler="random" if method == "random" else "tpe",
                                   uniform_seeds=method != "random", out=str(out), study=out.name,
                                   screen=self.args.screen if ours else 0, seed=seed,
                                   race=self.args.race if ours else 0,  # random search as a user runs it: no racing
                                   depth=method == "hwprune-depth",  # blocks dropped whole as well (--depth)
                                   weights=self.setup.weights)  # one dense model: the seed varies the search only
        prepare = flops_prepare(None) if method == "flops" else fp32_prepare if method == "hwprune-fp32" else \
            prepare_context
        t0 = time.time()
        try:
            s = run_search(spec, lambda m: None, prepare=prepare)
        except HwpruneError as exc:
            return {"infeasible": str(exc), "seconds": round(time.time() - t0, 1)}
        res = {"seconds": round(time.time() - t0, 1), "trials": s["trials"], "failed": s["failed"],
               "budget_priced": s["budget_ms"], "screen": s.get("screen"), "repaired": s["repaired"]}
        if not s["best"]:
            return {**res, "infeasible": "no feasible trial"}
        pol = json.loads((out / "best_policy.json").read_text())
        res.update(policy=pol, search_val=s["best"][self.task.metric], priced=s["best"]["predicted_latency_ms"],
                   trial=s["best"]["trial"], best_seed=next((p["seed"] for p in s["pareto"]
                                                             if p["trial"] == s["best"]["trial"]), ""))
        import csv

        rows = list(csv.DictReader(open(out / "trials.csv")))
        done = [r for r in rows if r["state"] == "COMPLETE" and not r.get("duplicate_of")]
        stopped = [r for r in rows if r["state"] == "PRUNED"]
        res["finetunes"] = {"complete": len(done), "stopped_early": len(stopped), "steps_each": self.row.steps,
                            "steps": round(s.get("finetunes", len(done) + len(stopped)) * self.row.steps)}
        res["int8_trials"] = sum(1 for r in done if "int8" in r["formats"])
        res["complete_trials"] = len(done)
        res["finish"] = s.get("finish")
        res["gate"] = s.get("gate")  # proposals timed before their fine-tune, and how many were shrunk
        return res

    # ---- the same final fine-tune for every chosen model -------------------------------------------------

    def finals(self, r: dict[str, Any], seeds: list[int], cache: dict[str, Any]) -> dict[str, Any]:
        """Fine-tune the chosen model with each seed, deploy, test metric; latency against dense ``--final-timings``
        times, one after each fine-tune (seconds apart), the timing with the median ratio kept: on a 2-core VM one
        30-round timing during a burst of load (the dense model at 5.9 ms instead of 3.8) put a policy timed
        0.24x before at 0.306x. The same rule for every method."""
        from hwprune.device.deploy import deploy
        from hwprune.export import finetune_policy
        from hwprune.policy import Policy
        from hwprune.train import evaluate, finetune

        data = self.setup.data
        test = data.test if data.test is not None else data.val
        key = json.dumps(r.get("policy") or list(r["model"]), sort_keys=True)
        if key in cache:
            return cache[key]
        scores, timings = [], []
        pol = Policy.from_dict(r["policy"]) if "policy" in r else None
        timed = self.deployed(pol) if pol is not None else self.build(r["model"])
        for i, s in enumerate(seeds):
            if pol is not None:
                model = finetune_policy(self.setup.model, pol, self.setup.example, data.train, self.args.final_steps,
                                        seed=s, batches=self.batches, task=self.task)
                model, _ = deploy(copy.deepcopy(model).eval(), "cpu", self.setup.example)
            else:
                model = self.build(r["model"])
                finetune(model, data.train, self.args.final_steps, seed=s, task=self.task)
                model.eval()
            scores.append(evaluate(model, test, task=self.task))
            if i < self.args.final_timings:
                timings.append(self.versus_dense(timed, self.args.repeats, f"final:{key}:{i}"))
        while len(timings) < self.args.final_timings:  # fewer seeds than timings
            timings.append(self.versus_dense(timed, self.args.repeats, f"final:{key}:{len(timings)}"))
        lat = sorted(timings, key=lambda m: m["ratio"])[(len(timings) - 1) // 2]  # the median timing (the lower)
        lat = {**lat, "timings": [{"ratio": round(m["ratio"], 4), "dense_ms": round(m["dense_ms"], 4)}
                                  for m in timings]}
        cache[key] = {"test": scores, "mean": statistics.mean(scores),
                      "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, **lat, "widths": self.widths(pol, r)}
        return cache[key]

    def widths(self, pol: Any, r: dict[str, Any]) -> dict[str, int]:
        """The chosen model's widths: units kept per group (a policy), or every Conv/Linear layer's outputs (a
        peer's model)."""
        from torch import nn

        from hwprune.space import build_space

        if pol is not None:  # a group inside a dropped block (hwprune-depth): 0
            return pol.widths(build_space(self.setup.model, self.setup.example, []))
        return {n: getattr(m, "out_channels", getattr(m, "out_features", 0))
                for n, m in self.build(r["model"]).named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}

    def build(self, what: tuple[str, float] | list[Any]) -> Any:
        """A copy of the model a peer built at ``knob`` (kept from its bisection: FastNAS's search is not
        rebuilt, so the model fine-tuned and timed is the one the bisection timed)."""
        kind, knob = what
        key = (kind, float(knob))
        if key not in self._built:
            self._built[key] = self.tp_model(knob) if kind == "tp" else self.fastnas_model(knob)
        return copy.deepcopy(self._built[key])


def run_row(row: Row, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from hwprune.policy import Policy

    b = Bench(row, args)
    seeds = list(range(args.seeds))
    cache: dict[str, Any] = {}
    dense_final = b.finals({"policy": Policy({}, {}, 8).to_dict()}, seeds, cache)  # the dense model, same fine-tune
    task = b.task
    out: dict[str, Any] = {"row": row.label, "model": row.model, "data": row.data, "model_args": row.model_args,
                           "batch": b.batch, "search_finetune_steps": row.steps, "metric": task.metric,
                           "direction": task.direction, "dense_ms": dense_final["dense_ms"], "dense": dense_final,
                           "test_items": len(b.setup.data.test if b.setup.data.test is not None else b.setup.data.val),
                           "budgets": {}}
    stem = Path(row.model.split(":")[0]).stem
    for frac in args.budgets:
        log(f"[{row.label}] budget {frac:.0%} of the dense latency (dense {dense_final['dense_ms']:.4f} ms)")
        res: dict[str, Any] = {}
        for method in args.methods:
            if method == "uniform":
                r = b.uniform(frac)
            elif method == "tp-global":
                r = b.tp_global(frac)
            elif method == "fastnas":
                r = b.fastnas(frac)
            elif method == "knapsack":
                r = b.knapsack(frac)
            else:
                runs = [b.search(method, frac, work / f"{stem}-{int(frac * 100)}-{method}-s{i}", seed=i)
                        for i in range(args.search_seeds)]
                r = combine(runs, [b.finals(x, seeds, cache) if "policy" in x else None for x in runs], frac)
                res[method] = r
                f = r.get("final")
                log(f"  {method:9s} " + (f"test {task.metric} {f['mean']:.4f} ± {f['std']:.4f} over {len(f['test'])} "
                                         f"(search x final seeds), ratios "
                                         f"{[x['final']['ratio'] for x in runs if 'final' in x]}"
                                         f", misses {r['misses']}" if f else f"no point: {r.get('infeasible')}"))
                continue
            if "policy" in r or "model" in r:
                r["final"] = b.finals(r, seeds, cache)
                r["met_budget"] = r["final"]["ratio"] <= frac
                # still a miss; said when the excess is under half the IQR of the per-round ratios
                r["miss_in_noise"] = not r["met_budget"] and r["final"]["ratio"] - frac < r["final"]["ratio_iqr"] / 2
            res[method] = r
            f = r.get("final")
            log(f"  {method:9s} " + (f"test {task.metric} {f['mean']:.4f} ± {f['std']:.4f}  {f['ratio']:.3f}× dense "
                                     f"(IQR {f['ratio_iqr']:.3f}, {'met' if r['met_budget'] else 'MISSED'})  "
                                     f"{r['seconds']} s" if f else
                                     f"{'unsupported' if 'unsupported' in r else 'infeasible'}: "
                                     f"{r.get('unsupported') or r.get('infeasible')}"))
        out["budgets"][f"{frac:g}"] = res
    return out


def combine(runs: list[dict[str, Any]], finals: list[Any], frac: float) -> dict[str, Any]:
    """A search method over several search seeds: each run's chosen model with its finals; the method's sample is
    every final score of every run that met the budget (search seed x final seed); a run over the budget is a
    miss (its scores are not in the sample)."""
    scores, misses = [], 0
    for r, f in zip(runs, finals):
        if f is None:
            continue
        r["final"] = f
        r["met_budget"] = f["ratio"] <= frac
        misses += int(not r["met_budget"])
        if r["met_budget"]:
            scores += f["test"]
    out: dict[str, Any] = {"runs": runs, "misses": misses, "seconds": round(sum(r.get("seconds", 0) for r in runs), 1)}
    if not any("final" in r for r in runs):
        out["infeasible"] = next((r.get("infeasible") for r in runs if r.get("infeasible")), "no point")
        return out
    met = [r for r in runs if r.get("met_budget")]
    if not met:  # every run missed: the method's point is a miss
        worst = max((r for r in runs if "final" in r), key=lambda r: r["final"]["ratio"])
        out.update(final=worst["final"], met_budget=False, policy=worst.get("policy"))
        return out
    ratios = [r["final"]["ratio"] for r in met]
    out.update(final={"test": scores, "mean": statistics.mean(scores),
                      "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                      "ratio": max(ratios), "ratio_iqr": max(r["final"]["ratio_iqr"] for r in met),
                      "ms": max(r["final"]["ms"] for r in met), "ratios": ratios},
               met_budget=misses == 0, policy=met[0].get("policy"))
    return out


def welch(a: list[float], b: list[float]) -> float:
    """Welch's t of mean(a) - mean(b) (unequal variances); +-inf when both are constant and differ, 0 when equal."""
    from scipy.stats import ttest_ind

    ma, mb = statistics.mean(a), statistics.mean(b)
    if len(a) < 2 or len(b) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
        return 0.0 if ma == mb else math.copysign(math.inf, ma - mb)
    return float(ttest_ind(a, b, equal_var=False).statistic)


def verdict(row: dict[str, Any], mine: dict[str, Any], other: dict[str, Any]) -> tuple[str, float, float]:
    """win, tie or loss of ``mine`` against ``other`` in one cell, by Welch's t on the final test scores (higher
    is better; a tie when |t| < 2 or the means differ by less than two test items); a method without a point in
    budget loses to one with a point. Returns (verdict, difference of means, t)."""
    a, b = _score(row, mine), _score(row, other)
    if a is None and b is None:
        return "both without a point", 0.0, 0.0
    if a is None:
        return "loss", -math.inf, -math.inf
    if b is None:
        return "win", math.inf, math.inf
    sign = 1 if row["direction"] == "max" else -1
    xa, xb = [sign * v for v in mine["final"]["test"]], [sign * v for v in other["final"]["test"]]
    t, d = welch(xa, xb), a - b
    item = 2.0 / row.get("test_items", 1e9) if row["metric"] != "perplexity" else 0.0
    if abs(t) < 2 or abs(d) < item:
        return "tie", d, t
    return ("win" if d > 0 else "loss"), d, t


def _score(row: dict[str, Any], r: dict[str, Any]) -> float | None:
    """A method's mean test metric as a score (higher is better), None without a point in the budget."""
    if not r.get("met_budget") and not (r.get("runs") and "ratios" in r.get("final", {})):
        return None  # a search with some runs in budget keeps their scores (its misses are counted apart)
    return r["final"]["mean"] if row["direction"] == "max" else -r["final"]["mean"]


def verdicts(row: dict[str, Any], methods: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """Per budget: hwprune against each other method (:func:`verdict`: Welch's t on the final test scores);
    counts of cells where hwprune has no loss, the cells any method has a point in, hwprune's wins and losses, and
    its misses (search runs whose chosen model measured over the budget)."""
    lines, count = [], {"best": 0, "cells": 0, "misses": 0, "wins": 0, "losses": 0}
    for frac, res in row["budgets"].items():
        mine = res["hwprune"]
        count["misses"] += mine.get("misses", int("final" in mine and not mine.get("met_budget")))
        others = {m: res[m] for m in methods if m != "hwprune" and m in res}
        if _score(row, mine) is not None or any(_score(row, r) is not None for r in others.values()):
            count["cells"] += 1
        parts, lost = [], False
        for m, r in others.items():
            v, d, t = verdict(row, mine, r)
            lost |= v == "loss"
            count["wins"] += v == "win"
            count["losses"] += v == "loss"
            unit = 100 if row["metric"] != "perplexity" else 1
            num = "" if not math.isfinite(d) else f" ({d * unit:+.2f}{' pts' if unit == 100 else ''}, t {t:+.1f})"
            why = "" if math.isfinite(d) or v.startswith("both") else (
                " (hwprune has no point in budget)" if v == "loss" else
                f" ({m} {'missed' if 'final' in r else 'unsupported' if 'unsupported' in r else 'infeasible'})")
            parts.append(f"{m}: {'**loss**' if v == 'loss' else v}{num}{why}")
        count["best"] += int(not lost and _score(row, mine) is not None)
        lines.append(f"- {row['row']} at {float(frac):.0%}: " + "; ".join(parts))
    return lines, count


def _fmt(r: dict[str, Any]) -> tuple[str, str, str, str]:
    f = r.get("final")
    if not f:
        return "—", "—", "unsupported" if "unsupported" in r else "infeasible", f"{r.get('seconds', 0)}"
    acc = f"{f['mean']:.4f} ± {f['std']:.4f}"
    ms = f"{f['ratio']:.3f}× (IQR {f['ratio_iqr']:.3f}; {f['ms']:.4f} ms)"
    met = "yes" if r["met_budget"] else "**MISSED**" + (" (within the IQR)" if r.get("miss_in_noise") else "")
    return acc, ms, met, f"{r['seconds']}"


def _describe(r: dict[str, Any]) -> str:
    if r.get("runs"):
        parts = []
        for i, x in enumerate(r["runs"]):
            f = x.get("final")
            if not f:
                parts.append(f"s{i}: no point")
                continue
            w = ",".join(str(v) for v in f.get("widths", {}).values())
            fm = ";".join(f"{k}:{v}" for k, v in sorted((x.get("policy") or {}).get("formats", {}).items()))
            ft = x.get("finetunes", {})
            steps = f", {ft['steps']} steps" if "steps" in ft else ""
            fin = x.get("finish") or {}
            extra = len(fin.get("rescored", []))  # the finish's re-scores (its grown trial is in trials.csv)
            grown = (fin.get("grown") or {}).get("trial") is not None
            parts.append(f"s{i}: [{w}]{' ' + fm if fm else ''} {f['ratio']:.3f}× {f['mean']:.4f}"
                         f" ({ft.get('complete', '?')}+{ft.get('stopped_early', '?')} fine-tunes"
                         f"{steps}"
                         f"{' incl. 1 grown' if grown else ''}{f' + {extra} re-scores' if extra else ''}, "
                         f"dropped {len(fin.get('dropped', []))}, seed {x.get('best_seed') or 'no'})")
        return " / ".join(parts)
    f = r.get("final") or {}
    if f.get("widths"):
        return "[" + ",".join(str(v) for v in f["widths"].values()) + "]" + (
            f" (knob {r['knob']})" if "knob" in r else "") + (
            "; " + ", ".join(f"{k}:{v}" for k, v in sorted((r.get("policy") or {}).get("formats", {}).items()))
            if (r.get("policy") or {}).get("formats") else "")
    pol = r.get("policy")
    if pol:
        return (", ".join(f"{k}={v:g}" for k, v in sorted(pol["keep"].items())) +
                ("; " + ", ".join(f"{k}:{v}" for k, v in sorted(pol["formats"].items())) if pol.get("formats") else ""))
    if "model" in r:
        return f"{'pruning ratio' if r['model'][0] == 'tp' else 'FLOPs constraint %'} {r['knob']}"
    return str(r.get("unsupported") or r.get("infeasible", ""))[:160]


def report(rows: list[dict[str, Any]], args: argparse.Namespace, cmd: str, fp: dict[str, Any],
           versions: dict[str, str], wall: float) -> list[str]:
    methods = tuple(args.methods)
    lines = ["# Search quality at equal measured latency", "", f"Command: `{cmd}`", "",
             f"Machine: {fp}", "", f"Versions: {versions}", "",
             f"Trials per search: {args.trials} (hwprune screens {args.screen} proposals per fine-tune); final "
             f"fine-tune: {args.final_steps} steps from the chosen model's pruned weights, seeds "
             f"{list(range(args.seeds))}, test split. Latency: the chosen model deployed and timed in "
             f"{args.repeats} interleaved rounds with the dense model (bisections and scans: {args.scan_repeats}), "
             f"{args.final_timings} such timings (one after each final fine-tune), the median one kept; "
             f"'× dense' is the median of the per-round ratios, its IQR the noise of that comparison; a budget "
             f"is met when the ratio is at most the budget's share. 1 thread. Wall time of the whole run: "
             f"{wall / 60:.1f} min.", ""]
    lines += summary_table(rows, methods) + [""]
    totals = {"best": 0, "cells": 0, "misses": 0, "wins": 0, "losses": 0}
    all_verdicts: list[str] = []
    for row in rows:
        d = row["dense"]
        lines += [f"## {row['row']} (batch {row['batch']}; dense {row['dense_ms']:.4f} ms measured, test "
                  f"{row['metric']} {d['mean']:.4f} ± {d['std']:.4f} after the same fine-tune)", "",
                  f"| budget | method | test {row['metric']} (mean ± std) | latency × dense | met | method s | "
                  f"choice |", "|---|---|---|---|---|---|---|"]
        for frac, res in row["budgets"].items():
            for m in methods:
                if m not in res:
                    continue
                acc, ms, met, secs = _fmt(res[m])
                lines.append(f"| {float(frac):.0%} | {m} | {acc} | {ms} | {met} | {secs} | {_describe(res[m])} |")
        lines.append("")
        corr = [f"{float(fr):.0%}: {res['hwprune']['screen']}" for fr, res in row["budgets"].items()
                if res.get("hwprune", {}).get("screen")]
        if corr:
            lines += ["Screen (proxy against fine-tuned validation score over the search's trials): "
                      + "; ".join(corr), ""]
        v, c = verdicts(row, methods)
        all_verdicts += v
        for k in totals:
            totals[k] += c[k]
    lines += ["## Verdicts (hwprune's search against each method: Welch's t on the final test scores, search x final "
              "seeds; |t| < 2 or a difference under two test items is a tie; a method without a point in budget "
              "loses to one with a point)", "",
              f"hwprune without a loss in **{totals['best']} of {totals['cells']}** cells where any method has a "
              f"point; {totals['wins']} wins, {totals['losses']} losses over all pairings; hwprune's misses (search "
              f"runs over the budget as measured): **{totals['misses']}**.", ""] + all_verdicts
    return lines


def summary_table(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> list[str]:
    """One line per row and budget: each method's mean test metric @ measured latency / dense (a miss struck
    through, the best point in budget in bold); the table docs/results.md quotes."""
    out = ["| model | budget | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in rows:
        pct = row["metric"] != "perplexity"
        for frac, res in row["budgets"].items():
            scores = {m: _score(row, res[m]) for m in methods if m in res}
            top = max((v for v in scores.values() if v is not None), default=None)
            cells = []
            for m in methods:
                r = res.get(m, {})
                f = r.get("final")
                if not f:
                    cells.append("unsupported" if "unsupported" in r else "no point")
                    continue
                v = f"{f['mean'] * (100 if pct else 1):.2f} ± {f['std'] * (100 if pct else 1):.2f} @ {f['ratio']:.3f}×"
                if scores[m] is None:
                    v = f"~~{v}~~ missed"
                else:
                    if top is not None and scores[m] == top:
                        v = f"**{v}**"
                    if r.get("misses"):  # a search: the runs in budget make its point, the others are misses
                        v += f" ({r['misses']} of {len(r['runs'])} runs missed)"
                cells.append(v)
            out.append(f"| {row['row']} | {float(frac):.0%} | " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict[str, Any]], path: Path, methods: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = {"hwprune": "*", "hwprune-fp32": "*", "hwprune-depth": "*", "knapsack": "P", "uniform": "o",
             "tp-global": "s", "fastnas": "X",
             "random": "^", "flops": "D"}
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for m in methods:
            pts = [(r[m]["final"]["ratio"], r[m]["final"]["mean"], r[m]["final"]["std"])
                   for r in row["budgets"].values() if m in r and r[m].get("final")]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=marks[m],
                            label=m, ms=9 if m == "hwprune" else 6, alpha=0.85, capsize=2,
                            mfc="none" if m != "hwprune" else None)
        for frac in row["budgets"]:
            ax.axvline(float(frac), color="grey", ls=":", lw=0.8)
        ax.set_title(row["row"], fontsize=9)
        ax.set_xlabel("measured latency / dense")
        ax.set_ylabel(f"test {row['metric']}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="cnn", help="a row set (" + ", ".join(ROW_SETS) + ") or "
                    "model|data|model_args|search_steps;... (default: cnn)")
    ap.add_argument("--methods", default=",".join(METHODS), help="which methods (default all; hwprune first)")
    ap.add_argument("--budgets", default="0.3,0.5,0.7", help="shares of the dense measured latency")
    ap.add_argument("--trials", type=int, default=10, help="trials per search (hwprune, random, flops)")
    ap.add_argument("--screen", type=int, default=4, help="hwprune's proposals screened per fine-tune")
    ap.add_argument("--race", type=int, default=3, help="hwprune's racing (successive halving, the best 1/ETA go on at "
                                                        "a checkpoint; 0: none); random search never races")
    ap.add_argument("--final-steps", type=int, default=200, help="fine-tune steps of every final model")
    ap.add_argument("--seeds", type=int, default=3, help="final fine-tunes per chosen model")
    ap.add_argument("--search-seeds", type=int, default=3, help="searches per search method (seeds 0..N-1), each "
                    "chosen model fine-tuned with every final seed")
    ap.add_argument("--repeats", type=int, default=30, help="interleaved rounds of a final latency")
    ap.add_argument("--final-timings", type=int, default=3,
                    help="separate timings of a chosen model (one after each final fine-tune); the median is its "
                         "latency, the same rule for every method")
    ap.add_argument("--scan-repeats", type=int, default=11, help="rounds per step of a scan or bisection")
    ap.add_argument("--bisect-steps", type=int, default=6, help="bisection steps of a peer's knob")
    ap.add_argument("--fastnas-timeout", type=float, default=300.0, help="seconds one FastNAS run may take")
    ap.add_argument("--tables", default=None, help="latency table folder (default: the user's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--name", default="search_quality", help="report name under --results")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the report goes")
    ap.add_argument("--work", default=None, help="run directories of the searches (default runs/bench-quality-<time>)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 trials, 20 steps, 2 seeds, one budget")
    ap.add_argument("--from-json", default=None, help="re-render the .md and .png of an earlier run's .json")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(Path(args.from_json))
    from hwprune.device.targets import PRIMITIVE_CACHE

    # oneDNN's kernel cache as every hwprune command has it (read once, at its first kernel: set before anything runs)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE))
    if args.quick:
        args.trials, args.final_steps, args.seeds, args.repeats, args.scan_repeats, args.bisect_steps = \
            3, 20, 2, 5, 3, 3
        args.search_seeds = 1
        args.fastnas_timeout = min(args.fastnas_timeout, 60.0)
        args.budgets = "0.7" if args.budgets == ap.get_default("budgets") else args.budgets
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or "hwprune" not in args.methods:
        ap.error(f"--methods {','.join(bad) or args.methods}: known {', '.join(METHODS)}, hwprune included")
    import optuna
    import torch

    work = Path(args.work or ROOT / "runs" / f"bench-quality-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = str(work)
    t0 = time.time()
    from hwprune.device.targets import get_target

    fp = get_target("cpu", threads=1).fingerprint()
    versions = {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                "torch_pruning": _version("torch-pruning"), "nvidia_modelopt": _version("nvidia-modelopt")}
    cmd = "python bench/search_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for r in parse_rows(ROW_SETS.get(args.rows, args.rows)):  # the report is rewritten after every row:
        rows.append(run_row(r, args, work))  # a run stopped later keeps the rows it finished
        wall = time.time() - t0
        lines = report(rows, args, cmd, fp, versions, wall)
        md = write_results(args.name, fp, {"args": {k: v for k, v in vars(args).items()}, "versions": versions,
                                           "wall_seconds": wall, "rows": rows, "command": cmd}, lines, results)
        plot(rows, md.with_suffix(".png"), tuple(args.methods))
    print("\n".join(lines))
    log(f"wrote {md} (+ .json, .png) in {wall / 60:.1f} min")
    return 0


def rerender(js: Path) -> int:
    """The report and plot of a finished run, from its JSON (after a change to the report's layout)."""
    d = json.loads(js.read_text())
    args = argparse.Namespace(**d["args"])
    lines = report(d["rows"], args, d.get("command") or "python bench/search_quality.py " + d.get("argv", ""),
                   d["fingerprint"], d["versions"], d["wall_seconds"])
    js.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(d["rows"], js.with_suffix(".png"), tuple(args.methods))
    print("\n".join(lines))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
