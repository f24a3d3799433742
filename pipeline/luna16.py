"""Read the LUNA16 data set as it is distributed.

Layout (after unzipping the challenge's archives into one folder ``root``)::

    root/subset0/<seriesuid>.mhd (+ .raw) ... root/subset9/...
    root/annotations.csv                      seriesuid,coordX,coordY,coordZ,diameter_mm
    root/candidates_V2/candidates_V2.csv      seriesuid,coordX,coordY,coordZ,class
    root/candidates.csv                       (version 1 of the candidates, same columns)
    root/evaluationScript/annotations/annotations_excluded.csv
    root/evaluationScript/annotations/seriesuids.csv   (one uid a line, no header)

Coordinates are world millimetres (ITK / LPS, the ``.mhd`` header's frame), written
``x, y, z``; :func:`stages.volume.xyz_to_zyx` turns them into lungscreen's ``(z, y, x)``.
The benchmark written by :mod:`synth.benchmark_data` uses the same names, one folder
per split, so everything here reads it too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["find_luna_scans", "read_annotations", "read_excluded", "read_candidates",
           "find_candidates_file", "CANDIDATE_FILES",
           "read_seriesuids", "read_luna_scan"]

_ANN_COLS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
_CAND_COLS = ("seriesuid", "coordX", "coordY", "coordZ", "class")


def find_luna_scans(root) -> pd.DataFrame:
    """Every ``subset*/*.mhd`` under ``root``: columns ``seriesuid, path, subset``.

    Sorted by subset then uid.  An empty frame (with those columns) when there is none.

    Raises
    ------
    FileNotFoundError
        When ``root`` is not a folder.

    Examples
    --------
    >>> import tempfile
    >>> find_luna_scans(tempfile.mkdtemp()).columns.tolist()
    ['seriesuid', 'path', 'subset']
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LUNA16 root {root} is not a folder; pass the folder holding subset0..subset9")
    rows = [(p.stem, str(p), p.parent.name) for p in root.glob("subset*/*.mhd") if p.is_file()]
    df = pd.DataFrame(rows, columns=["seriesuid", "path", "subset"])
    return df.sort_values(["subset", "seriesuid"], kind="mergesort").reset_index(drop=True)


def _locate(root_or_csv, names: tuple[str, ...], what: str) -> Path:
    path = Path(root_or_csv)
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {what} in {path}: looked for {', '.join(names)}")
    raise FileNotFoundError(f"{what}: {path} is neither a CSV file nor a LUNA16 folder")


def _read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"seriesuid": str})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(df.columns)}; "
                         f"LUNA16 expects {list(columns)}")
    for col in columns[1:]:
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any():
            raise ValueError(f"{path}: column '{col}' has non-numeric values "
                             f"(first at data row {int(np.flatnonzero(values.isna().to_numpy())[0])})")
        df[col] = values
    df["seriesuid"] = df["seriesuid"].str.strip()
    return df


def read_annotations(root_or_csv) -> pd.DataFrame:
    """``annotations.csv`` (a path, or the LUNA16 root holding it) as a DataFrame.

    Columns ``seriesuid`` (str), ``coordX, coordY, coordZ, diameter_mm`` (float, mm);
    extra columns (the benchmark's ``malignancy``...) are kept.
    """
    return _read_table(_locate(root_or_csv, ("annotations.csv",), "annotations.csv"), _ANN_COLS)


def read_excluded(root_or_csv) -> pd.DataFrame:
    """``annotations_excluded.csv`` (path, or root; also looked for in ``evaluationScript/annotations``)."""
    names = ("annotations_excluded.csv", "evaluationScript/annotations/annotations_excluded.csv")
    return _read_table(_locate(root_or_csv, names, "annotations_excluded.csv"), _ANN_COLS)


#: Where a LUNA16 root keeps its candidate list, in the order looked at.
CANDIDATE_FILES = ("candidates_V2.csv", "candidates_V2/candidates_V2.csv", "candidates.csv")


def find_candidates_file(root_or_csv) -> Path:
    """The candidate list's path (:data:`CANDIDATE_FILES` under a root, or the CSV given);
    FileNotFoundError naming the places looked at."""
    return _locate(root_or_csv, CANDIDATE_FILES, "candidates_V2.csv")


def read_candidates(root_or_csv) -> pd.DataFrame:
    """Candidate list: ``candidates_V2.csv`` (root, or ``root/candidates_V2/``), else ``candidates.csv``.

    Columns ``seriesuid`` (str), ``coordX, coordY, coordZ`` (float, mm), ``class``
    (int: 1 nodule, 0 not).
    """
    df = _read_table(find_candidates_file(root_or_csv), _CAND_COLS)
    df["class"] = df["class"].astype(int)
    return df


def read_seriesuids(root_or_csv) -> list[str]:
    """Scan list of ``seriesuids.csv`` (path or root; header ``seriesuid`` optional)."""
    from pipeline.evaluate import read_seriesuids as _read

    names = ("seriesuids.csv", "evaluationScript/annotations/seriesuids.csv")
    return _read(_locate(root_or_csv, names, "seriesuids.csv"))


def read_luna_scan(path):
    """One LUNA16 ``.mhd``/``.mha`` scan as a :class:`stages.volume.Volume` of int16 HU.

    The same reader as every other scan (:func:`stages.ingest.read_scan`: header size checked
    before reading, padding to air), with ``scan_id`` the file stem, i.e. LUNA16's seriesuid.

    Raises
    ------
    stages.errors.ScanError
        When the file is not a MetaImage or cannot be read.
    """
    from stages.errors import ScanError
    from stages.ingest import read_scan

    path = Path(path)
    if path.suffix.lower() not in (".mhd", ".mha"):
        raise ScanError(path, "not a MetaImage (.mhd/.mha) file, the format SimpleITK reads LUNA16 scans in")
    return read_scan(path)
