"""Training the dense base model, short fine-tunes, evaluation, and the model cache."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hwprune import inputs
from hwprune._io import write_atomic
from hwprune._modelcopy import copy_model, release_graph
from hwprune.errors import HwpruneError

__all__ = ["TrainConfig", "DEFAULT_EPOCHS", "train_model", "finetune", "evaluate", "resolve_device", "is_device_name",
           "cache_dir", "cache_key",
           "load_cached", "save_cached", "train_and_cache", "few_batches", "subset", "has_batchnorm",
           "recalibrate_batchnorm", "refresh_batchnorm", "BN_BATCHES"]

BN_BATCHES = 8  # training batches a fine-tune's BatchNorm statistics are re-estimated on before any evaluation

# epochs that reach the accuracies of docs/cli.md for each built-in model
DEFAULT_EPOCHS = {"cnn1d": 40, "resnet20": 12, "mobilenetv2": 12, "lstm": 30, "gru": 30, "lstm-lm": 10}


@dataclass
class TrainConfig:
    """How the dense model is trained (AdamW, one-cycle learning rate)."""

    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 128
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    task: Any = None  # hwprune.tasks.Task (None: classification)


def is_device_name(name: str) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has it is :func:`resolve_device`'s check)."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_device_name(name):
        raise HwpruneError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HwpruneError(f"device {name!r} asked, and torch sees no CUDA device here (torch {torch.__version__}); "
                           f"use --device cpu or auto")
    return torch.device(name)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _workers(ds: Dataset) -> int:
    """DataLoader workers: none for in-memory tensors (a worker only adds a copy), else up to 4 (one core left)."""
    import os

    from torch.utils.data import Subset, TensorDataset

    base = ds.dataset if isinstance(ds, Subset) else ds
    if isinstance(base, TensorDataset):
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _loader(ds: Dataset, batch: int, shuffle: bool, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    workers = _workers(ds)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g, drop_last=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 512, task: Any = None) -> float:
    """The task's metric of ``model`` on ``ds`` (default: top-1 accuracy), batch by batch on the device the
    model is on."""
    from hwprune.tasks import get_task

    model.eval()
    with torch.inference_mode():
        return get_task(task).evaluate(model, _loader(ds, batch_size, False, 0), _device_of(model))


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, x: Any, y: torch.Tensor,
          step: int, task: Any = None, teacher: nn.Module | None = None, distill: float = 0.0) -> float:
    """One optimizer step on the task's loss (gradients clipped at norm 5); returns the loss. With a ``teacher``
    the loss is ``(1 - distill) * task loss + distill * task.distill(output, teacher's output)``."""
    from hwprune.tasks import get_task

    dev = _device_of(model)
    x, y = inputs.to_device(x, dev, non_blocking=True), y.to(dev, non_blocking=True)
    t = get_task(task)
    out = inputs.call(model, x)
    loss = t.loss(out, y)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            soft = inputs.call(teacher, x)
        loss = (1.0 - distill) * loss + distill * t.distill(out, soft, y)
    if not torch.isfinite(loss):
        raise HwpruneError(f"training loss became {float(loss.detach())} at step {step}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def train_model(model: nn.Module, train: Dataset, val: Dataset, cfg: TrainConfig,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``model`` in place on ``cfg.device``; returns a summary with per-epoch val accuracy.

    The model comes back on the device it was on.
    """
    home = _device_of(model)
    model.to(resolve_device(cfg.device))
    try:
        return _train(model, train, val, cfg, log)
    finally:
        model.to(home)


def _train(model: nn.Module, train: Dataset, val: Dataset, cfg: TrainConfig,
           log: Callable[[str], None] | None) -> dict[str, Any]:
    from hwprune.tasks import get_task

    torch.manual_seed(cfg.seed)
    loader = _loader(train, cfg.batch_size, True, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(1, cfg.epochs * len(loader)))
    history, step, t0 = [], 0, time.time()
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            total += _step(model, opt, sched, x, y, step, cfg.task) * len(y)
            step += 1
        release_graph(model)  # a state the model kept from the last step holds its graph
        refresh_batchnorm(model, train, cfg.batch_size, cfg.seed)  # the statistics of this epoch's weights
        acc = evaluate(model, val, task=cfg.task)
        history.append(acc)
        if log:
            eta = (time.time() - t0) / (epoch + 1) * (cfg.epochs - epoch - 1)
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {total / len(train):.4f}  val {get_task(cfg.task).metric} "
                f"{acc:.4f}  eta {eta:.0f}s")
    final = history[-1] if history else evaluate(model, val, task=cfg.task)
    return {f"val_{get_task(cfg.task).metric}": final, "val_history": history,
            "train_seconds": round(time.time() - t0, 1), "steps": step, "device": str(_device_of(model))}


def finetune(model: nn.Module, train: Dataset, steps: int, lr: float = 1e-3, batch_size: int = 128,
             seed: int = 0, callback: Callable[[int], None] | None = None, device: str | None = None,
             task: Any = None, teacher: nn.Module | None = None, distill: float = 0.0) -> nn.Module:
    """A short fine-tune of ``steps`` optimizer steps (Adam, cosine decay), in place.

    With a ``teacher`` (the dense model) and ``distill`` in (0, 1], each step's loss mixes the task's loss with
    the task's distillation loss against the teacher's output (:meth:`hwprune.tasks.Task.distill`), weighted
    ``1 - distill`` and ``distill``. The teacher is copied to the training device and run in eval mode, without
    gradients; the caller's teacher is left as it was.

    Runs on ``device`` (``auto``/``cpu``/``cuda``; None: where the model is), batches moved per step; the
    model comes back on the device it was on. ``callback(step)`` runs after every step (1-based), with the
    model on the training device; it may raise to stop the fine-tune early (and re-estimates BatchNorm
    statistics itself before it evaluates: :func:`refresh_batchnorm`). At the end, the BatchNorm statistics
    are re-estimated on :data:`BN_BATCHES` seeded training batches.
    """
    if not 0.0 <= distill <= 1.0:
        raise HwpruneError(f"distill must be a weight in [0, 1], got {distill}")
    if steps <= 0:  # pruned, not trained: its BatchNorm statistics still describe the dense model's activations
        refresh_batchnorm(model, train, batch_size, seed)
        return model
    home = _device_of(model)
    if device is not None:
        model.to(resolve_device(device))
    soft = None
    if teacher is not None and distill > 0:
        soft = copy_model(teacher).to(_device_of(model)).eval().requires_grad_(False)
    try:
        return _finetune(model, train, steps, lr, batch_size, seed, callback, task, soft, distill)
    finally:
        model.to(home)


def _finetune(model: nn.Module, train: Dataset, steps: int, lr: float, batch_size: int, seed: int,
              callback: Callable[[int], None] | None, task: Any = None, teacher: nn.Module | None = None,
              distill: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loader, it, step = _loader(train, batch_size, True, seed), None, 0
    model.train()
    while step < steps:
        if it is None:
            it = iter(loader)
        try:
            x, y = next(it)
        except StopIteration:
            it = None
            continue
        _step(model, opt, sched, x, y, step, task, teacher, distill)
        step += 1
        if callback is not None:
            callback(step)
            model.train()
    release_graph(model)  # a state the model kept from the last step holds its graph (once: ~1 ms on ResNet-18)
    refresh_batchnorm(model, train, batch_size, seed)  # before anyone evaluates it
    return model


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # and subclasses (timm's BatchNormAct2d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[Any]) -> int:
    """Recompute every BatchNorm layer's running mean and variance as the plain average over ``batches``
    (inputs of ``(inputs, target)`` items); every other layer stays in eval mode. Returns the layers reset."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns or not batches:
        return 0
    was = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        for x, _ in batches:
            inputs.call(model, inputs.to_device(x, dev))
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in was.items():
            m.train(t)
    return len(bns)


def refresh_batchnorm(model: nn.Module, train: Dataset, batch_size: int = 128, seed: int = 0,
                      n: int = BN_BATCHES) -> int:
    """After training, before any evaluation: the BatchNorm statistics re-estimated as the plain average over
    ``n`` seeded training batches (:func:`recalibrate_batchnorm`). A layer built with a small momentum
    (torchvision's MobileNetV3: 0.01) otherwise keeps statistics from before the model was pruned or trained,
    and evaluates near chance while its training loss is low. Returns the layers re-estimated."""
    if not has_batchnorm(model):
        return 0
    return recalibrate_batchnorm(model, few_batches(train, n=n, batch_size=batch_size, seed=seed))


def cache_dir() -> Path:
    """Where trained base models live: ``$HWPRUNE_CACHE``, else the user's cache dir (``~/.cache/hwprune``)."""
    from hwprune._io import cache_root

    return cache_root()


def cache_key(model: str, data: str, seed: int, model_args: dict[str, Any], task: Any = None) -> str:
    """A file-name-safe key from model, data, seed, model arguments and task (readable prefix + hash).

    The task (a name, a :class:`hwprune.tasks.Task` or None) enters the hash unless it is classification, so
    the keys of classifiers cached before tasks existed are unchanged; a model trained for another task on
    the same model and data is another entry. User code (``file.py:factory`` models, data and tasks) enters
    with its source file's content: an edited file is trained again, never served the old file's weights.
    """
    from hwprune.factory import source_digest
    from hwprune.tasks import get_task

    name = get_task(task).name
    sources = [d for d in (source_digest(model), source_digest(data), source_digest(name)) if d]
    blob = json.dumps([model, data, seed, model_args] + ([] if name == "classification" else [name]) +
                      ([sources] if sources else []), sort_keys=True)
    short = lambda s: Path(s.split(":")[0]).stem if ":" in s else s  # noqa: E731
    return f"{short(model)}-{short(data)}-s{seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def few_batches(ds: Dataset, n: int = 4, batch_size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches drawn at random (seeded) from ``ds``: real inputs and labels for data-driven importance
    (on data sorted by label, the first batches would hold one class). Reads ``n * batch_size`` items."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: n * batch_size].tolist()
    from torch.utils.data import Subset

    # its own generator: a DataLoader without one draws its base seed from the global RNG, which would move a
    # fine-tune's later dropout masks when BatchNorm statistics are re-estimated at a checkpoint
    return [b for b in DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False,
                                  generator=torch.Generator().manual_seed(seed))]


def subset(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A fixed random (seeded) subset of ``n`` items of ``ds`` (``ds`` itself when n is None or not smaller)."""
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    from torch.utils.data import Subset

    g = torch.Generator().manual_seed(seed)
    return Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:n].tolist()))  # type: ignore[arg-type]


def save_cached(key: str, model: nn.Module, summary: dict[str, Any]) -> Path:
    """Write weights and summary atomically; the summary records where the weights are."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_atomic(d / f"{key}.pt", buf.getvalue())
    summary["weights"] = str(d / f"{key}.pt")
    write_atomic(d / f"{key}.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return d / f"{key}.pt"


def train_and_cache(model: nn.Module, data: Any, model_ref: str, data_ref: str, seed: int,
                    model_args: dict[str, Any], cfg: TrainConfig,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the dense base model in place, evaluate it on the test split (val if none) and cache it.

    ``data`` is a :class:`hwprune.data.DataBundle`. ``hwprune train`` and a
    search that finds no trained model both come here, so the cache holds one kind of entry.
    """
    import dataclasses

    from hwprune.tasks import get_task

    task = get_task(cfg.task if cfg.task is not None else getattr(data, "task", None))
    cfg = dataclasses.replace(cfg, task=task)
    summary = train_model(model, data.train, data.val, cfg, log=log)
    test = data.test if data.test is not None else data.val
    summary.update({"model": model_ref, "data": data_ref, "seed": seed, "epochs": cfg.epochs,
                    "model_args": model_args, f"test_{task.metric}": evaluate(model, test, task=task),
                    "task": task.name, "metric": task.metric, "direction": task.direction,
                    "test_split": "test" if data.test is not None else "val"})
    save_cached(cache_key(model_ref, data_ref, seed, model_args, task), model, summary)
    return summary


def load_cached(key: str) -> tuple[Path, dict[str, Any]] | None:
    """The cached weights path and summary for ``key``, if both exist and are readable."""
    d = cache_dir()
    pt, js = d / f"{key}.pt", d / f"{key}.json"
    if not (pt.is_file() and js.is_file()):
        return None
    try:
        return pt, {**json.loads(js.read_text()), "weights": str(pt)}
    except (json.JSONDecodeError, OSError):
        print(f"hwprune: ignoring unreadable cache entry {js}", file=sys.stderr)
        return None


