"""Cut the layers of recurrent-model groups (:class:`RNNGroupPlan`) to given unit indices, physically.

Shared by ``apply`` (indices chosen by importance) and the space's own check that every listed group can be
cut (every other unit)."""
from __future__ import annotations

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.space._rnn import RNNGroupPlan
from hwprune.space._rnnstack import CELL_TYPES, RNN_TYPES, gates_of, rebuild_cell, rebuild_rnn

__all__ = ["cut_plans"]


def _rnn_slices(mod: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Module:
    """An LSTM/GRU layer or a cell keeping the ``out_keep`` hidden units and ``in_keep`` inputs."""
    H = mod.hidden_size
    hk = out_keep if out_keep is not None else torch.arange(H)
    rows = torch.cat([g * H + hk for g in range(gates_of(mod))])
    params = {}
    for name, p in mod.named_parameters():
        t = p.detach()[rows]
        if name.startswith("weight_ih") and in_keep is not None:
            t = t[:, in_keep]
        elif name.startswith("weight_hh"):
            t = t[:, hk]
        params[name] = t
    in_size = len(in_keep) if in_keep is not None else mod.input_size
    new = (rebuild_cell if isinstance(mod, CELL_TYPES) else rebuild_rnn)(mod, in_size, len(hk), params)
    new.train(mod.training)
    return new


def _weight_slices(mod: nn.Linear | nn.modules.conv._ConvNd, out_keep: torch.Tensor | None,
                   in_keep: torch.Tensor | None) -> nn.Module:
    """A Linear or (groups=1) conv keeping the ``out_keep`` outputs and ``in_keep`` inputs, weights copied."""
    w = mod.weight.detach()
    b = mod.bias.detach() if mod.bias is not None else None
    if out_keep is not None:
        w, b = w[out_keep], (b[out_keep] if b is not None else None)
    if in_keep is not None:
        w = w[:, in_keep]
    if isinstance(mod, nn.Linear):
        new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        new = type(mod)(w.shape[1], w.shape[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation, 1,
                        b is not None, mod.padding_mode)
    new = new.to(w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(mod.training)
    return new


def _bn_slices(mod: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    new = type(mod)(len(keep), mod.eps, mod.momentum, mod.affine, mod.track_running_stats).to(
        next(iter(mod.buffers()), torch.zeros(0)).device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(mod, name)
            if src is not None:
                getattr(new, name).copy_(src.detach()[keep])
        if mod.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(mod.num_batches_tracked)
    new.train(mod.training)
    return new


def cut_plans(model: nn.Module, cuts: list[tuple[RNNGroupPlan, torch.Tensor]]) -> list[str]:
    """Cut each plan's producer to the kept unit indices ``idx`` (ascending), with everything the plan ties to it
    (members, coupled and joined layers, attention's square maps, readers' input columns), in place. Returns the
    cut layers' names."""
    mods = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    ins: dict[str, torch.Tensor] = {}
    norms: dict[str, tuple[int, torch.Tensor]] = {}
    for plan, idx in cuts:
        outs[plan.producer] = idx
        sides = torch.cat([d * plan.units + idx for d in range(plan.dirs)])  # [dir0 | dir1], each kept alike
        cols = sides
        if plan.stride > 1 or plan.outer > 1:  # a conv's channels flattened with other dims: channel c at
            # o * C * stride + c * stride + i (CRNN: stride H; SpeechBrain's (B, T, F, C) -> (B, T, F*C): outer F)
            cols = (torch.arange(plan.outer)[:, None, None] * plan.units * plan.stride +
                    idx[None, :, None] * plan.stride + torch.arange(plan.stride)[None, None, :]).reshape(-1)
        block = plan.units * plan.dirs * plan.stride * plan.outer
        for m in plan.members + plan.coupled:
            outs[m] = idx
        for m, axis in plan.norms:  # a LayerNorm over the channels and other dims: cut along the channels' axis
            norms[m] = (axis, idx)
        for m in plan.joined:  # a decoder started from the directions joined: its units are [dir0 | dir1]
            outs[m] = sides
        for m in plan.through:  # attention's linear_in: the units in, the units out
            outs[m] = ins[m] = sides
        for m in plan.tied:  # a reader whose output width the model ties to the units' (its inputs: a consumer)
            outs[m] = sides
        for c in plan.consumers:  # a reader of [dec | context] sees the units twice, block after block
            ins[c] = torch.cat([j * block + cols for j in range(plan.copies(c))])
        for c in plan.state_consumers:  # h_n[i]: one direction of one layer, the kept units (both: [h_n[-2] | h_n[-1]])
            ins[c] = torch.cat([j * plan.units + idx for j in range(plan.copies(c))])
    for name in sorted(set(outs) | set(ins)):
        mod = mods[name]
        if isinstance(mod, RNN_TYPES + CELL_TYPES):
            new: nn.Module = _rnn_slices(mod, outs.get(name), ins.get(name))
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            new = _weight_slices(mod, outs.get(name), ins.get(name))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and name in outs:
            new = _bn_slices(mod, outs[name])
        elif isinstance(mod, nn.Embedding) and name in outs and name not in ins:
            keep = outs[name]
            new = nn.Embedding(mod.num_embeddings, len(keep), padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                               norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq,
                               sparse=mod.sparse).to(mod.weight.device)
            with torch.no_grad():
                new.weight.copy_(mod.weight.detach()[:, keep])
            new.train(mod.training)
        else:  # pragma: no cover - analysis only yields RNN/Linear members
            raise HwpruneError(f"cannot prune layer {name!r} of type {type(mod).__name__}")
        model.set_submodule(name, new)
    for name, (axis, keep) in norms.items():
        model.set_submodule(name, _ln_slices(mods[name], axis, keep))
    return sorted(set(outs) | set(norms))


def _ln_slices(mod: nn.LayerNorm, axis: int, keep: torch.Tensor) -> nn.LayerNorm:
    """A LayerNorm over the same dims with only ``keep`` along ``axis`` of its normalized shape."""
    shape = list(mod.normalized_shape)
    shape[axis] = len(keep)
    new = nn.LayerNorm(shape, mod.eps, mod.elementwise_affine, bias=mod.bias is not None)
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src = getattr(mod, pname)
            if src is not None:
                getattr(new, pname).copy_(src.detach().index_select(axis, keep.to(src.device)))
    new = new.to(next(iter(mod.parameters()), torch.zeros(0)).device)
    new.train(mod.training)
    return new
