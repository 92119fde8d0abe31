"""ONNX export, and ONNX Runtime / OpenVINO sessions that are called like the module they came from.

One export path: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter; onnx and onnxscript),
with a dynamic batch dimension when asked. ONNX Runtime runs the ONNX bytes on its CPU execution provider;
OpenVINO reads the same bytes (``openvino.convert_model``) and compiles them for its CPU plugin with the f32
precision hint — on CPUs with AVX512-BF16 or AMX, OpenVINO otherwise runs bf16 silently, so the precision is part of
what is measured and of the table's fingerprint. Both use a fixed thread count (intra-op threads; one stream).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import sys
import warnings
from typing import Any

import torch
from torch import nn

from hwprune.errors import HwpruneError

__all__ = ["RUNTIMES", "missing", "runtime_fingerprint", "to_onnx", "Session"]

RUNTIMES = ("onnxruntime", "openvino")
_NEEDS = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino")}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
OV_PRECISION = "f32"
ORT_PROVIDER = "CPUExecutionProvider"


def missing(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (a package it needs is not installed), or None."""
    for mod in _NEEDS[runtime]:
        if importlib.util.find_spec(mod) is None:
            return (f"the {runtime} runtime needs the Python package {mod!r}: pip install 'hwprune[{_EXTRA[runtime]}]'")
    return None


def require(runtime: str) -> None:
    why = missing(runtime)
    if why:
        raise HwpruneError(why)


def runtime_fingerprint(runtime: str) -> dict[str, Any]:
    """What of ``runtime`` changes the numbers: its version, and the execution provider (ONNX Runtime) or the
    precision hint (OpenVINO)."""
    require(runtime)
    if runtime == "onnxruntime":
        import onnxruntime

        return {"runtime": runtime, "runtime_version": onnxruntime.__version__, "provider": ORT_PROVIDER}
    import openvino

    return {"runtime": runtime, "runtime_version": openvino.__version__.split("-")[0], "precision": OV_PRECISION}


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter's progress lines and warnings kept off stdout (``--json`` prints there)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _call_args(x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``x`` as the arguments :func:`hwprune.inputs.call` passes: ``(x,)``, ``(*x,)`` or ``**x``."""
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, dict):
        return (), dict(x)
    return tuple(x), {}


def to_onnx(module: nn.Module, x: Any, dynamic_batch: bool = False) -> bytes:
    """``module`` called on ``x`` (a tensor, a tuple of tensors or a dict, as :func:`hwprune.inputs.call` calls
    it) as ONNX bytes; ``dynamic_batch``: dim 0 of every input is left free (``Dim.AUTO``: where the model fixes
    it, the export keeps the example's size — check the graph at another batch before relying on it)."""
    for runtime in RUNTIMES:  # onnx + onnxscript, whichever runtime asked
        if missing(runtime) is None:
            break
    else:
        raise HwpruneError(missing("onnxruntime") or "ONNX export needs onnx and onnxscript")
    args, kwargs = _call_args(x)
    dyn: Any = None
    if dynamic_batch:
        def batch_dims(t: Any) -> Any:
            return {0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None
        dyn = {k: batch_dims(v) for k, v in kwargs.items()} if kwargs else tuple(batch_dims(a) for a in args)
    module = module.eval()
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dyn,
                                 verbose=False, report=False)
    return prog.model_proto.SerializeToString()


class Session:
    """An ONNX model in ONNX Runtime or OpenVINO (CPU, ``threads`` intra-op threads), called with torch tensors
    as the module was (positional or keyword, any nesting: the leaves in order are the graph's inputs) and
    returning torch tensors (one, or a tuple when the graph has several outputs)."""

    def __init__(self, runtime: str, onnx_bytes: bytes, threads: int) -> None:
        require(runtime)
        self.runtime = runtime
        if runtime == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.log_severity_level = 3
            self._sess = ort.InferenceSession(onnx_bytes, so, providers=[ORT_PROVIDER])
            self.input_names = [i.name for i in self._sess.get_inputs()]
        elif runtime == "openvino":
            import openvino as ov

            with _quiet():
                model = ov.convert_model(io.BytesIO(onnx_bytes))
            self._compiled = ov.Core().compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": OV_PRECISION,
                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
            self._request = self._compiled.create_infer_request()
            self.input_names = [i.get_any_name() for i in self._compiled.inputs]
        else:
            raise HwpruneError(f"unknown ONNX runtime {runtime!r}; known: {', '.join(RUNTIMES)}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import numpy as np
        from torch.utils._pytree import tree_leaves

        arrays = [t.detach().cpu().contiguous().numpy() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)]
        if len(arrays) != len(self.input_names):
            raise HwpruneError(f"the {self.runtime} graph takes {len(self.input_names)} input(s) "
                               f"({', '.join(self.input_names)}), called with {len(arrays)} tensor(s)")
        if self.runtime == "onnxruntime":
            outs = self._sess.run(None, dict(zip(self.input_names, arrays)))
        else:  # the request's output buffers are reused by the next call: copied out
            res = self._request.infer(arrays)
            outs = [np.array(res[o]) for o in self._compiled.outputs]
        tensors = [torch.from_numpy(np.asarray(o)) for o in outs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def load(runtime: str, path: str, threads: int) -> Session:
    """A saved ``model.onnx`` in ``runtime``."""
    with open(path, "rb") as f:
        return Session(runtime, f.read(), threads)
