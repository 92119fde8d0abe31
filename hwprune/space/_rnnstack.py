"""Split multi-layer ``nn.LSTM``/``nn.GRU`` into per-layer modules.

PyTorch's recurrent modules share one ``hidden_size`` across layers and
directions, so per-layer pruning needs one module per layer. :class:`RNNStack`
holds single-layer modules and computes exactly what the original did.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RNNStack", "split_rnn_stacks", "RNN_TYPES", "CELL_TYPES", "rebuild_rnn", "rebuild_cell", "gates_of"]

RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
CELL_TYPES = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)  # called once per step in a Python loop


def gates_of(mod: nn.Module) -> int:
    """Gate blocks stacked in the rows of a recurrent layer's weights (LSTM 4, GRU 3, plain RNN cell 1)."""
    return 4 if isinstance(mod, (nn.LSTM, nn.LSTMCell)) else 3 if isinstance(mod, (nn.GRU, nn.GRUCell)) else 1


def rebuild_cell(old: nn.RNNCellBase, input_size: int, hidden_size: int,
                 params: dict[str, torch.Tensor]) -> nn.RNNCellBase:
    """A fresh cell like ``old`` with new sizes and the given params."""
    extra = {"nonlinearity": old.nonlinearity} if isinstance(old, nn.RNNCell) else {}
    new = type(old)(input_size, hidden_size, bias=old.bias, **extra)
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.copy_(params[name])
    return new.to(old.weight_ih.device)


def rebuild_rnn(old: nn.RNNBase, input_size: int, hidden_size: int,
                params: dict[str, torch.Tensor]) -> nn.RNNBase:
    """A fresh single-layer LSTM/GRU like ``old`` with new sizes and the given ``*_l0*`` params."""
    extra = {"nonlinearity": old.nonlinearity} if isinstance(old, nn.RNN) else {}
    new = type(old)(input_size, hidden_size, num_layers=1, bias=old.bias, batch_first=old.batch_first,
                    bidirectional=old.bidirectional, **extra)
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.copy_(params[name])
    return new.to(next(old.parameters()).device)


class RNNStack(nn.Module):
    """A stack of single-layer LSTM/GRU modules that may differ in hidden size.

    Returns ``(output, h_n)`` (``(output, (h_n, c_n))`` for LSTM) like the
    module it replaces. When the layers' hidden sizes differ, ``h_n`` cannot
    be one tensor and is returned as a tuple with one ``(batch, hidden)``
    tensor per layer and direction, so ``h_n[i]`` still reads what it read in
    the dense model (layer ``i // dirs``, direction ``i % dirs``).
    """

    def __init__(self, layers: list[nn.RNNBase], dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = dropout
        self.is_lstm = isinstance(layers[0], nn.LSTM)
        self.batch_first = layers[0].batch_first
        self.dirs = 2 if layers[0].bidirectional else 1

    # nn.RNNBase's API, for models that call it on the module they built (SpeechBrain's RNN wrappers call
    # flatten_parameters() in every forward; others read sizes off the module)
    def flatten_parameters(self) -> None:
        """Each layer's weights made one contiguous block (cuDNN), as ``nn.RNNBase.flatten_parameters``."""
        for layer in self.live:
            layer.flatten_parameters()

    @property
    def live(self) -> list[nn.RNNBase]:
        """The layers that run: all but those a policy dropped (:class:`hwprune.space._depth.Dropped`); a layer
        wrapped or swapped for deployment (a precision region, a dynamic int8 LSTM) still runs."""
        from hwprune.space._depth import Dropped

        return [layer for layer in self.layers if not isinstance(layer, Dropped)]

    @property
    def mode(self) -> str:
        return self.layers[0].mode

    @property
    def num_layers(self) -> int:
        """The layers that run (a dropped one does not count: the final state has one layer fewer)."""
        return len(self.live)

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def hidden_size(self) -> int:
        """The last layer's (what each direction of the output holds); layers may differ once pruned."""
        return self.live[-1].hidden_size

    @property
    def bidirectional(self) -> bool:
        return self.dirs == 2

    @property
    def proj_size(self) -> int:
        return 0

    @property
    def bias(self) -> bool:
        return self.layers[0].bias

    @property
    def _flat_weights(self) -> list[torch.Tensor]:
        return [w for layer in self.live for w in layer._flat_weights]

    @property
    def all_weights(self) -> list[list[torch.Tensor]]:
        return [ws for layer in self.live for ws in layer.all_weights]

    def _split_hx(self, hx):  # type: ignore[no-untyped-def]
        n = len(self.live)
        if hx is None:
            return [None] * n
        d = self.dirs

        def part(t, i):  # type: ignore[no-untyped-def] - one stacked tensor, or one tensor per layer and direction
            return t[i * d:(i + 1) * d] if isinstance(t, torch.Tensor) else torch.stack(t[i * d:(i + 1) * d], 0)

        if self.is_lstm:
            h, c = hx
            return [(part(h, i), part(c, i)) for i in range(n)]
        return [part(hx, i) for i in range(n)]

    def forward(self, x: torch.Tensor, hx=None):  # type: ignore[no-untyped-def]
        hs, cs = [], []
        out = x
        live = self.live
        for i, (layer, h0) in enumerate(zip(live, self._split_hx(hx))):
            out, h = layer(out, h0)
            if self.is_lstm:
                hs.append(h[0])
                cs.append(h[1])
            else:
                hs.append(h)
            if self.training and self.dropout > 0 and i < len(live) - 1:
                if isinstance(out, nn.utils.rnn.PackedSequence):
                    out = out._replace(data=nn.functional.dropout(out.data, self.dropout, training=True))
                else:
                    out = nn.functional.dropout(out, self.dropout, training=True)
        same = len({t.shape[-1] for t in hs}) == 1

        def join(ts: list[torch.Tensor]):  # type: ignore[no-untyped-def]
            return torch.cat(ts, 0) if same else tuple(t for h in ts for t in h.unbind(0))

        return (out, (join(hs), join(cs))) if self.is_lstm else (out, join(hs))


def _split_one(rnn: nn.RNNBase) -> RNNStack:
    if getattr(rnn, "proj_size", 0):
        from hwprune.errors import HwpruneError

        raise HwpruneError("LSTM with proj_size > 0 is not supported for pruning")
    layers = []
    for k in range(rnn.num_layers):
        in_size = rnn.input_size if k == 0 else rnn.hidden_size * (2 if rnn.bidirectional else 1)
        params = {}
        for name, p in rnn.named_parameters():
            stem, _, rest = name.partition(f"_l{k}")
            if rest in ("", "_reverse") and name.endswith(f"_l{k}{rest}"):
                params[f"{stem}_l0{rest}"] = p.detach()
        layers.append(rebuild_rnn(rnn, in_size, rnn.hidden_size, params))
    stack = RNNStack(layers, dropout=rnn.dropout)
    stack.train(rnn.training)
    return stack


def split_rnn_stacks(model: nn.Module) -> nn.Module:
    """Replace every multi-layer LSTM/GRU in ``model`` by an :class:`RNNStack` (in place).

    Idempotent, and numerically identical: outputs do not change.
    """
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, RNN_TYPES) and child.num_layers > 1:
                setattr(mod, child_name, _split_one(child))
    return model
