"""User models written the way people write them (issue 21): several inputs, encoder-decoder RNNs, packed
sequences, sequence-first layers, cell loops, transposed convs, SE gating, a dilated TCN. Small widths: the
tests run them end to end. Each ``*_data`` factory returns (train, val, test) datasets of (inputs, target)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import Dataset, TensorDataset

# ---------------------------------------------------------------- data


class _Pairs(Dataset):
    """Items ``(inputs, target)`` where inputs is a tuple (or dict) of tensors."""

    def __init__(self, xs, y, keys=None):
        self.xs, self.y, self.keys = xs, y, keys

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.keys:
            return {k: x[i] for k, x in zip(self.keys, self.xs)}, self.y[i]
        return tuple(x[i] for x in self.xs), self.y[i]


def _splits(make, n=(768, 192, 192)):
    return tuple(make(k, seed) for k, seed in zip(n, (0, 1, 2)))


VOCAB, BOS, SRC_LEN = 12, 11, 8  # digits 0-9, pad 10, BOS 11


def _reverse(n, seed):
    """Translate a digit string into its reverse: src (L,), tgt_in = BOS + reversed[:-1], tgt = reversed."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(10, (n, SRC_LEN), generator=g)
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], 1)
    return _Pairs((src, tgt_in), tgt)


def seq2seq_data():
    return _splits(_reverse)


def _seq2seq_dict(n, seed):
    d = _reverse(n, seed)
    return _Pairs(d.xs, d.y, keys=("src", "tgt_in"))


def seq2seq_dict_data():
    return _splits(_seq2seq_dict)


def _lengths(n, seed, T=12, F=6):
    """Variable-length sequences (3..T steps, zero padded); the class is which feature has the largest sum."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    x = torch.randn(n, T, F, generator=g) * 0.5
    y = torch.randint(F, (n,), generator=g)
    x[torch.arange(n), :, y] += 0.6
    x[torch.arange(T)[None, :] >= lengths[:, None]] = 0.0
    return _Pairs((x, lengths), y)


def packed_data():
    return _splits(_lengths)


def _float_seq(n, seed, T=10, F=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, F, generator=g) * 0.5
    y = torch.randint(F, (n,), generator=g)
    x[torch.arange(n), :, y] += 0.5
    return TensorDataset(x, y)


def seq_data():
    return _splits(_float_seq)


def _tcn_seq(n, seed, C=4, L=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, L, generator=g) * 0.5
    y = torch.randint(C, (n,), generator=g)
    x[torch.arange(n), y] += 0.5
    return TensorDataset(x, y)


def tcn_data():
    return _splits(_tcn_seq)


def _images(n, seed, classes=4, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    y = torch.randint(classes, (n,), generator=g)
    x[torch.arange(n), y % 3] += 0.5 * (1 + y // 3)[:, None, None]
    return TensorDataset(x, y)


def image_data():
    return _splits(_images)


def _masks(n, seed, size=16):
    """Segmentation: pixel class 1 where a bright square is, 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 0.3
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        x[i, 0, r:r + 6, c:c + 6] += 1.0
        y[i, r:r + 6, c:c + 6] = 1
    return TensorDataset(x, y)


def seg_data():
    return _splits(_masks)


def pixel_task():
    """Per-pixel cross-entropy; metric: pixel accuracy."""
    def loss(out, y):
        return nn.functional.cross_entropy(out, y)

    def metric(out, y):
        return float((out.argmax(1) == y).float().sum()), float(y.numel())

    return {"name": "pixel accuracy", "loss": loss, "metric": metric, "direction": "max"}

# ---------------------------------------------------------------- models


class Seq2Seq(nn.Module):
    """Attention-free GRU encoder-decoder: the decoder starts from the encoder's final state."""

    def __init__(self, emb=16, hidden=32, layers=1):
        super().__init__()
        self.src_emb = nn.Embedding(VOCAB, emb)
        self.tgt_emb = nn.Embedding(VOCAB, emb)
        self.encoder = nn.GRU(emb, hidden, num_layers=layers, batch_first=True)
        self.decoder = nn.GRU(emb, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, src, tgt_in):
        _, h = self.encoder(self.src_emb(src))
        dec, _ = self.decoder(self.tgt_emb(tgt_in), h)
        return self.out(dec)


