"""FLOPs, parameters and size through fvcore.

fvcore counts one fused multiply-add as one flop and counts ``aten::lstm`` /
``aten::gru`` as 0 (with a warning); hwprune registers handles for them:
every 2-D weight matrix of the recurrence is applied once per time step per
example, so an LSTM costs ``B*T*sum(rows*cols)`` over its weight_ih/weight_hh.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hwprune import inputs as model_inputs

__all__ = ["ModelStats", "count_flops", "count_params", "model_stats", "rnn_flop_handle"]


def _shape(val: Any) -> list[int] | None:
    t = val.type()
    sizes = t.sizes() if hasattr(t, "sizes") else None
    return list(sizes) if sizes is not None else None


def rnn_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::lstm`` / ``aten::gru``: multiply-adds of all weight matrices."""
    x_shape = _shape(inputs[0])
    batch_first = bool(inputs[-1].toIValue())
    params = inputs[2].node().inputs() if inputs[2].node().kind() == "prim::ListConstruct" else []
    if x_shape is None or len(x_shape) != 3:
        return 0
    steps = x_shape[0] * x_shape[1]  # B * T either way
    macs = 0
    for p in params:
        s = _shape(p)
        if s is not None and len(s) == 2:
            macs += s[0] * s[1]
    del batch_first
    return steps * macs


def cell_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for one step of a cell (``aten::lstm_cell``, ``gru_cell``, ``rnn_tanh_cell``,
    ``rnn_relu_cell``): batch x (weight_ih + weight_hh elements); a loop over time counts every step."""
    x_shape = _shape(inputs[0])
    if x_shape is None or len(x_shape) != 2:
        return 0
    macs = 0
    for p in inputs[2:4]:
        s = _shape(p)
        if s is not None and len(s) == 2:
            macs += s[0] * s[1]
    return x_shape[0] * macs


def count_flops(model: nn.Module, example: Any) -> int:
    """Multiply-adds of one forward pass on ``example`` (all of its batch); formats do not change it."""
    from fvcore.nn import FlopCountAnalysis

    from hwprune.apply.formats import strip_formats

    model = strip_formats(model).eval()
    flops = FlopCountAnalysis(model, model_inputs.positional(model, example))
    flops.set_op_handle("aten::lstm", rnn_flop_handle)
    flops.set_op_handle("aten::gru", rnn_flop_handle)
    flops.set_op_handle("aten::rnn_tanh", rnn_flop_handle)
    flops.set_op_handle("aten::rnn_relu", rnn_flop_handle)
    for op in ("aten::lstm_cell", "aten::gru_cell", "aten::rnn_tanh_cell", "aten::rnn_relu_cell"):
        flops.set_op_handle(op, cell_flop_handle)
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        return int(flops.total())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class ModelStats:
    """Size of a model: parameters, multiply-adds per example, fp32 bytes of its parameters."""

    params: int
    flops: int
    size_bytes: int


def model_stats(model: nn.Module, example: Any) -> ModelStats:
    """Params, per-example FLOPs (fvcore, multiply-adds) and parameter bytes."""
    one = model_inputs.rows(example, slice(0, 1))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelStats(count_params(model), count_flops(model, one), size)
