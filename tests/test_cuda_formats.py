"""CUDA formats without a GPU (issue 13, part): shape rules, kernels that fail marked unsupported in the
table, menus read from the table whichever machine asks, policies made runnable, --device auto.

Tests marked ``gpu`` run the real kernels and are skipped where CUDA is absent.
"""
import pytest
import torch
from torch import nn

from conftest import ROOT
from hwprune import HwpruneError, build_model
from hwprune.latency import LatencyTable, Predictor, analyze_layers, get_target, model_key, resolve_table
from hwprune.latency.profiler import layer_configs, profile_layers
from hwprune.latency.table import Entry, key_format
from hwprune.device.targets import CpuTarget, cuda_shape_rule
from hwprune.policy import Policy
from hwprune.train import resolve_device

H100 = ROOT / "hwprune" / "latency_tables" / "cuda-x86-64-nvidia-h100-80gb-hbm3-sm90-torch2.11.0"


@pytest.mark.parametrize("op,cin,cout,fmt,cap,bad", [
    ("linear", 64, 10, "sp24", (9, 0), "multiples of 16, got 10x64"),   # the 10-class head that crashed
    ("linear", 32, 16, "sp24", (9, 0), None),
    ("linear", 128, 128, "sp24", (7, 5), "sm_80"),
    ("linear", 24, 32, "fp8", (9, 0), "multiples of 16, got 32x24"),
    ("linear", 128, 128, "fp8", (8, 0), "sm_89"),
    ("linear", 128, 128, "fp8", (9, 0), None),
    ("linear", 16, 64, "int8", (9, 0), "16 or fewer inputs"),
    ("linear", 17, 64, "int8", (9, 0), None),
    ("conv2d", 64, 64, "int8", (9, 0), "Linear layers only"),
    ("lstm", 64, 64, "sp24", (9, 0), "Linear layers only"),
    ("conv2d", 64, 64, "bf16", (7, 5), "sm_80"),
    ("conv2d", 64, 64, "fp16", (7, 5), None),
])
def test_cuda_shape_rules(op, cin, cout, fmt, cap, bad):
    why = cuda_shape_rule(op, cin, cout, fmt, cap)
    assert (why is None) if bad is None else (bad in why)


class _PickyTarget(CpuTarget):
    """A CPU target whose bf16 kernel rejects layers with fewer than 16 outputs (as cuSPARSELt rejects shapes)."""

    def realize(self, module, fmt):
        if fmt == "bf16" and getattr(module, "out_features", 99) < 16:
            raise RuntimeError("Error original_tensor.shape torch.Size([10, 16]) is not supported!")
        return super().realize(module, fmt)

    def unsupported(self, cfg):
        return "no bf16 for 8 inputs" if cfg.fmt == "bf16" and cfg.cin == 8 else None


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def test_failing_kernels_are_marked_unsupported_not_raised(tmp_path):
    target = _PickyTarget(threads=1)
    model, x = _mlp(), torch.randn(2, 8)
    layers = analyze_layers(model, x)
    table = LatencyTable(target.fingerprint(), 4, path=tmp_path / "t.json")
    configs = layer_configs(layers, (0.5, 1.0), target, 4)
    logs = []
    got = profile_layers(table, configs, target, 3, logs.append)
    assert got["measured"] + got["unsupported"] == len(configs) == len(table.entries) + len(table.unsupported)
    head = [k for k in table.unsupported if k.startswith("linear|i") and "|o10|" in k]
    assert head and all(table.unsupported[k].startswith("RuntimeError: Error original_tensor") for k in head)
    first = [k for k in table.unsupported if k.startswith("linear|i8|")]
    assert first and all(table.unsupported[k] == "no bf16 for 8 inputs" for k in first)
    assert not any(k in table.entries for k in table.unsupported)
    assert any("unsupported by their kernel" in m for m in logs)
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.unsupported == table.unsupported  # saved, and never measured again
    assert profile_layers(again, configs, target, 3, logs.append)["measured"] == 0

    pred = Predictor(again, layers, "k")
    assert pred.menu("4") == ["fp32"]  # the head's bf16 entry is unsupported: not offered
    pol = Policy({}, {"4": "bf16", "2": "bf16"}, 8)
    fixed = pred.runnable(pol)
    assert fixed.formats == {"2": "bf16"}  # the head falls back to fp32, the middle layer keeps bf16
    with pytest.raises(HwpruneError, match="cannot run bf16 at this shape"):
        pred.price(pol)
    assert pred.price(fixed).latency_us > 0


