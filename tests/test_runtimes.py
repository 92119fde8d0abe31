"""ONNX export and the ONNX Runtime / OpenVINO runtimes of the cpu target (issue 23)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ASSETS, run_cli
from hwprune.device.onnxrt import RUNTIMES, Session, missing, to_onnx

MLP3 = f"{ASSETS / 'user_model.py'}:mlp3"
DATA = f"{ASSETS / 'user_model.py'}:make_mlp_data"


def _need(runtime: str) -> None:
    why = missing(runtime)
    if why:
        pytest.skip(why)


def _agrees(runtime: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """f32 runtimes compute the module's outputs to 1e-5; openvino-bf16 within 2% of their scale and not exactly
    (its precision hint took effect: a silent f32 would be exact)."""
    diff, scale = float((got - ref.detach()).abs().max()), float(ref.detach().abs().max())
    if runtime == "openvino-bf16":
        assert 1e-6 < diff < 0.02 * max(scale, 1e-3), (diff, scale)
    else:
        assert diff < 1e-5, diff


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class GRU2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(6, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def _trained_bn(m: nn.Module) -> nn.Module:
    """BatchNorm with statistics that are not the identity, so that folding it is checked."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("make,shape", [(TinyCNN, (1, 40)), (GRU2, (12, 6))], ids=["cnn", "gru2"])
def test_onnx_round_trip_at_two_batch_sizes(runtime, make, shape):
    """Exported once at batch 4 with a dynamic batch dimension, the graph computes what the module computes at
    batch 4 and at batch 7, in each runtime."""
    _need(runtime)
    torch.manual_seed(0)
    model = _trained_bn(make())
    sess = Session(runtime, to_onnx(model, torch.randn(4, *shape), dynamic_batch=True), threads=1)
    for b in (4, 7):
        x = torch.randn(b, *shape)
        got = sess(x)
        assert got.shape == (b, 3)
        _agrees(runtime, got, model(x))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 48, batch_first=True)
        self.fc = nn.Linear(48, 48)
        self.out = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.out(torch.relu(self.fc(y[:, -1])))


def test_int8_in_onnx_runtime_quantizes_the_marked_layers_only_and_keeps_a_dynamic_batch():
    """The LSTM and the first Linear realized in int8 for ONNX Runtime: the graph holds DynamicQuantizeLSTM and one
    MatMulInteger (a Gemm is rewritten first), the last Linear stays float; outputs within 5% of the float model's
    scale at batch 4 and at batch 9 (int8 is not exact: a graph that quantized nothing would be within 1e-5)."""
    _need("onnxruntime")
    import onnx

    from hwprune.device.onnxrt import runtime_onnx
    from hwprune.latency import get_target

    torch.manual_seed(0)
    model = LSTMHead().eval()
    target = get_target("cpu", threads=1, runtime="onnxruntime")
    assert target.offered_formats("lstm") == ("fp32", "int8") and target.offered_formats("linear") == ("fp32", "int8")
    marked = LSTMHead().eval()
    marked.load_state_dict(model.state_dict())
    marked.rnn, marked.fc = target.realize(marked.rnn, "int8"), target.realize(marked.fc, "int8")
    with pytest.raises(Exception, match="no 'int8' kernel for GRU"):
        target.realize(nn.GRU(4, 4), "int8")
    data = runtime_onnx(marked, torch.randn(4, 12, 6), "onnxruntime", dynamic_batch=True)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 1 and ops.count("MatMulInteger") == 1
    assert ops.count("Gemm") + ops.count("MatMul") == 1  # the last Linear, float
    sess = Session("onnxruntime", data, threads=1)
    for b in (4, 9):
        x = torch.randn(b, 12, 6)
        ref = model(x).detach()
        diff = float((sess(x) - ref).abs().max())
        assert 1e-5 < diff < 0.05 * float(ref.abs().max())


def test_int8_reaches_an_lstm_nested_in_the_split_stack_the_search_builds():
    """A 2-layer LSTM is split into per-layer modules (rnn.layers.0/1) before it is priced; its second layer marked
    int8 is found by its module scope (the exporter names scopes by qualified name, outermost first) and quantized,
    the first stays float: the LSTM LM's calibration in ONNX Runtime once stopped here ("0 of 0 quantized")."""
    _need("onnxruntime")
    import onnx

    from hwprune.device.onnxrt import runtime_onnx
    from hwprune.latency import get_target
    from hwprune.space import prepare_model

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 16, num_layers=2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = prepare_model(Stack().eval())
    assert [n for n, _ in model.named_modules()][:5] == ["", "rnn", "rnn.layers", "rnn.layers.0", "rnn.layers.1"]
    model.rnn.layers[1] = get_target("cpu", threads=1, runtime="onnxruntime").realize(model.rnn.layers[1], "int8")
    data = runtime_onnx(model, torch.randn(4, 12, 6), "onnxruntime", dynamic_batch=True)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 1 and ops.count("LSTM") == 1


