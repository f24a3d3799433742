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

__all__ = ["atomic_path", "write_volume", "nifti_affine", "write_csv", "write_json", "write_text",
           "write_torch"]


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
    """Write a :class:`stages.volume.Volume`; the format follows the suffix.

    NRRD (``.nrrd``), MetaImage (``.mhd``, ``.mha``) and the rest go through SimpleITK, their
    geometry in ITK's LPS convention, which 3D Slicer reads as is; a MetaImage ``.mhd`` gets
    its ``.raw`` beside it, both renamed into place.  NIfTI (``.nii``, ``.nii.gz``) goes
    through nibabel (:func:`nifti_affine`: qform and sform both set, code 1 "scanner", RAS).
    ``compress`` gzips NRRD and MetaImage data; a NIfTI is gzipped when its name ends in
    ``.gz``.
    """
    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return _write_nifti(vol, path)
    import SimpleITK as sitk

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


#: NIfTI's code for coordinates aligned with the scanner (``NIFTI_XFORM_SCANNER_ANAT``).
NIFTI_SCANNER = 1
#: LPS (ITK, DICOM, :mod:`stages.volume`) to RAS (NIfTI): x and y change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_affine(vol) -> np.ndarray:
    """The 4x4 NIfTI affine of a Volume: voxel ``(i, j, k) = (x, y, z)`` index to RAS mm.

    The NIfTI array is the Volume's transposed (``array.transpose(2, 1, 0)``, so ``i`` runs
    along x); the LPS affine ``origin + direction @ (spacing * index)`` in ``(x, y, z)`` order
    is then turned to RAS by negating its x and y rows.

    Examples
    --------
    >>> from stages.volume import Volume
    >>> vol = Volume(np.zeros((2, 3, 4), np.int16), spacing_mm=(2.5, 0.5, 0.7),
    ...              origin_mm=(-100.0, 20.0, -30.0))
    >>> nifti_affine(vol).round(3).tolist()
    [[-0.7, 0.0, 0.0, 30.0], [0.0, -0.5, 0.0, -20.0], [0.0, 0.0, 2.5, -100.0], [0.0, 0.0, 0.0, 1.0]]
    """
    lps = np.eye(4)
    lps[:3, :3] = vol.direction[::-1, ::-1] * np.asarray(vol.spacing_mm[::-1])[None, :]
    lps[:3, 3] = vol.origin_mm[::-1]
    return LPS_TO_RAS @ lps


def _write_nifti(vol, path: Path) -> Path:
    """NIfTI-1 through nibabel: qform and sform both :func:`nifti_affine` with code 1
    (scanner), units mm, so nibabel, ITK (ITK-SNAP, SimpleITK, 3D Slicer) and FSL agree."""
    import nibabel as nib

    affine = nifti_affine(vol)
    img = nib.Nifti1Image(vol.array.transpose(2, 1, 0), affine)
    img.header.set_qform(affine, code=NIFTI_SCANNER)
    img.header.set_sform(affine, code=NIFTI_SCANNER)
    img.header.set_xyzt_units(xyz="mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
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


def write_torch(obj, path) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file.  Saved to a buffer first:
    ``torch.save`` to a file names the archive inside after the (random) temporary name."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)
