"""Resolve what a command was asked for into a model, data and an example input."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hwprune import inputs
from hwprune.data import DataBundle, load_data
from hwprune.errors import HwpruneError
from hwprune.factory import is_factory_ref, load_factory
from hwprune.models import MODELS, build_model, load_weights, model_layout
from hwprune.train import cache_key, load_cached

__all__ = ["Setup", "parse_input_shape", "resolve"]


@dataclass
class Setup:
    """A model ready to inspect, prune or search, with its data and one example batch."""

    model_ref: str
    model: nn.Module
    example: Any  # one batch of model inputs: a tensor, a tuple of tensors or a dict (hwprune.inputs)
    input_shape: tuple  # one item's shape; one shape per input when the model takes several
    num_classes: int
    data: DataBundle | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    weights: str = "random init"
    seed: int = 0
    task: Any = None  # hwprune.tasks.Task: the data's (or --task's); classification without data

    def inputs(self, n: int, seed: int = 0) -> Any:
        """``n`` model inputs for timing. Float inputs: standard normal (the latency of dense float kernels does
        not depend on the values). When any input is not floating point (token ids, lengths, masks): real items
        drawn with replacement (seeded) from at most 256 training examples, or from the example batch without
        data."""
        from hwprune.latency.profiler import timing_batch

        return timing_batch(self.example, n, self.timing_pool(seed), seed)

    def timing_pool(self, seed: int = 0) -> Any:
        """Real inputs to draw timing batches from: up to 256 training examples (seeded) when any input is not
        floating point; None for float inputs (drawn N(0, 1)) or without data (the example's rows are used)."""
        if inputs.all_float(self.example) or self.data is None:
            return None
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self.data.train), (256,), generator=g).tolist()
        return inputs.collate([self.data.train[i][0] for i in idx])


def _token_example(model: nn.Module, example: torch.Tensor, seed: int) -> torch.Tensor:
    """Without data the input's dtype is unknown: a model with an ``nn.Embedding`` that cannot take the float
    example but takes token ids (below its smallest vocabulary) gets token ids; anything else keeps ``example``."""
    vocab = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    if not vocab:
        return example
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
        return example
    except Exception:  # noqa: BLE001 - the float example does not fit; token ids may
        ids = torch.randint(min(vocab), example.shape, generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                model(ids)
            return ids
        except Exception:  # noqa: BLE001 - neither fits: check_input reports the float example's error
            return example
    finally:
        model.train(was)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> (1, 28, 28); every entry a positive integer."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise HwpruneError(f"input shape {text!r} must be comma-separated positive integers, e.g. 1,28,28") from None
    if not shape or any(v <= 0 for v in shape):
        raise HwpruneError(f"input shape {text!r} must be comma-separated positive integers, e.g. 1,28,28")
    return shape


def resolve(model_ref: str, data_ref: str | None = None, input_shape: str | None = None,
            model_args: dict[str, Any] | None = None, weights: str | None = None, seed: int = 0,
            use_cache: bool = True, task: str | None = None, num_classes: int | None = None) -> Setup:
    """Build the model (loading weights: ``weights``, else the cached trained model) and its data.

    Args:
        model_ref: built-in name or ``file.py:factory``.
        data_ref: built-in data name or ``file.py:factory``; optional for inspect/apply.
        input_shape: overrides the data's shape (``C,L``, ``C,H,W`` or ``T,F``).
        task: overrides the data's task (``classification``, ``language-model`` or ``file.py:factory``).
    """
    from hwprune.tasks import get_task

    args = dict(model_args or {})
    if not is_factory_ref(model_ref):
        MODELS.get(model_ref)  # unknown names fail here, listing the known ones
    the_task = get_task(task) if task else None  # a bad name fails before the data is built
    data = load_data(data_ref, model_layout(model_ref)) if data_ref else None
    if data is not None and the_task is not None:
        data.task = the_task
    if input_shape:
        shape: tuple[int, ...] | None = parse_input_shape(input_shape)
    elif data is not None:
        shape = data.input_shape
    elif not is_factory_ref(model_ref):
        shape = MODELS.get(model_ref).default_input_shape
    else:
        load_factory(model_ref)  # a missing file or name is the first thing to report
        raise HwpruneError(f"user model {model_ref!r} needs --data or --input-shape to know its input")
    if num_classes is None:
        num_classes = data.num_classes if data is not None else 10
    if num_classes is None:
        if not is_factory_ref(model_ref):
            raise HwpruneError(f"data {data_ref!r} does not say how many classes it has (no num_classes, classes or "
                               f"targets attribute); pass --num-classes N")
        num_classes = 0  # a user model sets its own outputs
    torch.manual_seed(seed)
    model = build_model(model_ref, shape, num_classes, args)
    source = "random init"
    if weights:
        load_weights(model, weights)
        source = weights
    elif use_cache and data_ref:
        hit = load_cached(cache_key(model_ref, data_ref, seed, args, data.task if data is not None else the_task))
        if hit is not None:
            load_weights(model, hit[0])
            source = str(hit[0])
    assert shape is not None
    if data is not None:
        example: Any = inputs.collate([data.train[i][0] for i in range(min(2, len(data.train)))])
    else:
        example = _token_example(model, torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed)), seed)
    return Setup(model_ref, model, example, tuple(shape), num_classes, data, args, source, seed,
                 data.task if data is not None else (the_task or get_task(None)))
