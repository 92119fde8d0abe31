"""Tasks: how a model's output is trained and scored — the loss, the metric, and which way is better.

- ``classification`` (default): cross-entropy on ``(batch, classes)`` outputs and ``(batch,)`` labels;
  metric top-1 ``accuracy``, higher is better.
- ``language-model``: per-token cross-entropy on ``(batch, time, vocab)`` outputs and ``(batch, time)``
  targets, tokens labelled ``-100`` (padding) ignored; metric ``perplexity`` = exp(mean token loss over
  the split), lower is better.
- a user task ``path/to/file.py:factory`` (or ``package.module:factory``) returning a dict (or object)
  with ``loss(output, target) -> scalar tensor``, ``metric(output, target) -> (sum, count)`` (or a float,
  weighted by the batch size), ``direction`` (``max`` or ``min``), optional ``name`` (the metric's name,
  default ``metric``) and ``finalize(mean) -> value`` (default: the mean itself), and optionally
  ``distill(output, teacher_output) -> scalar tensor`` (default: the mean squared error of the two outputs).

Distillation (``--distill``): the two built-in tasks match the dense model's softened distribution (Hinton et
al.'s KL at temperature :data:`TEMPERATURE`, scaled by its square; the language model over the tokens its
loss counts).

The search always maximizes a *score*: the metric where higher is better, minus the metric where lower is
(:meth:`Task.score`); everything shown to the user is the metric itself (:meth:`Task.show`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hwprune import inputs
from hwprune.errors import HwpruneError

__all__ = ["Task", "get_task", "TASK_NAMES", "CLASSIFICATION", "LANGUAGE_MODEL"]


@dataclass(frozen=True)
class Task:
    """A loss, a batch metric reduced over a split, and the metric's direction."""

    name: str
    metric: str
    direction: str  # "max" or "min"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_fn: Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]
    final_fn: Callable[[float], float] = float
    distill_fn: Callable[[Any, Any, torch.Tensor], torch.Tensor] | None = None

    def loss(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(out, y)

    def distill(self, out: Any, teacher: Any, y: torch.Tensor) -> torch.Tensor:
        """How far the student's output ``out`` is from the dense model's ``teacher`` output on targets ``y``."""
        if self.distill_fn is not None:
            return self.distill_fn(out, teacher, y)
        if not isinstance(out, torch.Tensor) or not isinstance(teacher, torch.Tensor):
            raise HwpruneError(f"task {self.name!r}: distillation needs tensor outputs or the task's own "
                               f"'distill(output, teacher_output)'; got {type(out).__name__}")
        return nn.functional.mse_loss(out.float(), teacher.float())

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "max" else -1.0

    def score(self, metric: float) -> float:
        """The value the search maximizes."""
        return self.sign * metric

    def show(self, score: float) -> float:
        """The metric behind a score."""
        return self.sign * score

    def better(self, a: float, b: float) -> bool:
        """Is metric ``a`` better than metric ``b``?"""
        return a > b if self.direction == "max" else a < b

    @property
    def label(self) -> str:
        return f"{self.metric} ({'higher' if self.direction == 'max' else 'lower'} is better)"

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        """The metric of ``model`` over every batch of ``loader`` (on ``device``)."""
        total = count = 0.0
        for x, y in loader:
            x, y = inputs.to_device(x, device, non_blocking=True), y.to(device, non_blocking=True)
            s, n = self.batch_fn(inputs.call(model, x), y)
            total, count = total + float(s), count + float(n)
        if count == 0:
            raise HwpruneError(f"task {self.name!r}: the split has nothing to score (0 counted items)")
        return float(self.final_fn(total / count))


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def _correct(out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    return float((out.argmax(-1) == y).sum()), float(y.numel())


def _lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() != 3 or y.shape != out.shape[:2]:
        raise HwpruneError(f"task 'language-model' needs outputs (batch, time, vocab) and targets (batch, time); "
                           f"got outputs {tuple(out.shape)} and targets {tuple(y.shape)}")
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), ignore_index=-100)


def _lm_batch(out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    if out.dim() != 3 or y.shape != out.shape[:2]:
        _lm_loss(out, y)  # the error
    flat = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), ignore_index=-100,
                                       reduction="sum")
    return float(flat), float((y != -100).sum())


TEMPERATURE = 2.0  # Hinton et al.'s softening of both distributions in distillation


def _soft_kl(out: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the last dim's distributions at :data:`TEMPERATURE`, times its square (so
    its gradients keep the scale of the hard loss's); averaged over the rows ``keep`` selects (all: None)."""
    t = TEMPERATURE
    s, q = out.reshape(-1, out.shape[-1]).float(), teacher.reshape(-1, teacher.shape[-1]).float()
    if keep is not None:
        s, q = s[keep.reshape(-1)], q[keep.reshape(-1)]
    if s.shape[0] == 0:
        return out.sum() * 0.0
    kl = nn.functional.kl_div(nn.functional.log_softmax(s / t, -1), nn.functional.log_softmax(q / t, -1),
                              reduction="batchmean", log_target=True)
    return kl * t * t


def _ce_distill(out: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _soft_kl(out, teacher)


def _lm_distill(out: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _soft_kl(out, teacher, y != -100)


def _perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))


CLASSIFICATION = Task("classification", "accuracy", "max", _ce, _correct, distill_fn=_ce_distill)
LANGUAGE_MODEL = Task("language-model", "perplexity", "min", _lm_loss, _lm_batch, _perplexity, _lm_distill)
_BUILTIN = {t.name: t for t in (CLASSIFICATION, LANGUAGE_MODEL)}
TASK_NAMES = tuple(_BUILTIN)


def _user_task(ref: str) -> Task:
    from hwprune.factory import load_factory

    made = load_factory(ref)()
    get = (lambda k, d=None: made.get(k, d)) if isinstance(made, dict) else (lambda k, d=None: getattr(made, k, d))
    loss, metric, direction = get("loss"), get("metric"), get("direction")
    if not callable(loss) or not callable(metric):
        raise HwpruneError(f"task {ref!r} must give callables 'loss(output, target)' and 'metric(output, target)'")
    if direction not in ("max", "min"):
        raise HwpruneError(f"task {ref!r} has direction {direction!r}; expected 'max' (higher is better) or 'min'")
    name = str(get("name", "metric"))
    finalize = get("finalize", float)
    distill = get("distill")
    if distill is not None and not callable(distill):
        raise HwpruneError(f"task {ref!r} gives 'distill' = {distill!r}; expected a callable "
                           f"distill(output, teacher_output) or nothing")

    def batch(out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        got = metric(out, y)
        if isinstance(got, (tuple, list)) and len(got) == 2:
            return float(got[0]), float(got[1])
        n = len(y) if hasattr(y, "__len__") else 1
        return float(got) * n, float(n)

    return Task(ref, name, direction, loss, batch, finalize,
                None if distill is None else (lambda out, teacher, y: distill(out, teacher)))


def get_task(ref: str | Task | None) -> Task:
    """A built-in task by name, a user task ``file.py:factory``, or the default (classification) for None."""
    if ref is None:
        return CLASSIFICATION
    if isinstance(ref, Task):
        return ref
    if ref in _BUILTIN:
        return _BUILTIN[ref]
    from hwprune.factory import is_factory_ref

    if is_factory_ref(ref):
        return _user_task(ref)
    raise HwpruneError(f"unknown task {ref!r}; known: {', '.join(TASK_NAMES)}, or path/to/file.py:factory")
