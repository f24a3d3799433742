"""LUNA16 FROC evaluation: the rules of the challenge's ``noduleCADEvaluationLUNA16.py``.

What the official script does, and so what :func:`froc` does
-------------------------------------------------------------
* **Mark cap.**  When a scan has more than ``max_marks_per_scan`` (100) marks, the
  script keeps the marks whose probability is *strictly greater* than the
  ``(cap + 1)``-th highest one.  With distinct scores that is the top 100; marks
  tied at the cut are all dropped.
* **Hit.**  A mark hits a finding when its squared distance to the finding's centre
  is *strictly less* than ``(diameter_mm / 2) ** 2`` (``dist < radiusSquared``).
  A finding with a negative diameter (LUNA16's ``-1`` rows in
  ``annotations_excluded.csv``) gets a 10 mm diameter.
* **Excluded findings.**  Marks hitting a finding of ``annotations_excluded.csv``
  (and no nodule) are removed: neither true nor false positives.  A mark that hits a
  nodule counts for the nodule even when it also hits an excluded finding.
* **Several hits on one nodule** count once, with the highest probability of the marks
  hitting it.  A mark hitting two nodules counts for both.
* **Missed nodules** count in the denominator of the sensitivity only.
* **Curve.**  ``sklearn.metrics.roc_curve`` on (nodule hits, false positives); the FP
  axis is divided by the number of scans, the TP axis by the number of nodules.
* **Operating points.**  The script interpolates the curve on its grid
  ``fps_itp = np.linspace(0.125, 8, num=10001)`` (``sens_itp = np.interp(fps_itp, fps,
  sens)``, the curve it plots); the sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/scan is
  ``sens_itp`` at the grid point nearest each rate (grid step 7.875e-4 FP/scan: 1/4 is read
  at 0.2502125, 1/2 at 0.49985, 1 at 0.9999125, 2 at 2.0000375, 4 at 4.0002875; 1/8 and 8
  exactly).  The CPM (competition performance metric) is their mean.  This differs from
  ``np.interp`` at the exact rate where a step of the curve sits on a rate: with 40 scans
  the 20th false positive is at exactly 1/2 FP/scan, and the grid point 0.49985 reads the
  curve just before that false positive's step, not at its top.
* **Bootstrap.**  Scans are drawn with replacement (``n_bootstrap`` = 1000 times),
  the curve is recomputed on each sample, and the 95 % interval is the official
  ``compute_mean_ci``'s: sorted values at ``floor(0.025 n)`` and ``floor(0.975 n)``.
  The official script bootstraps the curve only; here the CPM of each bootstrap curve
  gives ``cpm_ci95`` by the same rule.

Cross-validation (:func:`pool_folds`, ``lungscreen evaluate --folds OUT``): the published
LUNA16 numbers pool the ten test folds (fold K tests on ``subsetK``) into one FROC over all
scans.  :func:`read_folds` reads ``OUT/fold_K/fold.json`` and ``OUT/fold_K/predictions.csv``
(LUNA16's submission columns), refusing missing or unfinished folds, a scan tested or
predicted in two folds, and marks outside a fold's test scans; the pooled FROC is
:func:`froc` of all marks over all scans, each fold's the same over its own scans, and the
folds' marks together are LUNA16's submission file (:func:`write_pooled`).

Patient predictions (Kaggle DSB 2017: one ``id,cancer`` row per patient) are scored by
:func:`patient_scores`: log loss (Kaggle's score, probabilities clipped to ``[1e-15, 1 -
1e-15]``) and ROC AUC, each with a seeded bootstrap 95 % interval over patients (the same
``floor(0.025 n)`` / ``floor(0.975 n)`` rule); ``lungscreen evaluate --patients truth.csv
--predictions OUT/patients.csv``.

The ROC points are computed here with numpy exactly as scikit-learn's ``roc_curve``
(default ``drop_intermediate=True``) computes them, so scikit-learn is not needed at
run time; a test compares the two.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["patient_scores", "FrocResult", "froc", "write_froc", "read_seriesuids", "add_arguments",
           "run_from_args", "main", "operating_fps", "read_folds", "pool_folds",
           "PooledResult", "write_pooled", "format_pooled", "luna16_files", "N_FOLDS", "SUBMISSION_COLUMNS",
           "FP_RATES", "MAX_MARKS_PER_SCAN", "ANNOTATION_COLUMNS", "CANDIDATE_COLUMNS"]

#: The seven operating points of the LUNA16 CPM, in false positives per scan.
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Most marks per scan the official script reads (the most probable ones).
MAX_MARKS_PER_SCAN = 100
#: Columns an annotation table (annotations.csv, annotations_excluded.csv) must have.
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: Columns a candidate (CAD mark) table must have; ``score`` may stand for ``probability``.
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
#: Diameter the official script gives an excluded finding stored with a negative diameter.
UNKNOWN_DIAMETER_MM = 10.0
#: x-axis range of the official FROC plot and bootstrap band, FP/scan.
FROC_MIN_FPS, FROC_MAX_FPS = 0.125, 8.0
#: Number of points of the official bootstrap band grid (``np.linspace(0.125, 8, 10000)``).
BAND_POINTS = 10000
#: Number of points of the official curve grid (``fps_itp = np.linspace(0.125, 8, num=10001)``),
#: on which the operating points are read (the grid point nearest each rate).
CURVE_POINTS = 10001


@dataclass(frozen=True, eq=False)
class FrocResult:
    """FROC curve and summary of one evaluation.

    Attributes
    ----------
    fps_per_scan, sensitivity, thresholds : (K,) ndarray
        The ROC points of the official script: average false positives per scan,
        fraction of nodules detected, and the probability threshold (``inf`` first).
    sensitivity_at : dict of float -> float
        Sensitivity at each requested FP/scan rate, read as the official script reads it:
        the curve interpolated on ``linspace(0.125, 8, 10001)``, at the grid point nearest
        the rate (:func:`operating_fps`).
    cpm : float
        Mean of ``sensitivity_at`` (the LUNA16 competition performance metric).
    cpm_ci95 : (float, float)
        Bootstrap 95 % interval of the CPM (``nan`` when ``n_bootstrap`` is 0).
    sensitivity_at_ci95 : dict of float -> (float, float)
        Bootstrap 95 % interval of each ``sensitivity_at`` value.
    n_nodules, n_scans, n_candidates : int
        Nodules counted, scans counted, marks kept after the per-scan cap.
    candidate_recall : float
        Fraction of nodules hit by any mark, whatever its score and before the cap.
    n_true_positives, n_false_positives, n_ignored : int
        Nodules detected, marks counted as false positives, marks on excluded findings.
    band_fps, band_mean, band_lo, band_hi : ndarray
        Official bootstrap band: mean and 95 % limits on ``linspace(0.125, 8, 10000)``
        (empty when ``n_bootstrap`` is 0).
    """

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sensitivity_at: dict
    cpm: float
    cpm_ci95: tuple
    sensitivity_at_ci95: dict
    n_nodules: int
    n_scans: int
    n_candidates: int
    candidate_recall: float
    n_true_positives: int = 0
    n_false_positives: int = 0
    n_ignored: int = 0
    n_bootstrap: int = 0
    band_fps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_lo: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_hi: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def summary(self) -> dict:
        """JSON-ready summary (no curve arrays)."""
        return {
            "cpm": self.cpm, "cpm_ci95": list(self.cpm_ci95),
            "sensitivity_at": {f"{k:g}": v for k, v in self.sensitivity_at.items()},
            "sensitivity_at_ci95": {f"{k:g}": list(v) for k, v in self.sensitivity_at_ci95.items()},
            "n_nodules": self.n_nodules, "n_scans": self.n_scans,
            "n_candidates": self.n_candidates, "candidate_recall": self.candidate_recall,
            "n_true_positives": self.n_true_positives, "n_false_positives": self.n_false_positives,
            "n_ignored_on_excluded": self.n_ignored, "n_bootstrap": self.n_bootstrap,
        }


# ----------------------------------------------------------------------------- inputs
def _check_table(df, required, what: str, *, alias: Mapping[str, str] | None = None) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}; "
                        f"read the CSV with pandas.read_csv first")
    df = df.copy()
    for want, alt in (alias or {}).items():
        if want not in df.columns and alt in df.columns:
            df = df.rename(columns={alt: want})
    missing = [c for c in required if c not in df.columns]
    if missing:
        extra = "".join(f" (or '{alt}' for '{want}')" for want, alt in (alias or {}).items()
                        if want in missing)
        raise ValueError(f"{what} is missing column(s) {missing}{extra}; it has {list(df.columns)}. "
                         f"LUNA16 tables need {list(required)}")
    df["seriesuid"] = df["seriesuid"].astype(str)
    for col in required[1:]:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            raise ValueError(f"{what} column '{col}' has {int(bad.sum())} non-numeric or empty "
                             f"value(s), first at row {int(np.flatnonzero(bad.to_numpy())[0])}")
        df[col] = values.astype(np.float64)
    return df


def read_seriesuids(path) -> list[str]:
    """Scan list of a LUNA16 ``seriesuids.csv``: first column, header ``seriesuid`` optional.

    Examples
    --------
    >>> import io
    >>> read_seriesuids(io.StringIO("1.2.3\\n1.2.4\\n"))
    ['1.2.3', '1.2.4']
    """
    df = pd.read_csv(path, header=None, dtype=str)
    uids = [u.strip() for u in df.iloc[:, 0].dropna().tolist()]
    if uids and uids[0].lower() == "seriesuid":
        uids = uids[1:]
    return uids


def _cap_marks(probs: np.ndarray, cap: int) -> np.ndarray:
    """Boolean keep-mask of the official cap: probability > the (cap+1)-th highest one."""
    keep = np.ones(probs.size, dtype=bool)
    if cap > 0 and probs.size > cap:
        threshold = np.sort(probs)[::-1][cap]
        keep = probs > threshold
        # the script also stops after `cap` marks (in file order); only reachable with ties
        keep[np.flatnonzero(keep)[cap:]] = False
    return keep


# ----------------------------------------------------------------------------- ROC
def _roc_counts(y: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None, *,
                presorted: bool = False):
    """``(fps, tps, thresholds)`` counts as scikit-learn's ``roc_curve`` computes them.

    Points at each distinct score (descending), collinear points dropped
    (``drop_intermediate=True``), and ``(0, 0, inf)`` prepended.  ``presorted``: the
    entries already come by descending score.
    """
    if not presorted:
        order = np.argsort(score, kind="mergesort")[::-1]
        score, y = score[order], y[order]
        weight = None if weight is None else weight[order]
    w = np.ones_like(score) if weight is None else weight
    distinct = np.flatnonzero(np.diff(score))
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y * w)[idx]
    fps = np.cumsum((1.0 - y) * w)[idx] if weight is not None else 1.0 + idx - tps
    thr = score[idx]
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    return np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]


def operating_fps(fp_rates: Iterable[float] = FP_RATES) -> np.ndarray:
    """FP/scan values at which the official script reads each operating point.

    The nearest point to each rate of the official curve grid ``np.linspace(0.125, 8,
    num=10001)`` (step 7.875e-4 FP/scan).

    Parameters
    ----------
    fp_rates : iterable of float
        Operating points, false positives per scan, each within [0.125, 8] (the grid).

    Returns
    -------
    (R,) ndarray of float64
        The grid values, FP/scan, in the order of ``fp_rates``.

    Raises
    ------
    ValueError
        A rate outside the grid [0.125, 8], or no rate.

    Examples
    --------
    >>> operating_fps([0.125, 0.5, 1.0, 8.0]).round(7).tolist()
    [0.125, 0.49985, 0.9999125, 8.0]
    """
    rates = np.asarray([float(r) for r in fp_rates])
    if rates.size == 0 or not np.all((rates >= FROC_MIN_FPS) & (rates <= FROC_MAX_FPS)):
        raise ValueError(f"fp_rates must be FP/scan values within the official grid "
                         f"[{FROC_MIN_FPS:g}, {FROC_MAX_FPS:g}], got {rates.tolist()}")
    grid = np.linspace(FROC_MIN_FPS, FROC_MAX_FPS, num=CURVE_POINTS)
    return grid[np.abs(grid[None, :] - rates[:, None]).argmin(axis=1)]


def _sensitivity_at(fps: np.ndarray, sens: np.ndarray, at_fps: np.ndarray) -> np.ndarray:
    """Sensitivity of the curve ``(fps, sens)`` at :func:`operating_fps`'s grid points.

    ``np.interp`` at those points equals ``np.interp`` on the whole 10001-point grid, read
    at their indices: the official reading, for the CPM and every bootstrap sample.
    """
    return np.interp(at_fps, fps, sens)


def _froc_curve(y, score, n_scans, n_lesions, weight=None, *, presorted=False):
    if y.size == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    fps, tps, thr = _roc_counts(y, score, weight, presorted=presorted)
    return fps / n_scans, tps / n_lesions, thr


# ----------------------------------------------------------------------------- main API
def froc(annotations: pd.DataFrame, candidates: pd.DataFrame, *, excluded: pd.DataFrame | None = None,
         seriesuids: Iterable[str] | None = None, max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
         fp_rates: Iterable[float] = FP_RATES, n_bootstrap: int = 1000, seed: int = 0) -> FrocResult:
    """FROC analysis of CAD marks against LUNA16 annotations, as the official script.

    Parameters
    ----------
    annotations : DataFrame
        Nodules: ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world mm, LPS).
    candidates : DataFrame
        CAD marks: ``seriesuid, coordX, coordY, coordZ, probability`` (``score`` is
        accepted when ``probability`` is absent).
    excluded : DataFrame, optional
        Findings whose marks are ignored (``annotations_excluded.csv``), same columns as
        ``annotations``; a negative ``diameter_mm`` means 10 mm.
    seriesuids : iterable of str, optional
        Scans evaluated (LUNA16's ``seriesuids.csv``); scans without findings still add
        false positives, marks on other scans are ignored.  Default: the scans of
        ``annotations``.
    max_marks_per_scan : int
        Official cap on marks per scan (see the module notes); ``<= 0`` for none.
    fp_rates : iterable of float
        Operating points in false positives per scan, within [0.125, 8]; each is read at
        the nearest point of the official grid (:func:`operating_fps`); the CPM is the
        mean sensitivity.
    n_bootstrap : int
        Bootstrap samples (scans drawn with replacement); 0 skips the intervals.
    seed : int
        Seed of the bootstrap's random generator.

    Returns
    -------
    FrocResult

    Raises
    ------
    ValueError
        Missing columns, non-numeric values, no nodule on the evaluated scans, or bad
        settings.
    TypeError
        When a table is not a DataFrame.

    Examples
    --------
    >>> ann = pd.DataFrame({"seriesuid": ["a"], "coordX": [0.0], "coordY": [0.0],
    ...                     "coordZ": [0.0], "diameter_mm": [10.0]})
    >>> cand = pd.DataFrame({"seriesuid": ["a", "a"], "coordX": [1.0, 50.0],
    ...                      "coordY": [0.0, 0.0], "coordZ": [0.0, 0.0],
    ...                      "probability": [0.9, 0.1]})
    >>> res = froc(ann, cand, n_bootstrap=0)
    >>> round(res.cpm, 3), res.n_false_positives
    (1.0, 1)
    """
    annotations = _check_table(annotations, ANNOTATION_COLUMNS, "annotations")
    candidates = _check_table(candidates, CANDIDATE_COLUMNS, "candidates",
                              alias={"probability": "score"})
    if excluded is not None:
        excluded = _check_table(excluded, ANNOTATION_COLUMNS, "excluded")
    fp_rates = tuple(float(r) for r in fp_rates)
    at_fps = operating_fps(fp_rates)
    if int(n_bootstrap) < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    n_bootstrap = int(n_bootstrap)
    if seriesuids is None:
        seriesuids = list(dict.fromkeys(annotations["seriesuid"]))
    elif isinstance(seriesuids, (str, bytes)):
        raise TypeError("seriesuids must be a list of series UIDs, not one string; "
                        "use read_seriesuids(path) for a seriesuids.csv")
    else:
        seriesuids = list(dict.fromkeys(str(s) for s in seriesuids))
    if not seriesuids:
        raise ValueError("no scans to evaluate: seriesuids is empty")

    xyz = ["coordX", "coordY", "coordZ"]
    ann_by = {k: g for k, g in annotations.groupby("seriesuid", sort=False)}
    exc_by = {k: g for k, g in excluded.groupby("seriesuid", sort=False)} if excluded is not None else {}
    cand_by = {k: g for k, g in candidates.groupby("seriesuid", sort=False)}

    labels, scores, scan_of = [], [], []       # FROC entries (detected nodules and FPs)
    lesions_per_scan = np.zeros(len(seriesuids))
    n_cands = n_tp = n_fp = n_ignored = n_recalled = 0
    for s, uid in enumerate(seriesuids):
        cand = cand_by.get(uid)
        c_xyz = cand[xyz].to_numpy() if cand is not None else np.zeros((0, 3))
        c_p = cand["probability"].to_numpy() if cand is not None else np.zeros(0)
        ann = ann_by.get(uid)
        a_xyz = ann[xyz].to_numpy() if ann is not None else np.zeros((0, 3))
        a_r2 = (ann["diameter_mm"].to_numpy() / 2.0) ** 2 if ann is not None else np.zeros(0)
        lesions_per_scan[s] = len(a_xyz)
        if len(a_xyz) and len(c_xyz):  # candidate recall: any mark, any score, before the cap
            d2_all = ((a_xyz[:, None, :] - c_xyz[None, :, :]) ** 2).sum(-1)
            n_recalled += int((d2_all < a_r2[:, None]).any(axis=1).sum())
        keep = _cap_marks(c_p, int(max_marks_per_scan))
        c_xyz, c_p = c_xyz[keep], c_p[keep]
        n_cands += len(c_p)
        is_fp = np.ones(len(c_p), dtype=bool)
        if len(a_xyz):
            d2 = ((a_xyz[:, None, :] - c_xyz[None, :, :]) ** 2).sum(-1)
            hits = d2 < a_r2[:, None]
            is_fp &= ~hits.any(axis=0)
            found = hits.any(axis=1)
            n_tp += int(found.sum())
            best = np.where(hits, c_p[None, :], -np.inf).max(axis=1, initial=-np.inf)
            labels += [1.0] * int(found.sum())
            scores += best[found].tolist()
            scan_of += [s] * int(found.sum())
        exc = exc_by.get(uid)
        if exc is not None and len(exc) and len(c_p):
            e_d = exc["diameter_mm"].to_numpy()
            e_r2 = (np.where(e_d < 0.0, UNKNOWN_DIAMETER_MM, e_d) / 2.0) ** 2
            d2 = ((exc[xyz].to_numpy()[:, None, :] - c_xyz[None, :, :]) ** 2).sum(-1)
            on_excluded = (d2 < e_r2[:, None]).any(axis=0) & is_fp
            n_ignored += int(on_excluded.sum())
            is_fp &= ~on_excluded
        n_fp += int(is_fp.sum())
        labels += [0.0] * int(is_fp.sum())
        scores += c_p[is_fp].tolist()
        scan_of += [s] * int(is_fp.sum())

    n_nodules = int(lesions_per_scan.sum())
    if n_nodules == 0:
        raise ValueError(f"no nodule of annotations lies on the {len(seriesuids)} evaluated scan(s); "
                         f"the FROC sensitivity is undefined. Check that the seriesuid values match")
    n_scans = len(seriesuids)
    y, p, scan_of = np.asarray(labels), np.asarray(scores, dtype=np.float64), np.asarray(scan_of, int)
    fps, sens, thr = _froc_curve(y, p, n_scans, n_nodules)
    sens_at = {r: float(v) for r, v in zip(fp_rates, _sensitivity_at(fps, sens, at_fps))}
    cpm = float(np.mean(list(sens_at.values())))

    nan2 = (float("nan"), float("nan"))
    cpm_ci, sens_ci = nan2, {r: nan2 for r in fp_rates}
    band = [np.zeros(0)] * 4
    if n_bootstrap:
        order = np.argsort(p, kind="mergesort")[::-1]  # sort once; each sample keeps the order
        y, p, scan_of = y[order], p[order], scan_of[order]
        rng = np.random.default_rng(seed)
        grid = np.linspace(FROC_MIN_FPS, FROC_MAX_FPS, BAND_POINTS)
        at = np.zeros((n_bootstrap, len(fp_rates)))
        curves = np.zeros((n_bootstrap, BAND_POINTS), dtype=np.float32)
        for b in range(n_bootstrap):
            mult = np.bincount(rng.integers(0, n_scans, n_scans), minlength=n_scans).astype(float)
            w = mult[scan_of]
            sel = w > 0
            n_les = float(mult @ lesions_per_scan)
            if n_les == 0:  # a sample with no nodule: sensitivity 0 everywhere
                continue
            bf, bs, _ = _froc_curve(y[sel], p[sel], n_scans, n_les, w[sel], presorted=True)
            at[b] = _sensitivity_at(bf, bs, at_fps)
            curves[b] = np.interp(grid, bf, bs)
        lo_i = int(math.floor(0.025 * n_bootstrap))
        hi_i = min(int(math.floor(0.975 * n_bootstrap)), n_bootstrap - 1)
        cpms = np.sort(at.mean(axis=1))
        cpm_ci = (float(cpms[lo_i]), float(cpms[hi_i]))
        at_sorted = np.sort(at, axis=0)
        sens_ci = {r: (float(at_sorted[lo_i, j]), float(at_sorted[hi_i, j])) for j, r in enumerate(fp_rates)}
        curves.sort(axis=0)
        band = [grid, curves.mean(axis=0), curves[lo_i], curves[hi_i]]

    return FrocResult(
        fps_per_scan=fps, sensitivity=sens, thresholds=thr, sensitivity_at=sens_at, cpm=cpm,
        cpm_ci95=cpm_ci, sensitivity_at_ci95=sens_ci, n_nodules=n_nodules, n_scans=n_scans,
        n_candidates=n_cands, candidate_recall=n_recalled / n_nodules, n_true_positives=n_tp,
        n_false_positives=n_fp, n_ignored=n_ignored, n_bootstrap=n_bootstrap,
        band_fps=band[0], band_mean=band[1], band_lo=band[2], band_hi=band[3])


# ----------------------------------------------------------------------------- outputs
def write_froc(result: FrocResult, out_dir, *, name: str = "CAD") -> dict[str, Path]:
    """Write ``froc.csv`` (curve points), ``froc.png`` (official-style plot), ``froc.json``.

    Returns the three paths by key ``csv``, ``png``, ``json``.
    """
    from pipeline.io import atomic_path, write_csv, write_json

    if not isinstance(result, FrocResult):
        raise TypeError(f"result must be a FrocResult from froc(), got {type(result).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curve = pd.DataFrame({"fps_per_scan": result.fps_per_scan, "sensitivity": result.sensitivity,
                          "threshold": result.thresholds})
    paths = {"csv": write_csv(curve, out / "froc.csv"), "json": write_json(result.summary(), out / "froc.json")}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    try:
        grid = np.linspace(FROC_MIN_FPS, FROC_MAX_FPS, CURVE_POINTS)
        ax.plot(grid, np.interp(grid, result.fps_per_scan, result.sensitivity), color="b", lw=2,
                label=f"{name} (CPM {result.cpm:.3f})")
        if result.band_fps.size:
            ax.plot(result.band_fps, result.band_mean, color="b", ls="--")
            ax.plot(result.band_fps, result.band_lo, color="b", ls=":")
            ax.plot(result.band_fps, result.band_hi, color="b", ls=":")
            ax.fill_between(result.band_fps, result.band_lo, result.band_hi, facecolor="b", alpha=0.05)
        ax.set_xscale("log", base=2)
        ax.set_xlim(FROC_MIN_FPS, FROC_MAX_FPS)
        ax.set_ylim(0, 1)
        ticks = list(FP_RATES)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_locator(FixedLocator([]))
        ax.set_yticks(np.arange(0, 1.1, 0.1))
        ax.grid(True, which="both")
        ax.set_xlabel("Average number of false positives per scan")
        ax.set_ylabel("Sensitivity")
        ax.set_title(f"FROC performance - {name}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        with atomic_path(out / "froc.png") as tmp:
            fig.savefig(tmp, dpi=150, format="png")
    finally:
        plt.close(fig)
    paths["png"] = out / "froc.png"
    return paths


def format_result(result: FrocResult) -> str:
    """Lines printed by the CLI: CPM with its interval and the sensitivities."""
    lo, hi = result.cpm_ci95
    lines = [f"CPM {result.cpm:.4f} (95% CI {lo:.4f}-{hi:.4f}, {result.n_bootstrap} bootstrap samples)",
             f"{result.n_nodules} nodules on {result.n_scans} scans, {result.n_candidates} marks, "
             f"candidate recall {result.candidate_recall:.4f}"]
    for rate, sens in result.sensitivity_at.items():
        lines.append(f"  sensitivity at {rate:g} FP/scan: {sens:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- folds
#: Folds of LUNA16's cross-validation: fold K tests on ``subsetK`` (K = 0..9).
N_FOLDS = 10
#: Columns of LUNA16's submission file, and of each fold's ``predictions.csv``.
SUBMISSION_COLUMNS = CANDIDATE_COLUMNS
#: A cross-validation run's files, as ``lungscreen train --fold K`` writes them:
#: ``OUT/fold_K/fold.json`` (written last, ``"done": true``) and ``OUT/fold_K/predictions.csv``.
FOLD_JSON = "fold.json"
PREDICTIONS_CSV = "predictions.csv"


@dataclass(frozen=True, eq=False)
class PooledResult:
    """LUNA16 FROC of the pooled test folds of a cross-validation, and of each fold.

    Attributes
    ----------
    pooled : FrocResult
        One FROC over every evaluated scan with every fold's marks.
    folds : dict of int -> FrocResult or None
        Fold K's marks over fold K's test scans (``None`` when none of them holds a nodule:
        its sensitivity is undefined).
    fold_scans : dict of int -> list of str
        Each fold's evaluated scans (its ``test_seriesuids``, within ``seriesuids`` if given).
    seriesuids : list of str
        The pooled evaluation's scans.
    untested : list of str
        Evaluated scans that no fold tested (they count as scans without marks).
    submission : DataFrame
        Every fold's marks, fold 0 first, in :data:`SUBMISSION_COLUMNS`.
    """

    pooled: FrocResult
    folds: dict
    fold_scans: dict
    seriesuids: list
    untested: list
    submission: pd.DataFrame

    def rows(self) -> list[dict]:
        """One row per fold, then ``fold = "pooled"``: scans, nodules, marks kept (after the
        per-scan cap), CPM, its interval and the sensitivity at each operating point (marks
        ``None``, the rest ``nan``, for a fold without nodules)."""
        nan = float("nan")
        out = []
        for fold, res in [*self.folds.items(), ("pooled", self.pooled)]:
            scans = self.fold_scans[fold] if fold != "pooled" else self.seriesuids
            row = {"fold": fold, "n_scans": len(scans),
                   "n_nodules": res.n_nodules if res else 0,
                   "n_marks": res.n_candidates if res else None,
                   "cpm": res.cpm if res else nan,
                   "cpm_ci95_lo": res.cpm_ci95[0] if res else nan,
                   "cpm_ci95_hi": res.cpm_ci95[1] if res else nan}
            rates = (res or self.pooled).sensitivity_at
            row.update({f"sensitivity_at_{r:g}": (res.sensitivity_at[r] if res else nan) for r in rates})
            out.append(row)
        return out


def _fold_numbers(folds) -> list[int]:
    ks = list(range(N_FOLDS)) if folds is None else sorted({int(k) for k in folds})
    if not ks or ks[0] < 0:
        raise ValueError(f"folds must be fold numbers 0, 1, ..., got {folds!r}")
    return ks


def _fold_span(ks: list[int]) -> str:
    return f"{ks[0]}..{ks[-1]}" if ks == list(range(ks[0], ks[-1] + 1)) else ", ".join(map(str, ks))


def read_folds(folds_dir, *, folds: Iterable[int] | None = None) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Read the test predictions of a cross-validation's folds.

    ``folds_dir/fold_K/`` (K in ``folds``), as ``lungscreen train --folds all``
    writes it, holds ``fold.json`` (at least ``{"fold": K, "test_seriesuids": [...],
    "done": true}``) and ``predictions.csv`` (:data:`SUBMISSION_COLUMNS`: LUNA16's
    submission columns, world mm and probability) with the marks of fold K's test scans.

    Parameters
    ----------
    folds_dir : str or Path
        The training run's output folder.
    folds : iterable of int, optional
        Folds expected: fold K tests on ``subsetK``.  Default ``0..9``
        (:data:`N_FOLDS`, LUNA16's ten subsets).

    Returns
    -------
    predictions : DataFrame
        Every fold's marks, fold 0 first, in file order: :data:`SUBMISSION_COLUMNS`
        (``seriesuid`` str, the rest float) and ``fold`` (int).
    test_scans : dict of int -> list of str
        Each fold's ``test_seriesuids``.

    Raises
    ------
    FileNotFoundError
        ``folds_dir`` is not a folder.
    ValueError
        In one line: which folds are missing or not done; a ``fold.json`` that is not JSON
        or lacks ``test_seriesuids``; a ``predictions.csv`` without LUNA16's submission
        columns or with non-numeric values (the file is named); a scan that two folds test
        or predict; marks on a scan that is not one of its fold's test scans.
    """
    import json

    ks = _fold_numbers(folds)
    root = Path(folds_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--folds {root} is not a folder; give the output folder of "
                                f"`lungscreen train --folds all` (it holds fold_{ks[0]} .. fold_{ks[-1]})")
    missing, not_done, infos = [], [], {}
    for k in ks:
        folder = root / f"fold_{k}"
        if not folder.is_dir():
            missing.append(k)
            continue
        meta_path = folder / FOLD_JSON
        if not meta_path.is_file():
            not_done.append(k)
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is not valid JSON ({exc}); rerun that fold") from None
        if not isinstance(meta, dict) or meta.get("done") is not True:
            not_done.append(k)
            continue
        if meta.get("fold", k) != k:
            raise ValueError(f"{meta_path} says fold {meta.get('fold')!r}, but it is in fold_{k}")
        uids = meta.get("test_seriesuids")
        if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
            raise ValueError(f"{meta_path} has no test_seriesuids list (the seriesuids fold {k} tests on)")
        if not (folder / PREDICTIONS_CSV).is_file():
            raise ValueError(f"{folder / PREDICTIONS_CSV} is missing though {meta_path} says done; "
                              f"rerun fold {k}")
        infos[k] = uids
    if missing or not_done:
        parts = []
        if missing:
            parts.append(f"fold(s) {', '.join(map(str, missing))} missing (no fold_K folder)")
        if not_done:
            parts.append(f"fold(s) {', '.join(map(str, not_done))} not done (fold.json without "
                         f"\"done\": true)")
        raise ValueError(f"{root}: {'; '.join(parts)}; the pooled evaluation needs all folds "
                          f"{_fold_span(ks)}: finish them with `lungscreen train --folds all` (it resumes)")

    owner: dict[str, int] = {}
    for k, uids in infos.items():
        for uid in uids:
            if uid in owner and owner[uid] != k:
                raise ValueError(f"scan {uid} is a test scan of two folds: {root / f'fold_{owner[uid]}' / FOLD_JSON} "
                                  f"and {root / f'fold_{k}' / FOLD_JSON}")
            owner[uid] = k

    frames, predicted_in = [], {}
    for k in ks:
        path = root / f"fold_{k}" / PREDICTIONS_CSV
        try:
            df = pd.read_csv(path, dtype={"seriesuid": str})
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path} is empty: no header; LUNA16's submission columns are "
                              f"{','.join(SUBMISSION_COLUMNS)}") from None
        absent = [c for c in SUBMISSION_COLUMNS if c not in df.columns]
        if absent:
            raise ValueError(f"{path} lacks column(s) {absent}: it has {list(df.columns)}; a fold's "
                              f"predictions.csv has LUNA16's submission columns {','.join(SUBMISSION_COLUMNS)}")
        df = _check_table(df[list(SUBMISSION_COLUMNS)], SUBMISSION_COLUMNS, str(path))
        for uid in dict.fromkeys(df["seriesuid"]):
            if uid in predicted_in:
                first = root / f"fold_{predicted_in[uid]}" / PREDICTIONS_CSV
                raise ValueError(f"scan {uid} is predicted in two folds: {first} and {path}")
            predicted_in[uid] = k
        outside = [u for u in dict.fromkeys(df["seriesuid"]) if owner.get(u) != k]
        if outside:
            raise ValueError(f"{path} has marks on {len(outside)} scan(s) that are not fold {k}'s test "
                              f"scans (test_seriesuids of its fold.json), e.g. {outside[0]}")
        frames.append(df.assign(fold=k))
    predictions = pd.concat(frames, ignore_index=True)
    return predictions, {k: list(infos[k]) for k in ks}