def seq2seq(**kw):
    return Seq2Seq(**kw)


def seq2seq2(**kw):
    return Seq2Seq(layers=2, **kw)


class Seq2SeqAttn(nn.Module):
    """LSTM encoder-decoder with Luong dot attention over the encoder outputs."""

    def __init__(self, emb=16, hidden=32):
        super().__init__()
        self.src_emb = nn.Embedding(VOCAB, emb)
        self.tgt_emb = nn.Embedding(VOCAB, emb)
        self.encoder = nn.LSTM(emb, hidden, batch_first=True)
        self.decoder = nn.LSTM(emb, hidden, batch_first=True)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def forward(self, src, tgt_in):
        enc, state = self.encoder(self.src_emb(src))
        dec, _ = self.decoder(self.tgt_emb(tgt_in), state)
        weights = torch.softmax(torch.bmm(dec, enc.transpose(1, 2)), dim=-1)
        context = torch.bmm(weights, enc)
        return self.out(torch.cat([dec, context], -1))


def seq2seq_attn(**kw):
    return Seq2SeqAttn(**kw)


class PackedLSTM(nn.Module):
    """A 2-layer LSTM over variable-length sequences: pack, run, classify from the last layer's h_n."""

    def __init__(self, features=6, hidden=32, classes=6):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.fc(h[-1])


def packed_lstm(**kw):
    return PackedLSTM(**kw)


class PackedGRUSeq(nn.Module):
    """A GRU over packed sequences read back padded (pad_packed_sequence), mean over the valid steps."""

    def __init__(self, features=6, hidden=32, classes=6):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.fc(out.sum(1) / lengths[:, None].to(out.dtype))


def packed_gru(**kw):
    return PackedGRUSeq(**kw)


class SeqFirstLSTM(nn.Module):
    """PyTorch's default layout: the LSTM takes (time, batch, features)."""

    def __init__(self, features=6, hidden=32, classes=6):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x.transpose(0, 1))
        return self.fc(out[-1])


def seqfirst_lstm(**kw):
    return SeqFirstLSTM(**kw)


class VanillaRNN(nn.Module):
    """A 2-layer plain (Elman) RNN with ReLU, classifying from the last layer's final state."""

    def __init__(self, features=6, hidden=32, classes=6):
        super().__init__()
        self.rnn = nn.RNN(features, hidden, num_layers=2, batch_first=True, nonlinearity="relu")
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(h[-1])


def vanilla_rnn(**kw):
    return VanillaRNN(**kw)


