from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


# generated data sets (MNIST-1D: ~4 s to generate) are kept once for the whole run, in every process a test starts;
# each test still gets its own model cache (below)
if not os.environ.get("HWPRUNE_DATA_CACHE"):  # set here (pytest's own process): the workers inherit it
    os.environ["HWPRUNE_DATA_CACHE"] = tempfile.mkdtemp(prefix="hwprune-test-data-")
    atexit.register(shutil.rmtree, os.environ["HWPRUNE_DATA_CACHE"], ignore_errors=True)

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores shared out, not each worker taking all
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own model cache; nothing leaks into ~/.cache."""
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m hwprune ARGS`` in a subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "hwprune", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=600)
