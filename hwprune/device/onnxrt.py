"""ONNX export, and ONNX Runtime / OpenVINO sessions that are called like the module they came from.

One export path: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter; onnx and onnxscript),
with a dynamic batch dimension when asked. ONNX Runtime runs the ONNX bytes on its CPU execution provider;
OpenVINO reads the same bytes (``openvino.convert_model``) and compiles them for its CPU plugin with the f32
precision hint — on CPUs with AVX512-BF16 or AMX, OpenVINO otherwise runs bf16 silently, so the precision is part of
what is measured and of the table's fingerprint; runtime ``openvino-bf16`` asks for bf16 instead. Both use a
fixed thread count (intra-op threads; one stream).
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

__all__ = ["RUNTIMES", "is_openvino", "ov_precision", "missing", "runtime_fingerprint", "to_onnx", "Session",
           "RuntimeFormat", "runtime_onnx",
           "openvino_model", "SessionModule", "INT8_LAYERS", "load"]

# openvino-bf16: OpenVINO with the bf16 precision hint (every op it can run in bf16 does, on CPUs with AVX512-BF16
# or AMX); a runtime of its own because the hint is the whole graph's, not a layer's
RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")
_NEEDS = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino")}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
_NEEDS["openvino-bf16"], _EXTRA["openvino-bf16"] = _NEEDS["openvino"], _EXTRA["openvino"]
ORT_PROVIDER = "CPUExecutionProvider"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags that run OpenVINO's bf16 natively


def is_openvino(runtime: str | None) -> bool:
    return bool(runtime) and runtime.split("-")[0] == "openvino"


def ov_precision(runtime: str) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for ``runtime``: bf16 for openvino-bf16, else f32 (asked for, since on
    AVX512-BF16 / AMX CPUs OpenVINO runs bf16 silently otherwise)."""
    return "bf16" if runtime == "openvino-bf16" else "f32"


