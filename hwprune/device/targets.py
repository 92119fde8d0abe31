"""Targets: how to time on a device, what it fingerprints as, which formats run real kernels.

One small base class; ``cpu``, ``cuda`` and ``arm`` are registered by name.
"""
from __future__ import annotations

import contextlib
import platform
import re
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hwprune.device.onnxrt import RUNTIMES as ONNX_RUNTIMES, is_openvino
from hwprune.errors import HwpruneError
from hwprune.device.kernels import CastModule, cuda_shape_rule, realize_cpu, realize_cuda
from hwprune.device.timing import (Timing, cpu_sampler, cuda_graph_sampler, cuda_sampler, time_cpu, time_cuda,
                                    time_cuda_graph)
from hwprune.registry import Registry

__all__ = ["Target", "TARGETS", "get_target", "fingerprint_slug", "CastModule", "tune_allocator", "ALLOCATOR",
           "fingerprint_line", "cuda_shape_rule", "compile_module", "use_compile_cache"]

TARGETS: Registry[type["Target"]] = Registry("target")
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
              "amx_bf16", "neon", "asimd", "asimdhp", "asimddp", "sve", "i8mm", "bf16")


# glibc returns large blocks (tensors above its mmap threshold) to the OS on free and
# maps them again on the next call; every call then page-faults, and whether it does
# depends on the allocation history. Measured here (batch 512, 1 thread): a Conv1d took
# 1,030 us with glibc's defaults and 105 us with these settings. hwprune times with them
# and records them; deploy with them too (or jemalloc/tcmalloc) to see the same numbers.
ALLOCATOR = "glibc-mmap1g-trim2g"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> str:
    """Keep large blocks in glibc's heap (no per-call mmap/munmap); returns what was set."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return ALLOCATOR if ok else "default"


# oneDNN (torch's CPU convolutions and bf16 kernels) keeps the kernels it generates in a cache of 1024 by default.
# Timing many models in interleaved rounds (a profile's chunks, a validation's 20 policies of MobileNetV3 with ~50
# convolutions each) overflows it, and calls then generate their kernels again: bimodal timings, every model slower.
# Measured here (validate, torchvision mobilenet_v3_small, batch 16, one table, runs alternated): 15% and 20%
# within +-10% with a noise floor of +-21% at the default; 100% and 100% at +-3.7% with 16384.
PRIMITIVE_CACHE = 16384
_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


@contextlib.contextmanager
def kernel_cache() -> Iterator[None]:
    """oneDNN's kernel cache at :data:`PRIMITIVE_CACHE` for a command, unless the user set its size. oneDNN reads
    the setting once, when it makes its first kernel in the process, so this takes effect only where nothing ran a
    oneDNN kernel before (the command line; a library call in a fresh process). The variable is put back after;
    the size oneDNN took stays for the process, as the allocator's setting does."""
    import os

    mine = not any(v in os.environ for v in _CACHE_VARS)
    if mine:
        os.environ[_CACHE_VARS[0]] = str(PRIMITIVE_CACHE)
    try:
        yield
    finally:
        if mine:
            os.environ.pop(_CACHE_VARS[0], None)


def _allocator_policy() -> str:
    """What :func:`tune_allocator` sets on this machine (without setting it)."""
    return ALLOCATOR if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "default"


