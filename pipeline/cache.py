"""Per-scan stage cache: one HDF5 file per scan, one group per stage result.

Each group carries the ``key`` it was computed with (a hash of the stage's name, settings,
code version and the keys of its inputs).  A rerun loads a group whose key still matches
and recomputes the rest.  The file is never modified in place: every update writes a new
file under a temporary name (copying the groups that stay) and renames it, so a run
killed at any moment leaves either the old cache or the new one, never a corrupt file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from pipeline.io import atomic_path
from stages.volume import Volume

__all__ = ["StageCache", "stage_key", "code_version"]


def code_version(files) -> str:
    """Short hash of the given source files' contents (changes when the code does)."""
    h = hashlib.sha1()
    for f in sorted(Path(f) for f in files):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def stage_key(name: str, settings: dict, code: str, input_keys: list[str]) -> str:
    """Hash of everything a stage result depends on."""
    payload = json.dumps({"stage": name, "settings": settings, "code": code, "inputs": input_keys},
                         sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _write_value(group: h5py.Group, value: Any) -> None:
    if isinstance(value, Volume):
        group.attrs["type"] = "volume"
        group.create_dataset("array", data=value.array, compression="lzf", chunks=True)
        group.attrs["spacing_mm"] = value.spacing_mm
        group.attrs["origin_mm"] = value.origin_mm
        group.attrs["direction"] = np.asarray(value.direction)
        group.attrs["scan_id"] = value.scan_id
        group.attrs["meta"] = json.dumps(dict(value.meta), default=str)
    elif isinstance(value, pd.DataFrame):
        group.attrs["type"] = "dataframe"
        group.attrs["columns"] = json.dumps([str(c) for c in value.columns])
        for i, col in enumerate(value.columns):
            data = value[col].to_numpy()
            if data.dtype == object or pd.api.types.is_string_dtype(value[col]):
                group.create_dataset(f"c{i}", data=np.asarray(value[col].astype(str), dtype=object),
                                     dtype=h5py.string_dtype())
            else:
                group.create_dataset(f"c{i}", data=data)
    else:
        raise TypeError(f"cannot cache a {type(value).__name__}; stages return Volume or DataFrame")


def _read_value(group: h5py.Group) -> Any:
    kind = group.attrs["type"]
    if kind == "volume":
        return Volume(group["array"][()], spacing_mm=tuple(group.attrs["spacing_mm"]),
                      origin_mm=tuple(group.attrs["origin_mm"]), direction=group.attrs["direction"],
                      scan_id=str(group.attrs["scan_id"]), meta=json.loads(group.attrs["meta"]))
    columns = json.loads(group.attrs["columns"])
    data = {}
    for i, col in enumerate(columns):
        ds = group[f"c{i}"]
        data[col] = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
    return pd.DataFrame(data, columns=columns)


class StageCache:
    """The stage results of one scan, in ``path`` (``scan.h5``).

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> cache = StageCache(os.path.join(d, "scan.h5"))
    >>> cache.put("ct", "k1", Volume(np.zeros((2, 2, 2), np.int16), spacing_mm=(1, 1, 1)))
    >>> cache.get("ct", "k1").shape, cache.get("ct", "other-key")
    ((2, 2, 2), None)
    """

    def __init__(self, path):
        self.path = Path(path)

    def keys(self) -> dict[str, str]:
        """``{name: key}`` of every stored result."""
        if not self.path.exists():
            return {}
        try:
            with h5py.File(self.path, "r") as f:
                return {name: str(f[name].attrs["key"]) for name in f}
        except OSError:  # unreadable (should not happen: writes are atomic) -> start afresh
            return {}

    def get(self, name: str, key: str):
        """The stored value of ``name`` if it was computed with ``key``, else None."""
        if self.keys().get(name) != key:
            return None
        with h5py.File(self.path, "r") as f:
            return _read_value(f[name])

    def put(self, name: str, key: str, value) -> None:
        """Store ``value`` under ``name`` (replacing an older one), atomically."""
        self.put_many({name: (key, value)})

    def put_many(self, items: dict[str, tuple[str, Any]]) -> None:
        """Store several results in one rewrite of the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.keys()
        with atomic_path(self.path) as tmp:
            with h5py.File(tmp, "w") as dst:
                if old:
                    with h5py.File(self.path, "r") as src:
                        for name in src:
                            if name not in items:
                                src.copy(src[name], dst, name=name)
                for name, (key, value) in items.items():
                    group = dst.create_group(name)
                    group.attrs["key"] = key
                    _write_value(group, value)
