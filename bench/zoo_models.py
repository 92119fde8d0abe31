"""The field's library models as user files for the CLI (``--model bench/zoo_models.py:resnet18``), with small
synthetic data of the right shapes (nothing downloaded): what ``bench/model_patterns.py --zoo`` runs through
inspect -> profile -> search -> export. The libraries are imported as ``bench/zoo.py`` does (installed by
``make bench-zoo``); each factory builds the library's own classes, wrapped only where its output is not
``(batch, classes)`` logits or ``(batch, time, vocab)`` scores."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

CLASSES = 4
VOCAB, PAD, BOS, SRC_LEN = 12, 10, 11, 8  # digits 0-9, pad 10, BOS 11


# ---------------------------------------------------------------- data


def _splits(make, n=(768, 192, 192)):
    return tuple(make(k, seed) for k, seed in zip(n, (0, 1, 2)))


def _images(n, seed, size=32):
    """The class brightens one colour channel by a class-dependent amount."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    y = torch.randint(CLASSES, (n,), generator=g)
    x[torch.arange(n), y % 3] += 0.5 * (1 + y // 3)[:, None, None]
    return TensorDataset(x, y)


def image_data():
    return _splits(_images)


def _frames(n, seed, feats, steps, time_first):
    """The class raises one band of features over every frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, feats, generator=g) * 0.5
    y = torch.randint(CLASSES, (n,), generator=g)
    band = feats // CLASSES
    for c in range(CLASSES):
        x[y == c, :, c * band:(c + 1) * band] += 0.6
    return TensorDataset(x if time_first else x.transpose(1, 2).contiguous(), y)


def mfcc_data():
    """(batch, 13 MFCC, 100 frames), as torchaudio's Wav2Letter takes them."""
    return _splits(lambda n, s: _frames(n, s, 13, 100, False))


def fbank_data():
    """(batch, 50 frames, 40 filter banks), as SpeechBrain's CRDNN takes them."""
    return _splits(lambda n, s: _frames(n, s, 40, 50, True))


class _Pairs(Dataset):
    def __init__(self, xs, y):
        self.xs, self.y = xs, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return tuple(x[i] for x in self.xs), self.y[i]


def _reverse(n, seed, lengths=False):
    """Translate a digit string into its reverse (target in = BOS + reversed[:-1])."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(10, (n, SRC_LEN), generator=g)
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], 1)
    xs = (src, torch.full((n,), SRC_LEN), tgt_in) if lengths else (src, tgt_in)
    return _Pairs(xs, tgt)


def reverse_data():
    return _splits(_reverse)


def reverse_lengths_data():
    return _splits(lambda n, s: _reverse(n, s, lengths=True))


# ---------------------------------------------------------------- models


def resnet18():
    return zoo.torchvision_models().resnet18(weights=None, num_classes=CLASSES)


def mobilenet_v3_small():
    return zoo.torchvision_models().mobilenet_v3_small(weights=None, num_classes=CLASSES)


def timm_resnet10t():
    zoo.torchvision_models()  # timm imports torchvision
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)


class _TimeMean(nn.Module):
    """Per-frame class scores averaged over time: one label per utterance."""

    def __init__(self, body: nn.Module, time_dim: int) -> None:
        super().__init__()
        self.body, self.time_dim = body, time_dim

    def forward(self, x):
        return self.body(x).mean(self.time_dim)


def wav2letter():
    body = zoo.torchaudio_models().Wav2Letter(num_classes=CLASSES, input_type="mfcc", num_features=13)
    return _TimeMean(body, 2)  # (batch, classes, frames)


def crdnn_gru():
    return _TimeMean(zoo.crdnn_model("GRU", CLASSES), 1)  # (batch, frames, classes)


class _NMT(nn.Module):
    """OpenNMT-py's model taking (src, tgt_in): src as (batch, time, 1) features, the lengths all full, and the
    target padded by one step (NMTModel drops the last)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.nmt = model

    def forward(self, src, tgt_in):
        lengths = torch.full((src.size(0),), src.size(1), dtype=torch.long)
        tgt = torch.cat([tgt_in, tgt_in[:, -1:]], 1)
        return self.nmt(src.unsqueeze(-1), tgt.unsqueeze(-1), lengths)


def opennmt_gru(hidden: int = 64, emb: int = 32):
    return _NMT(zoo.onmt_model(False, "GRU", vocab=VOCAB, pad=PAD, hidden=hidden, emb=emb))


def fairseq_lstm():
    return zoo.fairseq_model(True, vocab=VOCAB, pad=PAD)
