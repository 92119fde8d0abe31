"""Small file helpers: atomic writes, strict JSON reads."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError

__all__ = ["write_atomic", "read_json", "cache_root", "mask_url", "file_lock"]


def _current_umask() -> int:
    """The process umask, read once at import (reading it with ``os.umask`` briefly changes it)."""
    try:  # Linux >= 4.7 reports it without changing it
        for line in open("/proc/self/status", encoding="ascii", errors="replace"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # at import, before any thread of ours creates files
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # like a plain open(): mkstemp makes 0600 files


def cache_root() -> Path:
    """hwprune's per-user folder: ``$HWPRUNE_CACHE``, else ``$XDG_CACHE_HOME/hwprune``, else ``~/.cache/hwprune``."""
    if os.environ.get("HWPRUNE_CACHE"):
        return Path(os.environ["HWPRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hwprune"


def mask_url(url: str | None) -> str | None:
    """A URL with its password replaced by ``***`` (``postgresql://user:***@host/db``); others unchanged."""
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth.split("/")[0]:
        return url
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def file_lock(path: str | os.PathLike[str]) -> Any:
    """An exclusive lock on ``path`` (a ``.lock`` file beside what it guards), for ``with``: ``filelock``'s."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


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
        os.chmod(tmp, _FILE_MODE)  # the umask was read once: changing it here races other threads' files
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