class GRUCellLoop(nn.Module):
    """An RNN written as a GRUCell loop over time; the state starts at zeros of the cell's width."""

    def __init__(self, features=6, hidden=32, classes=6):
        super().__init__()
        self.cell = nn.GRUCell(features, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        h = x.new_zeros(x.size(0), self.cell.hidden_size)
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
        return self.fc(h)


def grucell(**kw):
    return GRUCellLoop(**kw)


class LSTMCellLoop(nn.Module):
    """An LSTMCell loop collecting every step's output, then a per-step head averaged over time."""

    def __init__(self, features=6, hidden=32, classes=6):
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        state = None
        outs = []
        for t in range(x.size(1)):
            state = self.cell(x[:, t], state)
            outs.append(state[0])
        return self.fc(torch.stack(outs, 1)).mean(1)


def lstmcell(**kw):
    return LSTMCellLoop(**kw)


class TwoPlaces(nn.Module):
    """One GRUCell called over two different sequences: its units cannot be followed as one loop."""

    def __init__(self, features=6, hidden=16, classes=6):
        super().__init__()
        self.cell = nn.GRUCell(features, hidden)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        a = b = None
        for t in range(x.size(1)):
            a = self.cell(x[:, t], a)
            b = self.cell(x[:, -1 - t], b)
        return self.fc(torch.cat([a, b], 1))


def two_places(**kw):
    return TwoPlaces(**kw)


class UNet(nn.Module):
    """A small U-Net: conv encoder, ConvTranspose2d decoder, a skip concatenation, per-pixel logits."""

    def __init__(self, c=16, classes=2):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(a)
        u = torch.relu(self.up(b))
        return self.head(self.dec(torch.cat([u, a], 1)))


def unet(**kw):
    return UNet(**kw)


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class SECnn(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.se = SE(16)
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.c2(self.se(self.c1(x))).mean((2, 3)))


def se_cnn(**kw):
    return SECnn(**kw)


class TCN(nn.Module):
    """Dilated temporal convs (padding='same'), a linear head."""

    def __init__(self, c_in=4, c=16, classes=4):
        super().__init__()
        layers, ch = [], c_in
        for d in (1, 2, 4):
            layers += [nn.Conv1d(ch, c, 3, padding="same", dilation=d), nn.ReLU()]
            ch = c
        self.net = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.net(x).mean(-1))


def tcn(**kw):
    return TCN(**kw)


class WrappedLSTM(nn.Module):
    """SpeechBrain's RNN wrapper as its CRDNN uses it: the module calls ``flatten_parameters()`` on the
    multi-layer, bidirectional LSTM it built, in every forward, then a linear head on the last step."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        self.rnn.flatten_parameters()
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def wrapped_lstm(**kw):
    return WrappedLSTM(**kw)


class NeedsNumLayersOfAList(nn.Module):
    """Reads an attribute nn.LSTM has and hwprune's per-layer stack does not (its weight list by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1]) + 0 * self.rnn.weight_hh_l1.sum()


def needs_stack_attr(**kw):
    return NeedsNumLayersOfAList(**kw)


def _shuffle(x, groups: int):
    """torchvision's ShuffleNetV2 channel shuffle: split the channels into groups, transpose, flatten back."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: two branches (or half the channels passed through), concatenated and shuffled."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride, half = stride, oup // 2
        self.branch1 = nn.Sequential(
            nn.Conv2d(inp, inp, 3, stride, 1, bias=False, groups=inp), nn.BatchNorm2d(inp),
            nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU()) if stride > 1 else nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, bias=False, groups=half), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _shuffle(out, 2)


class ShuffleNet(nn.Module):
    """A small ShuffleNetV2: the stream through the shuffles cannot be followed; the branches' insides can."""

    def __init__(self, classes: int = 4, units: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), *[ShuffleUnit(16, 16, 1) for _ in range(units - 1)])
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.conv5(self.stage2(self.conv1(x))).mean((2, 3)))


def shufflenet(**kw):
    return ShuffleNet(**kw)


def shufflenet3(**kw):
    """Three units in a stage, as torchvision's: Torch-Pruning's reshape index map divides by zero building the
    graph of the whole model."""
    return ShuffleNet(units=3, **kw)


class XBlock(nn.Module):
    """RegNetX's block: 1x1, a 3x3 grouped convolution (groups of ``gw`` channels), 1x1, residual."""

    def __init__(self, cin: int, w: int, gw: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w // gw, bias=False), nn.BatchNorm2d(w),
                               nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w))
        self.proj = nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w)) if cin != w else None

    def forward(self, x):
        s = x if self.proj is None else self.proj(x)
        return torch.relu(s + self.c(self.b(self.a(x))))


class RegNetX(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.s1 = nn.Sequential(XBlock(16, 32, 8), XBlock(32, 32, 8))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.s1(self.stem(x)).mean((2, 3)))


def regnetx(**kw):
    return RegNetX(**kw)


