"""A user's own model and data, given to hwprune as file.py:factory."""
import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_model(width: int = 8):
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, 3))


def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def not_a_model():
    return 42


def mlp():
    """A two-layer MLP: one prunable group (the 16 hidden features)."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def mlp3():
    """A three-layer MLP: two prunable groups of 32 hidden features."""
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def make_mlp_data():
    """Four features, three classes, learnable by the MLP."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


class _Flaky(nn.Module):
    """mlp3 whose fine-tunes fail by the widths they were pruned to (reliability tests).

    Second hidden layer at 24 units: the training step runs out of memory; first at 16: the loss goes NaN.
    """

    def __init__(self):
        super().__init__()
        self.net = mlp3()

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        if self.training and h.shape[-1] == 16:
            h = h * float("nan")
        h = self.net[3](self.net[2](h))
        if self.training and h.shape[-1] == 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return self.net[4](h)


def flaky():
    return _Flaky()


class _Gru2(nn.Module):
    """A 2-layer GRU classifier over the output sequence (its last step): hwprune splits such stacks."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(1, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def gru2():
    return _Gru2()


def make_seq_data():
    """Sequences of 6 steps x 1 feature, three classes (a trend and a level)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(192, 6, 1, generator=g)
    y = (x[:, -1, 0] > x[:, 0, 0]).long() + (x.mean((1, 2)) > 0.3).long()
    return TensorDataset(x[:144], y[:144]), TensorDataset(x[144:], y[144:])


class _TinyLM(nn.Module):
    """Embedding -> LSTM -> Linear per step: a token-input language model (12 symbols)."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, vocab)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def tiny_lm():
    return _TinyLM()


def make_token_data():
    """Sequences of 10 token ids (12 symbols) counting up mod 12 from a random start, targets shifted by one;
    the last target of every fourth sequence is padding (-100)."""
    g = torch.Generator().manual_seed(3)
    start = torch.randint(0, 12, (160, 1), generator=g)
    seq = (start + torch.arange(11)) % 12
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    y[::4, -1] = -100
    return TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:])


def mean_abs_error_task():
    """A user task: regression-like score on a classifier's outputs, lower is better."""
    import torch.nn.functional as F

    return {"loss": lambda out, y: F.cross_entropy(out, y),
            "metric": lambda out, y: (float((out.argmax(-1) != y).float().sum()), len(y)),
            "direction": "min", "name": "error_rate"}


class _GruHn(nn.Module):
    """A GRU whose final state feeds the classifier (how many tutorials write it)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(1, 16, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(h[-1])


def gru_hn():
    return _GruHn()


class _Concat8(nn.Module):
    """Eight conv branches concatenated into one 1x1 conv (a DenseNet-style block): that conv's input width
    depends on 8 groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(16, 32, 3, padding=1) for _ in range(8))
        self.fuse = nn.Conv2d(256, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.relu(self.fuse(torch.cat([torch.relu(b(s)) for b in self.branches], 1)))
        return self.fc(y.mean((2, 3)))


def concat8():
    return _Concat8()


READS = {"train": 0}


class _Lazy(torch.utils.data.Dataset):
    """50,000 items made on demand (as if decoded from disk); counts every item read. Exposes its labels'
    class count as ``classes`` (as torchvision's ImageFolder does)."""

    classes = ["a", "b", "c"]

    def __len__(self):
        return 50_000

    def __getitem__(self, i):
        READS["train"] += 1
        g = torch.Generator().manual_seed(int(i))
        x = torch.randn(4, generator=g)
        return x, int(x[0] > 0) + int(x[1] > 0.5)


def make_lazy_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return _Lazy(), TensorDataset(x, y)


class _Plain(torch.utils.data.Dataset):
    """(x, label) items and nothing else: no classes, targets or num_classes attribute."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((1, 40), float(i % 3)), i % 3


def make_plain_data():
    return _Plain(), _Plain()


class _CRNN(nn.Module):
    """A conv front end + bidirectional GRU (as OCR and speech models are built): (B, 1, 8, 20) images read as
    20 columns of 24 channels x 4 rows."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.pool = nn.MaxPool2d(2)
        self.rnn = nn.GRU(24 * 4, 32, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.b1(self.c1(x))))  # (B, 16, 4, 10)
        x = torch.relu(self.b2(self.c2(x)))  # (B, 24, 4, 10)
        out, _ = self.rnn(x.permute(0, 3, 1, 2).flatten(2))  # (B, 10, 96)
        return self.fc(out[:, -1])


def crnn():
    return _CRNN()


def make_image_data():
    """(1, 8, 20) images, three classes by where the bright column band is."""
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 1, 8, 20, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        x[i, 0, :, 6 * c: 6 * c + 6] += 1.0
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
