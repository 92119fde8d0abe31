"""Small file helpers: atomic writes, strict JSON reads."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hwprune.errors import HwpruneError

__all__ = ["write_atomic", "read_json", "cache_root", "mask_url", "is_masked", "file_lock", "staged_dir",
           "relocated", "pid_alive", "file_digest"]


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


_SECRET_PARAMS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")


def mask_url(url: str | None) -> str | None:
    """A database URL with every secret replaced by ``***``: the password (``postgresql://user:***@host/db``) and
    query parameters whose name says secret (``?password=``, ``sslpassword``, ``token``, ``*key*``), parsed by
    SQLAlchemy (what opens the URL); a URL it cannot parse keeps only its scheme. Others (a path) unchanged."""
    if not url or "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - unparseable: nothing after the scheme is shown
        return url.split("://", 1)[0] + "://***"
    secret = {k: "***" for k in parsed.query if any(w in k.lower() for w in _SECRET_PARAMS)}
    if secret:
        parsed = parsed.update_query_dict(secret)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def is_masked(url: str | None) -> bool:
    """True when :func:`mask_url` hid something of ``url`` (a URL read back from run.json needs it given again)."""
    return bool(url) and "***" in str(url)


def file_lock(path: str | os.PathLike[str]) -> Any:
    """An exclusive lock on ``path`` (a ``.lock`` file beside what it guards), for ``with``: ``filelock``'s."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def write_atomic(path: str | os.PathLike[str], data: str | bytes, exclusive: bool = False) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file; an interrupted write leaves the old file. With ``exclusive``, the
    file is created only if ``path`` does not exist (a hard link, atomic: of several processes exactly one
    creates it); False when it existed. Otherwise True.
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
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: an exclusive create, then the content
                try:
                    fdx = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
                except FileExistsError:
                    return False
                with os.fdopen(fdx, "wb") as fh:
                    fh.write(data.encode() if isinstance(data, str) else data)
            finally:
                Path(tmp).unlink(missing_ok=True)
            return True
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file; a missing, truncated or non-JSON file is a one-line error naming ``what`` and the path."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise HwpruneError(f"{what} {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HwpruneError(f"{what} {str(p)!r} is not valid JSON (truncated or edited?): {exc}") from None


@functools.lru_cache(maxsize=16)
def _digest_of(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """A file's content hash (sha1, 16 hex digits; remembered while its mtime and size stay), '' when it cannot
    be read."""
    try:
        st = os.stat(path)
        return _digest_of(os.path.abspath(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """A folder whose content is built in a hidden sibling (``.NAME.partial-HOST-PID``) and renamed to ``dest``
    only when the ``with`` block completes: a crash or kill leaves no half-written ``dest``, so the same command
    runs again. A sibling left by a process of this host that is gone is removed first; one that raises removes
    its own. ``dest`` may exist empty; a non-empty ``dest`` at the end (another process finished first) is an
    error, and this one's work is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.partial-{socket.gethostname()}-"
    for old in dest.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    work = dest.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        try:
            os.rename(work, dest)
        except OSError as exc:
            raise HwpruneError(f"{str(dest)!r} was written by another process while this one worked; "
                               f"this one's result is dropped ({exc.strerror})") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def relocated(obj: Any, old: Path, new: Path) -> Any:
    """``obj`` (JSON-like) with every string path under ``old`` moved under ``new`` (a staged folder's files
    named where they end up)."""
    if isinstance(obj, str):
        return str(new) + obj[len(str(old)):] if obj == str(old) or obj.startswith(str(old) + os.sep) else obj
    if isinstance(obj, dict):
        return {k: relocated(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(relocated(v, old, new) for v in obj)
    return obj
