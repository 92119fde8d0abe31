"""What a user installs: the wheel carries the reference tables as package data, the core install leaves the
optional features (Ray, plots, mnist5k, the ONNX runtimes, PostgreSQL) to extras."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_the_wheel_ships_the_reference_tables_and_keeps_optional_features_in_extras(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hwprune", src / "hwprune", ignore=shutil.ignore_patterns("__pycache__", "*.lock"))
    (src / "hwprune" / "latency_tables" / "stray.lock").write_text("")  # a lock left by a profile: not shipped
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("hwprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "hwprune" / "latency_tables").glob("*/*.json")}
    assert len(shipped) >= 5 and shipped <= names  # every reference table, at the path the package reads
    assert "hwprune/latency_tables/README.md" in names and not any(n.endswith(".lock") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    for optional in ("ray", "matplotlib", "mlxtend", "onnxruntime", "openvino", "psycopg"):
        assert not any(r.startswith(optional) for r in core), (optional, core)
    extras = {ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Provides-Extra:")}
    assert {"ray", "plot", "data", "onnx", "openvino", "postgres", "bench", "dev"} <= extras
    assert any(r.startswith("mnist1d") for r in core)  # the demo's data set: the core install runs the demo


def test_reference_tables_are_found_inside_the_package():
    import hwprune
    from hwprune.latency.table import reference_tables_dir, table_dirs

    ref = reference_tables_dir()
    assert ref is not None and ref.parent == Path(hwprune.__file__).parent and any(ref.glob("*/b*.json"))
    assert table_dirs()[-1] == ref


BLOCK = """
import importlib.abc, importlib.util, sys
BLOCKED = {"ray", "matplotlib", "mlxtend", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "psycopg"}
def _blocked(name):
    return name.split(".")[0] in BLOCKED
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if _blocked(name) else _find(name, package)
"""


def test_the_core_install_searches_and_exports_without_any_extra(tmp_path):
    """With every optional package made not importable (Ray, matplotlib, mlxtend, the ONNX runtimes, PostgreSQL's
    driver), a search and an export of a small model run to the end: the plot and the ONNX file are left out with
    the reason, the rest is written."""
    import json

    model, data = f"{ROOT / 'tests/assets/user_model.py'}:mlp", f"{ROOT / 'tests/assets/user_model.py'}:make_mlp_data"
    code = BLOCK + f"""
import json
from hwprune import api
run = api.search({model!r}, {data!r}, target="cpu", budget="1ms", trials=2, finetune_steps=3, batch_size=4,
                 tables={str(tmp_path / 't')!r}, out={str(tmp_path / 'run')!r})
best = api.export(run["out"], finetune_steps=5, repeats=3, trust_code=True)
assert not [m for m in sys.modules if _blocked(m)], [m for m in sys.modules if _blocked(m)]
print(json.dumps({{"artifacts": best["artifacts"], "checks": best["artifact_checks"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HWPRUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "no pareto.png (matplotlib is not installed" in proc.stderr
    assert not (tmp_path / "run" / "pareto.png").exists() and (tmp_path / "run" / "pareto.csv").exists()
    assert "onnx" not in out["artifacts"] and "hwprune[onnx]" in out["checks"]["onnx"]["error"]
    assert Path(out["artifacts"]["torch.export"]).exists() and Path(out["artifacts"]["hwprune"]).exists()