def pool_folds(folds_dir, annotations: pd.DataFrame, *, excluded: pd.DataFrame | None = None,
               seriesuids: Iterable[str] | None = None, folds: Iterable[int] | None = None,
               max_marks_per_scan: int = MAX_MARKS_PER_SCAN, fp_rates: Iterable[float] = FP_RATES,
               n_bootstrap: int = 1000, seed: int = 0) -> PooledResult:
    """LUNA16 FROC/CPM of a cross-validation: the test folds pooled, and each fold alone.

    The pooled FROC is :func:`froc` of every fold's marks together over every evaluated
    scan (the published 10-fold LUNA16 numbers); fold K's is :func:`froc` of its marks
    over its own test scans.

    Parameters
    ----------
    folds_dir : str or Path
        The training run's output folder (:func:`read_folds`).
    annotations, excluded : DataFrame
        As :func:`froc` (LUNA16's ``annotations.csv``, ``annotations_excluded.csv``).
    seriesuids : iterable of str, optional
        Scans evaluated (LUNA16's ``seriesuids.csv``).  Default: every fold's
        ``test_seriesuids``.  Scans listed here that no fold tested count as scans without
        marks (:attr:`PooledResult.untested`); a fold's scans outside it are left out.
    folds, max_marks_per_scan, fp_rates, n_bootstrap, seed
        As :func:`read_folds` and :func:`froc` (the same for the pooled and each fold's FROC).

    Returns
    -------
    PooledResult

    Raises
    ------
    FileNotFoundError, ValueError
        From :func:`read_folds` and :func:`froc`.
    TypeError
        ``seriesuids`` is one string, or a table is not a DataFrame.

    Examples
    --------
    >>> import json, tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for k in range(10):
    ...     (root / f"fold_{k}").mkdir()
    ...     _ = (root / f"fold_{k}" / "fold.json").write_text(json.dumps(
    ...         {"fold": k, "test_subset": k, "test_seriesuids": [f"s{k}"], "done": True}))
    ...     _ = (root / f"fold_{k}" / "predictions.csv").write_text(
    ...         f"seriesuid,coordX,coordY,coordZ,probability\\ns{k},0,0,0,0.9\\ns{k},50,0,0,0.1\\n")
    >>> ann = pd.DataFrame({"seriesuid": [f"s{k}" for k in range(10)], "coordX": 0.0, "coordY": 0.0,
    ...                     "coordZ": 0.0, "diameter_mm": 10.0})
    >>> res = pool_folds(root, ann, n_bootstrap=0)
    >>> res.pooled.cpm, res.pooled.n_scans, res.folds[5].cpm, len(res.submission)
    (1.0, 10, 1.0, 20)
    """
    predictions, test_scans = read_folds(folds_dir, folds=folds)
    tested = [u for uids in test_scans.values() for u in uids]
    if seriesuids is None:
        evaluated = tested
    elif isinstance(seriesuids, (str, bytes)):
        raise TypeError("seriesuids must be a list of series UIDs, not one string; "
                        "use read_seriesuids(path) for a seriesuids.csv")
    else:
        evaluated = list(dict.fromkeys(str(s) for s in seriesuids))
    keep = set(evaluated)
    fold_scans = {k: [u for u in uids if u in keep] for k, uids in test_scans.items()}
    untested = sorted(keep - set(tested))
    annotations = _check_table(annotations, ANNOTATION_COLUMNS, "annotations")
    settings = dict(excluded=excluded, max_marks_per_scan=max_marks_per_scan, fp_rates=fp_rates,
                    n_bootstrap=n_bootstrap, seed=seed)
    submission = predictions[list(SUBMISSION_COLUMNS)]
    pooled = froc(annotations, submission, seriesuids=evaluated, **settings)
    with_nodules = set(annotations["seriesuid"])
    per_fold = {}
    for k, scans in fold_scans.items():
        per_fold[k] = (froc(annotations, submission[predictions["fold"] == k], seriesuids=scans, **settings)
                       if with_nodules.intersection(scans) else None)
    return PooledResult(pooled=pooled, folds=per_fold, fold_scans=fold_scans, seriesuids=evaluated,
                        untested=untested, submission=submission.reset_index(drop=True))