def missing(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (a package it needs is not installed), or None."""
    for mod in _NEEDS[runtime]:
        if importlib.util.find_spec(mod) is None:
            return (f"the {runtime} runtime needs the Python package {mod!r}: pip install 'hwprune[{_EXTRA[runtime]}]'")
    if ov_precision(runtime) == "bf16":
        from hwprune.device.targets import _cpu_model_and_flags

        cpu, flags = _cpu_model_and_flags()
        if not any(f in flags for f in BF16_FLAGS):
            return (f"the {runtime} runtime needs a CPU with bf16 instructions ({' or '.join(BF16_FLAGS)}); this "
                    f"{cpu} has none (OpenVINO would run f32: use --runtime openvino)")
    return None


def require(runtime: str) -> None:
    why = missing(runtime)
    if why:
        raise HwpruneError(why)


def runtime_fingerprint(runtime: str) -> dict[str, Any]:
    """What of ``runtime`` changes the numbers: its version, the execution provider (ONNX Runtime) or the
    precision hint (OpenVINO), and that graphs are timed with a free batch dimension (``graph_batch``: tables of
    static-batch graphs, whose GRUs OpenVINO runs up to 2.5x slower, are another device's)."""
    require(runtime)
    if runtime == "onnxruntime":
        import onnxruntime

        return {"runtime": runtime, "runtime_version": onnxruntime.__version__, "provider": ORT_PROVIDER,
                "graph_batch": "dynamic"}
    import openvino

    return {"runtime": runtime, "runtime_version": openvino.__version__.split("-")[0],
            "precision": ov_precision(runtime), "graph_batch": "dynamic"}


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter's progress lines and warnings kept off stdout (``--json`` prints there)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    loggers.append(logging.getLogger())  # onnxruntime.quantization warns on the root logger
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
        # fold every constant subgraph whatever its size: the exporter leaves an LSTM's gate reordering of large
        # weights as Slice/Concat nodes, and a quantizer only sees weights that are initializers
        import onnxscript.optimizer

        onnxscript.optimizer.optimize(prog.model, input_size_limit=2**40, output_size_limit=2**40)
    return prog.model_proto.SerializeToString()


# ONNX Runtime's int8: Linear (a Gemm is rewritten to MatMul + Add first) and LSTM by its dynamic quantization
# (MatMulInteger / DynamicQuantizeLSTM, activations quantized per call); convolutions by static QDQ (per-channel
# int8 weights, uint8 activations whose scales come from calibration inputs; ONNX Runtime fuses the
# DequantizeLinear -> Conv -> QuantizeLinear pattern into QLinearConv). Not GRU: ONNX Runtime has no quantized GRU.
# OpenVINO's int8: NNCF post-training quantization (FakeQuantize on the inputs and weights of the marked
# Convolution / MatMul ops, scales from calibration inputs, fast bias correction). Its recurrent layers stay fp32
# in hwprune (NNCF's LSTMSequence / GRUSequence quantization is not measured here).
INT8_LAYERS = {"onnxruntime": (nn.Linear, nn.LSTM, nn.Conv1d, nn.Conv2d), "openvino": (nn.Linear, nn.Conv1d, nn.Conv2d)}
INT8_LAYERS["openvino-bf16"] = INT8_LAYERS["openvino"]  # the same NNCF quantization; only the float ops' precision differs


class RuntimeFormat(nn.Module):
    """A layer an ONNX runtime runs in ``fmt`` (what ``realize`` returns there): in torch it computes as the
    layer itself; :func:`runtime_onnx` quantizes the ONNX nodes exported from it."""

    def __init__(self, layer: nn.Module, fmt: str) -> None:
        super().__init__()
        self.layer, self.fmt = layer, fmt

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer(*args, **kwargs)


def _scope(node: Any) -> str:
    """The module path a node of the dynamo exporter came from ('' for the top level). Its name scopes are the
    qualified names of the enclosing modules, outermost first (``['', 'body', 'body.1', 'body.1.0', 'linear']``):
    the innermost is the path; scopes of short names (each a child's own name) are joined instead."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            import ast

            mods = ast.literal_eval(p.value)[1:-1]
            if all(b.startswith(a + ".") for a, b in zip(mods, mods[1:])):
                return mods[-1] if mods else ""
            return ".".join(mods)
    return ""


def _gemm_to_matmul(model: Any, names: set[str]) -> None:
    """Rewrite the Gemm nodes in ``names`` whose weight is an initializer (``transB=1``, alpha = beta = 1, as the
    exporter writes nn.Linear) as MatMul by the transposed weight + Add of the bias: ONNX Runtime's dynamic int8
    quantizes MatMul, not Gemm."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.name not in names or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            model.graph.node.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        wt = numpy_helper.from_array((w.T if attrs.get("transB", 0) else w).copy(), n.input[1] + "_matmul")
        model.graph.initializer.append(wt)
        mm_out = n.output[0] + ("_matmul" if len(n.input) > 2 else "")
        model.graph.node.append(helper.make_node("MatMul", [n.input[0], wt.name], [mm_out], name=n.name + "_matmul"))
        if len(n.input) > 2:
            model.graph.node.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "_add"))
    used = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:  # the Gemm weights rewritten
        model.graph.initializer.remove(init)
    onnx.checker.check_model(model)


def _marked_nodes(model: Any, module: nn.Module, ops: tuple[str, ...]) -> list[str]:
    """The ONNX nodes of type ``ops`` that belong to a :class:`RuntimeFormat` layer of ``module``: the exporter's
    module scope is inside it, or its weight is the layer's parameter (a convolution the exporter fused with the
    BatchNorm after it carries the BatchNorm's scope and the convolution's weight)."""
    marked = [name for name, m in module.named_modules() if isinstance(m, RuntimeFormat)]
    inits = {i.name for i in model.graph.initializer}
    inside = lambda path: any(not m or path == m or path.startswith(m + ".") for m in marked)  # noqa: E731
    return sorted(n.name for n in model.graph.node if n.op_type in ops
                  and (inside(_scope(n)) or any(i in inits and inside(i.rsplit(".", 1)[0]) for i in n.input)))


def _batches(x: Any, calibration: list[Any] | None, names: list[str]) -> list[dict[str, Any]]:
    """Calibration inputs as feeds of the graph's inputs (``names``, the flattened tensors in order)."""
    from torch.utils._pytree import tree_leaves

    return [dict(zip(names, [t.detach().cpu().numpy() for t in tree_leaves(_call_args(b))
                             if isinstance(t, torch.Tensor)])) for b in (calibration or [x])]


