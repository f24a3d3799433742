"""Crash-safe writers: every output goes to a temporary name in the same folder and is
renamed into place, so a killed run never leaves a half-written file under a final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = ["atomic_path", "write_volume", "write_csv", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path, *, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps ``path``'s suffix (``.nrrd``, ``.nii.gz``...) so that
    writers choosing a format from the extension still work.  On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_volume(vol, path, *, compress: bool = True) -> Path:
    """Write a :class:`stages.volume.Volume` with SimpleITK (NRRD, MetaImage, NIfTI by suffix).

    Geometry is written in ITK's LPS convention, which 3D Slicer reads as is.  A MetaImage
    (``.mhd``) gets its ``.raw`` beside it, both renamed into place.
    """
    import SimpleITK as sitk

    path = Path(path)
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array))
    spacing, origin, direction = vol.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    if path.suffix.lower() == ".mhd":
        # the header names its data file; write both under the final names in a temp folder
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmpdir:
            tmp = Path(tmpdir) / path.name
            sitk.WriteImage(img, str(tmp), useCompression=False)
            os.replace(tmp.with_suffix(".raw"), path.with_suffix(".raw"))
            os.replace(tmp, path)
        return path
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return path


def write_csv(df, path, **kwargs) -> Path:
    """``DataFrame.to_csv`` through a temporary file (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)
    return Path(path)


def write_json(obj, path) -> Path:
    """Pretty JSON through a temporary file; numpy scalars and arrays are converted."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n")
    return Path(path)


def write_text(text: str, path) -> Path:
    """Text through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
