"""The compile runtime (torch.compile) on the CPU target, end to end on a tiny model."""
import json

import pytest
import torch
from torch import nn

from conftest import run_cli
from test_search import DATA, MLP

from hwprune import HwpruneError
from hwprune.latency import get_target
from hwprune.device.targets import compile_module, fingerprint_slug


def test_every_layer_configuration_is_compiled_not_run_eagerly_past_dynamos_limit():
    """Dynamo recompiles a module class for new shapes only up to a limit (and turns shapes dynamic after the first
    recompile); each configuration must get its own compiled graph."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for n in (4, 5, 6, 7):
        m, x = nn.Linear(n, 8).eval(), torch.randn(2, n)
        run = compile_module(m, x)
        with torch.inference_mode():
            assert torch.allclose(run(x), m(x), atol=1e-6)
    assert counters["stats"]["unique_graphs"] - before == 4


def test_compile_is_a_runtime_of_every_target_and_part_of_the_table_folder():
    assert get_target("cpu", runtime="compile").runtime == "compile"
    fp = {**get_target("cpu", threads=1).fingerprint(), "runtime": "compile"}
    assert fingerprint_slug(fp).endswith("-compile")
    with pytest.raises(HwpruneError, match="known: eager, compile"):
        get_target("cpu", runtime="cudagraph")


@pytest.mark.e2e  # over 15 s here: the slow tier (make test-e2e; CI runs it)
def test_search_and_export_in_the_compile_runtime(tmp_path, monkeypatch):
    cache, tables = tmp_path / "cache", tmp_path / "tables"
    env = {"HWPRUNE_CACHE": str(cache), "HWPRUNE_TABLES": str(tables)}
    # inductor in this pytest process (earlier tests) exports its default cache folder to os.environ, which the
    # subprocesses would inherit as if the user had chosen it
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    run = tmp_path / "run"
    proc = run_cli("search", "--model", MLP, "--data", DATA, "--target", "cpu", "--runtime", "compile",
                   "--budget", "5ms", "--batch-size", "4", "--finetune-steps", "3", "--trials", "3",
                   "--out", str(run), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    [folder] = list(tables.iterdir())
    assert folder.name.endswith("-compile")  # a table of its own, next to no eager one
    table = json.loads((folder / "b4.json").read_text())
    assert table["fingerprint"]["runtime"] == "compile" and table["casts"] == "regions"
    assert len(table["entries"]) >= 12 and all(e["median_us"] > 0 for e in table["entries"].values())
    # the compiled kernels went to hwprune's cache (a later profile of the same shapes compiles nothing new)
    assert any((cache / "inductor").rglob("*.py"))
    assert s["pareto"] and json.loads((run / "run.json").read_text())["spec"]["runtime"] == "compile"

    exp = run_cli("export", str(run), "--trust-code", "--finetune-steps", "3", "--repeats", "3", "--json", "--out",
                  str(tmp_path / "e"), env=env)
    assert exp.returncode == 0, exp.stderr
    e = json.loads(exp.stdout)
    assert e["runtime"] == "compile" and e["fingerprint_matches"]
    assert "aoti" in e["artifacts"], e["artifact_checks"]
    assert e["artifact_checks"]["aoti"]["max_abs_diff"] < 1e-3 and e["artifact_checks"]["aoti"]["batch"] == 4
    m = e["measurement"]
    assert m["median_ms"] > 0 and m["aoti_median_ms"] > 0
    # the package runs in plain torch (no hwprune) on a batch of the size it was compiled for
    pkg = torch._inductor.aoti_load_package(e["artifacts"]["aoti"])
    ts = torch.jit.load(e["artifacts"]["torchscript"])
    x = torch.randn(4, 4)
    with torch.no_grad():
        assert torch.allclose(pkg(x), ts(x), atol=1e-4)