def test_int8_convolutions_in_onnx_runtime_are_static_qdq_calibrated_on_the_inputs_given():
    """The first convolution of a conv + BatchNorm + ReLU net realized in int8: its weight comes through a
    DequantizeLinear (the exporter folded the BatchNorm into it: found by its weight, not its scope), the second
    convolution stays float; outputs within 5% of the scale at batch 4 and 9, not within 1e-5. A marked layer the
    quantizer cannot reach raises instead of timing a float kernel as int8."""
    _need("onnxruntime")
    import onnx

    from hwprune.device.onnxrt import RuntimeFormat, runtime_onnx
    from hwprune.errors import HwpruneError
    from hwprune.latency import get_target

    torch.manual_seed(0)
    model = _trained_bn(TinyCNN())
    marked = _trained_bn(TinyCNN())
    marked.load_state_dict(model.state_dict())
    marked.body[0] = get_target("cpu", runtime="onnxruntime").realize(marked.body[0], "int8")
    calib = [torch.randn(16, 1, 40) for _ in range(2)]
    g = onnx.load_from_string(runtime_onnx(marked, torch.randn(4, 1, 40), "onnxruntime", dynamic_batch=True,
                                           calibration=calib))
    made = {n.output[0]: n.op_type for n in g.graph.node}
    convs = [n for n in g.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and [made.get(n.input[1]) == "DequantizeLinear" for n in convs].count(True) == 1
    sess = Session("onnxruntime", g.SerializeToString(), threads=1)
    for b in (4, 9):
        x = torch.randn(b, 1, 40)
        ref = model(x).detach()
        assert 1e-5 < float((sess(x) - ref).abs().max()) < 0.05 * float(ref.abs().max())
    with pytest.raises(HwpruneError, match="left some of .* in float"):  # an activation-only layer: no weight node
        runtime_onnx(nn.Sequential(RuntimeFormat(nn.ReLU(), "int8")), torch.randn(2, 3), "onnxruntime")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_layer_entry_is_timed_as_a_single_block_graph_in_the_runtime(runtime):
    """The cpu target in an ONNX runtime prepares a table entry (a fused conv + BatchNorm + ReLU block) as a
    session of that runtime, not the eager module: same outputs, a positive timing sample; GRUs are offered fp32
    only, with the reason said."""
    _need(runtime)
    from hwprune.latency import analyze_layers, get_target
    from hwprune.latency.profiler import build_block, layer_configs, prepare_config

    target = get_target("cpu", threads=1, runtime=runtime)
    model = _trained_bn(TinyCNN())
    layers = analyze_layers(model, torch.randn(2, 1, 40))
    cfgs = [c for c in layer_configs(layers, (0.5, 1.0), target, 4) if getattr(c, "post", None)]
    assert cfgs and {c.fmt for c in cfgs} == {"fp32", "int8"}
    cfg = next(c for c in cfgs if c.fmt == "fp32")
    mod, x = build_block(cfg, target)
    run = target.prepare(mod, x)
    assert isinstance(run, Session) and run.runtime == runtime
    _agrees(runtime, run(x), mod(x))
    _agrees(runtime, run(torch.cat([x, x])), mod(torch.cat([x, x])))  # a free batch, as export ships it
    sample, _ = prepare_config(cfg, target)
    assert sample() > 0
    assert target.offered_formats("gru") == ("fp32",)
    assert target.offered_formats("conv1d") == ("fp32", "int8")
    assert "int8" in target.format_note() and "GRU" in target.format_note()
    assert get_target("cpu", runtime="eager").offered_formats("gru") == ("fp32", "bf16", "int8")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_runtime_is_in_the_fingerprint_and_a_table_of_another_runtime_is_refused(runtime, tmp_path):
    """The runtime, its version and its provider / precision are in the fingerprint and the table's folder; a
    table measured in another runtime (or another version of it) is not this device's."""
    _need(runtime)
    from hwprune.latency import get_target
    from hwprune.latency.table import fingerprint_diff
    from hwprune.device.targets import fingerprint_slug

    eager = get_target("cpu", threads=1).fingerprint()
    fp = get_target("cpu", threads=1, runtime=runtime).fingerprint()
    assert fp["runtime"] == runtime and fp["runtime_version"] and (fp.get("provider") or fp.get("precision"))
    assert fingerprint_slug(fp).startswith(fingerprint_slug(eager)) and runtime in fingerprint_slug(fp)
    assert any(d.startswith("runtime:") for d in fingerprint_diff(eager, fp))
    older = {**fp, "runtime_version": "0.1"}
    assert fingerprint_diff(older, fp) == [f"runtime_version: table '0.1' vs here {fp['runtime_version']!r}"]
    static = {k: v for k, v in fp.items() if k != "graph_batch"}  # a table of static-batch graphs (older hwprune)
    assert fp["graph_batch"] == "dynamic" and fingerprint_diff(static, fp) and "dynbatch" in fingerprint_slug(fp)
    assert "dynbatch" not in fingerprint_slug(static)
    # an eager table in the folder: a predict in this runtime does not take it
    tables = tmp_path / "tables"
    proc = run_cli("profile", "--target", "cpu", "--model", MLP3, "--data", DATA, "--batch-size", "8",
                   "--channel-multiple", "16", "--repeats", "2", "--tables", str(tables))
    assert proc.returncode == 0, proc.stderr[-2000:]
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"format_version": 1, "keep": {}, "channel_multiple": 16}))
    proc = run_cli("predict", "--target", "cpu", "--runtime", runtime, "--model", MLP3, "--data", DATA,
                   "--batch-size", "8", "--channel-multiple", "16", "--tables", str(tables), "--no-profile",
                   "--policy", str(pol))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert runtime in proc.stderr, proc.stderr[-1500:]


