"""Dependency groups of convolutional models, from Torch-Pruning's graph.

Torch-Pruning traces the model and ties together every channel that must go
at once: a conv's outputs with its BN and consumers, all members of a residual
sum, depthwise convs with their inputs, concatenations.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hwprune import inputs
from hwprune.errors import HwpruneError, one_line
from hwprune.space._trace import defined_at, raised_at

__all__ = ["CNNGroup", "cnn_groups", "grouped_conv", "output_layers", "shapes", "unmapped_reshapes"]

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class CNNGroup:
    """One Torch-Pruning group, named by its root module."""

    name: str
    units: int
    layers: tuple[str, ...]
    root: nn.Module
    handler: Any
    group: Any


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers that produce the model output (the classifier).

    The last conv/linear layer run in the forward pass.
    """
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with torch.no_grad():
            inputs.call(model, example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def grouped_conv(mod: nn.Module) -> bool:
    """A convolution whose channels are tied per group (``groups`` > 1) other than a plain depthwise one
    (``groups == in_channels == out_channels``, which Torch-Pruning follows channel by channel)."""
    if not isinstance(mod, nn.modules.conv._ConvNd) or mod.groups == 1:
        return False
    return not (mod.groups == mod.in_channels == mod.out_channels)


def _width(mod: nn.Module, handler: str) -> int | None:
    """The size of the dimension ``handler`` cuts in ``mod`` (None: a module without one hwprune knows)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels if "out" in handler else mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features if "out" in handler else mod.in_features
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.num_features
    return None


def _out_of_range(group: Any, names: dict[nn.Module, str]) -> str | None:
    """The first member a group's indices do not fit (Torch-Pruning's index mapping lost its way), or None."""
    for dep, idxs in group:
        width = _width(dep.target.module, getattr(dep.handler, "__name__", ""))
        if width is not None and idxs and max(int(i) for i in idxs) >= width:
            return f"{names.get(dep.target.module, '?')!r} ({max(int(i) for i in idxs)} >= {width})"
    return None


def _one_by_one(dg: Any, ignored: list[nn.Module], names: dict[nn.Module, str],
                kept: dict[str, str] | None) -> list[Any]:
    """Torch-Pruning's ``get_all_groups``, a root at a time: a root whose group it cannot build (its index
    mapping fails on some reshape) is kept whole with the reason, and the other groups are still found."""
    out, visited = [], set()
    skip = set(ignored) | set(getattr(dg, "IGNORED_LAYERS_IN_TRACING", []))
    for m in list(dg.module2node):
        if m in skip or m in visited or not isinstance(m, PRUNABLE_TYPES):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's own failure, in words
            visited.add(m)
            if kept is not None:
                name = names.get(m, "?")
                kept[name] = (f"Torch-Pruning cannot follow its channels ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}: an op it cannot map them through, such "
                              f"as a channel shuffle's reshape or a recurrent cell written as Linear layers in a loop)"
                              f"{defined_at(dg.model, name)}; kept whole")
            continue
        ok = True
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                ok = ok and dep.target.module not in skip
        if ok:
            out.append(group)
    return out


def shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model's output (nested tuples, lists, dicts)."""
    from torch.utils._pytree import tree_leaves

    return [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


_MODULE_DICTS = {"_parameters", "_buffers", "_modules"}  # restored by content below (the same dict objects)


def _trial_cut(model: nn.Module, dg: Any, group: CNNGroup, example: Any, want: list[tuple[int, ...]]) -> str | None:
    """Cut ``group`` alone to half its units (every other one) and run the model: None when it runs and gives
    the dense model's output shapes, else why not, in words, with the user's line that failed. Catches what the
    graph got wrong (a cut dimension that crosses a ``view``, a GLU's halves, a residual stream fed by the
    model's input), so that no listed group fails in ``apply``. The cut is made in place and undone: every
    module it touches gets its attributes (lists and dicts copied: Torch-Pruning's concat and split ops keep
    their offsets there), parameters and buffers back (a copy of the model would leave the graph behind)."""
    cut = dg.get_pruning_group(group.root, group.handler, idxs=list(range(1, group.units, 2)))
    mods = {id(d.target.module): d.target.module for d, _ in cut}.values()
    if not all(isinstance(m, nn.Module) for m in mods):
        return None  # a bare nn.Parameter member: its cut rewrites the graph itself; not tried
    saved = [(m, {k: copy.deepcopy(v) if isinstance(v, (list, dict, set)) and k not in _MODULE_DICTS else v
                  for k, v in m.__dict__.items()}, dict(m._parameters), dict(m._buffers)) for m in mods]
    try:
        cut.prune(record_history=False)
        with torch.no_grad():
            got = shapes(inputs.call(model, example))
    except Exception as exc:  # noqa: BLE001 - the model's own failure once cut: reported, the group kept whole
        return f"cut to half, the model fails{raised_at(exc)}: {one_line(exc, 160)}"
    finally:
        for m, attrs, params, bufs in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(bufs)
    if got != want:
        return f"cut to half, the model's output shapes change from {want} to {got}"
    return None


class unmapped_reshapes:
    """Torch-Pruning with each reshape whose index mapping it cannot compute (its ``update_reshape_index_mapping``
    dividing by zero: torchvision's ShuffleNetV2 shuffle) left unmapped, instead of failing for the whole model;
    it recomputes the mappings on every group it builds, so this holds while the graph is used. The function is
    put back afterwards. The groups through such a reshape fail their cut check (or their index check) and are
    kept whole."""

    def __enter__(self) -> None:
        from torch_pruning.dependency import index_mapping

        self._mod, self._orig = index_mapping, index_mapping.update_reshape_index_mapping
        orig = self._orig

        def tolerant(graph: Any, node: Any) -> None:
            try:
                orig(graph, node)
            except ZeroDivisionError:
                pass  # left unmapped
        index_mapping.update_reshape_index_mapping = tolerant

    def __exit__(self, *exc: Any) -> None:
        self._mod.update_reshape_index_mapping = self._orig


def cnn_groups(model: nn.Module, example: torch.Tensor, exclude: set[str],
               kept: dict[str, str] | None = None, verify: bool = True) -> tuple[Any, list[CNNGroup]]:
    """Build the dependency graph of ``model`` and its prunable groups, in module order.

    A group that cuts into a grouped convolution (ResNeXt, RegNet: ``groups`` > 1, not depthwise) is not
    searched: removing arbitrary channels there would leave the groups uneven or mix them (Torch-Pruning
    indexes the grouped weight as if it were dense). It is kept whole, with the reason, in ``kept``
    (layer -> why); the rest of the model is still searched. With ``verify``, each group is also cut alone in place
    and the model run, then the cut undone (:func:`_trial_cut`): a group that breaks the model is kept whole, with
    the reason."""
    with unmapped_reshapes():
        return _cnn_groups(model, example, exclude, kept, verify)


def _cnn_groups(model: nn.Module, example: torch.Tensor, exclude: set[str],
                kept: dict[str, str] | None, verify: bool) -> tuple[Any, list[CNNGroup]]:
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    classifier = set(output_layers(model, example))
    ignored = [m for m, n in names.items() if n in classifier or n in exclude]
    was_training = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs.positional(model, example),
                                                  verbose=False)
        try:
            raw = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES))
        except Exception:  # noqa: BLE001 - one group Torch-Pruning cannot map: the others, one by one
            raw = _one_by_one(dg, ignored, names, kept)
    except Exception as exc:
        raise HwpruneError(f"dependency analysis failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    order = {n: i for i, n in enumerate(names.values())}
    groups = []
    for g in raw:
        root = g[0].dep.target.module
        members = sorted({names[d.target.module] for d, _ in g if d.target.module in names}, key=order.get)
        if exclude & set(members):
            continue
        if any(names.get(d.target.module) in classifier and "out_channels" in getattr(d.handler, "__name__", "")
               for d, _ in g):
            continue
        lost = _out_of_range(g, names)
        if lost is not None:
            if kept is not None:
                kept[names[root]] = (f"Torch-Pruning's channel indices for it do not fit layer {lost} (channels "
                                     f"rearranged by a reshape it cannot follow, e.g. a channel shuffle); kept whole")
            continue
        tied = next((d.target.module for d, _ in g if grouped_conv(d.target.module)), None)
        if tied is not None:
            if kept is not None:
                kept[names[root]] = (f"its channels run through grouped convolution {names[tied]!r}"
                                     f"{defined_at(model, names[tied])} ({type(tied).__name__}, groups={tied.groups}, "
                                     f"{tied.in_channels} -> {tied.out_channels} channels), whose channels are tied "
                                     f"per group; kept whole")
            continue
        wide = next((d.target.module for d, _ in g if isinstance(d.target.module, nn.LayerNorm)
                     and len(d.target.module.normalized_shape) > 1), None)
        if wide is not None:  # SpeechBrain's CNN blocks: LayerNorm over (frequency, channels) together
            if kept is not None:
                kept[names[root]] = (f"its channels reach LayerNorm {names[wide]!r}{defined_at(model, names[wide])}, "
                                     f"which normalizes over {tuple(wide.normalized_shape)} together (Torch-Pruning "
                                     f"cuts one dimension of it); kept whole")
            continue
        producers = [names[d.target.module] for d, _ in g if d.target.module in names
                     and isinstance(d.target.module, PRUNABLE_TYPES)
                     and "out_channels" in getattr(d.handler, "__name__", "")]
        label = min(producers, key=order.get) if producers else names[root]
        groups.append(CNNGroup(label, len(g[0].idxs), tuple(members), root, g[0].dep.handler, g))
    groups.sort(key=lambda c: order[c.name])
    if verify and groups:
        model.eval()
        try:
            with torch.no_grad():
                want = shapes(inputs.call(model, example))
            checked = [(g, _trial_cut(model, dg, g, example, want)) for g in groups]
        finally:
            model.train(was_training)
        groups = [g for g, why in checked if why is None]
        if kept is not None:
            kept.update({g.name: f"{why} (the graph did not follow its channels there); kept whole"
                         for g, why in checked if why is not None})
    return dg, groups
