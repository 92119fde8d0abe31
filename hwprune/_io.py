"""Small file helpers: atomic writes, strict JSON reads."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError

__all__ = ["write_atomic", "read_json"]


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file; an interrupted write leaves the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like a plain open(): mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file; a missing, truncated or non-JSON file is a one-line error naming ``what`` and the path."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise HwpruneError(f"{what} {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HwpruneError(f"{what} {str(p)!r} is not valid JSON (truncated or edited?): {exc}") from None
