"""Where benchmark scripts write: bench/results/<name>_<fingerprint>.{md,json}."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_fingerprint() -> dict[str, Any]:
    from hwprune.device.targets import get_target

    return get_target("cpu", threads=1).fingerprint()


def write_results(name: str, fp: dict[str, Any], payload: dict[str, Any], lines: list[str],
                  folder: Path | None = None) -> Path:
    """The JSON (fingerprint + payload) and the markdown report side by side (in ``folder``, default
    bench/results); returns the .md path."""
    from hwprune.device.targets import fingerprint_slug

    out_md = (folder or ROOT / "bench" / "results") / f"{name}_{fingerprint_slug(fp)}.md"
    out_md.with_name(out_md.stem + ".json").write_text(json.dumps({"fingerprint": fp, **payload}, indent=1) + "\n")
    out_md.write_text("\n".join(lines) + "\n")
    return out_md
