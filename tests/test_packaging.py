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