def test_cuda_menus_come_from_the_table_not_this_machine():
    """The H100 table's menus on any machine: exactly the formats the table measured faster than fp32."""
    from hwprune.resolve import resolve

    table = LatencyTable.load(H100 / "b1024.json")
    s = resolve("gru", None, "40,1", {"num_layers": 2}, use_cache=False)
    layers = analyze_layers(s.model, s.example)
    key = model_key("gru", {"num_layers": 2}, (40, 1), [], 8)
    assert key in table.models
    pred = Predictor(table, layers, key)
    menus = pred.menus(get_target("cuda"))
    assert menus == pred.menus()  # the machine asking (no GPU here, or one) does not change them
    full = {g.name: g.units for g in layers.space.groups}
    for form in layers.layers:
        fp32 = table.entries[form.config(full, 1024, "fp32").key].median_us
        want = ["fp32"] + [f for f in ("bf16", "fp16")
                           if table.entries.get(form.config(full, 1024, f).key, Entry(1e9, 0, 1)).median_us < fp32]
        assert sorted(menus[form.name]) == sorted(want)
    # what the H100 measured: fp16 GRU layers beat fp32 (cast islands included), the small classifier does not
    assert menus == {"rnn.layers.0": ["fp32", "fp16"], "rnn.layers.1": ["fp32", "fp16"], "fc": ["fp32"]}