def fingerprint_slug(fp: dict[str, Any]) -> str:
    """A folder name from a fingerprint: device, the flags that matter, threads, torch, engine."""
    dev = fp.get("gpu") or fp.get("cpu") or "unknown"
    parts = [fp["target"], fp.get("arch", ""), dev]
    if fp.get("compute_capability"):
        parts.append("sm" + str(fp["compute_capability"]).replace(".", ""))
    parts += [f for f in fp.get("flags", []) if f.startswith(("avx512", "amx", "sve", "i8mm"))]
    if fp.get("threads"):
        parts.append(f"t{fp['threads']}")
    parts += [f"torch{fp.get('torch', '')}", fp.get("engine", "")]
    if fp.get("emulated"):
        parts.append("emulated")
    if fp.get("runtime") not in (None, "eager"):
        parts.append(str(fp["runtime"]) + str(fp.get("runtime_version", "")))
        if fp.get("precision"):
            parts.append(str(fp["precision"]))
        if fp.get("graph_batch") == "dynamic":
            parts.append("dynbatch")
    slug = "-".join(str(p) for p in parts if p)
    return re.sub(r"[^a-z0-9.]+", "-", slug.lower()).strip("-")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and name in ("", platform.machine(), platform.processor()):
                name = val.strip()
            elif key in ("flags", "features"):
                flags.update(val.split())
    except OSError:
        pass
    return name, sorted(f for f in _CPU_FLAGS if f in flags)


