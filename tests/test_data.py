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