def test_device_auto_is_the_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(HwpruneError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(HwpruneError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_finetune_returns_the_model_where_it_was():
    from torch.utils.data import TensorDataset

    from hwprune.train import evaluate, finetune

    model = _mlp()
    ds = TensorDataset(torch.randn(64, 8), torch.randint(0, 10, (64,)))
    before = [p.detach().clone() for p in model.parameters()]
    finetune(model, ds, 5, device="auto")
    assert next(model.parameters()).device.type == "cpu"
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # trained in place
    assert 0.0 <= evaluate(model, ds) <= 1.0


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_cuda_profile_marks_what_its_kernels_reject(tmp_path):
    """Every CUDA format on a small MLP: no traceback; the 10-output head is not 2:4, 8-input layers not int8."""
    target = get_target("cuda")
    target.setup()
    model, x = _mlp(), torch.randn(2, 8)
    layers = analyze_layers(model, x)
    table = LatencyTable(target.fingerprint(), 64, path=tmp_path / "t.json")
    configs = layer_configs(layers, (0.5, 1.0), target, 64)
    profile_layers(table, configs, target, 5, print)
    assert len(table.entries) + len(table.unsupported) == len(configs)
    for k, why in table.unsupported.items():
        print(k, "->", why)
    fmt = key_format
    assert any("|o10|" in k and fmt(k) == "sp24" for k in table.unsupported)
    assert any(k.startswith("linear|i8|") and fmt(k) == "int8" and k.endswith("|+relu") for k in table.unsupported)
    assert any(fmt(k) == "fp16" for k in table.entries) and any(fmt(k) == "fp32" for k in table.entries)


@pytest.mark.gpu
@gpu
def test_cuda_blocks_run_their_epilogue_in_the_region_dtype_in_every_runtime():
    """A conv + BN + ReLU + pool block in fp16 on the GPU: the epilogue in fp16, timed eager and as a graph."""
    from hwprune.latency.layers import LayerConfig
    from hwprune.latency.profiler import build_block, measure_config

    cfg = LayerConfig("conv2d", 16, 32, 256, fmt="fp16", kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                      extent=(16, 16), post=("bn", "relu", "maxpool.k2x2.s2x2.p0x0"))
    for runtime in ("eager", "cudagraph"):
        target = get_target("cuda", runtime=runtime)
        target.setup()
        mod, x = build_block(cfg, target)
        with torch.no_grad():
            y = mod(x)
        assert y.dtype == torch.float16 and y.shape == (256, 32, 8, 8) and y.is_cuda
        block = measure_config(cfg, target, 5).median_us
        bare = measure_config(cfg.bare(), target, 5).median_us
        print(runtime, f"block {block:.1f} us, bare layer {bare:.1f} us")
        assert block > bare


@pytest.mark.gpu
@gpu
def test_finetune_on_the_gpu_moves_batches_and_returns_to_cpu():
    from torch.utils.data import TensorDataset

    from hwprune.train import finetune

    model = _mlp()
    ds = TensorDataset(torch.randn(256, 8), torch.randint(0, 10, (256,)))
    seen = []
    finetune(model, ds, 3, device="cuda", callback=lambda step: seen.append(next(model.parameters()).device.type))
    assert seen == ["cuda"] * 3 and next(model.parameters()).device.type == "cpu"


def test_the_device_layer_sits_under_apply_latency_and_export():
    """Kernels are a leaf (errors, the deprecated-API module, inputs and the model copy only); the device package
    imports nothing of latency, search or export; apply (pruning and simulation) imports nothing of latency or of the device
    layer but the kernels it simulates with. One module realizes formats for deployment and profiling."""
    import ast

    import hwprune.apply.formats as formats
    import hwprune.device.kernels as kernels
    import hwprune.device.targets as targets
    from hwprune.device.deploy import deploy

    def imports(path):
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                and n.module.startswith("hwprune")}

    assert imports(ROOT / "hwprune" / "device" / "kernels.py") == {"hwprune.errors", "hwprune._compat.ao", "hwprune.inputs",
                                                                  "hwprune._modelcopy"}
    assert imports(ROOT / "hwprune" / "inputs.py") == {"hwprune.errors"}  # inputs: a leaf too
    assert imports(ROOT / "hwprune" / "_modelcopy.py") == set()  # and the model copy
    for f in sorted((ROOT / "hwprune" / "device").glob("*.py")):
        assert not {m for m in imports(f) if m.startswith(("hwprune.latency", "hwprune.search", "hwprune.export",
                                                           "hwprune.cli"))}, f
    for f in sorted((ROOT / "hwprune" / "apply").glob("*.py")):
        assert {m for m in imports(f) if m.startswith(("hwprune.latency", "hwprune.device"))} <= \
            {"hwprune.device.kernels"}, f
    assert formats.mask_2_4 is kernels.mask_2_4 and targets.CastModule is kernels.CastModule
    lin = nn.Linear(8, 4)
    real, report = deploy(formats.apply_formats(nn.Sequential(lin), {"0": "bf16"}), get_target("cpu"))
    # without an example there is no graph to plan regions on: the layer is an island (cast in, cast back)
    assert isinstance(real[0], kernels.RegionLayer) and report.real == {"0": "bf16"}
    assert real[0].dtype == torch.bfloat16 and real[0].out_dtype == torch.float32 and report.regions.startswith("islands")


def test_runtime_is_part_of_the_fingerprint_and_folder_but_eager_keeps_old_names():
    from hwprune.device.targets import fingerprint_slug

    with pytest.raises(HwpruneError, match="target 'cpu' has no runtime 'cudagraph'; known: eager"):
        get_target("cpu", runtime="cudagraph")
    cpu = get_target("cpu", threads=1)
    assert "runtime" not in cpu.fingerprint()  # eager tables of older versions still match
    fp = {"target": "cuda", "arch": "x86_64", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
          "torch": "2.11.0"}
    eager, graph = fingerprint_slug(fp), fingerprint_slug({**fp, "runtime": "cudagraph"})
    assert eager == "cuda-x86-64-nvidia-h100-80gb-hbm3-sm90-torch2.11.0" and graph == eager + "-cudagraph"
    assert get_target("cuda", runtime="cudagraph").runtime == "cudagraph"


@pytest.mark.gpu
@gpu
def test_cudagraph_timing_replays_what_eager_runs():
    """A graph replay of a small layer takes no longer than eager calls of it (launch overhead removed)."""
    target, eager = get_target("cuda", runtime="cudagraph"), get_target("cuda")
    target.setup()
    lin, x = nn.Linear(64, 64).cuda().eval(), torch.randn(32, 64, device="cuda")
    g, e = target.time(lambda: lin(x), 15), eager.time(lambda: lin(x), 15)
    print(f"graph {g.median_us:.2f} us, eager {e.median_us:.2f} us")
    assert 0 < g.median_us <= e.median_us * 1.1


def test_a_cuda_search_from_a_cpu_box_prices_with_the_shipped_table_of_its_runtime():
    if torch.cuda.is_available():
        pytest.skip("with a GPU the cuda target is this machine")
    from hwprune.resolve import resolve

    s = resolve("gru", None, "40,1", {"num_layers": 2}, use_cache=False)
    layers = analyze_layers(s.model, s.example)
    key = model_key("gru", {"num_layers": 2}, (40, 1), [], 8)
    for runtime, folder in (("eager", H100.name), ("cudagraph", H100.name + "-cudagraph")):
        t = resolve_table(get_target("cuda", runtime=runtime), 1024, layers, key, tables=ROOT / "hwprune" / "latency_tables")
        assert t.path.parent.name == folder and t.fingerprint.get("runtime", "eager") == runtime
        assert Predictor(t, layers, key).calibrated


@pytest.mark.gpu
@gpu
def test_fp16_regions_on_the_gpu_cast_twice_and_beat_islands():
    """Whole-model fp16 ResNet-20 on the GPU: 2 casts (in, out), BN in fp16, outputs as fp32's, and no slower
    than the same model as islands (44 casts); the compile runtime compiles it."""
    import copy

    from hwprune.apply.formats import apply_formats
    from hwprune.device.deploy import deploy
    from hwprune.latency.profiler import measure_model
    from hwprune.space import quant_layers

    target = get_target("cuda")
    target.setup()
    m = build_model("resnet20", (1, 28, 28), 10).eval()
    x = torch.randn(1024, 1, 28, 28)
    every = {q.name: "fp16" for q in quant_layers(m)}
    reg, rep = deploy(apply_formats(copy.deepcopy(m), every), target, x[:2])
    isl, rep2 = deploy(apply_formats(copy.deepcopy(m), every), target)
    assert rep.regions == "regions" and rep.casts == 2 and rep2.casts == 44
    assert reg.layer1[0].bn1.weight.dtype == torch.float16
    with torch.no_grad():
        ref = m.cuda()(x.cuda())
        assert float((reg(x.cuda()) - ref).abs().max()) < 0.05 * float(ref.abs().max())
    t_reg, t_isl = measure_model(reg, x, target, 15), measure_model(isl, x, target, 15)
    t_comp = measure_model(reg, x, get_target("cuda", runtime="compile"), 15)
    print(f"regions {t_reg.median_us:.0f} us, islands {t_isl.median_us:.0f} us, compiled regions {t_comp.median_us:.0f} us")
    assert t_reg.median_us <= 1.05 * t_isl.median_us


def test_deprecated_torch_apis_are_used_only_in_their_compat_modules():
    """TorchScript (torch.jit) only in hwprune/_compat/torchscript.py, torch.ao.quantization only in
    hwprune/_compat/ao.py: the one file each to migrate when they go (docstrings and messages may name them)."""
    import ast

    seen = {}
    for f in sorted((ROOT / "hwprune").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for n in ast.walk(tree):
            name = ast.unparse(n) if isinstance(n, ast.Attribute) else None
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                name = next((m for m in mods if m.startswith(("torch.ao.quantization", "torch.jit"))), None)
            if name and name.startswith(("torch.jit.", "torch.ao.quantization")):
                seen.setdefault(name.split(".")[1], set()).add(f.relative_to(ROOT).as_posix())
    assert seen.get("jit") == {"hwprune/_compat/torchscript.py"}
    assert seen.get("ao") == {"hwprune/_compat/ao.py"}


def test_a_profile_without_a_terminal_says_how_far_it_is(tmp_path, monkeypatch):
    """stderr is not a terminal under pytest: no bar, progress lines instead (here after every chunk), counting up
    to every configuration."""
    import re

    from hwprune.latency import profiler

    monkeypatch.setattr(profiler, "PROGRESS_LINE_S", 0.0)
    monkeypatch.setenv("HWPRUNE_ROUND_SECONDS", "0.05")  # small chunks: several lines
    target = CpuTarget(threads=1)
    model, x = _mlp(), torch.randn(2, 8)
    layers = analyze_layers(model, x)
    configs = layer_configs(layers, (0.5, 1.0), target, 4)
    logs = []
    profile_layers(LatencyTable(target.fingerprint(), 4, path=tmp_path / "t.json"), configs, target, 3, logs.append)
    done = [int(m.group(1)) for m in (re.match(r"hwprune: profiling: (\d+) of (\d+) configurations done", ln)
                                      for ln in logs) if m]
    assert len(done) >= 2 and done == sorted(done) and done[-1] == len(configs)


def test_a_profile_says_how_far_it_is_while_it_only_prepares(tmp_path, monkeypatch):
    """In the ONNX runtimes preparing (export, conversion, compilation) takes minutes before a chunk is measured
    (OpenVINO: ~10 min for cnn1d here, with no line): progress lines come while preparing too."""
    import re
    import time as _time

    from hwprune.latency import profiler

    real = profiler.try_prepare

    def slow(cfg, target):
        _time.sleep(0.02)
        return real(cfg, target)

    monkeypatch.setattr(profiler, "try_prepare", slow)
    monkeypatch.setattr(profiler, "PROGRESS_LINE_S", 0.05)
    monkeypatch.setenv("HWPRUNE_ROUND_SECONDS", "1000")  # one chunk: nothing is measured until every item is prepared
    target = CpuTarget(threads=1)
    model, x = _mlp(), torch.randn(2, 8)
    configs = layer_configs(analyze_layers(model, x), (0.5, 1.0), target, 4)
    logs = []
    profile_layers(LatencyTable(target.fingerprint(), 4, path=tmp_path / "t.json"), configs, target, 3, logs.append)
    preparing = [ln for ln in logs if re.match(r"hwprune: profiling: 0 of \d+ configurations done, \d+ prepared", ln)]
    assert len(preparing) >= 2, logs
