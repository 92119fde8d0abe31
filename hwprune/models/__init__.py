"""Model registry and loading of user models.

A built-in model is registered with the input *layout* it expects:
``"1d"`` (C, L), ``"2d"`` (C, H, W), ``"seq"`` (T, F) or ``"tokens"`` (T,
integer ids); data sets provide tensors in the layout the model asks for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.factory import is_factory_ref, load_factory
from hwprune.models.cnn import CNN1d, MobileNetV2, ResNet20
from hwprune.models.rnn import LSTMLanguageModel, RNNClassifier
from hwprune.registry import Registry

__all__ = ["ModelEntry", "MODELS", "build_model", "load_weights", "parse_model_args", "model_layout", "safe_load",
           "default_latency_batch"]

LAYOUT_DIMS = {"1d": 2, "2d": 3, "seq": 2, "tokens": 1}


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model: its factory, input layout and default input shape."""

    factory: Callable[..., nn.Module]
    layout: str
    default_input_shape: tuple[int, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    latency_batch: int = 16  # default batch for latency: large enough that pruning shows above noise


MODELS: Registry[ModelEntry] = Registry("model")

MODELS.register("cnn1d")(ModelEntry(
    lambda shape, nc, **kw: CNN1d(shape[0], shape[1], nc, **kw), "1d", (1, 40), latency_batch=512))
MODELS.register("resnet20")(ModelEntry(
    lambda shape, nc, **kw: ResNet20(shape[0], nc, **kw), "2d", (3, 32, 32)))
MODELS.register("mobilenetv2")(ModelEntry(
    lambda shape, nc, **kw: MobileNetV2(shape[0], nc, **kw), "2d", (3, 32, 32)))
MODELS.register("lstm")(ModelEntry(
    lambda shape, nc, **kw: RNNClassifier("lstm", shape[1], nc, **kw), "seq", (40, 1)))
MODELS.register("gru")(ModelEntry(
    lambda shape, nc, **kw: RNNClassifier("gru", shape[1], nc, **kw), "seq", (40, 1)))
# num_classes is the vocabulary (the data's); a vocabulary-sized output is never pruned
MODELS.register("lstm-lm")(ModelEntry(
    lambda shape, nc, **kw: LSTMLanguageModel(nc, **kw), "tokens", (64,)))


def model_layout(ref: str) -> str | None:
    """The layout a built-in model expects, or None for a user model."""
    return None if is_factory_ref(ref) else MODELS.get(ref).layout


def default_latency_batch(ref: str) -> int:
    """The batch size latency is profiled and predicted at when none is given (16 for user models)."""
    return 16 if is_factory_ref(ref) else MODELS.get(ref).latency_batch


def parse_model_args(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Parse ``"num_layers=2,bidirectional=true,width_mult=0.5"`` into typed kwargs (a dict, from the Python API,
    is taken as it is)."""
    if isinstance(text, dict):
        return dict(text)
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HwpruneError(f"model argument {item!r} must look like key=value")
        raw = raw.strip()
        low = raw.lower()
        value: Any
        if low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key.strip()] = value
    return out


def build_model(ref: str, input_shape: tuple[int, ...] | None = None, num_classes: int = 10,
                model_args: dict[str, Any] | None = None) -> nn.Module:
    """Build a built-in model by name, or call a user factory.

    Args:
        ref: a registry name (``resnet20``) or ``file.py:factory`` / ``pkg.mod:factory``.
        input_shape: one example's shape without the batch dimension.
        num_classes: classifier outputs (built-in models only).
        model_args: keyword arguments for the factory.
    """
    kwargs = dict(model_args or {})
    if is_factory_ref(ref):
        fn = load_factory(ref)
        try:
            model = fn(**kwargs)
        except TypeError as exc:
            raise HwpruneError(f"model factory {ref!r} failed: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise HwpruneError(f"model factory {ref!r} returned {type(model).__name__}, expected an nn.Module")
        return model
    entry = MODELS.get(ref)
    shape = tuple(input_shape) if input_shape else entry.default_input_shape
    if len(shape) != LAYOUT_DIMS[entry.layout]:
        raise HwpruneError(f"model {ref!r} takes {entry.layout} inputs of {LAYOUT_DIMS[entry.layout]} dims "
                           f"(e.g. {','.join(map(str, entry.default_input_shape))}), got input shape {shape}")
    try:
        return entry.factory(shape, num_classes, **{**entry.defaults, **kwargs})
    except TypeError as exc:
        raise HwpruneError(f"bad model argument for {ref!r}: {exc}") from exc


def safe_load(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` (no pickled code runs); problems become one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise HwpruneError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "Weights only load failed" in first:  # torch's long advice to load unsafely is not ours to give
            raise HwpruneError(f"cannot read {what} {str(path)!r}: it holds pickled objects other than tensors, "
                               f"and hwprune loads only plain state dicts (torch.load weights_only=True)") from exc
        raise HwpruneError(f"cannot read {what} {str(path)!r}: {type(exc).__name__}: {first}") from exc


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict saved with ``torch.save``; a mismatch names the first bad key."""
    state = safe_load(path, "weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HwpruneError(f"weights {str(path)!r} hold a {type(state).__name__}, expected a state dict")
    own = model.state_dict()
    for key in own:
        if key not in state:
            raise HwpruneError(f"weights {str(path)!r} do not match the model: missing key {key!r}")
    for key, val in state.items():
        if key not in own:
            raise HwpruneError(f"weights {str(path)!r} do not match the model: unexpected key {key!r}")
        if not isinstance(val, torch.Tensor) or val.shape != own[key].shape:
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            raise HwpruneError(f"weights {str(path)!r} do not match the model: {key!r} has shape {shape}, "
                               f"model wants {tuple(own[key].shape)}")
    model.load_state_dict(state)