def test_profile_runtime_all_measures_the_dense_model_in_every_runtime_side_by_side():
    """eager, compile and the ONNX runtimes in the same rounds: each a measured median with its spread, the
    speedup over eager (eager's own: 1), outputs equal to eager's (openvino-bf16: to bf16's precision, or skipped
    with the reason on a CPU without bf16)."""
    for rt in ("onnxruntime", "openvino"):
        _need(rt)
    proc = run_cli("profile", "--target", "cpu", "--runtime", "all", "--model", MLP3, "--data", DATA,
                   "--batch-size", "64", "--repeats", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["runtime"]: r for r in json.loads(proc.stdout)["runtimes"]}
    assert set(rows) == {"eager", "compile", "onnxruntime", "openvino", "openvino-bf16"}
    bf16 = rows.pop("openvino-bf16")
    if missing("openvino-bf16"):
        assert bf16["skipped"] == missing("openvino-bf16") and "bf16 instructions" in bf16["skipped"]
    else:
        assert bf16["median_ms"] > 0 and 1e-6 < bf16["max_abs_diff"] < 0.05, bf16
        rows["openvino-bf16"] = bf16
    for r in rows.values():
        assert r["median_ms"] > 0 and r["rounds"] >= 3 and (r["max_abs_diff"] < 1e-4 or r is bf16), r
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    for r in rows.values():
        assert r["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / r["median_ms"])


def test_export_writes_an_onnx_file_and_a_torch_export_program_with_a_dynamic_batch(tmp_path):
    """Traced at batch 8, both reload (ONNX Runtime / plain torch) and compute the model's outputs at batch 8
    and at batch 13; the checks record the largest difference and where the ONNX file was checked."""
    _need("onnxruntime")
    from hwprune.export import _save_artifacts

    torch.manual_seed(0)
    model = _trained_bn(TinyCNN())
    kept, checks = _save_artifacts(model, torch.randn(8, 1, 40), tmp_path, torch.randn(13, 1, 40))
    assert {"onnx", "torch.export"} <= set(kept), checks
    assert checks["onnx"]["checked_in"] == "onnxruntime" and checks["onnx"]["max_abs_diff"] < 1e-5
    import onnxruntime

    sess = onnxruntime.InferenceSession(kept["onnx"], providers=["CPUExecutionProvider"])
    pt2 = torch.export.load(kept["torch.export"]).module()
    for b in (3, 8, 13):
        x = torch.randn(b, 1, 40)
        ref = model(x).detach()
        assert float((torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]) - ref).abs().max()) < 1e-5
        assert float((pt2(x) - ref).abs().max()) < 1e-5


def test_the_target_session_restores_every_process_wide_setting_it_changes(monkeypatch):
    """Threads, quantized engine, inductor's cache folder (cpu, compile runtime) and TF32 / cuDNN flags (cuda):
    changed inside the session as the target needs them, as they were after it."""
    import os

    from hwprune.latency import get_target

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    other = "qnnpack" if engine != "qnnpack" and "qnnpack" in torch.backends.quantized.supported_engines else engine
    try:
        torch.set_num_threads(2)
        torch.backends.quantized.engine = other
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        with get_target("cpu", threads=1, runtime="compile").settings():
            assert torch.get_num_threads() == 1 and os.environ["TORCHINDUCTOR_CACHE_DIR"]
            if "x86" in torch.backends.quantized.supported_engines:
                assert torch.backends.quantized.engine == "x86"
        assert torch.get_num_threads() == 2 and torch.backends.quantized.engine == other
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
        with get_target("cuda").session():
            assert torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        torch.set_num_threads(threads)
        torch.backends.quantized.engine = engine
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = flags


