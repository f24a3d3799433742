"""The built-in demo scan for ``make run`` with no SCAN_DIR: the real lung1 chest CT written
as a DICOM series, or a generated phantom series when lung1 cannot be had."""
from __future__ import annotations

import logging
from pathlib import Path

from synth.data import DataUnavailable, cache_dir, lung1_paths

log = logging.getLogger(__name__)

__all__ = ["demo_scan"]


def demo_scan(root=None) -> Path:
    """Folder of a demo DICOM series, made once and reused (in the data cache by default)."""
    root = Path(root) if root is not None else cache_dir() / "demo"
    done = root / ".complete"
    if done.exists():
        return Path(done.read_text().strip())
    try:
        image, _ = lung1_paths()
        folder = root / "lung1-dicom"
        from synth.dicomio import write_dicom_series
        from stages.ingest import read_scan

        write_dicom_series(read_scan(image), folder, shuffle_names=True, seed=1)
        log.warning("demo scan: real chest CT lung1 (pyradiomics 3.0.1) as DICOM in %s", folder)
    except DataUnavailable as exc:
        from synth.phantom import write_phantom_scan

        folder = root / "phantom-dicom"
        write_phantom_scan(folder, fmt="dicom", seed=0)
        log.warning("demo scan: lung1 unavailable (%s); using a generated phantom in %s", exc, folder)
    root.mkdir(parents=True, exist_ok=True)
    done.write_text(str(folder))
    return folder
