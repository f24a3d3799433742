"""Nodule candidates: blob-like voxels of the lungs, clustered, measured, filtered and scored.

How :func:`find_candidates` works
---------------------------------
1. **Points**: voxels inside the lung mask denser than ``hu_floor`` whose shape index is at
   least ``si_floor`` (blob-like: nodules, vessel branchings and bends; not the straight
   vessels, 0.75, nor walls, 0.5), as scaled ``(z, y, x, HU, SI)`` features from
   :func:`stages.features.extract_features`.  With ``outside_hu`` (opt-in, e.g. -1000) the
   shape index is taken with every voxel outside the lung mask set to it (air): a
   juxta-pleural nodule, which the mask keeps, is then a blob rather than a bump on the
   chest wall (its voxels' shape index falls to about 0.5-0.7 with the wall there).
1b. **Wall pass** (``wall_pass_hu``): a juxta-pleural nodule's dense core, which the mask
   keeps, is a plateau next to the wall, so the first pass clusters only its lung-facing
   rim and the mark sits off-centre, towards the lung.  The in-mask voxels denser than
   ``wall_pass_hu`` whose shape index changes (by more than ``WALL_SI_CHANGE``) when the
   voxels outside the mask are set to air, i.e. those within reach of the wall, are taken
   again with the wall-as-air shape index and go through steps 2-6 on their own; each of
   their marks is added to the first pass's list unless a first-pass mark lies within
   ``wall_dedupe_mm`` of it.  Nothing of the first pass is moved or dropped (unlike
   ``outside_hu``, which replaces the shape index of every point).
2. **Clusters**: the points' 26-connected components give one seed each (their mean
   feature); :func:`stages.cluster.mean_shift` moves the seeds to the modes of the feature
   density over all points (``method="mean_shift"``, bandwidth in scaled units), or
   :func:`stages.cluster.kmeans` groups the points into as many clusters as there are
   seeds (``method="kmeans"``).  Each point then belongs to its nearest mode/centre and,
   to keep one blob one cluster, to the connected component it lies in: a cluster is the
   points of one component sharing one mode.
3. **Measures** per cluster (world mm): centre (mean position weighted by
   ``(HU - hu_floor) ** centre_hu_power``, so that the mark sits on the dense core of a
   nodule whose cluster also holds a faint rim or a bump of the wall next to it), diameter (mean extent along
   the three principal axes), sphericity (square root of the smallest over the largest
   principal variance, 1 for a ball), volume, mean HU, mean shape index and the distance
   from the centre to the lung's border (``dist_to_pleura_mm``; 0 or less means on or past
   it, juxta-pleural).
4. **Rules**: diameter in ``[min_diameter_mm, max_diameter_mm]``, sphericity at least
   ``min_sphericity`` (drops vessel pieces) and at least ``min_voxels`` points.
5. **Score**: ``sphericity * si_term ** 2 * size_term`` with ``si_term`` the mean shape
   index rescaled from [``SCORE_SI_LOW`` = 0.8, 1 (cap)] to [0, 1] and ``size_term = 1 -
   exp(-volume / ref_volume_mm3)`` (vessel branchings are small).  The squared shape-index
   term puts small blobs (juxta-pleural nodules: half balls, low sphericity) ahead of vessel
   bends and branchings: on the benchmark's train / validation scans (``data/bench48``),
   recall at 30 candidates per scan went from 0.82 / 0.90 with the linear term from 0.75 to
   0.85 / 0.90, at 100 per scan from 0.89 / 0.95 to 0.89 / 1.00.  A candidate whose centre lies within
   a better one's radius is dropped (one blob, one candidate); the best ``max_candidates``
   are kept, best first.
6. **One blob, one candidate**: before that, candidates whose centres lie in the same
   *compact dense blob* (a 26-connected component of lung voxels denser than
   ``blob_hu``, no more than ``max_diameter_mm`` across along every axis: a solid nodule
   standing free, not a vessel tree) are merged into the biggest of them, which takes
   their best score.  A large lobulated nodule otherwise gives a mark per lobe, and a
   mark on a lobe outside the nodule's radius is a false positive in LUNA16's FROC.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from stages.features import (HU_FLOOR, SCALE_HU, SCALE_MM, SCALE_SI, SIGMA_MM,
                             extract_features)
from stages.volume import AIR_HU, Volume, block_mask, unblock

log = logging.getLogger(__name__)

__all__ = ["find_candidates", "CANDIDATE_COLUMNS", "FEATURE_COLUMNS"]

#: LUNA16 columns first, then the score; then the measured features.
CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "finding", "score"]
FEATURE_COLUMNS = ["volume_mm3", "mean_hu", "shape_index", "sphericity", "dist_to_pleura_mm",
                   "n_voxels", "mass_id"]
#: Voxels with a shape index below this are not candidate points (tubes are 0.75).
SI_FLOOR = 0.8
#: Mean-shift bandwidth, in scaled feature units (see stages.features scales).
BANDWIDTH = 1.0
#: Most candidates returned per scan, the best by the detector's score: every one the rules
#: keep on a phantom (about 250), the cap on real CT (lung1-right: about 1070 before it); the
#: classify stage ranks them all and LUNA16's FROC reads the 100 most probable.
MAX_CANDIDATES = 1000
#: Candidate diameter limits (mm): nodules are 3 to 30 mm.
MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 30.0
#: Smallest sphericity (sqrt of smallest / largest principal variance) kept.
MIN_SPHERICITY = 0.25
#: Fewest points in a candidate.
MIN_VOXELS = 8
#: The score's shape-index term is the mean shape index rescaled from [SCORE_SI_LOW, 1] to
#: [0, 1], squared: blobs (about 0.9 and more) well above vessel bends and branchings.
SCORE_SI_LOW = 0.8
SCORE_SI_POWER = 2.0
#: Volume (mm^3) at which the size term reaches 63 %: a 6 mm sphere.
REF_VOLUME_MM3 = 113.0
#: The mark is the mean of the cluster's voxels weighted by ``(HU - hu_floor) ** power``:
#: 0 is the plain mean; 2 keeps the mark on a small nodule's dense core when the cluster
#: also holds its faint partial-volume rim or a touching vessel or wall bump (a 4.5 mm
#: juxta-pleural nodule's mark moved from 3.3 to 0.8 mm off its centre).
CENTRE_HU_POWER = 2.0
#: Voxels denser than this (HU) make the blobs of the one-blob-one-candidate merge (solid
#: nodules, vessels; ground glass is lighter and is never merged).
BLOB_HU = -400.0
#: HU given to the voxels outside the lung mask before the shape index; ``None`` (the
#: default) keeps the chest wall.  At -1000 (air), on the benchmark's training and
#: validation scans (129 nodules), detector recall at 100 per scan went from 0.922 to
#: 0.938, for juxta-pleural nodules (37) from 0.81 to 0.86; but the screen's CPM, with the
#: classifier fine-tuned on these candidates, went from 0.784 to 0.788 on
#: ``data/bench96/val`` and from 0.921 to 0.879 on ``data/bench48/val``, so it is off.
OUTSIDE_HU = None
#: The wall pass (step 1b, ``wall_pass_hu``): in-mask voxels denser than this many HU whose
#: shape index changes by more than WALL_SI_CHANGE when the wall is set to air are
#: clustered again with the shape index of the scan whose voxels outside the mask are
#: WALL_AIR_HU (air); a mark of that pass joins the list
#: unless a first-pass mark lies within WALL_DEDUPE_MM of it.  -320 HU is the lung mask's
#: air threshold.  Adopted on the validation sets (recall bench96/val 0.886 -> 0.914, no set
#: down; CPM unchanged); ``None`` turns the pass off.
WALL_PASS_HU = -320.0
WALL_AIR_HU = float(AIR_HU)
WALL_SI_CHANGE = 0.01
WALL_DEDUPE_MM = 1.0
#: Masses (step 7): lung voxels denser than MASS_HU, opened by a ball of MASS_OPEN_MM
#: radius (vessels of the hilum are up to about 8 mm across), on a MASS_GRID_MM grid.
MASS_HU = -100.0
MASS_OPEN_MM = 6.0
MASS_GRID_MM = 2.0
#: Findings over this equivalent diameter (mm) are masses (the Fleischner / Lung-RADS cut).
MASS_DIAMETER_MM = 30.0
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
    df["finding"] = pd.Series(dtype=str)
    df["n_voxels"] = pd.Series(dtype=np.int64)
    df["mass_id"] = pd.Series(dtype=np.int64)
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


def _one_per_compact_blob(rows, vol: Volume, lung: np.ndarray, blob_hu: float, max_extent_mm: float):
    """Merge the candidate rows whose centre voxels lie in one compact dense blob (step 6)."""
    dense = (vol.array > blob_hu) & lung
    labels, _ = ndi.label(dense, structure=np.ones((3, 3, 3), bool))
    boxes = ndi.find_objects(labels)
    spacing = np.asarray(vol.spacing_mm)
    idx = np.round(vol.world_to_index(np.array([r[0] for r in rows]))).astype(int)
    idx = np.clip(idx, 0, np.asarray(vol.shape) - 1)
    groups: dict[int, list[int]] = {}
    for i, blob in enumerate(labels[tuple(idx.T)]):
        if blob == 0:
            continue
        extent_mm = np.array([b.stop - b.start for b in boxes[blob - 1]]) * spacing
        if np.all(extent_mm <= max_extent_mm):
            groups.setdefault(int(blob), []).append(i)
    drop = set()
    out = list(rows)
    for members in groups.values():
        if len(members) < 2:
            continue
        biggest = max(members, key=lambda i: rows[i][3])
        best_score = max(rows[i][2] for i in members)
        out[biggest] = (rows[biggest][0], rows[biggest][1], best_score, *rows[biggest][3:])
        drop.update(i for i in members if i != biggest)
    return [r for i, r in enumerate(out) if i not in drop]


def _cluster(shape, pts, idx, *, method, bandwidth, si_floor, scale_si, min_voxels,
             density_stride, device, kernel, max_iter, seed):
    """Steps 1-2 on one point set: ``(points, index, cluster label)`` of the kept points, or
    ``None`` when none is left."""
    from stages.cluster import kmeans, mean_shift

    keep = pts[:, 4] * scale_si >= si_floor
    pts, idx = pts[keep], idx[keep]
    if pts.shape[0] == 0:
        return None
    # connected components of the points: one seed each
    grid = np.zeros(shape, bool)
    grid[tuple(idx.T)] = True
    comp, n_comp = ndi.label(grid, structure=np.ones((3, 3, 3), bool))
    comp_of = comp[tuple(idx.T)]
    del grid, comp
    sizes = np.bincount(comp_of, minlength=n_comp + 1)
    big = sizes[comp_of] >= min_voxels
    pts, idx, comp_of = pts[big], idx[big], comp_of[big]
    if pts.shape[0] == 0:
        return None
    ids, inverse = np.unique(comp_of, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    seeds = np.stack([np.bincount(inverse, weights=pts[:, j]) / counts for j in range(5)], axis=1)
    # the density is estimated on a sub-grid of the big components' points (cost)
    on_grid = np.all(idx % density_stride == 0, axis=1) | (counts[inverse] < SMALL_COMPONENT)
    dens = pts[on_grid].astype(np.float64)
    if method == "mean_shift":
        res = mean_shift(dens, bandwidth, seeds=seeds, device=device, kernel=kernel, dtype="float32",
                         max_iter=max_iter, tol=MEAN_SHIFT_TOL, cutoff=MEAN_SHIFT_CUTOFF,
                         seed=seed)
    else:
        res = kmeans(dens, min(len(ids), dens.shape[0]), device=device, dtype="float32", seed=seed)
    log.debug("candidates: %d points, %d density points, %d seeds, %d modes, %s iterations",
              len(pts), len(dens), len(seeds), len(res.centres), getattr(res, "n_iter", "?"))
    labels = cKDTree(res.centres).query(pts, k=1)[1]
    # a cluster = the points of one component sharing one mode
    group = inverse.astype(np.int64) * (len(res.centres) + 1) + labels
    _, cluster = np.unique(group, return_inverse=True)
    return pts, idx, cluster


def _measure(vol: Volume, clustered, *, hu_floor, scale_si, min_diameter_mm,
             max_diameter_mm, min_sphericity, min_voxels, ref_volume_mm3, centre_hu_power):
    """Steps 3-5: one row ``(centre_zyx_mm, diameter, score, volume, mean_hu, mean_si,
    sphericity, n)`` per cluster that passes the rules."""
    if clustered is None:
        return []
    pts, idx, cluster = clustered
    spacing = np.asarray(vol.spacing_mm)
    voxel_mm3 = float(np.prod(spacing))
    world = vol.index_to_world(idx)
    hu = vol.array[tuple(idx.T)].astype(np.float64)
    si = pts[:, 4].astype(np.float64) * scale_si
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    rows = []
    for members in np.split(order, bounds):
        n = members.size
        if n < min_voxels:
            continue
        w = world[members]
        mean = w.mean(axis=0)
        cov = np.cov((w - mean).T) if n > 1 else np.zeros((3, 3))
        evals, evecs = np.linalg.eigh(cov)
        proj = (w - mean) @ evecs
        # the mark: the density-weighted centre, on the dense core rather than the faint rim
        weight = np.clip(hu[members] - hu_floor, 0.0, None) ** centre_hu_power
        centre = (w * weight[:, None]).sum(axis=0) / weight.sum() if weight.sum() > 0 else mean
        extent = proj.max(axis=0) - proj.min(axis=0) + spacing.mean()
        diameter = float(extent.mean())
        sphericity = float(np.sqrt(max(evals[0], 0) / evals[2])) if evals[2] > 0 else 1.0
        if not (min_diameter_mm <= diameter <= max_diameter_mm) or sphericity < min_sphericity:
            continue
        volume = n * voxel_mm3
        mean_si = float(si[members].mean())
        si_term = float(np.clip((mean_si - SCORE_SI_LOW) / (1.0 - SCORE_SI_LOW), 0.0, 1.0))
        size_term = 1.0 - np.exp(-volume / ref_volume_mm3)
        score = sphericity * si_term ** SCORE_SI_POWER * size_term
        rows.append((centre, diameter, score, volume, float(hu[members].mean()), mean_si,
                     sphericity, n))
    return rows


def _masses(vol: Volume, lung: np.ndarray, mass_hu: float, min_diameter_mm: float):
    """Step 7: ``(rows, labels)``: one row per mass (the row layout of :func:`_measure`) and
    the masses' voxels labelled 1..n (0 elsewhere) on ``vol``'s grid."""
    spacing = np.asarray(vol.spacing_mm, float)
    dense = lung & (vol.array > mass_hu)
    if not dense.any():
        return [], None
    f = tuple(max(1, int(round(MASS_GRID_MM / s))) for s in spacing)
    coarse = block_mask(dense, f)
    sp = spacing * f
    core = ndi.distance_transform_edt(coarse, sampling=sp) > MASS_OPEN_MM
    if not core.any():
        return [], None
    opened = ndi.distance_transform_edt(~core, sampling=sp) <= MASS_OPEN_MM
    pieces, n = ndi.label(opened & coarse)
    if n == 0:
        return [], None
    labels = np.where(dense, unblock(pieces, f, dense.shape), 0)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    voxel_mm3 = float(np.prod(spacing))
    rows, keep = [], np.zeros(n + 1, np.int32)
    for i in np.flatnonzero(counts):
        if i == 0:
            continue
        diameter = float((6 * counts[i] * voxel_mm3 / np.pi) ** (1 / 3))
        if diameter <= min_diameter_mm:
            continue
        idx = np.argwhere(labels == i)
        w = vol.index_to_world(idx)
        mean = w.mean(axis=0)
        evals = np.linalg.eigvalsh(np.cov((w - mean).T))
        sphericity = float(np.sqrt(max(evals[0], 0) / evals[2])) if evals[2] > 0 else 1.0
        keep[i] = len(rows) + 1
        rows.append((mean, diameter, sphericity, counts[i] * voxel_mm3,
                     float(vol.array[tuple(idx.T)].mean()), float("nan"), sphericity, int(counts[i])))
    return rows, keep[labels] if rows else None


def _one_per_blob(rows, max_candidates: int):
    """Drop a row whose centre lies inside a better one (rows sorted best first); keep the
    best ``max_candidates``."""
    kept = []
    for r in rows:
        if all(np.linalg.norm(r[0] - k[0]) > k[1] / 2 for k in kept):
            kept.append(r)
        if len(kept) == max_candidates:
            break
    return kept


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
                    centre_hu_power: float = CENTRE_HU_POWER, blob_hu: float | None = BLOB_HU,
                    outside_hu: float | None = OUTSIDE_HU,
                    wall_pass_hu: float | None = WALL_PASS_HU,
                    wall_dedupe_mm: float = WALL_DEDUPE_MM, mass_hu: float | None = MASS_HU,
                    device=None,
                    seed: int = 0) -> pd.DataFrame:
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
        Most candidates returned (the best scored; default :data:`MAX_CANDIDATES`).
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
    centre_hu_power : float
        The mark is the cluster's mean position weighted by ``(HU - hu_floor) **
        centre_hu_power`` (0: plain mean); the measures use the plain mean.
    blob_hu : float or None
        Candidates in one compact blob of voxels denser than this (HU) are merged into
        the biggest (step 6); ``None`` turns the merge off.
    outside_hu : float or None
        Voxels outside the mask are set to this (HU) for the shape index (step 1);
        ``None`` (default, :data:`OUTSIDE_HU`) keeps them.
    wall_pass_hu : float or None
        Dense-voxel floor (HU) of the wall pass (step 1b; default :data:`WALL_PASS_HU`, the
        lung mask's air threshold); ``None`` turns it off.  Ignored when ``outside_hu`` is set.
    wall_dedupe_mm : float
        A wall-pass mark this close (mm) to a first-pass mark is not added.
    mass_hu : float or None
        Density floor (HU) of the mass pass (step 7; default :data:`MASS_HU`); ``None``
        turns it off (nothing over ``max_diameter_mm`` is then found).
    device : str, optional
        Torch device for the clustering; ``None``: CUDA when available, else CPU.
    seed : int
        Seed of the k-means initialisation.

    Returns
    -------
    pandas.DataFrame
        One row per candidate, best first: ``seriesuid, coordX, coordY, coordZ`` (world LPS
        mm, LUNA16 order), ``diameter_mm``, ``finding`` (``"nodule"``, or ``"mass"`` over
        :data:`MASS_DIAMETER_MM`), ``score`` (0..1), then ``volume_mm3, mean_hu,
        shape_index, sphericity, dist_to_pleura_mm, n_voxels, mass_id`` (step 7).

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
    if not np.isfinite(centre_hu_power) or centre_hu_power < 0:
        raise ValueError(f"centre_hu_power must be a finite number >= 0, got {centre_hu_power!r}")
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
    if outside_hu is not None and not np.isfinite(outside_hu):
        raise ValueError(f"outside_hu must be a finite number or None, got {outside_hu!r}")
    if wall_pass_hu is not None and not np.isfinite(wall_pass_hu):
        raise ValueError(f"wall_pass_hu must be a finite number or None, got {wall_pass_hu!r}")
    if not np.isfinite(wall_dedupe_mm) or wall_dedupe_mm < 0:
        raise ValueError(f"wall_dedupe_mm must be a finite number >= 0, got {wall_dedupe_mm!r}")
    def wall_as(hu):  # the scan with every voxel outside the lung mask set to hu
        return vol.with_array(np.where(mask.array != 0, vol.array,
                                       np.asarray(hu).astype(vol.array.dtype)))

    fkw = dict(hu_floor=hu_floor, sigma_mm=sigma_mm, scale_mm=scale_mm, scale_hu=scale_hu,
               scale_si=scale_si)
    pts, idx = extract_features(vol if outside_hu is None else wall_as(outside_hu), mask, **fkw)
    ckw = dict(method=method, bandwidth=bandwidth, si_floor=si_floor, scale_si=scale_si,
               min_voxels=min_voxels, density_stride=density_stride, device=device,
               kernel=kernel, max_iter=mean_shift_max_iter, seed=seed)
    mkw = dict(hu_floor=hu_floor, scale_si=scale_si, min_diameter_mm=min_diameter_mm,
               max_diameter_mm=max_diameter_mm, min_sphericity=min_sphericity,
               min_voxels=min_voxels, ref_volume_mm3=ref_volume_mm3,
               centre_hu_power=centre_hu_power)
    lung = mask.array != 0
    passes = [(pts, idx)]
    if wall_pass_hu is not None and outside_hu is None and len(pts):
        # the wall pass: dense voxels whose shape index the chest wall changes, seen with the
        # wall as air (a juxta-pleural nodule's core is a blob there, a plateau here); the
        # shape index is taken only at the voxels denser than wall_pass_hu, which come in
        # the same (argwhere) order as in pts
        dense = vol.array[tuple(idx.T)] > wall_pass_hu
        dense_mask = mask.with_array((lung & (vol.array > wall_pass_hu)).view(np.uint8))
        pts_air, _ = extract_features(wall_as(WALL_AIR_HU), dense_mask, **fkw)
        changed = np.abs(pts_air[:, 4] - pts[dense, 4]) * scale_si > WALL_SI_CHANGE
        passes.append((pts_air[changed], idx[dense][changed]))
    found = []
    for p_pts, p_idx in passes:
        rows = _measure(vol, _cluster(vol.shape, p_pts, p_idx, **ckw), **mkw)
        if rows and blob_hu is not None:
            rows = _one_per_compact_blob(rows, vol, lung, blob_hu, max_diameter_mm)
        found.append(_one_per_blob(sorted(rows, key=lambda r: -r[2]), max_candidates))
    rows = found[0]
    if len(found) > 1 and found[1]:
        # a wall-pass mark joins unless a first-pass mark lies within wall_dedupe_mm of it
        first = np.array([r[0] for r in rows]).reshape(-1, 3)
        extra = [r for r in found[1] if not len(first)
                 or np.min(np.linalg.norm(first - r[0], axis=1)) > wall_dedupe_mm]
        rows = sorted(rows + extra, key=lambda r: -r[2])[:max_candidates]
        log.debug("candidates: wall pass added %d of %d marks", len(extra), len(found[1]))
    mass_of = [0] * len(rows)
    if mass_hu is not None:
        masses, mass_labels = _masses(vol, lung, mass_hu, max_diameter_mm)
        if masses:  # one lesion, one finding: marks inside a mass are tagged with it
            at = np.clip(np.round(vol.world_to_index(np.array([r[0] for r in rows]).reshape(-1, 3))).astype(int),
                         0, np.asarray(vol.shape) - 1)
            inside = mass_labels[tuple(at.T)] if rows else np.zeros(0, int)
            tagged = sorted(zip(rows + masses, list(inside) + list(range(1, len(masses) + 1))),
                            key=lambda t: -t[0][2])[:max_candidates]
            rows, mass_of = [t[0] for t in tagged], [int(t[1]) for t in tagged]
            log.debug("candidates: %d masses, %d marks inside them", len(masses), int((inside > 0).sum()))
    if not rows:
        return _empty(vol.scan_id)
    spacing = np.asarray(vol.spacing_mm)
    centres = np.array([r[0] for r in rows])
    centre_idx = vol.world_to_index(centres)
    df = pd.DataFrame({
        "seriesuid": vol.scan_id,
        "coordX": centres[:, 2], "coordY": centres[:, 1], "coordZ": centres[:, 0],
        "diameter_mm": [r[1] for r in rows],
        "finding": ["mass" if r[1] > MASS_DIAMETER_MM else "nodule" for r in rows],
        "score": [r[2] for r in rows],
        "volume_mm3": [r[3] for r in rows], "mean_hu": [r[4] for r in rows],
        "shape_index": [r[5] for r in rows], "sphericity": [r[6] for r in rows],
        "dist_to_pleura_mm": [_dist_to_pleura(lung, spacing, c, PLEURA_SEARCH_MM)
                              for c in centre_idx],
        "n_voxels": np.array([r[7] for r in rows], np.int64),
        "mass_id": np.array(mass_of, np.int64),
    })
    return df
