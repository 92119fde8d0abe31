import pytest
import torch

from hwprune import HwpruneError, load_data
from hwprune.data import DATASETS


@pytest.mark.parametrize("layout,shape", [("1d", (1, 40)), ("seq", (40, 1))])
def test_mnist1d_splits(layout, shape):
    d = load_data("mnist1d", layout)
    assert (len(d.train), len(d.val), len(d.test)) == (7000, 1000, 2000)
    assert d.input_shape == shape and d.num_classes == 10
    again = load_data("mnist1d", layout)
    assert torch.equal(d.train.tensors[0], again.train.tensors[0])  # fixed, seeded
    xs = {tuple(x.flatten()[:8].tolist()) for x in d.val.tensors[0]}
    assert not xs & {tuple(x.flatten()[:8].tolist()) for x in d.train.tensors[0][:2000]}


def test_mnist1d_is_generated_once_and_kept_as_plain_arrays(tmp_path, monkeypatch):
    """Kept in the data cache (allow_pickle=False): the same arrays as the package generates; a damaged file is
    generated again, and the arrays are the same."""
    import numpy as np

    from hwprune.data import _mnist1d_arrays

    monkeypatch.setenv("HWPRUNE_DATA_CACHE", str(tmp_path))
    _mnist1d_arrays.cache_clear()
    try:
        made = _mnist1d_arrays(200)
        (kept,) = list(tmp_path.glob("mnist1d-*.npz"))
        with np.load(kept, allow_pickle=False) as z:
            assert all(np.array_equal(z[k], a) and z[k].dtype == a.dtype
                       for k, a in zip(("x", "y", "x_test", "y_test"), made))
        _mnist1d_arrays.cache_clear()
        assert all(np.array_equal(a, b) for a, b in zip(_mnist1d_arrays(200), made))  # read back
        kept.write_bytes(kept.read_bytes()[:100])  # damaged
        _mnist1d_arrays.cache_clear()
        assert all(np.array_equal(a, b) for a, b in zip(_mnist1d_arrays(200), made))
        assert kept.stat().st_size > 1000  # and written whole again
    finally:
        _mnist1d_arrays.cache_clear()


@pytest.mark.parametrize("layout,shape", [("2d", (1, 28, 28)), ("seq", (28, 28))])
def test_mnist5k_splits_are_shuffled(layout, shape):
    d = load_data("mnist5k", layout)
    assert (len(d.train), len(d.val), len(d.test)) == (3500, 500, 1000)
    assert d.input_shape == shape
    counts = torch.bincount(d.test.tensors[1], minlength=10)
    assert counts.min() > 50  # the source is sorted by label; the splits must not be


def test_unknown_dataset_and_layout():
    with pytest.raises(HwpruneError, match="unknown dataset 'cifar'; known: mnist1d, mnist5k, pydoc"):
        load_data("cifar")
    with pytest.raises(HwpruneError, match="no '2d' view"):
        load_data("mnist1d", "2d")
    assert DATASETS.names() == ["mnist1d", "mnist5k", "pydoc"]


def test_a_search_set_up_reads_a_bounded_number_of_items_of_a_large_lazy_dataset(tmp_path, monkeypatch):
    """50,000 training items, never all read before the trials: the class count comes from ``classes``, the
    example and the importance batches read a few hundred. (Trials then read what their fine-tunes draw.)"""
    import sys

    from conftest import ASSETS
    from hwprune.search import SearchSpec
    from hwprune.search.context import prepare_context
    from hwprune.resolve import resolve

    reads = lambda ds: type(ds).__getitem__.__globals__["READS"]["train"]  # noqa: E731 - the module it was made in
    mlp, data = f"{ASSETS / 'user_model.py'}:mlp", f"{ASSETS / 'user_model.py'}:make_lazy_data"
    s = resolve(mlp, data, use_cache=False)
    assert s.data.num_classes == 3 and len(s.data.train) == 50_000
    assert reads(s.data.train) <= 5  # the shape and a 2-item example
    weights = tmp_path / "w.pt"
    torch.save(s.model.state_dict(), weights)
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HWPRUNE_TABLES", str(tmp_path / "tables"))
    spec = SearchSpec(model=mlp, data=data, budget="10ms", batch_size=4, weights=str(weights), importance="taylor")
    spec.validate()
    ctx = prepare_context(spec, log=lambda m: None)  # profiles the MLP on demand (a few seconds)
    assert len(ctx.batches) == 4 and reads(ctx.setup.data.train) <= 4 * 64 + 5, reads(ctx.setup.data.train)


def test_a_dataset_that_does_not_say_its_class_count_needs_num_classes():
    from conftest import ASSETS, run_cli

    data = f"{ASSETS / 'user_model.py'}:make_plain_data"
    proc = run_cli("inspect", "--model", "cnn1d", "--data", data)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"hwprune: error: data {data!r} does not say how many classes it has (no num_classes, classes or targets "
        f"attribute); pass --num-classes N"]
    import json

    p3, p5 = (json.loads(run_cli("inspect", "--model", "cnn1d", "--data", data, "--num-classes", n, "--json").stdout)
              ["params"] for n in ("3", "5"))
    from hwprune import build_model

    head = build_model("cnn1d", (1, 40), 3).fc
    assert p5 - p3 == 2 * (head.in_features + 1)  # the classifier has the asked outputs