def format_pooled(result: PooledResult) -> str:
    """The table the CLI prints: one line per fold, then the pooled line, and notes."""
    rates = list(result.pooled.sensitivity_at)
    head = (f"{'fold':>6} {'scans':>5} {'nodules':>7} {'marks':>6} {'CPM':>6} {'95% CI':>13} "
            + " ".join(f"{r:>6g}" for r in rates))
    lines = ["sensitivity at FP/scan (LUNA16 operating points):", head]
    for row in result.rows():
        if math.isnan(row["cpm"]):
            tail = f"{'-':>6} {'-':>13} " + " ".join(f"{'-':>6}" for _ in rates)
        else:
            ci = f"{row['cpm_ci95_lo']:.3f}-{row['cpm_ci95_hi']:.3f}"
            tail = (f"{row['cpm']:6.4f} {ci:>13} "
                    + " ".join(f"{row[f'sensitivity_at_{r:g}']:6.3f}" for r in rates))
        marks = "-" if row["n_marks"] is None else str(row["n_marks"])
        lines.append(f"{row['fold']!s:>6} {row['n_scans']:5d} {row['n_nodules']:7d} {marks:>6} {tail}")
    empty = [k for k, res in result.folds.items() if res is None]
    if empty:
        lines.append(f"fold(s) {', '.join(map(str, empty))}: no nodule on the test scans, no CPM of their own "
                     f"(their marks count in the pooled FROC)")
    if result.untested:
        lines.append(f"{len(result.untested)} evaluated scan(s) are in no fold's test_seriesuids (e.g. "
                     f"{result.untested[0]}): they count as scans without marks")
    lines.append(f"pooled CPM {result.pooled.cpm:.4f} over {result.pooled.n_scans} scans, "
                 f"{result.pooled.n_nodules} nodules, candidate recall {result.pooled.candidate_recall:.4f}")
    return "\n".join(lines)