class TasBlock(nn.Module):
    """ConvTasNet's temporal block: 1x1 up, PReLU, GroupNorm, dilated depthwise conv, PReLU, GroupNorm, 1x1
    back, residual."""

    def __init__(self, b: int, h: int, dilation: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(b, h, 1), nn.PReLU(), nn.GroupNorm(1, h, eps=1e-8),
            nn.Conv1d(h, h, 3, padding=dilation, dilation=dilation, groups=h), nn.PReLU(),
            nn.GroupNorm(1, h, eps=1e-8), nn.Conv1d(h, b, 1))

    def forward(self, x):
        return x + self.net(x)


class ConvTasNet(nn.Module):
    """torchaudio's ConvTasNet in small: an encoder conv, a mask generator whose output conv makes
    ``sources * feats`` channels, viewed as (batch, sources, feats, time) and multiplied into the encoding, and a
    transposed-conv decoder. The encoder's channels and the mask's cross the ``.view``."""

    def __init__(self, sources: int = 2, feats: int = 16, b: int = 8, h: int = 16) -> None:
        super().__init__()
        self.sources, self.feats = sources, feats
        self.encoder = nn.Conv1d(1, feats, 8, stride=4, padding=4, bias=False)
        self.norm = nn.GroupNorm(1, feats, eps=1e-8)
        self.bottleneck = nn.Conv1d(feats, b, 1)
        self.blocks = nn.Sequential(TasBlock(b, h, 1), TasBlock(b, h, 2))
        self.mask = nn.Conv1d(b, sources * feats, 1)
        self.decoder = nn.ConvTranspose1d(feats, 1, 8, stride=4, padding=4, bias=False)

    def forward(self, x):  # x: (batch, 1, samples)
        n, t = x.shape[0], x.shape[-1]
        e = self.encoder(x)
        m = torch.sigmoid(self.mask(self.blocks(self.bottleneck(self.norm(e)))))
        m = m.view(n, self.sources, self.feats, -1)
        y = (e.unsqueeze(1) * m).view(n * self.sources, self.feats, -1)
        return self.decoder(y).view(n, self.sources, -1)[..., :t]


def convtasnet(**kw):
    return ConvTasNet(**kw)


class ConformerBlock(nn.Module):
    """A Conformer block without attention: half-step feed-forward, convolution module (pointwise conv + GLU,
    depthwise conv, BatchNorm, SiLU, pointwise conv), half-step feed-forward, LayerNorm; every module adds to
    the residual stream of width ``d``."""

    def __init__(self, d: int, ff: int, k: int = 5) -> None:
        super().__init__()
        self.ff1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, ff), nn.SiLU(), nn.Linear(ff, d))
        self.ln = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)
        self.ff2 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, ff), nn.SiLU(), nn.Linear(ff, d))
        self.out = nn.LayerNorm(d)

    def forward(self, x):  # (batch, time, d)
        x = x + 0.5 * self.ff1(x)
        c = nn.functional.glu(self.pw1(self.ln(x).transpose(1, 2)), dim=1)
        x = x + self.pw2(nn.functional.silu(self.bn(self.dw(c)))).transpose(1, 2)
        x = x + 0.5 * self.ff2(x)
        return self.out(x)


class Conformer(nn.Module):
    """torchaudio's Conformer fed features of width ``d`` directly (its residual stream is the input's width),
    two blocks, a classifier over the mean. Follows: the feed-forward inner widths; the stream cannot be cut."""

    def __init__(self, d: int = 16, ff: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ConformerBlock(d, ff), ConformerBlock(d, ff))
        self.fc = nn.Linear(d, classes)

    def forward(self, x):  # (batch, time, d)
        return self.fc(self.blocks(x).mean(1))


def conformer(**kw):
    return Conformer(**kw)


