"""The Python API (hwprune.api): the README's example runs as written (on a tiny model, with a short search), and
options are checked as the command line checks them."""
import re

import pytest

from conftest import ASSETS, ROOT
from hwprune import HwpruneError, api

MLP = f"{ASSETS / 'user_model.py'}:mlp"
DATA = f"{ASSETS / 'user_model.py'}:make_mlp_data"


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python block, with the user's files swapped for a tiny MLP and its data and the search and
    export made short, the budget 1 ms (a tiny MLP at batch 4, ~0.02 ms, is launch-bound: pruning cannot halve it): a search whose front is within the budget, an export measured on this machine whose
    artifacts exist, and nothing but the example's own print on stdout."""
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    code = (block.replace('"my_model.py:build"', repr(MLP)).replace('"my_data.py:load"', repr(DATA))
            .replace("trials=30", f"trials=3, finetune_steps=3, batch_size=4, tables={str(tmp_path / 't')!r}")
            .replace('budget="50%"', 'budget="1ms"')  # a 2-layer MLP at batch 4 is launch-bound: no share of it
            .replace('out="runs/mine"', f"out={str(tmp_path / 'run')!r}")
            .replace('trial="best", trust_code=True)', 'trial="best", trust_code=True, finetune_steps=10, repeats=5)'))
    assert code.count(repr(MLP)) == 1 and "finetune_steps=10" in code and "trials=3," in code and "1ms" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    run, best = scope["run"], scope["best"]
    assert run["trials"] == 3 and run["pareto"]
    assert all(p["predicted_latency_ms"] <= run["budget_ms"] for p in run["pareto"])
    assert best["measured_latency_ms"] > 0 and (tmp_path / "run" / "best_policy.json").exists()
    for path in best["artifacts"].values():
        assert (tmp_path / "run").as_posix() in str(path) and __import__("os").path.exists(path), path
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(str(best["measured_latency_ms"]))


def test_options_are_checked_as_the_command_line_checks_them(tmp_path):
    with pytest.raises(HwpruneError, match="unknown option.*trails.*known: .*trials"):
        api.search(MLP, DATA, trails=3)
    with pytest.raises(HwpruneError, match=r"target='gpu'; accepted: cpu, cuda, arm"):
        api.search(MLP, DATA, target="gpu")
    with pytest.raises(HwpruneError, match="batch_size='0'.*positive integer"):
        api.profile(MLP, batch_size="0")
    with pytest.raises(HwpruneError, match="no run"):
        api.export(tmp_path / "nothing-here")
    from hwprune.cli._common import parse_exclude

    assert parse_exclude(["fc", "conv1"]) == parse_exclude("fc,conv1") == ["fc", "conv1"]  # a list from Python


def test_the_building_blocks_example_runs(capsys):
    """docs/models.md's example: ResNet-20 with half of every group keeps about a quarter of its FLOPs (a conv
    between two halved groups keeps 1/4, the stem and the head more)."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "models.md").read_text(), re.S).group(1)
    exec(compile(block, "docs/models.md", "exec"), {})
    before, after = (int(v) for v in capsys.readouterr().out.split("->"))
    assert 0.2 < after / before < 0.4, (before, after)
