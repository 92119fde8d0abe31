"""Latency tables: measured layer latencies with the provenance of where they were measured.

A table is one JSON file ``<tables dir>/<fingerprint slug>/b<batch>.json``::

    {"format": "hwprune-latency-table/1", "fingerprint": {...}, "batch_size": 16,
     "command": "hwprune profile ...", "entries": {key: {"median_us", "iqr_us", "repeats", "inner"}},
     "unsupported": {key: "why the kernel rejected it"},
     "models": {model_key: {"grid": [...], "blocks": "fused", "calibration": [sample, ...]}}}

A model's ``blocks`` says what its layer entries time: ``"fused"`` (since
fused blocks: each layer with its epilogue, BatchNorm / activation / pooling,
see :mod:`hwprune.latency.epilogue`) or ``"layers"`` (the bare layer; a model
profiled before, the default when absent and calibrated). A table can hold
both kinds for different models: keys differ where a layer has an epilogue.

``casts`` says what a bf16/fp16 entry holds: ``"regions"`` (tables profiled
since precision regions: the layer alone, input already in its dtype, output
left in it; dtype changes are separate ``cast|...`` entries) or ``"islands"``
(older tables, the default when the field is absent: each entry includes
casting its input in and its output back to fp32). Profiling into an islands
table first drops its bf16/fp16 entries and calibration runs (re-measured).

``unsupported`` (optional) holds the configurations whose kernel rejects the
shape or silently fell back to another format while profiling: never priced,
never offered, never measured again.

It is written atomically and re-read strictly: a truncated, edited or
poisoned file (negative or NaN latencies) is refused with its path. Saving
merges with what is on disk under a file lock, so two processes profiling
different models into one table both keep their entries.

Where tables are looked up (:func:`table_dirs`): ``--tables DIR`` alone when
given; otherwise the user's folder (``$HWPRUNE_TABLES``, default
``<user cache>/tables``), then the reference tables shipped in the
package's ``hwprune/latency_tables/`` (read-only: new measurements go to the
user's folder).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune._io import cache_root, file_lock, read_json, write_atomic
from hwprune.errors import HwpruneError
from hwprune.device.kernels import DTYPES
from hwprune.device.targets import fingerprint_slug

__all__ = ["TABLE_FORMAT", "Entry", "LatencyTable", "table_path", "FINGERPRINT_KEYS", "user_tables_dir",
           "reference_tables_dir", "table_dirs", "fingerprint_diff", "calibration_key"]

TABLE_FORMAT = "hwprune-latency-table/1"
REGION_FORMATS = tuple(DTYPES)  # formats whose layers run as precision regions
# what must match between a table and the local device when the local device is the target: the one definition
# of "the same device" (search, predict, validate, profile and export all ask fingerprint_diff)
FINGERPRINT_KEYS = ("target", "arch", "cpu", "gpu", "flags", "threads", "torch", "engine", "compute_capability",
                    "cuda", "cudnn", "tf32", "malloc", "emulated", "cudnn_benchmark", "runtime", "runtime_version",
                    "provider", "precision", "graph_batch")


@dataclass(frozen=True)
class Entry:
    """One measured configuration: median and interquartile range in microseconds."""

    median_us: float
    iqr_us: float
    repeats: int
    inner: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"median_us": round(self.median_us, 3), "iqr_us": round(self.iqr_us, 3), "repeats": self.repeats,
                "inner": self.inner}


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _nonnegative(v: Any) -> bool:
    return _positive(v) or (v == 0 and isinstance(v, (int, float)) and not isinstance(v, bool))


def _entry(key: str, raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise HwpruneError(f"latency table {where}: entry {key!r} is not an object")
    vals = []
    for f in ("median_us", "iqr_us"):
        v = raw.get(f)
        if not (_positive(v) if f == "median_us" else _nonnegative(v)):
            raise HwpruneError(f"latency table {where}: entry {key!r} has {f} {v!r}; a measured latency is a "
                               f"finite positive number")
        vals.append(float(v))
    reps, inner = raw.get("repeats", 0), raw.get("inner", 1)
    for name, n in (("repeats", reps), ("inner", inner)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise HwpruneError(f"latency table {where}: entry {key!r} has {name} {n!r}; expected an integer >= 1")
    return Entry(vals[0], vals[1], reps, inner)


def _check_model(key: str, raw: Any, where: str) -> None:
    """A model's grid and calibration runs: ratios in (0, 1], policies that parse, finite positive times."""
    from hwprune.policy import Policy

    if not isinstance(raw, dict):
        raise HwpruneError(f"latency table {where}: model {key!r} is not an object")
    grid = raw.get("grid", [])
    if not isinstance(grid, list) or not all(_positive(r) and r <= 1 for r in grid):
        raise HwpruneError(f"latency table {where}: model {key!r} has grid {grid!r}; expected keep ratios in (0, 1]")
    if raw.get("blocks", "fused") not in ("fused", "layers"):
        raise HwpruneError(f"latency table {where}: model {key!r} has blocks {raw['blocks']!r}; expected 'fused' "
                           f"or 'layers'")
    if raw.get("smallest") is not None:
        Policy.from_dict(raw["smallest"], source=f"latency table {where}: the smallest policy of {key!r}")
    cal = raw.get("calibration", [])
    if not isinstance(cal, list):
        raise HwpruneError(f"latency table {where}: model {key!r} has calibration {cal!r}; expected a list")
    for i, sample in enumerate(cal):
        what = f"latency table {where}: calibration run {i} of {key!r}"
        if not isinstance(sample, dict):
            raise HwpruneError(f"{what} is not an object")
        Policy.from_dict(sample.get("policy"), source=what)
        m, iqr = sample.get("measured_us"), sample.get("iqr_us", 0.0)
        if not _positive(m) or not _nonnegative(iqr):
            raise HwpruneError(f"{what} has measured_us {m!r}, iqr_us {iqr!r}; a measured latency is a finite "
                               f"positive number")