class FullyConnected(nn.Module):
    """torchaudio's DeepSpeech layer: Linear, ReLU, hardtanh(0, 20), dropout."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(nn.functional.hardtanh(nn.functional.relu(self.fc(x)), 0, 20))


class DeepSpeech(nn.Module):
    """torchaudio's DeepSpeech in small: three FullyConnected layers on (batch, 1, time, feats), a bidirectional
    ReLU RNN run time-first, its directions added by slicing (``x[:, :, :n] + x[:, :, n:]``), two Linear layers,
    log-softmax over the classes per step."""

    def __init__(self, feats: int = 12, hidden: int = 16, classes: int = 5, fixed: bool = True) -> None:
        super().__init__()
        self.n_hidden, self.fixed = hidden, fixed
        self.fc1, self.fc2, self.fc3 = FullyConnected(feats, hidden), FullyConnected(hidden, hidden), \
            FullyConnected(hidden, hidden)
        self.bi_rnn = nn.RNN(hidden, hidden, num_layers=1, nonlinearity="relu", bidirectional=True)
        self.fc4 = FullyConnected(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):  # (batch, 1, time, feats)
        x = self.fc3(self.fc2(self.fc1(x)))
        x = x.squeeze(1).transpose(0, 1)
        x, _ = self.bi_rnn(x)
        n = self.n_hidden if self.fixed else x.size(2) // 2  # torchaudio: the number, fixed
        x = x[:, :, :n] + x[:, :, n:]
        x = self.out(self.fc4(x))
        return nn.functional.log_softmax(x.permute(1, 0, 2), dim=2)


def deepspeech(**kw):
    return DeepSpeech(**kw)


def deepspeech_sized(**kw):
    """DeepSpeech with the halves' width taken from the output (``x.size(2) // 2``): the RNN prunes too."""
    return DeepSpeech(fixed=False, **kw)