def openvino_model(module: nn.Module, x: Any, dynamic_batch: bool = False,
                   calibration: list[Any] | None = None) -> Any:
    """``module`` as an ``openvino.Model`` read from its ONNX export; the Convolution / MatMul ops of its
    :class:`RuntimeFormat` layers quantized to int8 by NNCF (``nncf.quantize``, every other op in its ignored
    scope; scales from ``calibration`` inputs, default ``x``). Raises when NNCF quantized fewer ops than marked."""
    require("openvino")
    import openvino as ov

    data = to_onnx(module, x, dynamic_batch)
    with _quiet():
        model = ov.convert_model(io.BytesIO(data))
    marked = {m.fmt for m in module.modules() if isinstance(m, RuntimeFormat)}
    if not marked:
        return model
    if marked != {"int8"}:
        raise HwpruneError(f"the openvino runtime has no {sorted(marked - {'int8'})[0]} kernels in hwprune")
    if importlib.util.find_spec("nncf") is None:
        raise HwpruneError("int8 in the openvino runtime needs NNCF: pip install 'hwprune[openvino]'")
    import onnx

    import nncf

    g = onnx.load_from_string(data)
    nodes = _marked_nodes(g, module, ("Conv", "MatMul", "Gemm"))
    mine = lambda name: any(name == n or name.startswith(n + "/") for n in nodes)  # noqa: E731
    weighted = ("Convolution", "GroupConvolution", "MatMul")
    ops = [op for op in model.get_ops() if op.get_type_name() in weighted]
    keep = [op.get_friendly_name() for op in ops if mine(op.get_friendly_name())]
    ignore = [op.get_friendly_name() for op in ops if not mine(op.get_friendly_name())]
    feeds = _batches(x, calibration, [i.get_any_name() for i in model.inputs])
    nlog = logging.getLogger("nncf")  # what nncf.set_log_level sets: the logger and its handlers, restored after
    levels = [nlog.level] + [h.level for h in nlog.handlers]
    try:
        with _quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # bars
            nncf.set_log_level(logging.ERROR)
            q = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                              target_device=nncf.TargetDevice.CPU,
                              ignored_scope=nncf.IgnoredScope(names=ignore, validate=False))
    finally:
        nlog.setLevel(levels[0])
        for h, lv in zip(nlog.handlers, levels[1:]):
            h.setLevel(lv)
    fq = sum(1 for op in q.get_ops() if op.get_type_name() == "FakeQuantize")
    if not keep or fq < len(keep):
        raise HwpruneError(f"NNCF left some int8 layers in float ({fq} FakeQuantize ops for {len(keep)} marked "
                           f"Convolution/MatMul ops)")
    return q


def runtime_onnx(module: nn.Module, x: Any, runtime: str, dynamic_batch: bool = False,
                 calibration: list[Any] | None = None) -> bytes:
    """:func:`to_onnx`, then the nodes of every :class:`RuntimeFormat` layer in its format (ONNX Runtime's int8, see
    :data:`INT8_LAYERS`; ``reduce_range`` on CPUs without VNNI, where u8 x s8 products can saturate). A node is the
    layer's when the exporter's module scope is inside it or its weight is the layer's parameter (a convolution the
    exporter fused with the BatchNorm after it carries the BatchNorm's scope and the convolution's weight).
    ``calibration``: inputs (structured like ``x``) whose activation ranges set the convolutions' static scales
    (default: ``x`` itself, enough for timing; an export passes training batches). Raises when a marked layer's
    nodes were not all quantized: a float kernel is never timed as int8."""
    data = to_onnx(module, x, dynamic_batch)
    marked = {name: m.fmt for name, m in module.named_modules() if isinstance(m, RuntimeFormat)}
    if not marked:
        return data
    bad = sorted({f for f in marked.values() if f != "int8"} | ({"int8"} if runtime != "onnxruntime" else set()))
    if bad:
        raise HwpruneError(f"the {runtime} runtime has no {bad[0]} kernels in hwprune")
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from hwprune.device.targets import _cpu_model_and_flags

    model = onnx.load_from_string(data)
    gemms = set(_marked_nodes(model, module, ("Gemm",)))
    _gemm_to_matmul(model, gemms)
    convs = _marked_nodes(model, module, ("Conv",))
    dyn = sorted(set(_marked_nodes(model, module, ("MatMul", "LSTM"))) | {g + "_matmul" for g in gemms})
    reduce = not any("vnni" in f for f in _cpu_model_and_flags()[1])
    feeds = _batches(x, calibration, [i.name for i in model.graph.input])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="hwprune-ort-") as tmp, _quiet():
        cur: Any = model
        if convs:
            quantize_static(cur, Path(tmp) / "s.onnx", Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], nodes_to_quantize=convs, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce)
            cur = Path(tmp) / "s.onnx"
        if dyn:
            quantize_dynamic(cur, Path(tmp) / "d.onnx", op_types_to_quantize=["MatMul", "LSTM"],
                             nodes_to_quantize=dyn, weight_type=QuantType.QInt8, reduce_range=reduce)
            cur = Path(tmp) / "d.onnx"
        out = cur if isinstance(cur, onnx.ModelProto) else onnx.load(cur)
    _check_quantized(out, len(convs), len(dyn), sorted(marked))
    return out.SerializeToString()


