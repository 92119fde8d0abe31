"""User models as people write them, at realistic widths: what bench/predictor_fidelity.py prices besides the
built-ins (``tests/assets/zoo.py:NAME`` with ``--input-shape`` from ``SHAPES``). Not trained: latency only."""
from __future__ import annotations

import torch
from torch import nn

SHAPES = {"lstm3": "40,16", "se_cnn": "3,32,32", "tcn": "8,128", "char_lm": "64", "crnn": "1,32,100"}


class _Lstm3(nn.Module):
    """A 3-layer LSTM classifier reading the last step."""

    def __init__(self, features: int = 16, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, num_layers=3, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def lstm3():
    return _Lstm3()


class _SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class _SECnn(nn.Module):
    """Conv-BN-ReLU stages with squeeze-and-excitation gating, global pooling, a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for w, stride in ((32, 1), (64, 2), (128, 2)):
            layers += [nn.Conv2d(c, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), _SE(w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def se_cnn():
    return _SECnn()


class _Tcn(nn.Module):
    """A dilated temporal conv net: length-preserving dilated convs (1, 2, 4, 8), ReLU, a linear head."""

    def __init__(self, features: int = 8, width: int = 64, classes: int = 5):
        super().__init__()
        convs, c = [], features
        for d in (1, 2, 4, 8):
            convs += [nn.Conv1d(c, width, 3, padding=d, dilation=d), nn.ReLU()]
            c = width
        self.net = nn.Sequential(*convs)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.net(x).mean(-1))


def tcn():
    return _Tcn()


class _CharLM(nn.Module):
    """A character-level language model: embedding, 2-layer LSTM, a per-step vocabulary head."""

    def __init__(self, vocab: int = 64, emb: int = 64, hidden: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


def char_lm():
    return _CharLM()


class _CRNN(nn.Module):
    """A conv front end and a bidirectional GRU over image columns (OCR / speech style): (B, 1, 32, 100)."""

    def __init__(self, classes: int = 20):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.rnn = nn.GRU(64 * 8, 128, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.b1(self.c1(x))))  # (B, 32, 16, 50)
        x = self.pool(torch.relu(self.b2(self.c2(x))))  # (B, 64, 8, 25)
        out, _ = self.rnn(x.permute(0, 3, 1, 2).flatten(2))  # (B, 25, 512)
        return self.fc(out[:, -1])


def crnn():
    return _CRNN()


def make_seq_data(n: int = 768):
    """(40, 16) sequences for ``lstm3``: the class (of 10) is the feature channel that carries a pulse."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 40, 16, generator=g) * 0.5
    x[torch.arange(n), 10:20, y] += 1.5
    k = n * 3 // 4
    return TensorDataset(x[:k], y[:k]), TensorDataset(x[k:], y[k:])


def make_image_data(n: int = 768):
    """(3, 32, 32) images for ``se_cnn``: the class (of 10) is which of 10 horizontal bands is bright."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        x[i, :, 3 * c: 3 * c + 3] += 1.0
    k = n * 3 // 4
    return TensorDataset(x[:k], y[:k]), TensorDataset(x[k:], y[k:])
