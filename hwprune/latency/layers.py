"""Which kernel each layer runs under a policy: layer configurations and their keys.

Each quantizable layer's dims (inputs, outputs, conv groups) are a linear form
of the kept units of the prunable groups: ``dim = const + sum(factor_g * units_g)``
(a flatten multiplies by the spatial size, a bidirectional RNN by two, a
concatenation sums its branches). The factors are found once per model by
pruning each group on its own, then checked on a policy that prunes all groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from hwprune import inputs
from hwprune.errors import HwpruneError
from hwprune.policy import Policy, keep_units
from hwprune.space import Space, build_space, prepare_model

__all__ = ["LayerConfig", "CastConfig", "LayerForm", "ModelLayers", "analyze_layers", "FP32_ONLY_OPS", "CELL_OPS"]

CELL_OPS = ("lstmcell", "grucell", "rnncell", "rnncellrelu")  # a cell called once per step: priced as its loop
RNN_OPS = ("lstm", "gru", "rnn", "rnnrelu")  # whole-sequence recurrent layers (nn.RNN: tanh, or ReLU)
# ops profiled (and searched) in fp32 only: their low-precision kernels (torch.ao's transposed convs, per-step
# int8/bf16 cells with their casts in the loop) are not wired into deploy and the table
FP32_ONLY_OPS = ("convt1d", "convt2d", "rnn", "rnnrelu") + CELL_OPS
_GATES = {"lstm": 4, "gru": 3, "rnn": 1, "rnnrelu": 1, "lstmcell": 4, "grucell": 3, "rnncell": 1, "rnncellrelu": 1}


@dataclass(frozen=True)
class LayerConfig:
    """Everything that changes a layer's kernel; :attr:`key` names it in a latency table."""

    op: str
    cin: int
    cout: int
    batch: int
    fmt: str = "fp32"
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()  # or "same" (PyTorch's padding='same': output as long as the input)
    groups: int = 1
    bias: bool = True
    extent: tuple[int, ...] = ()  # spatial size (conv), middle dims (linear), sequence length (rnn)
    bidirectional: bool = False
    post: tuple[str, ...] = ()  # the epilogue timed with the layer (hwprune.latency.epilogue): a fused block
    dilation: tuple[int, ...] = ()  # conv dilation; () when every factor is 1 (keys of undilated convs unchanged)
    time_first: bool = False  # an LSTM/GRU in PyTorch's default layout (time, batch, features): key part 'tf'
    output_padding: tuple[int, ...] = ()  # a transposed conv's; () when all 0

    @property
    def key(self) -> str:
        j = lambda t: "x".join(map(str, t)) or "-"  # noqa: E731
        parts = [self.op, f"i{self.cin}", f"o{self.cout}"]
        if self.op.startswith("conv"):
            pad = self.padding if isinstance(self.padding, str) else j(self.padding)
            parts += [f"k{j(self.kernel)}", f"s{j(self.stride)}", f"p{pad}"]
            parts += ([f"d{j(self.dilation)}"] if self.dilation else []) + \
                ([f"q{j(self.output_padding)}"] if self.output_padding else []) + [f"g{self.groups}"]
        if self.op in RNN_OPS:
            parts.append("bi" if self.bidirectional else "uni")
            if self.time_first:
                parts.append("tf")
        parts += [f"x{j(self.extent)}", f"b{self.batch}", "bias" if self.bias else "nobias", self.fmt]
        if self.post:
            parts.append("+" + "+".join(self.post))
        return "|".join(parts)

    @classmethod
    def from_key(cls, key: str) -> "LayerConfig | None":
        """Parse a :attr:`key` back (None if it is not one)."""
        parts = key.split("|")
        try:
            op = parts[0]
            t = lambda s: tuple(int(v) for v in s.split("x")) if s != "-" else ()  # noqa: E731
            kw: dict[str, Any] = {"cin": int(parts[1][1:]), "cout": int(parts[2][1:])}
            rest = parts[3:]
            if op.startswith("conv"):
                pad = rest[2][1:]
                kw.update(kernel=t(rest[0][1:]), stride=t(rest[1][1:]), padding=pad if pad == "same" else t(pad))
                if rest[3].startswith("d"):
                    kw["dilation"] = t(rest[3][1:])
                    rest = rest[1:]
                if rest[3].startswith("q"):
                    kw["output_padding"] = t(rest[3][1:])
                    rest = rest[1:]
                kw["groups"] = int(rest[3][1:])
                rest = rest[4:]
            elif op in RNN_OPS:
                kw["bidirectional"] = rest[0] == "bi"
                rest = rest[1:]
                if rest[0] == "tf":
                    kw["time_first"] = True
                    rest = rest[1:]
            kw.update(extent=t(rest[0][1:]), batch=int(rest[1][1:]), bias=rest[2] == "bias", fmt=rest[3])
            if len(rest) > 4:
                kw["post"] = tuple(rest[4][1:].split("+"))
            cfg = cls(op, **kw)
        except (IndexError, ValueError):
            return None
        return cfg if cfg.key == key else None

    def macs(self) -> int:
        """Multiply-adds of one call (the FLOPs proxy; same convention as fvcore)."""
        ext = 1
        for e in self.extent:
            ext *= e
        if self.op.startswith("conv"):
            out_ext = 1
            for n in self.out_extent():
                out_ext *= n
            kvol = 1
            for k in self.kernel:
                kvol *= k
            return self.batch * out_ext * self.cout * (self.cin // self.groups) * kvol
        if self.op == "linear":
            return self.batch * ext * self.cin * self.cout
        d = 2 if self.bidirectional else 1
        return self.batch * ext * d * _GATES[self.op] * self.cout * (self.cin + self.cout)

    def out_extent(self) -> tuple[int, ...]:
        """A conv's output spatial size (PyTorch's formula, with dilation; 'same' keeps the input's)."""
        if self.padding == "same":
            return tuple(self.extent)
        dil = self.dilation or (1,) * len(self.kernel)
        if self.op.startswith("convt"):
            opad = self.output_padding or (0,) * len(self.kernel)
            return tuple((n - 1) * s - 2 * p + d * (k - 1) + q + 1
                         for n, k, s, p, d, q in zip(self.extent, self.kernel, self.stride, self.padding, dil, opad))
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, k, s, p, d in zip(self.extent, self.kernel, self.stride, self.padding, dil))

    def in_elems(self) -> int:
        """Elements of one call's input: what a dtype cast in front of the layer touches."""
        n = self.batch * self.cin
        for e in self.extent:
            n *= e
        return n

    def out_elems(self) -> int:
        """Elements of one call's output: what the elementwise ops after the layer touch."""
        if self.op.startswith("conv"):
            n = self.batch * self.cout
            for e in self.out_extent():
                n *= e
            return n
        n = self.batch * self.cout * (2 if self.bidirectional else 1)
        for e in self.extent:
            n *= e
        return n

    def epilogue(self) -> nn.Module | None:
        """The fp32 modules of :attr:`post` at this configuration's width (None without an epilogue)."""
        if not self.post:
            return None
        from hwprune.latency.epilogue import build_epilogue

        return build_epilogue(self.post, self.op, self.cout)

    def bare(self) -> "LayerConfig":
        """This configuration without its epilogue."""
        return replace(self, post=()) if self.post else self

    def build(self, device: str | torch.device = "cpu") -> tuple[nn.Module, torch.Tensor]:
        """A fresh fp32 module of this configuration's layer (without its epilogue: :meth:`epilogue`) and an
        input for it, on ``device``.

        The module is initialized on the CPU (weights are small; the default CUDA generator must stay out of
        it: CUDA graph capture registers that generator), the input is drawn on ``device`` with its own
        generator (inputs are large).
        """
        g = torch.Generator(device=device).manual_seed(0)
        made = self._module()
        return made.to(device).eval(), self._input(g, device)

    def _module(self) -> nn.Module:
        if self.op in ("conv1d", "conv2d"):
            cls = nn.Conv1d if self.op == "conv1d" else nn.Conv2d
            return cls(self.cin, self.cout, self.kernel, self.stride, self.padding, dilation=self.dilation or 1,
                       groups=self.groups, bias=self.bias)
        if self.op in ("convt1d", "convt2d"):
            tcls = nn.ConvTranspose1d if self.op == "convt1d" else nn.ConvTranspose2d
            return tcls(self.cin, self.cout, self.kernel, self.stride, self.padding, self.output_padding or 0,
                        groups=self.groups, bias=self.bias, dilation=self.dilation or 1)
        if self.op == "linear":
            return nn.Linear(self.cin, self.cout, bias=self.bias)
        if self.op in CELL_OPS:
            if self.op.startswith("rnncell"):
                return CellLoop(nn.RNNCell(self.cin, self.cout, bias=self.bias,
                                           nonlinearity="relu" if self.op.endswith("relu") else "tanh"))
            ccls = {"lstmcell": nn.LSTMCell, "grucell": nn.GRUCell}[self.op]
            return CellLoop(ccls(self.cin, self.cout, bias=self.bias))
        if self.op.startswith("rnn"):
            return nn.RNN(self.cin, self.cout, batch_first=not self.time_first, bidirectional=self.bidirectional,
                          bias=self.bias, nonlinearity="relu" if self.op == "rnnrelu" else "tanh")
        cls = nn.LSTM if self.op == "lstm" else nn.GRU
        return cls(self.cin, self.cout, batch_first=not self.time_first, bidirectional=self.bidirectional,
                   bias=self.bias)

    def _input(self, g: torch.Generator, device: str | torch.device) -> torch.Tensor:
        if self.op.startswith("conv"):
            return torch.randn(self.batch, self.cin, *self.extent, generator=g, device=device)
        if self.time_first:
            return torch.randn(*self.extent, self.batch, self.cin, generator=g, device=device)
        return torch.randn(self.batch, *self.extent, self.cin, generator=g, device=device)