class Target(ABC):
    """A device kind. Subclasses say how to time, fingerprint and realize formats.

    Call order: :meth:`check_can_measure` (measuring commands only), :meth:`setup`,
    then :meth:`time` / :meth:`realize` any number of times.
    """

    name: str = ""
    device: str = "cpu"
    # how a model runs here; the first is the default. compile: torch.compile (inductor), each layer and each
    # whole model compiled before it is timed, as a deployment that compiles its model runs it
    runtimes: tuple[str, ...] = ("eager", "compile")

    def __init__(self, threads: int | None = None, emulate: bool = False, runtime: str | None = None) -> None:
        self.threads = threads
        self.emulate = emulate
        self.runtime = runtime or self.runtimes[0]
        if self.runtime not in self.runtimes:
            raise HwpruneError(f"target {self.name!r} has no runtime {self.runtime!r}; known: {', '.join(self.runtimes)}")

    def _runtime_key(self) -> dict[str, Any]:
        """The runtime in a fingerprint; eager (the default) is left out, so eager tables keep their names. ONNX
        Runtime and OpenVINO add their version and execution provider / precision hint."""
        if self.runtime in ONNX_RUNTIMES:
            from hwprune.device.onnxrt import runtime_fingerprint

            return runtime_fingerprint(self.runtime)
        return {} if self.runtime == "eager" else {"runtime": self.runtime}

    def format_note(self) -> str:
        """Why this runtime offers fewer formats than the target's kernels ('' when it does not)."""
        return ""

    def prepare_seconds(self) -> float:
        """About how long :meth:`prepare` takes per item beyond eager (for the profile-time estimate only): an
        ONNX export and session about 0.6 s for a layer here, a torch.compile several seconds."""
        return {"onnxruntime": 0.6, "openvino": 0.6, "compile": 5.0}.get(self.runtime, 0.0)

    @abstractmethod
    def is_local(self) -> bool:
        """Is this machine the target device (so that tables must match it)?"""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What changes the numbers on this device (only meaningful where it is local)."""

    @abstractmethod
    def offered_formats(self, op: str) -> tuple[str, ...]:
        """Formats with a real kernel here for an op type (conv1d, conv2d, linear, lstm, gru)."""

    @abstractmethod
    def realize(self, module: nn.Module, fmt: str) -> nn.Module:
        """A module running ``module`` in ``fmt`` with this device's real kernel."""

    def unsupported(self, cfg: Any) -> str | None:
        """Why this device's kernel for ``cfg.fmt`` rejects the configuration's shape (None: it accepts it).

        Rules known up front; a kernel that still raises or falls back while profiling is recorded as
        unsupported in the table by the profiler.
        """
        return None

    def check_can_measure(self) -> None:
        """Raise unless this machine can measure for this target."""
        if not self.is_local():
            raise HwpruneError(f"target {self.name!r} is not this machine; run 'hwprune profile' on the device")

    def setup(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.runtime == "compile":
            use_compile_cache()

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """The target session: :meth:`setup` for the duration of a ``with`` block, and every process-wide setting
        it changes as it was after it — the thread count, the quantized engine, TF32 and cuDNN flags, inductor's
        cache folder, oneDNN's cache variable (:func:`kernel_cache`). The allocator setting stays: glibc has no way
        to ask for the old one."""
        import os

        saved = (torch.get_num_threads(), torch.backends.quantized.engine, torch.backends.cuda.matmul.allow_tf32,
                 torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        try:
            self.setup()
            with kernel_cache():
                yield
        finally:
            torch.set_num_threads(saved[0])
            torch.backends.quantized.engine = saved[1]
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]
            torch.backends.cudnn.benchmark = saved[4]
            if cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache

    session = settings

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        """What this runtime runs for ``module``: the module itself, or (compile) ``torch.compile`` of it,
        compiled here on ``x`` so that the compilation is not inside a timing, or (onnxruntime / openvino) a session
        of its ONNX export with a dynamic batch dimension (the graph export writes)."""
        if self.runtime in ONNX_RUNTIMES:
            from hwprune.device.onnxrt import Session, openvino_model, runtime_onnx

            # a free batch dimension, as export ships it: OpenVINO runs a GRU of a static-batch graph 1.5-2.5x
            # slower than the same GRU with a dynamic batch (measured here); ONNX Runtime and convolutions: equal
            graph = (openvino_model(module, x, dynamic_batch=True) if is_openvino(self.runtime)
                     else runtime_onnx(module, x, self.runtime, dynamic_batch=True))
            return Session(self.runtime, graph, self.threads or torch.get_num_threads())
        if self.runtime != "compile":
            return module
        return compile_module(module, x)

    def time(self, fn: Callable[[], object], repeats: int, warmup: int = 3) -> Timing:
        return time_cpu(fn, repeats, warmup)

    def sampler(self, fn: Callable[[], object]) -> Callable[[], float]:
        """``fn`` warmed up, returned as a callable taking one timing sample (for interleaved rounds,
        :mod:`hwprune.latency.rounds`)."""
        return cpu_sampler(fn)

    @property
    def interleaved(self) -> bool:
        """Whether several prepared items can be timed in alternation. Not in the compile runtime: each layer is
        compiled after a reset of dynamo's caches (see :func:`compile_module`), which drops the ones before, so
        its items are timed one at a time (their rounds back to back)."""
        return self.runtime != "compile"


@TARGETS.register("cpu")
class CpuTarget(Target):
    """An x86 (or any) CPU: fbgemm/x86 engine, dynamic int8 for Linear/LSTM/GRU, bf16 where it runs."""

    name = "cpu"
    engine = "x86"
    # onnxruntime / openvino: the model exported to ONNX (hwprune.device.onnxrt) and run there, fp32
    runtimes = ("eager", "compile") + ONNX_RUNTIMES

    def is_local(self) -> bool:
        return True

    def check_can_measure(self) -> None:
        super().check_can_measure()
        if self.runtime in ONNX_RUNTIMES:
            from hwprune.device.onnxrt import require

            require(self.runtime)

    def format_note(self) -> str:
        if self.runtime == "onnxruntime":
            return ("the onnxruntime runtime offers int8 for Linear and LSTM layers (its dynamic quantization) and "
                    "convolutions (static QDQ, activation scales from calibration inputs); GRU layers stay fp32 (ONNX "
                    "Runtime has no quantized GRU)")
        if self.runtime == "openvino":
            return ("the openvino runtime offers int8 for convolutions and Linear layers (NNCF post-training "
                    "quantization, scales from calibration inputs); LSTM/GRU layers stay fp32; every other op runs "
                    "f32 (bf16 for the whole graph: --runtime openvino-bf16)")
        if self.runtime == "openvino-bf16":
            return ("the openvino-bf16 runtime runs every op OpenVINO can in bf16 (its precision hint, for the whole "
                    "graph: the table's entries and the export are all bf16); int8 for convolutions and Linear "
                    "layers as in openvino (NNCF), LSTM/GRU layers no int8; the search's fine-tunes score in fp32, "
                    "the export's test metric is the bf16 artifact's")
        return ""

    def setup(self) -> None:
        super().setup()
        tune_allocator()
        if self.engine in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = self.engine

    def fingerprint(self) -> dict[str, Any]:
        cpu, flags = _cpu_model_and_flags()
        return {"target": self.name, "arch": platform.machine(), "cpu": cpu, "flags": flags,
                "threads": self.threads or torch.get_num_threads(), "torch": torch.__version__.split("+")[0],
                "engine": self.engine, "malloc": _allocator_policy(), "emulated": bool(self.emulate),
                **self._runtime_key()}

    def offered_formats(self, op: str) -> tuple[str, ...]:
        if self.runtime == "onnxruntime":
            return ("fp32", "int8") if op in ("linear", "lstm", "conv1d", "conv2d") else ("fp32",)
        if is_openvino(self.runtime):  # "fp32" there: the runtime's precision (bf16 in openvino-bf16)
            return ("fp32", "int8") if op in ("linear", "conv1d", "conv2d") else ("fp32",)
        return ("fp32", "bf16", "int8") if op in ("linear", "lstm", "gru") else ("fp32", "bf16")

    def realize(self, module: nn.Module, fmt: str) -> nn.Module:
        if self.runtime in ONNX_RUNTIMES:
            from hwprune.device.onnxrt import INT8_LAYERS, RuntimeFormat

            if fmt == "fp32":
                return module
            if fmt == "int8" and isinstance(module, INT8_LAYERS.get(self.runtime, ())):
                return RuntimeFormat(module, fmt)
            raise HwpruneError(f"the {self.runtime} runtime has no {fmt!r} kernel for {type(module).__name__} in "
                               f"hwprune")
        return realize_cpu(module, fmt, self.name)


@TARGETS.register("arm")
class ArmTarget(CpuTarget):
    """An ARM board: the qnnpack engine. Profile on the board; ``--emulate`` runs elsewhere, marked so."""

    name = "arm"
    engine = "qnnpack"
    runtimes = ("eager", "compile")  # ONNX Runtime / OpenVINO on ARM: not measured by hwprune yet

    def is_local(self) -> bool:
        return platform.machine().lower() in ("aarch64", "arm64") or self.emulate

    def check_can_measure(self) -> None:
        if not self.is_local():
            raise HwpruneError(f"--target arm measures on an ARM board, and this machine is {platform.machine()}; "
                               "run 'hwprune profile --target arm' on the board, or pass --emulate for a table "
                               "marked as not measured on ARM")

    def offered_formats(self, op: str) -> tuple[str, ...]:
        return ("fp32", "int8") if op in ("linear", "lstm", "gru") else ("fp32",)


@TARGETS.register("cuda")
class CudaTarget(Target):
    """An NVIDIA GPU: CUDA-event timing; fp32 (TF32), fp16, bf16; int8/fp8/2:4 for Linear where supported."""

    name = "cuda"
    device = "cuda"
    # cudagraph: every timing (each layer, each whole model) is the replay of a captured CUDA graph, as a
    # deployment that captures its forward pass runs it: no per-kernel launch overhead from Python.
    # compile: torch.compile (inductor's default mode) of each layer and model.
    runtimes = ("eager", "cudagraph", "compile")

    def is_local(self) -> bool:
        return torch.cuda.is_available()

    def check_can_measure(self) -> None:
        if not torch.cuda.is_available():
            raise HwpruneError("--target cuda needs a CUDA device, and torch sees none here "
                               f"(torch {torch.__version__}); run it on the GPU machine")

    def setup(self) -> None:  # pragma: no cover - needs a GPU
        if self.runtime == "compile":  # CPU threads are not part of a GPU table: left as they are
            use_compile_cache()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's heuristics, as torch runs by default: with benchmark=True every new conv shape is autotuned
        # first (~60 ms each on an H100, most of a profile's time), and a deployment that does not opt in
        # runs the heuristic kernels anyway. Recorded in the fingerprint.
        torch.backends.cudnn.benchmark = False

    def fingerprint(self) -> dict[str, Any]:  # pragma: no cover - needs a GPU
        cap = torch.cuda.get_device_capability()
        return {"target": self.name, "arch": platform.machine(), "gpu": torch.cuda.get_device_name(),
                "compute_capability": f"{cap[0]}.{cap[1]}", "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__.split("+")[0],
                "tf32": True, "cudnn_benchmark": False, "emulated": False, **self._runtime_key()}

    def offered_formats(self, op: str) -> tuple[str, ...]:
        fmts = ["fp32", "fp16", "bf16"]
        if op == "linear" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            fmts += ["int8"] + (["fp8"] if cap >= (8, 9) else []) + (["sp24"] if cap >= (8, 0) else [])
        return tuple(fmts)

    def unsupported(self, cfg: Any) -> str | None:
        if self.runtime == "cudagraph" and cfg.fmt in ("int8", "fp8", "sp24"):
            # seen on an H100: capturing torchao's dynamic int8 failed, and a failed capture leaves the CUDA
            # context unusable for every later capture; 2:4 capture is unverified
            return f"{cfg.fmt} is not offered in the cudagraph runtime (its kernel is not known to be capturable)"
        return cuda_shape_rule(cfg.op, cfg.cin, cfg.cout, cfg.fmt,
                               torch.cuda.get_device_capability() if torch.cuda.is_available() else None)

    def time(self, fn: Callable[[], object], repeats: int, warmup: int = 5) -> Timing:  # pragma: no cover
        if self.runtime == "cudagraph":
            return time_cuda_graph(fn, repeats, warmup)
        return time_cuda(fn, repeats, warmup)

    def sampler(self, fn: Callable[[], object]) -> Callable[[], float]:  # pragma: no cover - needs a GPU
        return cuda_graph_sampler(fn) if self.runtime == "cudagraph" else cuda_sampler(fn)

    def realize(self, module: nn.Module, fmt: str) -> nn.Module:  # pragma: no cover - needs a GPU
        return realize_cuda(module, fmt)


def use_compile_cache() -> str:
    """Point inductor's on-disk caches (compiled graphs, kernels, autotuning) at hwprune's cache folder, unless
    the user chose one (``TORCHINDUCTOR_CACHE_DIR``): a layer shape compiled once is not compiled again by a
    later profile, search or export."""
    import os

    from hwprune._io import cache_root

    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def compile_module(module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """``torch.compile(module)`` (inductor, default mode), compiled now by one call on ``x``.

    Dynamo's caches are reset first: every layer of a profile is a module of the same class, and past its
    recompile limit dynamo would silently run new shapes eagerly (an eager timing labelled compiled). Layers
    dynamo does not trace (LSTM/GRU, torch.ao's dynamic int8) run eagerly inside the compiled model, as they
    do in a deployment compiled with default settings.
    """
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(module)
    from hwprune import inputs

    with torch.inference_mode():
        inputs.call(compiled, x)
    return compiled


def fingerprint_line(fp: dict[str, Any]) -> str:
    """A fingerprint in one readable line."""
    dev = fp.get("gpu") or fp.get("cpu")
    bits = [fp["target"], str(dev), fp.get("arch", "")]
    if fp.get("threads"):
        bits.append(f"{fp['threads']} thread(s)")
    bits += [f"torch {fp.get('torch')}", str(fp.get("engine") or fp.get("compute_capability") or "")]
    if fp.get("runtime") not in (None, "eager"):
        bits.append(" ".join(str(fp[k]) for k in ("runtime", "runtime_version", "provider", "precision") if fp.get(k)))
    return ", ".join(b for b in bits if b) + (" [EMULATED]" if fp.get("emulated") else "")


def get_target(name: str, threads: int | None = None, emulate: bool = False, runtime: str | None = None) -> Target:
    """The target called ``name`` (unknown names list the known ones) in ``runtime`` (default: eager)."""
    return TARGETS.get(name)(threads=threads, emulate=emulate, runtime=runtime)
