"""Tasks beyond classification: a language model (token inputs, perplexity, lower is better) and user tasks."""
import csv
import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import ASSETS, run_cli
from hwprune import HwpruneError
from hwprune.tasks import get_task
from hwprune.train import evaluate

LM = f"{ASSETS / 'user_model.py'}:tiny_lm"
TOKENS = f"{ASSETS / 'user_model.py'}:make_token_data"
MLP = f"{ASSETS / 'user_model.py'}:mlp"
MLP_DATA = f"{ASSETS / 'user_model.py'}:make_mlp_data"
ERR_TASK = f"{ASSETS / 'user_model.py'}:mean_abs_error_task"


class Uniform(torch.nn.Module):
    """Equal logits for every symbol at every step: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab) + self.p


def test_perplexity_of_a_uniform_model_is_the_vocabulary_and_padding_is_ignored():
    x = torch.randint(0, 7, (9, 5))
    y = torch.randint(0, 7, (9, 5))
    y[::2, -2:] = -100  # padding
    lm = get_task("language-model")
    assert lm.metric == "perplexity" and lm.direction == "min"
    assert evaluate(Uniform(7), TensorDataset(x, y), batch_size=4, task=lm) == pytest.approx(7.0)
    # a model right on the non-padded tokens and wrong on the padded ones: perplexity ~1, padding not counted
    class Oracle(torch.nn.Module):
        def forward(self, inp):
            out = torch.full((*inp.shape, 7), -30.0)
            tgt = y.clamp_min(0)[: len(inp)]
            out.scatter_(2, tgt[..., None], 30.0)
            out[y[: len(inp)] == -100] = torch.linspace(-30, 30, 7)  # confidently wrong (or anything) on padding
            return out
    assert evaluate(Oracle(), TensorDataset(x, y), batch_size=len(x), task=lm) == pytest.approx(1.0, abs=1e-6)
    # score/show: the study maximizes minus perplexity
    assert lm.score(5.0) == -5.0 and lm.show(-5.0) == 5.0 and lm.better(4.0, 5.0)


def test_language_model_task_names_a_shape_mismatch_in_one_line():
    with pytest.raises(HwpruneError, match=r"outputs \(batch, time, vocab\) and targets \(batch, time\); got outputs "
                                           r"\(4, 10\) and targets \(4,\)"):
        get_task("language-model").loss(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))


def test_user_task_and_bad_task_names():
    t = get_task(ERR_TASK)
    assert (t.metric, t.direction) == ("error_rate", "min")
    out, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    assert t.batch_fn(out, y) == (1.0, 3.0)
    with pytest.raises(HwpruneError, match="unknown task 'regression'; known: classification, language-model"):
        get_task("regression")
    proc = run_cli("inspect", "--model", MLP, "--data", MLP_DATA, "--task", "regression")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "hwprune: error: unknown task 'regression'; known: classification, language-model, or path/to/file.py:factory"]


def test_a_token_input_language_model_through_inspect_profile_search_and_export(tmp_path):
    env = {"HWPRUNE_CACHE": str(tmp_path / "cache"), "HWPRUNE_TABLES": str(tmp_path / "tables")}
    common = ["--model", LM, "--data", TOKENS, "--task", "language-model"]
    ins = run_cli("inspect", *common, "--json", env=env)
    assert ins.returncode == 0, ins.stderr
    groups = json.loads(ins.stdout)["groups"]
    # the embedding width and the hidden units; the head's 12 outputs are the vocabulary, never a group
    assert [(g["name"], g["units"]) for g in groups] == [("embed", 8), ("rnn", 16)]
    prof = run_cli("profile", "--target", "cpu", *common, "--batch-size", "4", "--grid", "0.5,1.0",
                   "--calibration", "4", "--repeats", "3", "--json", env=env)
    assert prof.returncode == 0, prof.stderr  # calibration timed on token ids (randn would not index the embedding)
    assert json.loads(prof.stdout)["calibration_measured_now"] >= 2
    run = tmp_path / "run"
    se = run_cli("search", *common, "--target", "cpu", "--budget", "5ms", "--batch-size", "4", "--trials", "3",
                 "--finetune-steps", "5", "--out", str(run), "--json", env=env)
    assert se.returncode == 0, se.stderr
    s = json.loads(se.stdout)
    assert (s["metric"], s["direction"], s["task"]) == ("perplexity", "min", "language-model")
    # the untrained dense model scores about the vocabulary size (12); every front point has a perplexity
    assert 6 < s["dense_val_perplexity"] < 30 and all(p["perplexity"] >= 1.0 for p in s["pareto"])
    best = s["best"]
    assert best["perplexity"] == min(p["perplexity"] for p in s["pareto"]
                                     if p["predicted_latency_ms"] <= best["predicted_latency_ms"] + 1e-12)
    rows = list(csv.DictReader(open(run / "trials.csv")))
    assert "perplexity" in rows[0] and "accuracy" not in rows[0]
    assert next(csv.reader(open(run / "pareto.csv")))[1] == "perplexity"
    plain = run_cli("pareto", str(run), env=env)
    assert plain.returncode == 0 and "perplexity" in plain.stdout
    ex = run_cli("export", str(run), "--trust-code", "--finetune-steps", "3", "--repeats", "3", "--json", "--out", str(tmp_path / "e"),
                 env=env)
    assert ex.returncode == 0, ex.stderr
    e = json.loads(ex.stdout)
    assert e["metric"] == "perplexity" and math.isfinite(e["test_perplexity"]) and e["test_perplexity"] >= 1.0
    assert e["test_split"].startswith("val") and e["measured_latency_ms"] > 0  # no test split: said so
    report = (tmp_path / "e" / "report.md").read_text()
    assert "## Perplexity (lower is better)" in report and "| trial | val perplexity |" in report


def test_the_embedding_width_is_a_group_and_dead_columns_prune_without_changing_outputs():
    from hwprune import Policy, build_model
    from hwprune.apply import apply_policy
    from hwprune.space import build_space

    torch.manual_seed(0)
    m = build_model("lstm-lm", (10,), 20, {"embed_size": 16, "hidden_size": 24, "num_layers": 1}).eval()
    x = torch.randint(0, 20, (3, 10))
    space = build_space(m, x)
    assert [(g.name, g.kind, g.units, g.layers) for g in space.groups] == [
        ("embed", "embedding", 16, ("embed", "rnn")), ("rnn", "hidden", 24, ("rnn", "head"))]
    dead = [1, 4, 6, 7, 9, 12, 13, 15]
    with torch.no_grad():
        m.embed.weight[:, dead] = 0
        m.rnn.weight_ih_l0[:, dead] = 0
    p = apply_policy(m, Policy({"embed": 0.5}, channel_multiple=1), x).eval()
    assert p.embed.embedding_dim == 8 and p.rnn.input_size == 8 and p.embed.num_embeddings == 20
    assert torch.allclose(p(x), m(x), atol=1e-6, rtol=0)
    assert torch.equal(p.embed.weight, m.embed.weight[:, [0, 2, 3, 5, 8, 10, 11, 14]])


def test_trained_model_cache_key_tells_tasks_apart():
    """A model trained for another task on the same model and data is another cache entry; classifiers keep the
    keys they had before tasks existed."""
    from hwprune.tasks import get_task
    from hwprune.train import cache_key

    plain = cache_key("m.py:f", "d.py:g", 0, {})
    assert cache_key("m.py:f", "d.py:g", 0, {}, "classification") == plain
    assert cache_key("m.py:f", "d.py:g", 0, {}, get_task("classification")) == plain
    lm = cache_key("m.py:f", "d.py:g", 0, {}, "language-model")
    assert lm != plain and lm == cache_key("m.py:f", "d.py:g", 0, {}, get_task("language-model"))


def test_a_token_model_given_only_an_input_shape_gets_token_ids():
    """Without data the input dtype is unknown: an Embedding model that cannot take floats gets token ids below its
    vocabulary; float models, and Embedding models that take floats (positions made inside), keep floats."""
    from torch import nn

    from hwprune.resolve import resolve

    s = resolve(f"{ASSETS / 'user_model.py'}:tiny_lm", input_shape="10")
    assert s.example.dtype == torch.int64 and s.example.shape == (2, 10) and int(s.example.max()) < 12
    assert resolve(f"{ASSETS / 'user_model.py'}:mlp", input_shape="4").example.is_floating_point()

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.fc(x + self.pos(torch.arange(x.shape[1])))

    from hwprune.resolve import _token_example

    ex = torch.randn(2, 10, 4)
    assert _token_example(Positions(), ex, 0) is ex
