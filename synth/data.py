"""Real data the project may use without the internet: the chest CT inside the pyradiomics
source distribution and pydicom's DICOM test files.  Everything is cached outside the repo
(``$LUNGSCREEN_CACHE`` or ``~/.cache/lungscreen``) and never committed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from pipeline.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "lung1_paths", "pydicom_test_file", "DataUnavailable"]

PYRADIOMICS = "pyradiomics==3.0.1"


class DataUnavailable(RuntimeError):
    """The data set cannot be had here (no registry, no cache)."""


def cache_dir() -> Path:
    """Folder for downloaded data: ``$LUNGSCREEN_CACHE`` or ``~/.cache/lungscreen``."""
    root = Path(os.environ.get("LUNGSCREEN_CACHE", Path.home() / ".cache" / "lungscreen"))
    root.mkdir(parents=True, exist_ok=True)
    return root


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
    tarballs = sorted(root.glob("pyradiomics-3.0.1.tar.gz"))
    if not tarballs:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "-q", "--disable-pip-version-check", PYRADIOMICS, "-d", str(root)]
        log.info("downloading %s (34 MB) into %s", PYRADIOMICS, root)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataUnavailable(f"pip download {PYRADIOMICS} failed: {exc}") from exc
        tarballs = sorted(root.glob("pyradiomics-3.0.1.tar.gz"))
        if proc.returncode != 0 or not tarballs:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataUnavailable(f"pip download {PYRADIOMICS} failed: {last}")
    image.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarballs[0]) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in (image.name, label.name) and member.isfile():
                with atomic_path(image.parent / name) as tmp:
                    tmp.write_bytes(tar.extractfile(member).read())
    if not (image.exists() and label.exists()):
        raise DataUnavailable(f"{tarballs[0]} holds no data/lung1_image.nrrd")
    return image, label


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
