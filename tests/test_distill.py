"""Distillation from the dense model in the fine-tune (``--distill``): the loss, its masking, and that it teaches."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import run_cli
from hwprune import HwpruneError
from hwprune.tasks import CLASSIFICATION, LANGUAGE_MODEL, TEMPERATURE, Task, get_task
from hwprune.train import finetune


def test_the_classification_distillation_loss_is_hintons_kl_at_temperature_2():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    p = torch.softmax(t / TEMPERATURE, -1)
    q = torch.softmax(s / TEMPERATURE, -1)
    by_hand = float((p * (p.log() - q.log())).sum()) * TEMPERATURE ** 2
    assert TEMPERATURE == 2.0
    assert float(CLASSIFICATION.distill(s, t, torch.tensor([0]))) == pytest.approx(by_hand, rel=1e-5)
    assert float(CLASSIFICATION.distill(t, t, torch.tensor([0]))) == pytest.approx(0.0, abs=1e-6)


def test_the_language_model_distillation_loss_skips_padding_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    y = torch.tensor([[1, 2, -100], [0, -100, -100]])
    base = float(LANGUAGE_MODEL.distill(s, t, y))
    t2 = t.clone()
    t2[0, 2] += 10.0  # padding positions: the teacher may say anything there
    t2[1, 1:] -= 7.0
    assert float(LANGUAGE_MODEL.distill(s, t2, y)) == pytest.approx(base, rel=1e-6)
    keep = y != -100  # the mean over the three counted tokens
    by_hand = sum(float(CLASSIFICATION.distill(s[i, j][None], t[i, j][None], y[i, j][None]))
                  for i, j in keep.nonzero().tolist()) / 3
    assert base == pytest.approx(by_hand, rel=1e-5)
    assert float(LANGUAGE_MODEL.distill(s, t, torch.full((2, 3), -100))) == 0.0


def test_a_user_task_distills_with_its_own_function_or_the_outputs_mse(tmp_path):
    mse = Task("mine", "m", "min", nn.functional.mse_loss, lambda o, y: (0.0, 1.0))
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert float(mse.distill(a, b, b)) == pytest.approx(2.5)
    f = tmp_path / "task.py"
    f.write_text("import torch\n"
                 "def make():\n"
                 "    return {'loss': lambda o, y: ((o - y) ** 2).mean(), 'metric': lambda o, y: 0.0,\n"
                 "            'direction': 'min', 'distill': lambda o, t: (o - t).abs().sum()}\n")
    own = get_task(f"{f}:make")
    assert float(own.distill(a, b, b)) == pytest.approx(3.0)
    f.write_text("def make():\n    return {'loss': abs, 'metric': abs, 'direction': 'min', 'distill': 3}\n")
    with pytest.raises(HwpruneError, match="'distill' = 3"):
        get_task(f"{f}:make")


def _data(n=256, d=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g))


def _kl_to(student, teacher, x):
    with torch.no_grad():
        return float(CLASSIFICATION.distill(student(x), teacher(x), torch.zeros(len(x), dtype=torch.long)))


def test_a_fine_tune_with_distill_1_learns_the_teacher_and_leaves_it_alone():
    """Random labels carry nothing; with weight 1 the student learns only the teacher's outputs."""
    torch.manual_seed(0)
    teacher, student = nn.Linear(8, 4), nn.Linear(8, 4)
    with torch.no_grad():
        teacher.weight.mul_(3.0)
    teacher.train()  # the caller's mode and weights come back as they were
    before = copy.deepcopy(teacher.state_dict())
    data = _data()
    x = data.tensors[0]
    kl0 = _kl_to(student, teacher, x)
    plain = finetune(copy.deepcopy(student), data, 150, lr=1e-2, batch_size=64)
    taught = finetune(copy.deepcopy(student), data, 150, lr=1e-2, batch_size=64, teacher=teacher, distill=1.0)
    assert _kl_to(taught, teacher, x) < 0.1 * kl0
    assert _kl_to(taught, teacher, x) < 0.2 * _kl_to(plain, teacher, x)
    assert teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_distill_0_or_no_teacher_is_the_plain_fine_tune_bit_for_bit():
    torch.manual_seed(1)
    student, teacher = nn.Linear(8, 4), nn.Linear(8, 4)
    data = _data(seed=1)
    a = finetune(copy.deepcopy(student), data, 20, batch_size=32)
    b = finetune(copy.deepcopy(student), data, 20, batch_size=32, teacher=teacher, distill=0.0)
    assert torch.equal(a.weight, b.weight)
    c = finetune(copy.deepcopy(student), data, 20, batch_size=32, teacher=teacher, distill=0.5)
    assert not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize("w", [-0.1, 1.5, math.nan])
def test_a_distill_weight_outside_0_1_is_refused(w):
    with pytest.raises(HwpruneError, match="distill must be a weight in \\[0, 1\\]"):
        finetune(nn.Linear(8, 4), _data(), 1, teacher=nn.Linear(8, 4), distill=w)


def test_search_refuses_a_bad_distill_weight_in_one_line(tmp_path):
    r = run_cli("search", "--model", "cnn1d", "--data", "mnist1d", "--budget", "50%", "--distill", "2",
                "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "distill must be a weight in [0, 1]" in r.stderr and "got 2.0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