def test_int8_in_openvino_is_nncf_quantization_of_the_marked_layers():
    """The first convolution and the first Linear of a small net realized in int8 for OpenVINO: NNCF puts
    FakeQuantize ops in front of them, not of the rest (at least one per marked op, fewer than for all four); the
    compiled model stays within 5% of the float outputs at batch 4 and 9, and is not exact. LSTMs are not offered.
    NNCF's logger level, set for the call, is back where it was."""
    _need("openvino")
    pytest.importorskip("nncf", reason="int8 in the openvino runtime needs NNCF (the openvino extra)")
    from hwprune.device.onnxrt import openvino_model
    from hwprune.latency import get_target

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1)
            self.f1, self.f2 = nn.Linear(16 * 20, 32), nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.f2(torch.relu(self.f1(y.flatten(1))))

    torch.manual_seed(0)
    model = Net().eval()
    target = get_target("cpu", threads=1, runtime="openvino")
    assert target.offered_formats("lstm") == ("fp32",) and target.offered_formats("conv1d") == ("fp32", "int8")
    marked = Net().eval()
    marked.load_state_dict(model.state_dict())
    marked.c1, marked.f1 = target.realize(marked.c1, "int8"), target.realize(marked.f1, "int8")
    import logging

    nlog = logging.getLogger("nncf")
    before = nlog.level
    ovm = openvino_model(marked, torch.randn(4, 4, 20), dynamic_batch=True, calibration=[torch.randn(32, 4, 20)])
    assert nlog.level == before  # NNCF's log level is process-wide: quieted for the call, then restored
    fq = [op for op in ovm.get_ops() if op.get_type_name() == "FakeQuantize"]
    everything = openvino_model(nn.Sequential(*[target.realize(m, "int8") for m in (nn.Linear(8, 8), nn.Linear(8, 8))]),
                                torch.randn(4, 8))
    assert 2 <= len(fq) < 8 and sum(op.get_type_name() == "FakeQuantize" for op in everything.get_ops()) >= 2
    sess = Session("openvino", ovm, threads=1)
    for b in (4, 9):
        x = torch.randn(b, 4, 20)
        ref = model(x).detach()
        assert 1e-6 < float((sess(x) - ref).abs().max()) < 0.05 * float(ref.abs().max())


@pytest.mark.e2e
@pytest.mark.parametrize("runtime,artifact", [("onnxruntime", "model.onnx"), ("openvino", "model.xml"),
                                              ("openvino-bf16", "model.xml")])
def test_search_and_export_in_an_onnx_runtime_measure_the_file_that_runtime_loads(runtime, artifact, tmp_path):
    """profile (on demand) + search + export of a 3-layer MLP in the runtime: the export measures the runtime's own
    file, reports the test metric of that file, and the file reloads and runs at another batch size. The budget is
    absolute and far above the MLP (~0.1 ms): whether a share of it can be met depends on the machine's noise, and
    the flow is what is tested."""
    _need(runtime)
    run, tables = tmp_path / "run", tmp_path / "tables"
    proc = run_cli("search", "--model", MLP3, "--data", DATA, "--target", "cpu", "--runtime", runtime, "--budget",
                   "10ms", "--budget-margin", "0", "--batch-size", "1024", "--trials", "3", "--finetune-steps", "3", "--keep-levels", "0",
                   "--tables", str(tables), "--out", str(run), "--json", env={"HWPRUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the {runtime} runtime offers int8" in proc.stderr or f"the {runtime} runtime runs every op" in proc.stderr
    proc = run_cli("export", str(run), "--trust-code", "--finetune-steps", "3", "--repeats", "3", "--json",
                   env={"HWPRUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["measurement"]["measured"] == f"{artifact} in {runtime}" and s["measured_latency_ms"] > 0
    key = "openvino" if runtime.startswith("openvino") else "onnx"
    assert Path(s["artifacts"][key]).name == artifact and s["artifact_checks"][key]["checked_in"] == runtime
    from hwprune.device.onnxrt import load

    sess = load(runtime, s["artifacts"][key], 1)
    assert sess(torch.randn(5, 4)).shape == (5, 3)
    assert 0 <= s["test_accuracy"] <= 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_dict_inputs_reach_the_graph_by_name_in_any_order(runtime):
    """A model called as model(**inputs): exported from one dict order, called with another, the session feeds
    each tensor to the graph input of its name."""
    _need(runtime)

    class TwoInputs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * 2 + b[:, :1]

    m = TwoInputs().eval()
    x = {"b": torch.randn(4, 3), "a": torch.randn(4, 1)}
    sess = Session(runtime, to_onnx(m, x), threads=1)
    y = {"a": x["a"], "b": x["b"]}
    assert float((sess(**y) - m(**y)).abs().max()) < 1e-6
