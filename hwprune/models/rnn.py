"""Built-in recurrent sequence classifiers: ``lstm`` and ``gru``.

Input is (batch, time, features); the classifier reads the last time step of
the top layer's output sequence.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RNNClassifier"]


class RNNClassifier(nn.Module):
    """An LSTM or GRU stack followed by a Linear classifier on the last step."""

    def __init__(self, cell: str, input_size: int, num_classes: int = 10, hidden_size: int = 128,
                 num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(input_size, hidden_size, num_layers=num_layers, batch_first=True,
                           bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])
