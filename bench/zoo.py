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
    """``torchaudio.models`` without ``torchaudio/__init__`` (which loads CUDA-linked ``lib/*.so``)."""
    _bare("torchaudio")
    import torchaudio.models as tam

    return tam


def _bare(name: str) -> None:
    """Enter package ``name`` as a bare namespace over its install folder, without running its ``__init__``:
    torchaudio's loads CUDA-linked ``lib/*.so``; OpenNMT-py's imports its text transforms (spacy, fasttext),
    which its model classes do not need."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"No module named '{name}'")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
    pkg.__spec__ = spec
    sys.modules[name] = pkg


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
        ("torchaudio", "conformer", ta("Conformer", input_dim=32, num_heads=2, ffn_dim=64, num_layers=2,
                                       depthwise_conv_kernel_size=3),
         lambda: (torch.randn(2, 20, 32), torch.tensor([20, 15]))),
    ]
    out += _speech_and_translation()
    return out


FAIRSEQ_SRC = ROOT / ".zoo" / "fairseq_fixed-0.12.3.1"  # its unbuilt source (no wheel exists; make bench-zoo unpacks it)


def _speech_and_translation() -> list:
    """SpeechBrain's CRDNN (GRU, LSTM and LiGRU layers), OpenNMT-py's RNN encoder-decoders (input feeding with an
    LSTM, a standard decoder with a GRU; bidirectional encoders, general attention) and fairseq's LSTM model
    (with and without attention), built from their own classes in small."""
    out: list = []
    for rnn in ("GRU", "LSTM", "LiGRU"):
        out.append(("speechbrain", f"CRDNN ({rnn})", lambda rnn=rnn: crdnn_model(rnn), lambda: torch.randn(2, 50, 40)))
    onmt_in = lambda: (torch.randint(2, 50, (2, 7, 1)), torch.randint(2, 50, (2, 6, 1)), torch.tensor([7, 7]))  # noqa: E731
    out.append(("opennmt-py", "RNN seq2seq (bi-LSTM, input feeding)", lambda: onmt_model(True, "LSTM"), onmt_in))
    out.append(("opennmt-py", "RNN seq2seq (bi-GRU, standard decoder)", lambda: onmt_model(False, "GRU"), onmt_in))
    fs_in = lambda: (torch.randint(2, 50, (2, 7)), torch.tensor([7, 5]), torch.randint(2, 50, (2, 6)))  # noqa: E731
    out.append(("fairseq", "LSTM model (attention)", lambda: fairseq_model(True), fs_in))
    out.append(("fairseq", "LSTM model (no attention)", lambda: fairseq_model(False), fs_in))
    return out


def crdnn_model(rnn: str, classes: int = 10) -> torch.nn.Module:
    """SpeechBrain's CRDNN (2 CNN blocks, 2 recurrent layers of 64 of ``rnn``, 1 DNN block) with a per-frame
    Linear classifier; input (batch, frames, 40)."""
    torchaudio_models()  # SpeechBrain imports torchaudio
    import speechbrain.nnet.RNN as R
    from speechbrain.lobes.models.CRDNN import CRDNN

    return _Head(CRDNN(input_shape=[None, None, 40], rnn_class=getattr(R, rnn), cnn_blocks=2, cnn_channels=(16, 32),
                       rnn_layers=2, rnn_neurons=64, dnn_blocks=1, dnn_neurons=64, time_pooling=False,
                       using_2d_pooling=False, rnn_re_init=False), 64, classes)


def onmt_model(input_feed: bool, rnn: str, vocab: int = 50, pad: int = 1, hidden: int = 64, emb: int = 32
               ) -> torch.nn.Module:
    """OpenNMT-py's NMTModel: a bidirectional ``rnn`` encoder, an input-feeding or standard decoder with general
    attention, ``hidden`` units (64), embeddings ``emb`` wide (32), and its generator; input (src (batch, time,
    1), tgt, src lengths)."""
    for pkg in ("onmt", "onmt.encoders", "onmt.decoders", "onmt.models"):
        _bare(pkg)
    from onmt.decoders.decoder import InputFeedRNNDecoder, StdRNNDecoder
    from onmt.encoders.rnn_encoder import RNNEncoder
    from onmt.models.model import NMTModel
    from onmt.modules import Embeddings

    dec = InputFeedRNNDecoder if input_feed else StdRNNDecoder
    model = _OpenNMT(NMTModel(RNNEncoder(rnn, True, 1, hidden, embeddings=Embeddings(emb, vocab, pad)),
                              dec(rnn, True, 1, hidden, attn_type="general", embeddings=Embeddings(emb, vocab, pad))),
                     hidden, vocab)
    # its Embeddings are built with skip_init (memory left as it was, NaN at times): OpenNMT's model builder then
    # draws every parameter from U(-0.1, 0.1) (its default --param_init), as here
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1)
    return model


def fairseq_model(attention: bool, vocab: int = 50, pad: int = 1) -> torch.nn.Module:
    """fairseq's LSTM model (LSTMEncoder, LSTMDecoder; hidden 64, embeddings 32, one layer each); input
    (src tokens, src lengths, previous output tokens)."""
    if FAIRSEQ_SRC.is_dir() and str(FAIRSEQ_SRC) not in sys.path:
        sys.path.insert(0, str(FAIRSEQ_SRC))
    from fairseq.models.lstm import LSTMDecoder, LSTMEncoder

    d = _Dictionary(vocab, pad)
    return _Fairseq(LSTMEncoder(d, embed_dim=32, hidden_size=64, num_layers=1),
                    LSTMDecoder(d, embed_dim=32, hidden_size=64, out_embed_dim=32, num_layers=1,
                                attention=attention, encoder_output_units=64))


class _Head(torch.nn.Module):
    """A library's encoder with a Linear classifier per frame."""

    def __init__(self, body: torch.nn.Module, width: int, classes: int) -> None:
        super().__init__()
        self.body, self.out = body, torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class _OpenNMT(torch.nn.Module):
    """OpenNMT-py's NMTModel with its generator (a Linear over the vocabulary), as its trainer calls them."""

    def __init__(self, model: torch.nn.Module, width: int, vocab: int) -> None:
        super().__init__()
        self.model, self.generator = model, torch.nn.Linear(width, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_len: torch.Tensor) -> torch.Tensor:
        return self.generator(self.model(src, tgt, src_len)[0])


class _Fairseq(torch.nn.Module):
    """fairseq's LSTMModel.forward: the encoder's output handed to the decoder, the logits returned."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.decoder(prev, encoder_out=self.encoder(src_tokens, src_lengths))[0]


class _Dictionary:
    """What fairseq's LSTM model reads off its dictionary: its size and the padding index."""

    def __init__(self, n: int, pad: int) -> None:
        self.n, self._pad = n, pad

    def __len__(self) -> int:
        return self.n

    def pad(self) -> int:
        return self._pad


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
    versions = {p: _v(p) for p in ("torch", "torch-pruning", "torchvision", "timm", "torchaudio", "speechbrain",
                                   "opennmt-py")}
    versions["fairseq"] = "0.12.3.1 (fairseq-fixed, unbuilt source)" if FAIRSEQ_SRC.is_dir() else "not installed"
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
