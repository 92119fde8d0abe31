"""The Python API: the command line's profile, search and export as functions returning their JSON summaries.

Each takes the same options as its command (``--batch-size`` is ``batch_size=``), with the same defaults and the
same checks; progress goes to ``log`` (default: stderr, as the CLI prints it) and nothing to stdout. Bad input
raises :class:`hwprune.HwpruneError` with the CLI's one-line message::

    from hwprune import api

    table = api.profile("my_model.py:build", target="cpu", input_shape="3,32,32")
    run = api.search("my_model.py:build", "my_data.py:load", target="cpu", budget="50%", trials=30,
                     out="runs/mine")
    art = api.export(run["out"], trial="best", trust_code=True)  # the run names user code: trust it to run it
    print(art["measured_latency_ms"], art["artifacts"])

(Imported as ``api``: ``hwprune.search`` and ``hwprune.export`` are the modules that do the work.)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator

from hwprune.errors import HwpruneError

__all__ = ["profile", "search", "export"]

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _command_args(cmd: str, required: list[str], options: dict[str, Any]) -> argparse.Namespace:
    """``options`` as the parsed arguments of ``hwprune cmd``: the command line's defaults, then each option by
    its flag's name (``batch_size`` for ``--batch-size``), checked against the flag's choices and type."""
    from hwprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices[cmd]
    flags = {a.dest: a for a in sub._actions if a.option_strings}
    bad = sorted(set(options) - set(flags))
    if bad:
        raise HwpruneError(f"hwprune.{cmd}() got unknown option(s) {', '.join(bad)}; "
                           f"known: {', '.join(sorted(set(flags) - {'help', 'json'}))}")
    try:
        args = sub.parse_args(required)
    except SystemExit:
        raise HwpruneError(f"hwprune.{cmd}(): bad arguments {required!r}") from None
    for name, value in options.items():
        act = flags[name]
        if value is not None and act.type is not None and isinstance(value, str):
            try:
                value = act.type(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise HwpruneError(f"hwprune.{cmd}(): {name}={value!r}: {exc}") from None
        if value is not None and act.choices is not None and value not in act.choices:
            raise HwpruneError(f"hwprune.{cmd}(): {name}={value!r}; accepted: {', '.join(map(str, act.choices))}")
        setattr(args, name, value)
    args.json = True
    return args


@contextlib.contextmanager
def _as_found() -> Iterator[None]:
    """Process-wide state a command changes, put back when it ends (however it ends): the random generators of
    torch, Python and NumPy (fine-tunes seed them), Optuna's log level, torch's thread count, default dtype and
    grad mode, oneDNN's cache variable (:func:`hwprune.device.targets.kernel_cache`). (A local Ray a search started
    is shut down by the search itself.)"""
    import random

    import numpy as np
    import optuna
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, random.getstate(),
             np.random.get_state(), optuna.logging.get_verbosity(), torch.get_num_threads(),
             torch.get_default_dtype(), torch.is_grad_enabled())
    from hwprune.device.targets import kernel_cache

    try:
        with kernel_cache():
            yield
    finally:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
        random.setstate(state[2])
        np.random.set_state(state[3])
        optuna.logging.set_verbosity(state[4])
        torch.set_num_threads(state[5])
        torch.set_default_dtype(state[6])
        torch.set_grad_enabled(state[7])


def profile(model: str, target: str = "cpu", log: Log | None = None, **options: Any) -> dict[str, Any]:
    """Measure ``model``'s latency table on this machine (``hwprune profile``); ``runtime="all"`` compares the
    dense model in every runtime instead. Options: data, input_shape, model_args, batch_size, threads, runtime,
    tables, grid, calibration, repeats, exclude, channel_multiple, ... Returns the summary (table path,
    configurations measured, the calibration fit, ``reference_ms`` of the dense model)."""
    from hwprune.cli.latency import run_profile

    args = _command_args("profile", ["--model", model, "--target", target], options)
    with _as_found():
        return run_profile(args, log or _stderr)[0]


def search(model: str | None = None, data: str | None = None, log: Log | None = None,
           **options: Any) -> dict[str, Any]:
    """Search keep ratios and formats under a latency budget (``hwprune search``). ``spec="file.yaml"`` reads a
    search spec first; options override it (budget, target, trials, runtime, batch_size, out, ...). Returns the
    summary: ``out`` (the run directory), ``pareto``, ``best``, ``budget_ms``, ..."""
    from hwprune.cli.search import build_spec
    from hwprune.search import run_search

    required = ([] if model is None else ["--model", model]) + ([] if data is None else ["--data", data])
    args = _command_args("search", required, options)
    with _as_found():
        return run_search(build_spec(args), log or _stderr)


def export(run_dir: str, trial: str | int = "best", log: Log | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune a searched policy longer, deploy it on the target's kernels, measure it and write the artifacts
    (``hwprune export``). Options: finetune_steps, schedule, out, repeats, measure_here, storage, device,
    distill (the fine-tune's distillation weight; default the run's), trust_code (run the user code run.json
    names). Returns
    the summary (``measured_latency_ms``, ``artifacts``, test metric, ...)."""
    from hwprune.export import export_run

    args = _command_args("export", [str(run_dir), "--trial", str(trial)], options)
    with _as_found():
        return export_run(args.run_dir, args.trial, args.finetune_steps, args.schedule, args.out, args.repeats,
                          args.measure_here, log=log or _stderr, storage=args.storage, device=args.device,
                          trust_code=args.trust_code, distill=args.distill)