class CellLoop(nn.Module):
    """A cell run over every step of a ``(batch, steps, features)`` input from a zero state, as a user's Python
    loop runs it: what a cell's table entry times (the loop's step count is the entry's extent)."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return state[0] if isinstance(state, tuple) else state


@dataclass(frozen=True)
class CastConfig:
    """A dtype cast of an activation (``src`` -> ``dst``, format names) of ``elems`` elements per example.

    Measured and priced like a layer: ``op`` is ``cast`` and it runs in fp32 terms (no format of its own).
    """

    src: str
    dst: str
    elems: int
    batch: int
    op: str = "cast"
    fmt: str = "fp32"
    cin: int = 0
    cout: int = 0

    @property
    def key(self) -> str:
        return f"cast|{self.src}>{self.dst}|n{self.elems}|b{self.batch}"

    @classmethod
    def from_key(cls, key: str) -> "CastConfig | None":
        parts = key.split("|")
        try:
            src, dst = parts[1].split(">")
            cfg = cls(src, dst, int(parts[2][1:]), int(parts[3][1:]))
        except (IndexError, ValueError):
            return None
        return cfg if parts[0] == "cast" and cfg.key == key else None

    def macs(self) -> int:
        return 0

    def in_elems(self) -> int:
        return self.batch * self.elems

    out_elems = in_elems

    def build(self, device: str | torch.device = "cpu") -> tuple[nn.Module, torch.Tensor]:
        from hwprune.device.kernels import Cast, DTYPE_BY_NAME

        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(self.batch, self.elems, generator=g, device=device).to(DTYPE_BY_NAME[self.src])
        return Cast(DTYPE_BY_NAME[self.dst]), x


@dataclass(frozen=True)
class LayerForm:
    """One layer's dims as linear forms of the groups' kept units."""

    name: str
    base: LayerConfig  # the dense configuration (batch 1, fp32)
    terms: dict[str, dict[str, int]] = field(default_factory=dict)  # dim -> {group: factor}
    consts: dict[str, int] = field(default_factory=dict)  # dim -> constant

    def dim(self, which: str, units: dict[str, int]) -> int:
        return self.consts[which] + sum(f * units[g] for g, f in self.terms[which].items())

    def config(self, units: dict[str, int], batch: int, fmt: str, fused: bool = True) -> LayerConfig:
        """The configuration at ``units`` (see :meth:`at`)."""
        groups = self.dim("groups", units) if self.base.groups > 1 else 1
        return self.at((self.dim("cin", units), self.dim("cout", units), groups), batch, fmt, fused)

    def at(self, dims: tuple[int, int, int], batch: int, fmt: str, fused: bool = True) -> LayerConfig:
        """The configuration with ``(cin, cout, groups)``; ``fused`` False: the bare layer (tables profiled
        before blocks)."""
        return replace(self.base, cin=dims[0], cout=dims[1], groups=dims[2], batch=batch, fmt=fmt,
                       post=self.base.post if fused else ())


@dataclass
class ModelLayers:
    """The layer forms of one model and the space they were derived from."""

    space: Space
    layers: list[LayerForm]
    channel_multiple: int
    sources: Any = None  # hwprune.device.kernels.Sources: which layer feeds which (None: unknown, priced as islands)

    def configs(self, policy: Policy, batch: int, fused: bool = True) -> list[tuple[str, LayerConfig]]:
        units = policy.units(self.space)
        return [(f.name, f.config(units, batch, policy.formats.get(f.name, "fp32"), fused))
                for f in self.forms(policy.drop)]

    def forms(self, drop: tuple[str, ...] = ()) -> list[LayerForm]:
        """The layer forms of the model with the blocks ``drop`` names removed (depth): the layers inside them
        are gone, and a layer that read a dropped block's output reads its input instead (a block keeps its
        input's shape, so its output width is its input width: ``factor * units_g`` of a group produced only
        inside the block becomes the same share of the block's input form). Cached per set of blocks."""
        if not drop:
            return self.layers
        cache = self.__dict__.setdefault("_dropped_forms", {})
        if drop in cache:
            return cache[drop]
        from fractions import Fraction

        gone = lambda n: any(n == d or n.startswith(d + ".") for d in drop)  # noqa: E731
        producers: dict[str, list[str]] = {}
        for f in self.layers:
            for g in f.terms.get("cout", {}):
                producers.setdefault(g, []).append(f.name)
        subst: dict[str, tuple[dict[str, Fraction], Fraction]] = {}  # vanished group -> its value as a form

        def rewrite(terms: dict[str, int], const: int) -> tuple[dict[str, Fraction], Fraction]:
            out: dict[str, Fraction] = {}
            c = Fraction(const)
            for g, k in terms.items():
                if g in subst:
                    sub, sc = subst[g]
                    c += k * sc
                    for h, v in sub.items():
                        out[h] = out.get(h, Fraction(0)) + k * v
                else:
                    out[g] = out.get(g, Fraction(0)) + k
            return out, c

        for block in sorted(drop, key=lambda b: next((i for i, f in enumerate(self.layers)
                                                      if f.name == b or f.name.startswith(b + ".")), 0)):
            inside = [f for f in self.layers if f.name == block or f.name.startswith(block + ".")]
            if not inside:
                continue
            first = inside[0]
            in_terms, in_const = rewrite(first.terms.get("cin", {}), first.consts.get("cin", 0))
            width = first.base.cin  # the block's input (= output) width in the dense model
            for g, ps in producers.items():
                if g not in subst and all(gone(p) for p in ps) and any(p in {f.name for f in inside} for p in ps):
                    share = Fraction(self.space.group(g).units, width)  # units_g per unit of the block's output
                    subst[g] = ({h: v * share for h, v in in_terms.items()}, in_const * share)
        out = []
        for f in self.layers:
            if gone(f.name):
                continue
            terms, consts = {}, {}
            for dim in f.terms:
                t, c = rewrite(f.terms[dim], f.consts.get(dim, 0))
                if c.denominator != 1 or any(v.denominator != 1 for v in t.values()):
                    raise HwpruneError(f"layer {f.name!r}: its {dim} does not follow the dropped blocks "
                                       f"{', '.join(drop)} in whole units (a gap in hwprune: please report it)")
                terms[dim] = {g: int(v) for g, v in t.items() if v}
                consts[dim] = int(c)
            out.append(replace(f, terms=terms, consts=consts))
        cache[drop] = out
        return out

    def carriers(self) -> dict[str, str]:
        """group -> the droppable block (``space.blocks``) it stands for in a search: a group produced only inside
        that block (it is gone with it), the first such, innermost blocks first. A block without one (its layers
        kept whole) is not searched."""
        producers: dict[str, list[str]] = {}
        for f in self.layers:
            for g in f.terms.get("cout", {}):
                producers.setdefault(g, []).append(f.name)
        out: dict[str, str] = {}
        for b in sorted(self.space.blocks, key=lambda b: -b.name.count(".")):
            inside = lambda n, b=b: n == b.name or n.startswith(b.name + ".")  # noqa: E731
            owned = [g.name for g in self.space.groups if g.name not in out and producers.get(g.name)
                     and all(inside(p) for p in producers[g.name])]
            if owned:
                out[owned[0]] = b.name
        return out

    def sources_for(self, drop: tuple[str, ...] = ()) -> Any:
        """:attr:`sources` with the blocks ``drop`` names removed: whatever read a dropped layer or follower
        reads what fed it (None stays None)."""
        src = self.sources
        if src is None or not drop:
            return src
        from hwprune.device.kernels import Sources

        gone = lambda n: any(n == d or n.startswith(d + ".") for d in drop)  # noqa: E731

        def through(names: tuple[str, ...], seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
            got: list[str] = []
            for n in names:
                if not gone(n):
                    got.append(n)
                elif n not in seen:
                    got += through(src.inputs.get(n, ()), seen | {n})
            return tuple(dict.fromkeys(got))

        return Sources({n: through(v) for n, v in src.inputs.items() if not gone(n)}, through(src.output),
                       tuple(n for n in src.followers if not gone(n)))

    def unit_options(self, group: str, grid: list[float]) -> list[int]:
        g = self.space.group(group)
        return sorted({keep_units(r, g.units, self.channel_multiple) for r in grid})


_DIMS = ("cin", "cout", "groups")


def _dims(mod: nn.Module) -> dict[str, int]:
    if isinstance(mod, nn.modules.conv._ConvNd):
        return {"cin": mod.in_channels, "cout": mod.out_channels, "groups": mod.groups}
    if isinstance(mod, nn.Linear):
        return {"cin": mod.in_features, "cout": mod.out_features, "groups": 1}
    return {"cin": mod.input_size, "cout": mod.hidden_size, "groups": 1}  # LSTM / GRU


def _base_configs(model: nn.Module, example: torch.Tensor, space: Space) -> dict[str, LayerConfig]:
    extents: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    packed: set[str] = set()
    mods = dict(model.named_modules())

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(m: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0]
            calls[name] = calls.get(name, 0) + 1
            if isinstance(m, nn.modules.conv._ConvNd):
                extents[name] = tuple(x.shape[2:])
            elif isinstance(m, nn.RNNCellBase):  # one step per call: the loop's length is the call count
                extents[name] = (calls[name],)
            elif isinstance(x, nn.utils.rnn.PackedSequence):  # priced at the padded length (see padded_lengths)
                packed.add(name)
                extents[name] = (len(x.batch_sizes),)
            elif isinstance(m, nn.RNNBase) and not m.batch_first:  # (T, B, F)
                extents[name] = tuple(x.shape[:1])
            else:  # linear: middle dims; batch-first rnn: (T,)
                extents[name] = tuple(x.shape[1:-1])
        return fn

    handles = [mods[q.name].register_forward_hook(hook(q.name)) for q in space.layers]
    try:
        with torch.no_grad():
            inputs.call(model.eval(), inputs.rows(example, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    padded = padded_lengths(model, example) if packed else {}
    out = {}
    for q in space.layers:
        m, d = mods[q.name], _dims(mods[q.name])
        if q.name not in extents:
            continue  # never called in forward: costs nothing
        if isinstance(m, nn.modules.conv._ConvNd):
            pad = tuple(m.padding) if isinstance(m.padding, tuple) else \
                "same" if m.padding == "same" else (0,) * len(m.kernel_size)  # 'valid' is no padding
            dil = tuple(m.dilation) if any(d != 1 for d in m.dilation) else ()
            extra = dict(kernel=tuple(m.kernel_size), stride=tuple(m.stride), padding=pad, dilation=dil,
                         groups=m.groups, bias=m.bias is not None)
            if m.transposed:
                opad = tuple(m.output_padding)
                extra["output_padding"] = opad if any(opad) else ()
        elif isinstance(m, nn.Linear):
            extra = dict(bias=m.bias is not None)
        elif isinstance(m, nn.RNNCellBase):
            extra = dict(bias=m.bias)
        else:
            extra = dict(bias=m.bias, bidirectional=m.bidirectional, time_first=not m.batch_first)
        ext = extents[q.name]
        if q.name in packed:
            ext = padded.get(q.name, ext)
        out[q.name] = LayerConfig(q.op, d["cin"], d["cout"], 1, extent=ext, **extra)
    from hwprune.latency.epilogue import trace_epilogues

    post = trace_epilogues(model, example, {n: c.op for n, c in out.items()}, {n: c.cout for n, c in out.items()})
    return {n: replace(c, post=post.get(n, ())) if post else c for n, c in out.items()}


def padded_lengths(model: nn.Module, example: Any) -> dict[str, tuple[int]]:
    """The padded length of every LSTM/GRU layer that reads a ``PackedSequence``: the time dim of the tensor
    ``pack_padded_sequence`` was given (the timing batch's padding), where a hook only sees the longest
    sequence of one example. A packed layer is priced as if every sequence ran that long (an upper bound)."""
    from torch import fx

    from hwprune.space._rnn import LEAVES
    from hwprune.space._rnnstack import RNNStack
    from hwprune.space._trace import trace_concrete

    try:
        graph = trace_concrete(model, example, LEAVES)
    except Exception:  # noqa: BLE001 - the analysis traced it before; without it, the hook's length stands
        return {}
    mods = dict(model.named_modules())
    out: dict[str, tuple[int]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if not (src.op == "call_function" and src.target is nn.utils.rnn.pack_padded_sequence):
            continue
        padded = src.args[0].meta.get("value") if isinstance(src.args[0], fx.Node) else None
        if not isinstance(padded, torch.Tensor):
            continue
        bf = src.kwargs.get("batch_first", src.args[2] if len(src.args) > 2 else False)
        steps = (int(padded.shape[1 if bf else 0]),)
        mod = mods[str(node.target)]
        for k in range(len(mod.layers) if isinstance(mod, RNNStack) else 1):
            out[f"{node.target}.layers.{k}" if isinstance(mod, RNNStack) else str(node.target)] = steps
    return out


def analyze_layers(model: nn.Module, example: torch.Tensor, exclude: list[str] | tuple[str, ...] = (),
                   channel_multiple: int = 8) -> ModelLayers:
    """Derive every layer's dims as linear forms of the groups' units (prunes each group once)."""
    from hwprune.apply.prune import prune_model

    model = prepare_model(model)
    space = build_space(model, example, exclude)
    base = _base_configs(model, example, space)
    dense = {n: _dims(model.get_submodule(n)) for n in base}
    terms: dict[str, dict[str, dict[str, int]]] = {n: {d: {} for d in _DIMS} for n in base}
    for g in space.groups:
        small = max(1, g.units // 2)
        pruned = prune_model(model, Policy({g.name: small / g.units}, channel_multiple=1), example, exclude=exclude)
        for n in base:
            now = _dims(pruned.get_submodule(n))
            for d in _DIMS:
                delta = dense[n][d] - now[d]
                if delta:
                    terms[n][d][g.name] = delta // (g.units - small)
    forms = []
    full = {g.name: g.units for g in space.groups}
    for n, cfg in base.items():
        consts = {d: dense[n][d] - sum(f * full[g] for g, f in terms[n][d].items()) for d in _DIMS}
        forms.append(LayerForm(n, cfg, terms[n], consts))
    from hwprune.device.kernels import dtype_sources

    layers = ModelLayers(space, forms, channel_multiple, dtype_sources(model, example, [f.name for f in forms]))
    _check_forms(model, example, exclude, layers)
    return layers


def _check_forms(model: nn.Module, example: torch.Tensor, exclude: Any, layers: ModelLayers) -> None:
    """Prune every group at once and compare the real dims with the forms' prediction."""
    from hwprune.apply.prune import prune_model

    if not layers.space.groups:
        return
    keep = {g.name: (1 + i % 3) / 4 for i, g in enumerate(layers.space.groups)}
    policy = Policy(keep, channel_multiple=1)
    pruned = prune_model(model, policy, example, exclude=exclude)
    units = policy.units(layers.space)
    for f in layers.layers:
        real = _dims(pruned.get_submodule(f.name))
        for d in ("cin", "cout"):
            if f.dim(d, units) != real[d]:
                raise HwpruneError(f"layer {f.name!r}: its {d} does not follow the groups linearly "
                                   f"({f.dim(d, units)} predicted, {real[d]} real); exclude it")
