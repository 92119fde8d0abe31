"""The field's model libraries, as a new user takes them (random weights, small synthetic inputs, nothing
downloaded): for every model definition, ``build_space`` (what ``hwprune inspect`` lists, each group cut once)
and a uniform 50% prune (what ``hwprune apply --uniform 0.5`` does), in process.

Each row: groups found, layers kept whole (with the reason), params dense -> pruned, whether the pruned model
runs and gives the dense model's output shapes, the seconds analysis took, or the one-line error. A library that
is not installed is skipped with the reason. Install them as ``make bench-zoo`` does (versions and the CPU-torch
workarounds: docs/models.md and DESIGN.md).

    python bench/zoo.py [--only torchvision,torchaudio] [--name zoo]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def torchvision_models() -> Any:
    """torchvision's model code on a CPU torch: its compiled ops do not load, and its meta registrations then
    fail on the missing ``torchvision::nms``; define the two schemas first (the models never call them)."""
    if getattr(torchvision_models, "lib", None) is None:
        _define_torchvision_ops()
    import torchvision.models as tvm

    return tvm


def _define_torchvision_ops() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            lib.define(schema)
        except RuntimeError:
            pass
    torchvision_models.lib = lib  # type: ignore[attr-defined] - kept alive while the process runs


def torchaudio_models() -> Any:
    """``torchaudio.models`` without ``torchaudio/__init__`` (which loads CUDA-linked ``lib/*.so``): the
    package is entered as a bare namespace over its install folder."""
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'torchaudio'")
    if "torchaudio" not in sys.modules:
        pkg = types.ModuleType("torchaudio")
        pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
        pkg.__spec__ = spec
        sys.modules["torchaudio"] = pkg
    import torchaudio.models as tam

    return tam


def _img(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def cases() -> list[tuple[str, str, Callable[[], torch.nn.Module], Callable[[], Any]]]:
    """(library, model, factory, example) for each definition tried."""
    out: list = []
    tv = lambda name, **kw: (lambda: getattr(torchvision_models(), name)(weights=None, num_classes=10, **kw))  # noqa: E731
    for name in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "efficientnet_b1", "squeezenet1_0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "regnet_x_400mf",
                 "regnet_y_400mf", "resnext50_32x4d"):
        out.append(("torchvision", name, tv(name), _img))

    def timm_model(name: str) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            torchvision_models()  # timm imports torchvision
            import timm

            return timm.create_model(name, pretrained=False, num_classes=10)
        return make
    for name in ("resnet10t", "mobilenetv3_small_050", "efficientnet_lite0", "lcnet_050"):
        out.append(("timm", name, timm_model(name), _img))

    ta = lambda name, **kw: (lambda: getattr(torchaudio_models(), name)(**kw))  # noqa: E731
    out += [
        ("torchaudio", "wav2letter (waveform)", ta("Wav2Letter", num_classes=10, input_type="waveform"),
         lambda: torch.randn(2, 1, 4000)),
        ("torchaudio", "wav2letter (mfcc)", ta("Wav2Letter", num_classes=10, input_type="mfcc", num_features=13),
         lambda: torch.randn(2, 13, 100)),
        ("torchaudio", "conv_tasnet", ta("ConvTasNet", num_sources=2, enc_kernel_size=16, enc_num_feats=64,
                                         msk_kernel_size=3, msk_num_feats=32, msk_num_hidden_feats=64,
                                         msk_num_layers=2, msk_num_stacks=1),
         lambda: torch.randn(2, 1, 800)),
        ("torchaudio", "deepspeech", ta("DeepSpeech", n_feature=40, n_hidden=64, n_class=10),
         lambda: torch.randn(2, 1, 50, 40)),
    ]
    return out


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run_case(factory: Callable[[], torch.nn.Module], example: Callable[[], Any]) -> dict[str, Any]:
    from torch.utils._pytree import tree_leaves

    from hwprune import inputs
    from hwprune.apply import prune_model
    from hwprune.policy import Policy
    from hwprune.space import build_space

    torch.manual_seed(0)
    model, x = factory().eval(), example()
    with torch.no_grad():
        want = [tuple(t.shape) for t in tree_leaves(inputs.call(model, x)) if isinstance(t, torch.Tensor)]
    t0 = time.perf_counter()
    space = build_space(model, x)
    row: dict[str, Any] = {"groups": len(space.groups), "kept_whole": dict(space.kept),
                           "analysis_s": round(time.perf_counter() - t0, 2), "params": _params(model)}
    if not space.groups:
        return row
    pruned = prune_model(model, Policy({g.name: 0.5 for g in space.groups}, channel_multiple=1), x).eval()
    with torch.no_grad():
        got = [tuple(t.shape) for t in tree_leaves(inputs.call(pruned, x)) if isinstance(t, torch.Tensor)]
    row.update(pruned_params=_params(pruned), runs=got == want)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="libraries to try, comma-separated (default all)")
    ap.add_argument("--name", default="zoo")
    a = ap.parse_args()
    from _results import cpu_fingerprint, write_results

    from hwprune.errors import one_line

    only = set(a.only.split(",")) if a.only else None
    rows = []
    for lib, name, factory, example in cases():
        if only and lib not in only:
            continue
        try:
            row = run_case(factory, example)
        except ImportError as exc:
            row = {"skipped": f"not installed ({one_line(exc, 120)})"}
        except Exception as exc:  # noqa: BLE001 - a row's failure is its result
            row = {"error": one_line(exc, 300)}
        row = {"library": lib, "model": name, **row}
        rows.append(row)
        print(row, flush=True)
    from importlib.metadata import PackageNotFoundError, version

    def _v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"
    versions = {p: _v(p) for p in ("torch", "torch-pruning", "torchvision", "timm", "torchaudio")}
    lines = ["# The field's model libraries: analysis and a uniform 50% prune", "",
             "Random weights, small synthetic inputs; `build_space` (each listed group cut once) then every group "
             "at 50%, in process. Written by `python bench/zoo.py`.", "", f"Versions: {versions}", "",
             "| library | model | groups | kept whole | params dense → pruned | pruned runs | analysis s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['library']} | {r['model']} | {r.get('skipped') or 'error: ' + r['error']} ||||| ")
            continue
        kept = "; ".join(f"`{k}`: {v[:120]}" for k, v in r["kept_whole"].items()) or "—"
        pp = f"{r['params']:,} → {r['pruned_params']:,}" if "pruned_params" in r else f"{r['params']:,} → —"
        lines.append(f"| {r['library']} | {r['model']} | {r['groups']} | {kept} | {pp} | "
                     f"{r.get('runs', '—')} | {r['analysis_s']} |")
    write_results(a.name, cpu_fingerprint(), {"versions": versions, "rows": rows}, lines)


if __name__ == "__main__":
    main()
