"""Helpers shared by the ``hwprune`` subcommands: argument groups, parsing types, output."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["log", "add_model_args", "add_shape_args", "setup_from_args", "parse_exclude", "emit", "positive",
           "keep_ratio", "grid", "Parser", "RUNTIME_CHOICES", "TARGET_CHOICES", "device", "model_help", "example"]

# every runtime of any target (a target refuses the ones it has not in one line: cudagraph is cuda's,
# onnxruntime / openvino the cpu's)
RUNTIME_CHOICES = ("eager", "compile", "cudagraph", "onnxruntime", "openvino", "openvino-bf16")
TARGET_CHOICES = ("cpu", "cuda", "arm")


def model_help() -> str:
    from hwprune.models import MODELS

    return (f"built-in model ({', '.join(MODELS.names())}) or path/to/file.py:factory or package.module:factory "
            f"returning an nn.Module")


def example(*lines: str) -> dict[str, Any]:
    """A subcommand's epilog: its example command lines, printed as written."""
    return {"epilog": "example:\n" + "\n".join("  " + ln for ln in lines) + "\n",
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (checked against this machine when it is used)."""
    from hwprune.train import is_device_name

    if is_device_name(text):
        return text
    raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    p.add_argument("--model", required=True, help=model_help())
    p.add_argument("--model-args", default=None, metavar="K=V,...",
                   help="arguments for the model factory, e.g. num_layers=2,bidirectional=true or width_mult=0.5")
    p.add_argument("--data", required=data_required,
                   help="built-in data (mnist1d, mnist5k, pydoc) or path/to/file.py:factory returning (train, val) "
                        "datasets of (inputs, target) items; inputs a tensor, a tuple of tensors (the model is "
                        "called as model(*inputs)) or a dict (model(**inputs))")
    p.add_argument("--task", default=None,
                   help="how outputs are trained and scored: classification (accuracy, the default), "
                        "language-model (per-token cross-entropy, perplexity; targets -100 are padding), or "
                        "path/to/file.py:factory returning {loss, metric, direction, name}; default: the data's "
                        "(pydoc is a language-model data set)")
    p.add_argument("--num-classes", type=positive, default=None,
                   help="classes of a built-in model's output when the data does not expose them (a dataset's "
                        "num_classes, classes or targets; items are never read to count them)")
    p.add_argument("--seed", type=int, default=0, help="seed for training and the cached base model (default 0)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout at the end")


def add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", default=None, metavar="C,L|C,H,W|T,F",
                   help="one example's shape without batch (default: from --data, or the model's default)")
    p.add_argument("--weights", default=None,
                   help="state dict to load (torch.load weights_only=True); default: the model cached by "
                        "'hwprune train' for this model/data/seed, if any")
    p.add_argument("--exclude", default="", metavar="LAYER,...", help="layers never to prune")


def setup_from_args(args: argparse.Namespace, use_cache: bool = True):  # type: ignore[no-untyped-def]
    from hwprune.models import parse_model_args
    from hwprune.resolve import resolve

    return resolve(args.model, args.data, getattr(args, "input_shape", None), parse_model_args(args.model_args),
                   getattr(args, "weights", None), args.seed, use_cache, getattr(args, "task", None),
                   getattr(args, "num_classes", None))


def parse_exclude(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``--exclude a,b`` -> ["a", "b"] (a list, from the Python API, is taken as it is)."""
    if isinstance(text, (list, tuple)):
        return [str(e) for e in text if e]
    return [e for e in text.split(",") if e]


def emit(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))


def keep_ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratio must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1], got {text!r}")
    return v


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def grid(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(sorted({float(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be comma-separated keep ratios, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals) or 1.0 not in vals:
        raise argparse.ArgumentTypeError(f"grid ratios must be in (0, 1] and include 1.0, got {text!r}")
    return vals


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"hwprune: error: {message} (see --help)\n")
