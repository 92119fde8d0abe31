"""Timing like a benchmark: warm-up, inference mode, synchronize, median and spread.

CPU: wall clock (``perf_counter_ns``) at a fixed thread count. Each repeat runs
the call enough times to last at least ``min_repeat_us`` (timer resolution and
scheduler noise), and the per-call time is that repeat's mean. CUDA: CUDA
events around the same loop after warm-up, synchronized; the first call is
never timed.

Two ways to use it: ``time_cpu``/``time_cuda`` time one callable with its
repeats back to back (stopping after 5 when their spread is already within
2%); the *samplers* (``cpu_sampler``/``cuda_sampler``) warm a callable up once
and return a function that takes one sample, so that
:mod:`hwprune.latency.rounds` can time many items in interleaved rounds (what
profiling, calibration, validation and export do: drift then moves every item
alike).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Timing", "time_cpu", "time_cuda", "time_cuda_graph", "timing_of", "cpu_sampler", "cuda_sampler",
           "cuda_graph_sampler"]


@dataclass(frozen=True)
class Timing:
    """Per-call latency in microseconds: median over repeats, interquartile range, and counts."""

    median_us: float
    iqr_us: float
    repeats: int
    inner: int

    @property
    def spread_pct(self) -> float:
        return 100.0 * self.iqr_us / self.median_us if self.median_us > 0 else 0.0


def _summarize(samples: list[float], inner: int) -> Timing:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(statistics.median(samples), q[2] - q[0], len(samples), inner)


def timing_of(samples: list[float], inner: int = 1) -> Timing:
    """A :class:`Timing` from per-call samples (one per round or repeat): median, IQR, how many."""
    if not samples:
        raise ValueError("no samples to summarize")
    return _summarize(list(samples), inner)


def _calibrate_inner(fn: Callable[[], object], min_repeat_us: float) -> int:
    t0 = time.perf_counter_ns()
    fn()
    one = max((time.perf_counter_ns() - t0) / 1e3, 0.5)
    return max(1, int(min_repeat_us / one + 0.999))


def _repeat(sample: Callable[[], float], repeats: int, first: int, settled_pct: float) -> Timing:
    """Samples back to back: ``first`` of them, and when their spread is over ``settled_pct``, up to ``repeats``."""
    inner = int(getattr(sample, "inner", 1))
    samples: list[float] = []
    while len(samples) < repeats:
        samples.append(sample())
        if len(samples) == min(first, repeats) and _summarize(samples, inner).spread_pct <= settled_pct:
            break
    return _summarize(samples, inner)


def time_cpu(fn: Callable[[], object], repeats: int = 20, warmup: int = 3,
             min_repeat_us: float = 2000.0, first: int = 5, settled_pct: float = 2.0) -> Timing:
    """Median per-call wall time of ``fn`` (run under ``torch.inference_mode``), its repeats back to back.

    As on CUDA, ``first`` repeats are taken; when their spread (IQR / median) is already within
    ``settled_pct`` the timing stops there, else it goes on to ``repeats`` (the stored ``repeats`` says how
    many were taken).
    """
    return _repeat(cpu_sampler(fn, warmup, min_repeat_us), repeats, first, settled_pct)


def time_cuda(fn: Callable[[], object], repeats: int = 20, warmup: int = 5,
              min_repeat_us: float = 200.0, first: int = 5, settled_pct: float = 2.0) -> Timing:  # pragma: no cover
    """Median per-call time of ``fn`` on the current CUDA device, from CUDA events, its repeats back to back.

    Each repeat replays ``fn`` for at least ``min_repeat_us`` between two events (event resolution is
    ~0.5 us, so 200 us suffices); the early stop is :func:`time_cpu`'s.
    """
    return _repeat(cuda_sampler(fn, warmup, min_repeat_us), repeats, first, settled_pct)


def time_cuda_graph(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> Timing:  # pragma: no cover
    """:func:`time_cuda` of the replay of ``fn`` captured as one CUDA graph (warm-up on a side stream first,
    as capture requires); what a deployment that captures its forward pass runs."""
    return time_cuda(_capture(fn, warmup).replay, repeats, warmup=2)


def _capture(fn: Callable[[], object], warmup: int) -> Any:  # pragma: no cover - needs a GPU
    """``fn`` captured as one CUDA graph, after ``warmup`` calls on a side stream (as capture requires)."""
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph


# Samplers: the interleaved measurement (:mod:`hwprune.latency.rounds`) prepares every item once (warm-up, inner
# count) and then takes one sample of each per round. A sampler is a callable returning one sample: the mean
# per-call time, in microseconds, of ``inner`` back-to-back calls lasting at least ``min_repeat_us``.


def cpu_sampler(fn: Callable[[], object], warmup: int = 3, min_repeat_us: float = 2000.0) -> Callable[[], float]:
    """Warm ``fn`` up, fix its inner count, and return a callable that takes one wall-clock sample of it."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        inner = _calibrate_inner(fn, min_repeat_us)

    def sample() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            return (time.perf_counter_ns() - t0) / 1e3 / inner

    sample.inner = inner  # type: ignore[attr-defined]
    return sample


def cuda_sampler(fn: Callable[[], object], warmup: int = 5,
                 min_repeat_us: float = 200.0) -> Callable[[], float]:  # pragma: no cover - needs a GPU
    """As :func:`cpu_sampler`, timed with CUDA events around the inner loop (synchronized per sample)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        inner = max(1, int(min_repeat_us / max(start.elapsed_time(end) * 1e3, 0.5) + 0.999))

    def sample() -> float:
        with torch.inference_mode():
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) * 1e3 / inner

    sample.inner = inner  # type: ignore[attr-defined]
    return sample


def cuda_graph_sampler(fn: Callable[[], object], warmup: int = 3) -> Callable[[], float]:  # pragma: no cover
    """:func:`cuda_sampler` of the replay of ``fn`` captured as one CUDA graph (see :func:`time_cuda_graph`)."""
    graph = _capture(fn, warmup)
    sample = cuda_sampler(graph.replay, warmup=2)
    sample.graph = graph  # type: ignore[attr-defined]  # kept alive with the sampler
    return sample