def write_pooled(result: PooledResult, out_dir, *, submission_path=None) -> dict[str, Path]:
    """Write a pooled evaluation.

    ``out_dir/cpm.csv`` (:meth:`PooledResult.rows`: the folds and the pooled line),
    ``out_dir/cpm.json`` (the pooled and each fold's :meth:`FrocResult.summary`, with the
    folds' scans), the pooled curve as :func:`write_froc` writes it (``froc.csv``,
    ``froc.png``, ``froc.json``), and the submission file (:attr:`PooledResult.submission`,
    default ``out_dir/submission.csv``).

    Returns the paths by key ``cpm_csv``, ``cpm_json``, ``csv``, ``png``, ``json``,
    ``submission``.
    """
    from pipeline.io import write_csv, write_json

    if not isinstance(result, PooledResult):
        raise TypeError(f"result must be a PooledResult from pool_folds(), got {type(result).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_froc(result.pooled, out, name=f"{len(result.folds)} folds pooled")
    paths["cpm_csv"] = write_csv(pd.DataFrame(result.rows()), out / "cpm.csv")
    paths["cpm_json"] = write_json({
        "pooled": result.pooled.summary(),
        "folds": {str(k): {**(res.summary() if res else {"cpm": None}), "seriesuids": result.fold_scans[k]}
                  for k, res in result.folds.items()},
        "untested_seriesuids": result.untested}, out / "cpm.json")
    paths["submission"] = write_csv(result.submission, Path(submission_path or out / "submission.csv"))
    return paths


# ----------------------------------------------------------------------------- patients
def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count one half); NaN when one class is missing."""
    pos, neg = p[y == 1], p[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    fps, tps, _ = _roc_counts(y.astype(float), p.astype(float))  # the area under its ROC points
    return float(np.trapezoid(tps / tps[-1], fps / fps[-1]))


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def patient_scores(truth: pd.DataFrame, predictions: pd.DataFrame, *, n_bootstrap: int = 1000,
                   seed: int = 0) -> dict:
    """Log loss and ROC AUC of patient cancer probabilities, with bootstrap 95 % intervals.

    Parameters
    ----------
    truth : DataFrame
        ``id, cancer`` (0 or 1), one row per patient.
    predictions : DataFrame
        ``id, cancer`` (probability in [0, 1]); every truth id must be there (extra ids are
        ignored, a missing one is an error: Kaggle scores every patient).
    n_bootstrap : int
        Patients are drawn with replacement this many times; a sample with one class only
        has no AUC and is skipped for the AUC's interval.
    seed : int
        Seed of the bootstrap's generator.

    Returns
    -------
    dict
        ``n_patients, n_cancer, log_loss, log_loss_ci95, auc, auc_ci95, n_bootstrap``.

    Examples
    --------
    >>> t = pd.DataFrame({"id": ["a", "b", "c", "d"], "cancer": [0, 0, 1, 1]})
    >>> p = pd.DataFrame({"id": ["a", "b", "c", "d"], "cancer": [0.1, 0.4, 0.35, 0.8]})
    >>> r = patient_scores(t, p, n_bootstrap=0)
    >>> round(r["log_loss"], 4), r["auc"]
    (0.4723, 0.75)
    """
    for what, df in (("truth", truth), ("predictions", predictions)):
        missing = {"id", "cancer"} - set(df.columns)
        if missing:
            raise ValueError(f"{what} is missing column(s) {sorted(missing)}; it has {list(df.columns)}")
    t = truth[["id", "cancer"]].assign(id=truth["id"].astype(str))
    q = predictions[["id", "cancer"]].assign(id=predictions["id"].astype(str))
    if t["id"].duplicated().any() or q["id"].duplicated().any():
        raise ValueError("truth and predictions need one row per patient id")
    merged = t.merge(q, on="id", how="left", suffixes=("_true", "_pred"))
    missing = merged.loc[merged["cancer_pred"].isna(), "id"].tolist()
    if missing:
        raise ValueError(f"{len(missing)} patients have no prediction, e.g. {missing[:3]}")
    y = pd.to_numeric(merged["cancer_true"], errors="coerce").to_numpy(float)
    p = pd.to_numeric(merged["cancer_pred"], errors="coerce").to_numpy(float)
    if np.isnan(p).any():
        raise ValueError("predicted cancer must be a number for every patient")
    if not set(np.unique(y)) <= {0.0, 1.0}:
        raise ValueError("truth cancer must be 0 or 1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("predicted cancer must be a probability in [0, 1]")
    out = {"n_patients": int(len(y)), "n_cancer": int(y.sum()), "log_loss": _log_loss(y, p),
           "auc": _auc(y, p), "n_bootstrap": int(n_bootstrap)}
    rng = np.random.default_rng(seed)
    losses, aucs = [], []
    for _ in range(int(n_bootstrap)):
        i = rng.integers(0, len(y), len(y))
        losses.append(_log_loss(y[i], p[i]))
        a = _auc(y[i], p[i])
        if not math.isnan(a):
            aucs.append(a)

    def ci(values):
        if not values:
            return (float("nan"), float("nan"))
        v = np.sort(values)
        return (float(v[int(math.floor(0.025 * len(v)))]),
                float(v[min(int(math.floor(0.975 * len(v))), len(v) - 1)]))

    out["log_loss_ci95"], out["auc_ci95"] = ci(losses), ci(aucs)
    return out


def format_patient_scores(r: dict) -> str:
    """Two lines: log loss and AUC with their intervals."""
    return (f"patients {r['n_patients']} ({r['n_cancer']} cancer)\n"
            f"log loss {r['log_loss']:.4f} (95% CI {r['log_loss_ci95'][0]:.4f}-{r['log_loss_ci95'][1]:.4f}, "
            f"{r['n_bootstrap']} bootstrap samples)\n"
            f"ROC AUC {r['auc']:.4f} (95% CI {r['auc_ci95'][0]:.4f}-{r['auc_ci95'][1]:.4f})")


# ----------------------------------------------------------------------------- CLI
#: Where a LUNA16 folder keeps the evaluation's files: its root, or the evaluation script's
#: ``evaluationScript/annotations/`` (:mod:`pipeline.luna16`).
LUNA16_EVALUATION_FILES = {
    "annotations": ("annotations.csv", "evaluationScript/annotations/annotations.csv"),
    "excluded": ("annotations_excluded.csv", "evaluationScript/annotations/annotations_excluded.csv"),
    "seriesuids": ("seriesuids.csv", "evaluationScript/annotations/seriesuids.csv"),
}


def luna16_files(root) -> dict[str, Path]:
    """The evaluation's files in a LUNA16 folder: ``annotations``, ``excluded``, ``seriesuids``.

    Each is looked for at :data:`LUNA16_EVALUATION_FILES`'s places, first found wins.
    ``seriesuids`` is left out when absent (the evaluated scans then default to the marked
    ones' or the folds'); ``annotations`` and ``excluded`` must be there.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder, or lacks ``annotations.csv`` or ``annotations_excluded.csv``
        (the message names the places looked at).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a folder; give the LUNA16 folder holding "
                                "annotations.csv and evaluationScript/")
    found = {}
    for key, names in LUNA16_EVALUATION_FILES.items():
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None and key != "seriesuids":
            raise FileNotFoundError(f"--data {root}: no {Path(names[0]).name} (looked for "
                                    f"{' and '.join(names)}); give --{key} FILE")
        if path is not None:
            found[key] = path
    return found


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``evaluate`` options to ``parser`` (``lungscreen evaluate``, ``python -m pipeline.evaluate``).

    Returns ``parser``, extended.
    """
    parser.add_argument("--annotations", default=None, help="annotations.csv (LUNA16 columns)")
    parser.add_argument("--candidates", default=None,
                        help="CAD marks: seriesuid,coordX,coordY,coordZ,probability (or score)")
    parser.add_argument("--folds", default=None, metavar="OUT",
                        help="a cross-validation's output folder (`lungscreen train --folds all`): pool "
                             f"fold_0..fold_{N_FOLDS - 1}/predictions.csv into one FROC/CPM beside each "
                             "fold's, write OUT/submission.csv (LUNA16's submission file)")
    parser.add_argument("--data", default=None, metavar="LUNA16_ROOT",
                        help="a LUNA16 folder: annotations.csv, annotations_excluded.csv and seriesuids.csv "
                             "are read from it or its evaluationScript/annotations/ (the options above "
                             "override them); with --folds, its subsetK folders are the folds expected "
                             f"(default: 0..{N_FOLDS - 1})")
    parser.add_argument("--patients", default=None,
                        help="patient truth id,cancer (0/1): score --predictions instead of the FROC")
    parser.add_argument("--predictions", default=None,
                        help="with --patients: id,cancer probabilities (a run's patients.csv)")
    parser.add_argument("--excluded", default=None, help="annotations_excluded.csv (optional)")
    parser.add_argument("--seriesuids", default=None,
                        help="seriesuids.csv listing the evaluated scans (default: scans in annotations)")
    parser.add_argument("--out", default=None, help="folder for froc.csv, froc.png, froc.json (with "
                        "--folds also cpm.csv, cpm.json; default there: the --folds folder)")
    parser.add_argument("--max-marks-per-scan", type=int, default=MAX_MARKS_PER_SCAN, help="official cap; <=0 for none")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap samples (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the evaluation the parsed ``args`` describe, print it, write the files.

    ``--candidates``: one FROC, files written with ``--out``.  ``--folds OUT``: the folds
    pooled (:func:`pool_folds`), the table printed, :func:`write_pooled`'s files written to
    ``--out`` (default ``OUT``) and the submission to ``OUT/submission.csv``.  ``--data``
    finds the tables (:func:`luna16_files`) that ``--annotations``, ``--excluded`` and
    ``--seriesuids`` do not name, and with ``--folds`` its ``subsetK`` folders are the folds
    expected (as ``lungscreen train --folds all`` trains one fold per subset; default 0..9).

    ``args`` come from :func:`add_arguments`; returns the exit status: 0 done; 2 a table or
    fold is missing or unusable (the reason is printed in one line, ``error: ...``).
    """
    if args.patients or args.predictions:
        if not (args.patients and args.predictions):
            print("error: --patients and --predictions go together", file=sys.stderr)
            return 2
        try:
            result = patient_scores(pd.read_csv(args.patients, dtype={"id": str}),
                                    pd.read_csv(args.predictions, dtype={"id": str}),
                                    n_bootstrap=args.n_bootstrap, seed=args.seed)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_patient_scores(result))
        if args.out:
            from pipeline.io import write_json

            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_json(result, Path(args.out) / "patients.json")
        return 0
    if args.folds and args.candidates:
        print("error: give --folds (a cross-validation's folds, pooled) or --candidates (one run's "
              "marks), not both", file=sys.stderr)
        return 2
    if not (args.folds or args.candidates) or not (args.annotations or args.data):
        print("error: give --annotations (or --data LUNA16_ROOT) with --candidates or --folds (LUNA16 "
              "FROC), or --patients and --predictions (patient log loss and AUC)", file=sys.stderr)
        return 2
    try:
        files = luna16_files(args.data) if args.data else {}
        ann_path = args.annotations or files["annotations"]
        exc_path = args.excluded or files.get("excluded")
        uids_path = args.seriesuids or files.get("seriesuids")
        ann = pd.read_csv(ann_path, dtype={"seriesuid": str})
        exc = pd.read_csv(exc_path, dtype={"seriesuid": str}) if exc_path else None
        uids = read_seriesuids(uids_path) if uids_path else None
        settings = dict(excluded=exc, seriesuids=uids, max_marks_per_scan=args.max_marks_per_scan,
                        n_bootstrap=args.n_bootstrap, seed=args.seed)
        if args.folds:
            subsets = sorted(int(d.name[6:]) for d in Path(args.data).glob("subset*")
                             if d.is_dir() and d.name[6:].isdigit()) if args.data else []
            pooled = pool_folds(args.folds, ann, folds=subsets or None, **settings)
        else:
            cand = pd.read_csv(args.candidates, dtype={"seriesuid": str})
            result = froc(ann, cand, **settings)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.folds:
        print(format_pooled(pooled))
        paths = write_pooled(pooled, args.out or args.folds,
                             submission_path=Path(args.folds) / "submission.csv")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    print(format_result(result))
    if args.out:
        paths = write_froc(result, args.out, name=Path(args.candidates).stem)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv=None) -> int:
    """``python -m pipeline.evaluate --annotations A --candidates C [...]`` (or ``--folds OUT``);
    returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description="LUNA16 FROC / CPM of CAD marks, or of a "
        "cross-validation's folds pooled"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