def _check_quantized(model: Any, convs: int, dyn: int, layers: list[str]) -> None:
    """Every marked node quantized: as many Conv nodes fed by a DequantizeLinear weight as marked convolutions, and
    as many MatMulInteger / DynamicQuantizeLSTM nodes as marked MatMul / LSTM nodes."""
    made = {n.output[0]: n.op_type for n in model.graph.node}
    qconv = sum(1 for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
                and made.get(n.input[1]) == "DequantizeLinear")
    qdyn = sum(1 for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLSTM"))
    if qconv < convs or qdyn < dyn or convs + dyn == 0:
        raise HwpruneError(f"ONNX Runtime's quantizer left some of {', '.join(layers) or 'the model'} in float "
                           f"({qconv} of {convs} convolutions, {qdyn} of {dyn} MatMul/LSTM nodes quantized)")


class Session:
    """An ONNX model in ONNX Runtime or OpenVINO (CPU, ``threads`` intra-op threads), called with torch tensors
    as the module was (positional or keyword, any nesting: the leaves in order are the graph's inputs) and
    returning torch tensors (one, or a tuple when the graph has several outputs)."""

    def __init__(self, runtime: str, onnx_bytes: Any, threads: int) -> None:
        """``onnx_bytes``: the ONNX model, or (OpenVINO) an ``openvino.Model`` already read (e.g. quantized by
        NNCF, :func:`openvino_model`)."""
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
        elif is_openvino(runtime):
            import openvino as ov

            if isinstance(onnx_bytes, (bytes, bytearray)):
                with _quiet():
                    model = ov.convert_model(io.BytesIO(onnx_bytes))
            else:
                model = onnx_bytes
            self._compiled = ov.Core().compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": ov_precision(runtime),
                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
            self._request = self._compiled.create_infer_request()
            self.input_names = [i.get_any_name() for i in self._compiled.inputs]
        else:
            raise HwpruneError(f"unknown ONNX runtime {runtime!r}; known: {', '.join(RUNTIMES)}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import numpy as np
        from torch.utils._pytree import tree_leaves

        if not args and kwargs and set(kwargs) == set(self.input_names):  # by name: any dict order
            leaves = [kwargs[n] for n in self.input_names]
        else:
            leaves = tree_leaves((args, kwargs))
        arrays = [t.detach().cpu().contiguous().numpy() for t in leaves if isinstance(t, torch.Tensor)]
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
    """A saved ``model.onnx`` in ``runtime``, or an OpenVINO IR (``model.xml`` beside its ``.bin``) in OpenVINO (at
    ``runtime``'s precision when it is an OpenVINO runtime)."""
    if str(path).endswith(".xml"):
        require("openvino")
        import openvino as ov

        return Session(runtime if is_openvino(runtime) else "openvino", ov.Core().read_model(str(path)), threads)
    with open(path, "rb") as f:
        return Session(runtime, f.read(), threads)


def save_openvino_ir(model: Any, path: str) -> None:
    """An ``openvino.Model`` as IR (``path`` = ``.xml``, weights in the ``.bin`` beside it), weights kept fp32."""
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)


class SessionModule(nn.Module):
    """A :class:`Session` as an ``nn.Module`` (no parameters: it runs on the CPU), for code that evaluates
    modules (the test metric of an export measured on the file the runtime loads)."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.session(*args, **kwargs)
