"""Apply a policy: a physically smaller model, then per-layer formats; save and load the result.

A pruned model is saved as a plain dict (``torch.save``) holding the model
reference, the policy and the pruned state dict. Loading rebuilds the dense
model, re-derives the pruned shapes from the policy (they depend only on it)
and loads the weights with ``torch.load(weights_only=True)``: no pickled code.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from hwprune import inputs
from hwprune._io import write_atomic
from hwprune._modelcopy import copy_model
from hwprune.apply.formats import FormatSim, apply_formats
from hwprune.apply.importance import IMPORTANCES
from hwprune.apply.prune import kept_indices, prune_model, unit_scores
from hwprune.errors import HwpruneError
from hwprune.models import build_model, safe_load
from hwprune.policy import Policy

__all__ = ["apply_policy", "prune_model", "apply_formats", "FormatSim",
           "IMPORTANCES", "kept_indices", "unit_scores", "save_pruned", "load_pruned", "ARTIFACT_FORMAT"]

ARTIFACT_FORMAT = "hwprune-pruned-model/1"


def apply_policy(model: nn.Module, policy: Policy, example: torch.Tensor, *, exclude: Iterable[str] = (),
                 importance: str = "l1", batches: Any = None, loss: Any = None) -> nn.Module:
    """Prune a copy of ``model`` under ``policy`` and set each layer's (simulated) format (``loss``: the task's,
    for Taylor importance)."""
    pruned = prune_model(model, policy, example, exclude=exclude, importance=importance, batches=batches,
                         loss=loss)
    return apply_formats(pruned, {n: f for n, f in policy.formats.items() if not policy.dropped(n)})


def save_pruned(path: str | Path, model: nn.Module, policy: Policy, model_ref: str, model_args: dict[str, Any],
                input_shape: tuple[int, ...], num_classes: int, exclude: Iterable[str] = (),
                extra: dict[str, Any] | None = None, example: Any = None) -> None:
    """Write a pruned model artifact atomically, with two rows of the example input (the dense model's: what
    :func:`load_pruned` rebuilds the pruned structure on; token ids and several inputs included)."""
    blob = {"format": ARTIFACT_FORMAT, "model": model_ref, "model_args": dict(model_args),
            "input_shape": [list(s) if isinstance(s, tuple) else s for s in input_shape], "num_classes": num_classes,
            "exclude": sorted(exclude), "policy": policy.to_dict(), "extra": dict(extra or {}),
            "state_dict": model.state_dict()}
    if example is not None:
        blob["example"] = inputs.rows(example, slice(0, 2))
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_atomic(Path(path), buf.getvalue())


def load_pruned(path: str | Path, model: str | nn.Module | None = None, *,
                trust_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model from an artifact written by :func:`save_pruned`.

    The artifact names the dense model it was pruned from. A built-in model is built by name; a user model
    (``file.py:factory``) is code, and loading never runs code the file names: give ``model`` (the dense
    ``nn.Module``, or its reference, whose factory then gets the artifact's ``model_args``), or
    ``trust_code=True`` to build the reference the artifact holds.
    """
    from hwprune.factory import refuse_untrusted

    p = Path(path)
    blob = safe_load(p, "pruned model")
    if not isinstance(blob, dict) or blob.get("format") != ARTIFACT_FORMAT:
        raise HwpruneError(f"{str(p)!r} is not an hwprune pruned model ({ARTIFACT_FORMAT})")
    missing = [k for k in ("model", "model_args", "input_shape", "num_classes", "exclude", "policy", "state_dict")
               if k not in blob]
    if missing or not isinstance(blob["model"], str) or not isinstance(blob["model_args"], dict):
        raise HwpruneError(f"pruned model {str(p)!r} is damaged or foreign (missing or bad: "
                           f"{', '.join(missing) or 'model/model_args'})")
    shape = tuple(tuple(s) if isinstance(s, list) else s for s in blob["input_shape"])
    if isinstance(model, nn.Module):
        dense = copy_model(model)
    else:
        ref = model if model is not None else blob["model"]
        if model is None and not trust_code:
            refuse_untrusted({"model": ref}, f"pruned model {str(p)!r}",
                             "the dense model (load_pruned(path, model=...)) or trust_code=True")
        dense = build_model(ref, shape, blob["num_classes"], blob["model_args"])
    policy = Policy.from_dict(blob["policy"], source=str(p))
    example = blob.get("example")
    if example is None:  # an artifact written before examples were stored: float inputs of the stored shape
        example = torch.zeros(2, *shape)
    model = apply_policy(dense, policy, example, exclude=blob["exclude"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise HwpruneError(f"pruned model {str(p)!r} does not match its policy: {str(exc).splitlines()[0]}") from exc
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta
