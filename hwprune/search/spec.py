"""Search specs: the same fields as ``hwprune search`` flags, as YAML in ``search/``.

Parsed with ``yaml.safe_load`` into :class:`SearchSpec`; unknown keys and wrong
types are errors naming the key, the value and what is accepted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError

__all__ = ["SearchSpec", "load_spec", "SAMPLERS", "BACKENDS", "COSTS", "OBJECTIVES"]

SAMPLERS = ("tpe", "nsga2", "random")
BACKENDS = ("local", "ray")
COSTS = ("sensitivity", "importance")
OBJECTIVES = ("metric", "front")


@dataclass
class SearchSpec:
    """Everything a search needs; CLI flags override fields loaded from a spec file."""

    model: str = ""
    data: str = ""
    target: str = "cpu"
    budget: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    finetune_steps: int = 100
    lr: float = 1e-3
    batch_size: int | None = None
    threads: int = 1
    channel_multiple: int = 8
    exclude: list[str] = field(default_factory=list)
    importance: str = "l1"
    early_stop_margin: float = 0.05
    uniform_seeds: bool = True
    tables: str | None = None
    table: str | None = None
    allow_foreign_table: bool = False
    profile: bool = True
    budget_margin: float | None = None
    storage: str | None = None
    study: str | None = None
    out: str | None = None
    backend: str = "local"
    ray_address: str | None = None
    workers: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    device: str = "auto"  # where base training and fine-tunes run: auto (GPU if any), cpu, cuda
    runtime: str = "eager"  # how the deployed model runs on the target: eager, compile (cuda: also cudagraph)
    heartbeat_interval: float = 30.0  # seconds between renewals of a running trial's lease
    heartbeat_grace: float = 120.0  # a trial of another host whose lease is older than this is failed as stale
    task: str | None = None  # classification, language-model or file.py:factory (None: the data's own task)
    train_batch_size: int = 128  # the fine-tunes' batch (the latency batch is batch_size)
    val_subset: int | None = None  # trials score on this many validation items (fixed, seeded); export uses all
    num_classes: int | None = None  # a built-in model's outputs when the data does not expose its class count
    screen: int = 4  # repaired samples ranked by the cheap proxy per fine-tune (hwprune.search.screen); 0: none
    keep_levels: int = 16  # keep ratios searched: multiples of 1/N beside the table's grid, measured on demand; 0: grid
    costs: str = "sensitivity"  # cost of a cut: measured by the proxy ('sensitivity') or counted ('importance')
    objective: str = "metric"  # what the sampler maximizes: the metric under the budget, or the 'front' (2 objectives)
    seed_trials: int = 3  # the best-screened seeds of the portfolio that are fine-tuned (the fp32 uniform one always)
    finish: int = 3  # the best trials timed against the dense model at the end (this machine the target); 0: none
    grow: bool = True  # with the finish: grow the best into the headroom it measures (one more fine-tune)
    gate: bool = True  # with the finish: time each proposal before its fine-tune; one measured over is shrunk
    way_out: bool = True  # a budget below the floor: measure what would reach it before refusing (seconds)
    depth: bool = False  # blocks the model can lose whole are searched too: 'drop' is one more level of a group
    distill: float = 0.0  # weight of the dense model's outputs in every fine-tune's loss (0: the task's loss only)
    race: int = 3  # under a budget: successive halving at the checkpoints, the best 1/race go on; 0: no racing

    def validate(self) -> None:
        from hwprune.search.budget import parse_budget

        for name in ("model", "data", "budget"):
            if not getattr(self, name):
                raise HwpruneError(f"search needs --{name} (or '{name}:' in the spec)")
        parse_budget(self.budget, dense_ms=1.0)  # syntax first: nothing is trained or read for a typo
        if self.screen < 0:
            raise HwpruneError(f"screen must be 0 (no proxy) or a number of candidates per fine-tune, got "
                               f"{self.screen}")
        if self.keep_levels != 0 and not 2 <= self.keep_levels <= 128:
            raise HwpruneError(f"keep_levels must be 0 (the table's grid only) or 2 to 128 (keep ratios in steps of "
                               f"1/N), got {self.keep_levels}")
        for key, allowed in (("costs", COSTS), ("objective", OBJECTIVES)):
            if getattr(self, key) not in allowed:
                raise HwpruneError(f"unknown {key} {getattr(self, key)!r}; known: {', '.join(allowed)}")
        if self.seed_trials < 1 or self.finish < 0:
            raise HwpruneError(f"seed_trials must be >= 1 (no seeds: --no-uniform-seeds) and finish >= 0 (0: no "
                               f"measured finish), got {self.seed_trials} and {self.finish}")
        if self.race < 0 or self.race == 1:
            raise HwpruneError(f"race must be 0 (no racing) or >= 2 (the best 1/race of a checkpoint go on), got "
                               f"{self.race}")
        if self.trials < 1:
            raise HwpruneError(f"trials must be at least 1, got {self.trials}")
        if self.train_batch_size < 1 or (self.val_subset is not None and self.val_subset < 1) or \
                (self.num_classes is not None and self.num_classes < 1):
            raise HwpruneError(f"train_batch_size, val_subset and num_classes must be positive integers, got "
                               f"{self.train_batch_size}, {self.val_subset} and {self.num_classes}")
        if self.finetune_steps < 0:
            raise HwpruneError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if not 0 <= self.distill <= 1:
            raise HwpruneError(f"distill must be a weight in [0, 1] (0: no distillation; 0.5: half the loss from the "
                               f"dense model's outputs), got {self.distill}")
        if not 0 <= self.early_stop_margin <= 1:
            raise HwpruneError(f"early_stop_margin must be in [0, 1] (0: never stop a fine-tune early), "
                               f"got {self.early_stop_margin}")
        if self.workers < 1:
            raise HwpruneError(f"workers must be at least 1, got {self.workers}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise HwpruneError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {self.cpus_per_trial} "
                               f"and {self.gpus_per_trial}")
        if self.budget_margin is not None and not 0 <= self.budget_margin < 1:
            raise HwpruneError(f"budget_margin must be in [0, 1) (a share of the budget kept free for prediction "
                               f"error, e.g. 0.05; 0 prices up to the budget), got {self.budget_margin}")
        if not 0 < self.heartbeat_interval < self.heartbeat_grace:
            raise HwpruneError(f"heartbeat_interval must be > 0 and below heartbeat_grace, got "
                               f"{self.heartbeat_interval} and {self.heartbeat_grace}")
        from hwprune.tasks import TASK_NAMES
        from hwprune.factory import is_factory_ref
        from hwprune.train import resolve_device

        if self.task is not None and self.task not in TASK_NAMES and not is_factory_ref(self.task):
            raise HwpruneError(f"unknown task {self.task!r}; known: {', '.join(TASK_NAMES)}, or path/to/file.py:factory")

        resolve_device(self.device)  # a name it knows, and a GPU here if one is asked: before anything runs
        if self.sampler not in SAMPLERS:
            raise HwpruneError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.backend not in BACKENDS:
            raise HwpruneError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")

    @property
    def name(self) -> str:
        """A default study / run name: model-data-target-budget."""
        short = lambda s: Path(s.split(":")[0]).stem if ":" in s else s  # noqa: E731
        budget = "".join(c for c in str(self.budget) if c.isalnum() or c == ".").replace("%", "pct")
        return self.study or f"{short(self.model)}-{short(self.data)}-{self.target}-{budget}"

    def identity(self) -> dict[str, Any]:
        """The fields that define the study (a run directory holds exactly one)."""
        keep = ("model", "data", "target", "budget", "model_args", "weights", "sampler", "seed", "finetune_steps",
                "lr", "batch_size", "threads", "channel_multiple", "exclude", "importance")
        ident = {k: getattr(self, k) for k in keep}
        if self.budget_margin is not None:  # the automatic margin (None) keeps run directories of older versions
            ident["budget_margin"] = self.budget_margin
        if self.runtime != "eager":  # likewise: eager runs of older versions resume
            ident["runtime"] = self.runtime
        if self.task is not None:
            ident["task"] = self.task
        for k, default in (("train_batch_size", 128), ("val_subset", None), ("num_classes", None),
                           ("early_stop_margin", 0.05), ("uniform_seeds", True), ("device", "auto"),
                           ("costs", "sensitivity"), ("objective", "metric"), ("seed_trials", 3), ("depth", False),
                           ("distill", 0.0)):
            if getattr(self, k) != default:  # the defaults keep run directories of older versions
                ident[k] = getattr(self, k)
        sources = self.sources()
        if sources:  # built-in models and data have none: their runs keep older versions' identity
            ident["sources"] = sources
        return ident

    def sources(self) -> dict[str, str]:
        """Digests of what the references point at (the model, data and task files, the --weights file), beside
        the reference strings: an edited ``my_model.py`` or a replaced weights file is another study."""
        from hwprune._io import file_digest
        from hwprune.factory import source_digest

        out = {k: source_digest(getattr(self, k) or "") for k in ("model", "data", "task")}
        if self.weights:
            out["weights"] = file_digest(self.weights)
        return {k: v for k, v in out.items() if v}

    def public(self) -> dict[str, Any]:
        """The spec as plain data for run.json, logs and workers: a storage URL's password masked."""
        from hwprune._io import mask_url

        return {**vars(self), "storage": mask_url(self.storage)}


