"""Every row of the bad-input table (docs/bad-input.md): the command prints exactly that message and exits with
that code."""
import os
import platform
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def _rows():
    text = (ROOT / "docs" / "bad-input.md").read_text()
    section = text.split("# Bad input: what you see", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| case") or line.startswith("|---"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        case, cmd, msg, code = cells
        rows.append(pytest.param(cmd.strip("`"), msg.strip("`"), int(code), id=case))
    return rows


ROWS = _rows()


def test_the_table_is_there():
    assert len(ROWS) >= 15


@pytest.mark.parametrize("cmd,message,code", ROWS)
def test_bad_input_row(cmd, message, code, tmp_path):
    if "--target arm" in cmd and platform.machine() in ("aarch64", "arm64"):
        pytest.skip("an ARM machine may profile --target arm")
    if "--target cuda" in cmd and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = shlex.split(cmd)
    assert argv[0] == "hwprune"
    before = sorted(p.name for p in ROOT.iterdir())
    proc = subprocess.run([sys.executable, "-m", "hwprune", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HWPRUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == code, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == message
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing written (no pruned.pt, no runs/...)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
