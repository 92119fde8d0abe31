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


class LSTMLanguageModel(nn.Module):
    """A character/token language model: Embedding -> multi-layer LSTM -> Linear on every step.

    Input (batch, time) token ids; output (batch, time, vocab) logits for the next token at each step.
    """

    def __init__(self, vocab_size: int, embed_size: int = 64, hidden_size: int = 128, num_layers: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.LSTM(embed_size, hidden_size, num_layers=num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)