@dataclass
class LatencyTable:
    """Measured entries for one device fingerprint and batch size, plus per-model calibration."""

    fingerprint: dict[str, Any]
    batch_size: int
    entries: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    command: str = ""
    path: Path | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    casts: str = "regions"

    def upgrade_casts(self) -> int:
        """Turn an ``islands`` table into a ``regions`` one: drop its bf16/fp16 entries and the calibration runs
        that use them (they are re-measured); returns how many entries were dropped."""
        if self.casts == "regions":
            return 0
        low = lambda fmts: any(f in REGION_FORMATS for f in fmts)  # noqa: E731
        gone = [k for k in self.entries if low([key_format(k)])]
        for k in gone:
            del self.entries[k]
        for k in [k for k in self.unsupported if low([key_format(k)])]:
            del self.unsupported[k]
        for m in self.models.values():
            m["calibration"] = [s for s in m.get("calibration", []) if not low(s["policy"].get("formats", {}).values())]
        self.casts = "regions"
        return len(gone)

    def fused(self, key: str | None) -> bool:
        """Whether model ``key``'s layers are priced as fused blocks (layer + epilogue,
        :mod:`hwprune.latency.epilogue`): yes for a model profiled since blocks, or not profiled yet; no for a
        model whose calibration was measured with bare-layer entries (an older table)."""
        model = self.models.get(key or "", {})
        if model.get("blocks"):
            return model["blocks"] == "fused"
        return not model.get("calibration")

    @property
    def slug(self) -> str:
        return fingerprint_slug(self.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "fingerprint": self.fingerprint, "batch_size": self.batch_size,
                "command": self.command, "entries": {k: self.entries[k].to_dict() for k in sorted(self.entries)},
                "unsupported": dict(sorted(self.unsupported.items())), "models": self.models, "casts": self.casts}

    def save(self, path: Path | None = None) -> Path:
        """Write the table atomically, merged with the file on disk (under a lock; another process may write it).

        Entries and calibration runs on disk that this table lacks are added to it first; where both hold a
        configuration, this table's measurement is kept.
        """
        p = Path(path or self.path or "")
        if not str(p):
            raise ValueError("no path to save the table to")
        with file_lock(p.parent / f".{p.name}.lock"):
            if p.exists():
                self.merge(LatencyTable.load(p))
            write_atomic(p, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        self.path = p
        return p

    def merge(self, other: "LatencyTable") -> None:
        """Add ``other``'s entries and calibration runs that this table lacks (same device and batch only)."""
        if other.batch_size != self.batch_size or fingerprint_diff(other.fingerprint, self.fingerprint):
            raise HwpruneError(f"table {str(other.path)!r} holds another device or batch than the one being saved "
                               f"(batch {other.batch_size} vs {self.batch_size}); move it away first")
        if other.casts != self.casts:  # one side is an older islands table: its bf16/fp16 timings do not fit
            import copy

            other = copy.deepcopy(other)
            other.upgrade_casts()
            self.upgrade_casts()
        for k, e in other.entries.items():
            self.entries.setdefault(k, e)
        for k, why in other.unsupported.items():
            self.unsupported.setdefault(k, why)
        for key, theirs in other.models.items():
            mine = self.models.setdefault(key, {})
            for field_name, value in theirs.items():
                if field_name != "calibration":
                    mine.setdefault(field_name, value)
            runs = mine.setdefault("calibration", [])
            have = {calibration_key(s["policy"]) for s in runs}
            runs.extend(s for s in theirs.get("calibration", []) if calibration_key(s["policy"]) not in have)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        p = Path(path)
        where = repr(str(p))
        data = read_json(p, "latency table")
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise HwpruneError(f"latency table {where} is not a {TABLE_FORMAT} file")
        fp, batch = data.get("fingerprint"), data.get("batch_size")
        if not isinstance(fp, dict) or "target" not in fp:
            raise HwpruneError(f"latency table {where} has no device fingerprint")
        if not isinstance(batch, int) or batch < 1:
            raise HwpruneError(f"latency table {where} has batch_size {batch!r}")
        raw, models = data.get("entries", {}), data.get("models", {})
        if not isinstance(raw, dict) or not isinstance(models, dict):
            raise HwpruneError(f"latency table {where}: 'entries' and 'models' must be objects")
        entries = {str(k): _entry(k, v, where) for k, v in raw.items()}
        for k, v in models.items():
            _check_model(k, v, where)
        unsup = data.get("unsupported", {})
        if not isinstance(unsup, dict) or not all(isinstance(v, str) for v in unsup.values()):
            raise HwpruneError(f"latency table {where}: 'unsupported' must map configurations to reasons")
        casts = data.get("casts", "islands")
        if casts not in ("regions", "islands"):
            raise HwpruneError(f"latency table {where} has casts {casts!r}; expected 'regions' or 'islands'")
        return cls(fp, batch, entries, models, str(data.get("command", "")), p, {str(k): v for k, v in unsup.items()},
                   casts)


def key_format(key: str) -> str:
    """The format of an entry's key (its last field, before a fused block's ``+epilogue``)."""
    parts = key.split("|")
    return parts[-2] if len(parts) > 1 and parts[-1].startswith("+") else parts[-1]


def calibration_key(policy: dict[str, Any]) -> str:
    """What identifies a calibration run's policy (its model label aside)."""
    return json.dumps({k: policy.get(k) for k in ("keep", "formats", "channel_multiple")}, sort_keys=True)


def table_path(tables_dir: str | Path, fingerprint: dict[str, Any], batch: int) -> Path:
    return Path(tables_dir) / fingerprint_slug(fingerprint) / f"b{batch}.json"


def user_tables_dir() -> Path:
    """Where this machine's own tables go: ``$HWPRUNE_TABLES``, else ``<user cache>/tables``."""
    return Path(os.environ["HWPRUNE_TABLES"]) if os.environ.get("HWPRUNE_TABLES") else cache_root() / "tables"


def reference_tables_dir() -> Path | None:
    """The measured tables shipped with hwprune (package data ``hwprune/latency_tables/``), if installed."""
    from importlib.resources import files

    d = Path(str(files("hwprune").joinpath("latency_tables")))
    return d if d.is_dir() else None


def table_dirs(tables: str | Path | None = None) -> list[Path]:
    """Folders to look for tables in, in order: ``tables`` alone if given, else the user's, then the reference."""
    if tables:
        return [Path(tables)]
    ref = reference_tables_dir()
    return [user_tables_dir()] + ([ref] if ref is not None else [])


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fingerprint keys that differ between two devices, as ``key: table X vs here Y``."""
    return [f"{k}: table {a.get(k)!r} vs here {b.get(k)!r}" for k in FINGERPRINT_KEYS if a.get(k) != b.get(k)]