_TYPES: dict[str, tuple[type, ...]] = {}
for _f in dataclasses.fields(SearchSpec):
    _t = str(_f.type)
    _TYPES[_f.name] = ((int,) if _t.startswith("int") else (float, int) if _t.startswith("float")
                       else (bool,) if _t == "bool" else (dict,) if _t.startswith("dict")
                       else (list,) if _t.startswith("list") else (str,))


def _check(key: str, value: Any, source: str) -> Any:
    if value is None and key in ("weights", "batch_size", "storage", "study", "out", "ray_address", "table", "tables",
                                 "budget_margin", "task", "val_subset", "num_classes"):
        return None
    want = _TYPES[key]
    if key == "budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise HwpruneError(f"{source}: budget {value!r} needs a unit: 10ms, 800us, 0.01s or 50%")
    if isinstance(value, bool) and bool not in want:
        ok = False
    else:
        ok = isinstance(value, want)
    if not ok:
        raise HwpruneError(f"{source}: '{key}' must be {' or '.join(t.__name__ for t in want)}, "
                           f"got {value!r} ({type(value).__name__})")
    if key == "exclude" and not all(isinstance(v, str) for v in value):
        raise HwpruneError(f"{source}: 'exclude' must be a list of layer names, got {value!r}")
    return value


def load_spec(path: str | Path) -> SearchSpec:
    """Read a YAML spec (``yaml.safe_load``) into a :class:`SearchSpec`."""
    import yaml

    p = Path(path)
    src = f"spec {str(p)!r}"
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise HwpruneError(f"{src} does not exist") from None
    except yaml.YAMLError as exc:
        raise HwpruneError(f"{src} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise HwpruneError(f"{src} must be a mapping of field: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(SearchSpec)}
    for key in data:
        if key not in known:
            raise HwpruneError(f"{src}: unknown key {key!r}; known: {', '.join(sorted(known))}")
    return SearchSpec(**{k: _check(k, v, src) for k, v in data.items()})
