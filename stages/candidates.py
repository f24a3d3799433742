"""Nodule candidates: blob-like voxels of the lungs, clustered, measured, filtered and scored.

How :func:`find_candidates` works
---------------------------------
1. **Points**: voxels inside the lung mask denser than ``hu_floor`` whose shape index is at
   least ``si_floor`` (blob-like: nodules, vessel branchings and bends; not the straight
   vessels, 0.75, nor walls, 0.5), as scaled ``(z, y, x, HU, SI)`` features from
   :func:`stages.features.extract_features`.
2. **Clusters**: the points' 26-connected components give one seed each (their mean
   feature); :func:`stages.cluster.mean_shift` moves the seeds to the modes of the feature
   density over all points (``method="mean_shift"``, bandwidth in scaled units), or
   :func:`stages.cluster.kmeans` groups the points into as many clusters as there are
   seeds (``method="kmeans"``).  Each point then belongs to its nearest mode/centre and,
   to keep one blob one cluster, to the connected component it lies in: a cluster is the
   points of one component sharing one mode.
3. **Measures** per cluster (world mm): centre (mean position), diameter (mean extent along
   the three principal axes), sphericity (square root of the smallest over the largest
   principal variance, 1 for a ball), volume, mean HU, mean shape index and the distance
   from the centre to the lung's border (``dist_to_pleura_mm``; 0 or less means on or past
   it, juxta-pleural).
4. **Rules**: diameter in ``[min_diameter_mm, max_diameter_mm]``, sphericity at least
   ``min_sphericity`` (drops vessel pieces) and at least ``min_voxels`` points.
5. **Score**: ``sphericity * si_term * size_term`` with ``si_term`` the mean shape index
   rescaled from [0.75 (tube), 1 (cap)] to [0, 1] and ``size_term = 1 - exp(-volume /
   ref_volume_mm3)`` (vessel branchings are small).  A candidate whose centre lies within
   a better one's radius is dropped (one blob, one candidate); the best ``max_candidates``
   are kept, best first.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from stages.features import (HU_FLOOR, SCALE_HU, SCALE_MM, SCALE_SI, SIGMA_MM,
                             extract_features)
from stages.volume import Volume

log = logging.getLogger(__name__)

__all__ = ["find_candidates", "CANDIDATE_COLUMNS", "FEATURE_COLUMNS"]

#: LUNA16 columns first, then the score; then the measured features.
CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "score"]
FEATURE_COLUMNS = ["volume_mm3", "mean_hu", "shape_index", "sphericity", "dist_to_pleura_mm",
                   "n_voxels"]
#: Voxels with a shape index below this are not candidate points (tubes are 0.75).
SI_FLOOR = 0.8
#: Mean-shift bandwidth, in scaled feature units (see stages.features scales).
BANDWIDTH = 1.0
#: Most candidates returned per scan.
MAX_CANDIDATES = 30
#: Candidate diameter limits (mm): nodules are 3 to 30 mm.
MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 30.0
#: Smallest sphericity (sqrt of smallest / largest principal variance) kept.
MIN_SPHERICITY = 0.25
#: Fewest points in a candidate.
MIN_VOXELS = 8
#: Volume (mm^3) at which the size term reaches 63 %: a 6 mm sphere.
REF_VOLUME_MM3 = 113.0
#: Half-size (mm) of the box searched for the lung border around a candidate.
PLEURA_SEARCH_MM = 20.0

#: The feature density is estimated on every ``DENSITY_STRIDE``-th voxel along each axis of
#: components of ``SMALL_COMPONENT`` points or more (all points of smaller ones): 8 times
#: fewer points at stride 2, the modes hardly move.
DENSITY_STRIDE = 2
SMALL_COMPONENT = 27
#: The Gaussian kernel is cut at this many bandwidths (weight exp(-2) = 0.14).
MEAN_SHIFT_CUTOFF = 2.0
#: A seed has converged when it moves less than this many bandwidths in an iteration.
MEAN_SHIFT_TOL = 1e-2

_METHODS = ("mean_shift", "kmeans")


def _check(vol, mask):
    for name, v in (("vol", vol), ("mask", mask)):
        if not isinstance(v, Volume):
            raise TypeError(f"{name} must be a stages.volume.Volume, got {type(v).__name__}")
    vol.check_same_geometry(mask)


def _empty(scan_id) -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=float) for c in CANDIDATE_COLUMNS + FEATURE_COLUMNS})
    df["seriesuid"] = pd.Series(dtype=str)
    df["n_voxels"] = pd.Series(dtype=np.int64)
    return df


def _dist_to_pleura(mask: np.ndarray, spacing, centre_idx, search_mm) -> float:
    """Distance (mm) from a voxel to the nearest voxel outside the mask, within a box."""
    c = np.round(centre_idx).astype(int)
    c = np.clip(c, 0, np.asarray(mask.shape) - 1)
    half = [int(np.ceil(search_mm / s)) for s in spacing]
    box = tuple(slice(max(0, ci - h), min(n, ci + h + 1)) for ci, h, n in zip(c, half, mask.shape))
    sub = mask[box]
    local = tuple(ci - b.start for ci, b in zip(c, box))
    if not sub[local]:
        return 0.0
    if sub.all():
        return float(search_mm)
    return float(ndi.distance_transform_edt(sub, sampling=spacing)[local])


def find_candidates(vol: Volume, mask: Volume, *, method: str = "mean_shift",
                    bandwidth: float = BANDWIDTH, max_candidates: int = MAX_CANDIDATES,
                    hu_floor: float = HU_FLOOR, si_floor: float = SI_FLOOR,
                    sigma_mm: float = SIGMA_MM, scale_mm: float = SCALE_MM,
                    scale_hu: float = SCALE_HU, scale_si: float = SCALE_SI,
                    min_diameter_mm: float = MIN_DIAMETER_MM,
                    max_diameter_mm: float = MAX_DIAMETER_MM,
                    min_sphericity: float = MIN_SPHERICITY, min_voxels: int = MIN_VOXELS,
                    ref_volume_mm3: float = REF_VOLUME_MM3, mean_shift_max_iter: int = 20,
                    kernel: str = "gaussian", density_stride: int = DENSITY_STRIDE,
                    device=None, seed: int = 0) -> pd.DataFrame:
    """Find nodule candidates in the lungs of a CT volume.

    Parameters
    ----------
    vol : Volume
        CT in HU, resampled to about 1 mm.
    mask : Volume
        Lung mask on the same grid (non-zero inside), from :func:`stages.lungmask.segment_lungs`.
    method : {"mean_shift", "kmeans"}
        Clustering of the candidate points (see the module notes).
    bandwidth : float
        Mean-shift bandwidth in scaled feature units.
    max_candidates : int
        Most candidates returned (the best scored).
    hu_floor, si_floor : float
        Candidate points are denser than ``hu_floor`` HU with a shape index >= ``si_floor``.
    sigma_mm, scale_mm, scale_hu, scale_si : float
        Passed to :func:`stages.features.extract_features`.
    min_diameter_mm, max_diameter_mm : float
        Candidates outside this diameter range (mm) are dropped.
    min_sphericity : float
        Candidates less spherical than this (0..1) are dropped (vessel pieces).
    min_voxels : int
        Candidates with fewer points are dropped.
    ref_volume_mm3 : float
        Volume (mm^3) at which the score's size term reaches 1 - 1/e.
    mean_shift_max_iter : int
        Most mean-shift iterations.
    kernel : {"gaussian", "flat"}
        Mean-shift kernel.
    density_stride : int
        Sub-grid step (voxels) of the points the density is estimated on (1: all).
    device : str, optional
        Torch device for the clustering; ``None``: CUDA when available, else CPU.
    seed : int
        Seed of the k-means initialisation.

    Returns
    -------
    pandas.DataFrame
        One row per candidate, best first: ``seriesuid, coordX, coordY, coordZ`` (world LPS
        mm, LUNA16 order), ``diameter_mm, score`` (0..1), then ``volume_mm3, mean_hu,
        shape_index, sphericity, dist_to_pleura_mm, n_voxels``.

    Raises
    ------
    TypeError
        If ``vol`` or ``mask`` is not a Volume.
    ValueError
        For an unknown method, non-positive sizes or a mask on another grid.

    Examples
    --------
    >>> z, y, x = np.mgrid[:40, :40, :40]
    >>> arr = np.where((z-20)**2 + (y-20)**2 + (x-20)**2 <= 25, 20, -850).astype(np.int16)
    >>> vol = Volume(arr, spacing_mm=(1, 1, 1), scan_id="demo")
    >>> cands = find_candidates(vol, vol.with_array(np.ones(arr.shape, np.uint8)), device="cpu")
    >>> len(cands), cands.loc[0, ["coordX", "coordY", "coordZ"]].round(1).tolist()
    (1, [20.0, 20.0, 20.0])
    """
    _check(vol, mask)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    for name, value in (("bandwidth", bandwidth), ("max_diameter_mm", max_diameter_mm),
                        ("ref_volume_mm3", ref_volume_mm3)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not 0 <= min_diameter_mm <= max_diameter_mm:
        raise ValueError(f"need 0 <= min_diameter_mm <= max_diameter_mm, got {min_diameter_mm!r}, "
                         f"{max_diameter_mm!r}")
    if isinstance(density_stride, bool) or not isinstance(density_stride, (int, np.integer)) \
            or density_stride < 1:
        raise ValueError(f"density_stride must be an int >= 1, got {density_stride!r}")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, (int, np.integer)) \
            or max_candidates < 1:
        raise ValueError(f"max_candidates must be an int >= 1, got {max_candidates!r}")
    from stages.cluster import kmeans, mean_shift

    pts, idx = extract_features(vol, mask, hu_floor=hu_floor, sigma_mm=sigma_mm,
                                scale_mm=scale_mm, scale_hu=scale_hu, scale_si=scale_si)
    keep = pts[:, 4] * scale_si >= si_floor
    pts, idx = pts[keep], idx[keep]
    if pts.shape[0] == 0:
        return _empty(vol.scan_id)
    # connected components of the points: one seed each
    grid = np.zeros(vol.shape, bool)
    grid[tuple(idx.T)] = True
    comp, n_comp = ndi.label(grid, structure=np.ones((3, 3, 3), bool))
    comp_of = comp[tuple(idx.T)]
    del grid, comp
    sizes = np.bincount(comp_of, minlength=n_comp + 1)
    big = sizes[comp_of] >= min_voxels
    pts, idx, comp_of = pts[big], idx[big], comp_of[big]
    if pts.shape[0] == 0:
        return _empty(vol.scan_id)
    ids, inverse = np.unique(comp_of, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    seeds = np.stack([np.bincount(inverse, weights=pts[:, j]) / counts for j in range(5)], axis=1)
    # the density is estimated on a sub-grid of the big components' points (cost)
    on_grid = np.all(idx % density_stride == 0, axis=1) | (counts[inverse] < SMALL_COMPONENT)
    dens = pts[on_grid].astype(np.float64)
    if method == "mean_shift":
        res = mean_shift(dens, bandwidth, seeds=seeds, device=device, kernel=kernel, dtype="float32",
                         max_iter=mean_shift_max_iter, tol=MEAN_SHIFT_TOL, cutoff=MEAN_SHIFT_CUTOFF,
                         seed=seed)
    else:
        res = kmeans(dens, min(len(ids), dens.shape[0]), device=device, dtype="float32", seed=seed)
    log.debug("candidates: %d points, %d density points, %d seeds, %d modes, %s iterations",
              len(pts), len(dens), len(seeds), len(res.centres), getattr(res, "n_iter", "?"))
    labels = cKDTree(res.centres).query(pts, k=1)[1]
    # a cluster = the points of one component sharing one mode
    group = inverse.astype(np.int64) * (len(res.centres) + 1) + labels
    _, cluster = np.unique(group, return_inverse=True)

    spacing = np.asarray(vol.spacing_mm)
    voxel_mm3 = float(np.prod(spacing))
    world = vol.index_to_world(idx)
    hu = vol.array[tuple(idx.T)].astype(np.float64)
    si = pts[:, 4].astype(np.float64) * scale_si
    lung = mask.array != 0
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    rows = []
    for members in np.split(order, bounds):
        n = members.size
        if n < min_voxels:
            continue
        w = world[members]
        centre = w.mean(axis=0)
        cov = np.cov((w - centre).T) if n > 1 else np.zeros((3, 3))
        evals, evecs = np.linalg.eigh(cov)
        proj = (w - centre) @ evecs
        extent = proj.max(axis=0) - proj.min(axis=0) + spacing.mean()
        diameter = float(extent.mean())
        sphericity = float(np.sqrt(max(evals[0], 0) / evals[2])) if evals[2] > 0 else 1.0
        if not (min_diameter_mm <= diameter <= max_diameter_mm) or sphericity < min_sphericity:
            continue
        volume = n * voxel_mm3
        mean_si = float(si[members].mean())
        si_term = float(np.clip((mean_si - 0.75) / 0.25, 0.0, 1.0))
        size_term = 1.0 - np.exp(-volume / ref_volume_mm3)
        score = sphericity * si_term * size_term
        rows.append((centre, diameter, score, volume, float(hu[members].mean()), mean_si,
                     sphericity, n))
    if not rows:
        return _empty(vol.scan_id)
    rows.sort(key=lambda r: -r[2])
    # one blob, one candidate: drop a candidate whose centre lies inside a better one
    kept = []
    for r in rows:
        if all(np.linalg.norm(r[0] - k[0]) > k[1] / 2 for k in kept):
            kept.append(r)
        if len(kept) == max_candidates:
            break
    rows = kept
    centres = np.array([r[0] for r in rows])
    centre_idx = vol.world_to_index(centres)
    df = pd.DataFrame({
        "seriesuid": vol.scan_id,
        "coordX": centres[:, 2], "coordY": centres[:, 1], "coordZ": centres[:, 0],
        "diameter_mm": [r[1] for r in rows], "score": [r[2] for r in rows],
        "volume_mm3": [r[3] for r in rows], "mean_hu": [r[4] for r in rows],
        "shape_index": [r[5] for r in rows], "sphericity": [r[6] for r in rows],
        "dist_to_pleura_mm": [_dist_to_pleura(lung, spacing, c, PLEURA_SEARCH_MM)
                              for c in centre_idx],
        "n_voxels": np.array([r[7] for r in rows], np.int64),
    })
    return df