class NMTEncoder(nn.Module):
    """OpenNMT-py's RNNEncoder in small: embeddings, a bidirectional LSTM, its final state returned as the
    (h_n, c_n) tuple."""

    def __init__(self, vocab: int, emb: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden // 2, bidirectional=True)

    def forward(self, src):  # (time, batch)
        memory_bank, encoder_final = self.rnn(self.embeddings(src))
        return encoder_final, memory_bank


class NMTDecoder(nn.Module):
    """OpenNMT-py's StdRNNDecoder in small: its init_state checks ``isinstance(encoder_final, tuple)`` and joins
    the two directions of each state with strided slicing (``_fix_enc_hidden``), then an LSTM, general (Luong)
    attention over the memory bank, and a Linear generator."""

    def __init__(self, vocab: int, emb: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden)
        self.linear_in = nn.Linear(hidden, hidden, bias=False)
        self.linear_out = nn.Linear(2 * hidden, hidden, bias=False)
        self.generator = nn.Linear(hidden, vocab)

    @staticmethod
    def _fix_enc_hidden(hidden):
        return torch.cat([hidden[0:hidden.size(0):2], hidden[1:hidden.size(0):2]], 2)

    def init_state(self, encoder_final):
        if isinstance(encoder_final, tuple):  # LSTM
            return tuple(self._fix_enc_hidden(h) for h in encoder_final)
        return (self._fix_enc_hidden(encoder_final),)

    def forward(self, tgt, memory_bank, state):  # tgt: (time, batch); memory_bank: (src time, batch, hidden)
        out, _ = self.rnn(self.embeddings(tgt), state)
        q, mb = self.linear_in(out).transpose(0, 1), memory_bank.transpose(0, 1)  # (batch, time, hidden)
        align = torch.softmax(torch.bmm(q, mb.transpose(1, 2)), dim=-1)
        c = torch.bmm(align, mb)
        attn_h = torch.tanh(self.linear_out(torch.cat([c, out.transpose(0, 1)], 2)))
        return self.generator(attn_h)


class OpenNMTSeq2Seq(nn.Module):
    """OpenNMT-py's NMTModel: encoder, decoder started from the encoder's fixed-up state."""

    def __init__(self, vocab: int = 20, emb: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.encoder = NMTEncoder(vocab, emb, hidden)
        self.decoder = NMTDecoder(vocab, emb, hidden)

    def forward(self, src, tgt):
        enc_state, memory_bank = self.encoder(src)
        return self.decoder(tgt, memory_bank, self.decoder.init_state(enc_state))


def opennmt(**kw):
    return OpenNMTSeq2Seq(**kw)


class NMTGRUDecoder(nn.Module):
    """OpenNMT-py's StdRNNDecoder with a GRU and its GlobalAttention, batch first: the state a one-element tuple
    unwrapped because ``isinstance(self.rnn, nn.GRU)``, general attention, and the attention output reshaped with
    the memory bank's width (``.view(batch, tgt_len, dim)``, ``dim = memory_bank.size(2)``): the attention output
    is as wide as the encoder's joined directions, by the model's code."""

    def __init__(self, vocab: int, emb: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True)
        self.linear_in = nn.Linear(hidden, hidden, bias=False)
        self.linear_out = nn.Linear(2 * hidden, hidden, bias=False)

    def init_state(self, encoder_final):
        return (torch.cat([encoder_final[0:encoder_final.size(0):2], encoder_final[1:encoder_final.size(0):2]], 2),)

    def forward(self, tgt, memory_bank, state):  # tgt (batch, time); memory_bank (batch, src time, dim)
        out, _ = self.rnn(self.embeddings(tgt), state[0] if isinstance(self.rnn, nn.GRU) else state)
        batch, _, dim = memory_bank.size()
        align = torch.softmax(torch.bmm(self.linear_in(out), memory_bank.transpose(1, 2)), -1)
        c = torch.bmm(align, memory_bank)
        concat = torch.cat([c, out], 2).view(batch * out.size(1), dim * 2)
        return torch.tanh(self.linear_out(concat).view(batch, out.size(1), dim))


class OpenNMTGRU(nn.Module):
    """OpenNMT-py's NMTModel with a bidirectional GRU encoder, the decoder above and a generator."""

    def __init__(self, vocab: int = VOCAB, emb: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, emb)
        self.encoder = nn.GRU(emb, hidden // 2, batch_first=True, bidirectional=True)
        self.decoder = NMTGRUDecoder(vocab, emb, hidden)
        self.generator = nn.Linear(hidden, vocab)

    def forward(self, src, tgt):  # (batch, time) each
        memory_bank, final = self.encoder(self.embeddings(src))
        return self.generator(self.decoder(tgt, memory_bank, self.decoder.init_state(final)))


def opennmt_gru(**kw):
    return OpenNMTGRU(**kw)


class FairseqEncoder(nn.Module):
    """fairseq's LSTMEncoder in small: tokens and lengths in, ``nn.utils.rnn.pack_padded_sequence`` called through
    the module with the lengths moved to the CPU, zero initial states from ``x.new_zeros``, a classifier on the
    final hidden state."""

    def __init__(self, vocab: int = 20, emb: int = 8, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.embed_tokens = nn.Embedding(vocab, emb, padding_idx=0)
        self.lstm = nn.LSTM(emb, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, src_tokens, src_lengths):  # (batch, time), (batch,)
        bsz, _ = src_tokens.size()
        x = self.embed_tokens(src_tokens).transpose(0, 1)
        packed_x = nn.utils.rnn.pack_padded_sequence(x, src_lengths.cpu(), enforce_sorted=False)
        h0 = x.new_zeros(1, bsz, self.hidden_size)
        c0 = x.new_zeros(1, bsz, self.hidden_size)
        _, (final_hiddens, _) = self.lstm(packed_x, (h0, c0))
        return self.fc(final_hiddens[-1])


def fairseq_lstm(**kw):
    return FairseqEncoder(**kw)


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin: int, s: int, e: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, s, 1)
        self.expand1x1 = nn.Conv2d(s, e, 1)
        self.expand3x3 = nn.Conv2d(s, e, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.fire1, self.fire2 = Fire(16, 8, 16), Fire(32, 8, 16)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.fire2(self.fire1(torch.relu(self.stem(x)))).mean((2, 3)))


def squeezenet(**kw):
    return SqueezeNet(**kw)


class SBConv(nn.Module):
    """SpeechBrain's CRDNN convolution blocks in small: features (batch, time, feats) as a 1-channel image, the
    first block's channels normalized by LayerNorm over (frequency, channels) together in channels-last layout,
    a second convolution averaged over frequency, a Linear per frame."""

    def __init__(self, feats: int = 6, ch: int = 8, hidden: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, ch, 3, padding=1)
        self.norm1 = nn.LayerNorm((feats, ch))
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.fc = nn.Linear(ch, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):  # (batch, time, feats)
        x = self.conv1(x.unsqueeze(1))  # (batch, ch, time, feats)
        x = torch.relu(self.norm1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = torch.relu(self.conv2(x)).mean(3).transpose(1, 2)  # (batch, time, ch)
        return self.out(torch.relu(self.fc(x)))


def sb_conv(**kw):
    return SBConv(**kw)


class SBCRDNN(nn.Module):
    """SpeechBrain's CRDNN in small, with its recurrent layer: its Conv2d wrapper (features (batch, time, freq)
    transposed and unsqueezed, padded, ``squeeze(1)`` after the conv, channels moved last), LayerNorm over
    (frequency, channels) together, LeakyReLU, pooling over frequency, then ``reshape(batch, time, freq *
    channels)`` (channels the minor index) into a GRU and a Linear per frame."""

    def __init__(self, feats: int = 6, ch: int = 4, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, ch, 3)
        self.norm = nn.LayerNorm((feats, ch))
        self.act = nn.LeakyReLU()
        self.pool = nn.MaxPool2d((1, 2))
        self.gru = nn.GRU(feats // 2 * ch, hidden, batch_first=True)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):  # (batch, time, freq)
        x = nn.functional.pad(x.transpose(1, -1).unsqueeze(1), [1, 1, 1, 1])  # (batch, 1, freq + 2, time + 2)
        x = self.conv(x).squeeze(1).transpose(1, -1)  # (batch, time, freq, ch)
        x = self.act(self.norm(x))
        x = self.pool(x.transpose(-1, 2)).transpose(-1, 2)  # pooled over frequency: (batch, time, freq / 2, ch)
        b, t = x.shape[0], x.shape[1]
        x, _ = self.gru(x.reshape(b, t, x.shape[2] * x.shape[3]))
        return self.out(x)


def sb_crdnn(**kw):
    return SBCRDNN(**kw)


class ScoresLoop(nn.Module):
    """fairseq's LSTMDecoder loop in small: an LSTMCell stepped over the target, attention over the encoder's
    outputs, and the attention weights written step by step into a preallocated tensor
    (``attn_scores[:, j, :] = ...``), returned beside the logits."""

    def __init__(self, vocab: int = 20, emb: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.src_emb, self.tgt_emb = nn.Embedding(vocab, emb), nn.Embedding(vocab, emb)
        self.encoder = nn.LSTM(emb, hidden, batch_first=True)
        self.cell = nn.LSTMCell(emb, hidden)
        self.out = nn.Linear(2 * hidden, vocab)

    def forward(self, src, tgt):  # (batch, src time), (batch, tgt time)
        enc, _ = self.encoder(self.src_emb(src))
        bsz, steps = tgt.shape
        h = enc.new_zeros(bsz, self.cell.hidden_size)
        c = enc.new_zeros(bsz, self.cell.hidden_size)
        attn_scores = enc.new_zeros(bsz, steps, src.size(1))
        emb, outs = self.tgt_emb(tgt), []
        for j in range(steps):
            h, c = self.cell(emb[:, j], (h, c))
            a = torch.softmax(torch.bmm(enc, h.unsqueeze(2)).squeeze(2), dim=1)
            attn_scores[:, j, :] = a
            outs.append(torch.cat([h, torch.bmm(a.unsqueeze(1), enc).squeeze(1)], 1))
        return self.out(torch.stack(outs, 1)), attn_scores


def scores_loop(**kw):
    return ScoresLoop(**kw)
