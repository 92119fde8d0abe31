"""Training leaves models that evaluate: BatchNorm statistics re-estimated after every fine-tune and epoch."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hwprune.train import BN_BATCHES, TrainConfig, evaluate, few_batches, finetune, train_model


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g) * 10 + 50  # far from BatchNorm's initial statistics (mean 0, var 1)
    return TensorDataset(x, (x[:, 0] > 50).long())


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # torchvision's MobileNetV3 builds its BatchNorms with momentum 0.01, as here
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=0.01), nn.ReLU(), nn.Linear(16, 2))


def _by_hand(model: nn.Sequential, ds: TensorDataset, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the re-estimation must give: the plain average over the seeded batches of each batch's mean and
    unbiased variance of the BatchNorm's input (PyTorch's cumulative moving average, momentum None)."""
    with torch.no_grad():
        h = [model[0](x) for x, _ in few_batches(ds, n=BN_BATCHES, batch_size=batch, seed=seed)]
    return torch.stack([t.mean(0) for t in h]).mean(0), torch.stack([t.var(0) for t in h]).mean(0)


@pytest.mark.parametrize("steps", [0, 30])
def test_finetune_reestimates_batchnorm_statistics(steps):
    """With momentum 0.01, 30 steps move the running mean 26% of the way from 0: without re-estimation the model
    evaluates on statistics of a model that no longer exists. 0 steps (pruned, not trained) is re-estimated too."""
    ds, model = _data(), _model()
    finetune(model, ds, steps, lr=1e-2, batch_size=32, seed=3)
    bn = model[1]
    mean, var = _by_hand(model, ds, 32, 3)
    assert torch.allclose(bn.running_mean, mean, rtol=1e-4, atol=1e-3)
    assert torch.allclose(bn.running_var, var, rtol=1e-3, atol=1e-3)
    assert bn.momentum == 0.01  # the layer's own setting is left as it was


def test_training_epochs_end_with_reestimated_statistics():
    ds, model = _data(), _model()
    out = train_model(model, ds, ds, TrainConfig(epochs=2, lr=1e-2, batch_size=64, device="cpu"))
    mean, var = _by_hand(model, ds, 64, 0)
    assert torch.allclose(model[1].running_mean, mean, rtol=1e-4, atol=1e-3)
    assert out["val_history"][-1] == out["val_accuracy"] == evaluate(model, ds)  # scored on those statistics


class _KeepsState(nn.Module):
    """OpenNMT-py's decoder habit: the last forward's state kept in a plain dict attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.state: dict = {}

    def forward(self, x):
        out = self.fc(x)
        self.state["hidden"] = (out * 2,)
        self.state["seen"] = [out.sum()]
        return out


def test_a_state_kept_from_the_last_forward_is_detached_so_the_model_can_be_copied():
    """After a fine-tune step the model's state dict holds tensors with autograd history; copy.deepcopy then
    raised 'Only Tensors created explicitly by the user ... support the deepcopy protocol' (every search copies
    the model). They are detached, with their values kept, and the copy works."""
    import copy

    from hwprune._modelcopy import copy_model, release_graph

    model = _KeepsState()
    out = model(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    want = model.state["hidden"][0].detach().clone()
    assert release_graph(model) == 2
    assert model.state["hidden"][0].grad_fn is None and model.state["seen"][0].grad_fn is None
    assert torch.equal(model.state["hidden"][0], want) and out.grad_fn is not None
    copy.deepcopy(model)
    model(torch.randn(3, 8))  # history again: copy_model (every copy hwprune makes of a model) detaches first
    assert model.state["hidden"][0].grad_fn is not None
    torch.testing.assert_close(copy_model(model).state["hidden"][0], model.state["hidden"][0].detach())
    x = torch.randn(64, 8)
    finetune(model, TensorDataset(x, torch.randint(0, 4, (64,))), steps=2, batch_size=16)
    copy.deepcopy(model)  # finetune leaves it copyable
