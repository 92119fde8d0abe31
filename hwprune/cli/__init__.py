"""The ``hwprune`` command line: train, inspect, apply, profile, predict, validate, search, pareto, export.

Every user error is one line on stderr (``hwprune: error: ...``) and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from hwprune.cli import core, latency, search
from hwprune.cli._common import Parser
from hwprune.errors import HwpruneError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="hwprune", description="Hardware-aware pruning and quantization search for PyTorch.")
    p.add_argument("--version", action="version", version="hwprune " + __import__("hwprune").__version__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for mod in (core, latency, search):
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    from hwprune.device.targets import kernel_cache

    try:
        with kernel_cache():  # before anything runs a kernel: oneDNN reads it once
            return fn(args)
    except HwpruneError as exc:
        print(f"hwprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
