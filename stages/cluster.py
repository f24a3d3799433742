"""Candidate clustering: mean shift (Gaussian or flat kernel) and k-means, batched in torch.

Both functions take and return numpy arrays; torch is used only inside, on the GPU when
one is present (``device=None``) or on the device named.  Work is vectorised over points
and seeds: the only Python loops run over iterations, chunks of seeds and (for the
k-means initialisation) centres.

Mean shift has two engines.

``mode="exact"``
    Every seed is moved with *all* points each iteration: squared distances come from
    ``|a|^2 + |b|^2 - 2 a.b`` (a matrix product) on chunks of seeds, so memory stays
    bounded; the Gaussian kernel is not truncated.  Cost O(seeds x N) per iteration.
``mode="grid"``
    Points are sorted by the id of a grid cell of side ``cutoff / cells_per_reach``
    bandwidths and cut once into tiles of consecutive points, the seeds each iteration the
    same way; the neighbours of a tile of either kind (the cells within the kernel's reach,
    a ball of cells) are contiguous runs of the other kind, and every (seed tile, point
    tiles) block (many seeds) or (point tile, seeds) block (few seeds) is solved as a small
    dense problem with batched matrix products, the Gaussian cut at ``cutoff`` bandwidths.
    Four further savings: path merging (a seed that stops in a small cell another seed has
    stopped in follows that seed, after Carreira-Perpinan's spatial discretisation, CVPR
    2006), optional bin seeding (scikit-learn's: seeds at the occupied bins of one
    bandwidth), optional seed thinning (one data point per occupied cell of ``seed_cell``),
    optional binned points (the kernel summed over bin means weighted by their counts).
    Cost O(seeds x neighbours) per iteration.  With ``coarse_cutoff`` (opt-in) it runs
    coarse-to-fine: every seed climbs with the Gaussian cut at ``coarse_cutoff`` bandwidths,
    and only the distinct end points climb on with the full ``cutoff``, so the modes and
    densities are the full kernel's at a fraction of the (seed, point) pairs.

In both, seeds that moved less than ``tol`` bandwidths are dropped from the work, modes
closer than ``merge_radius`` are merged keeping the denser one (scikit-learn's rule), and
every point is labelled by its nearest mode (so the labels depend on the modes found, not on
any seed's path).  Cluster 0 is the largest.

This module holds the API and its input checks; the work is done by private modules:
:mod:`stages._meanshift` (the iteration both engines share, the exact engine, mode merging),
:mod:`stages._meanshift_grid` (the grid engine), :mod:`stages._meanshift_paths` (path
merging, snapping), :mod:`stages._kmeans` and :mod:`stages._cluster_dense` (chunked
distances shared by all).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stages import _kmeans, _meanshift
from stages._cluster_dense import pair_budget
from stages.device import pick_device

__all__ = ["MeanShiftResult", "KMeansResult", "mean_shift", "kmeans"]

#: ``mode="auto"`` uses the exact engine up to this many points, the grid engine above.
AUTO_EXACT_MAX_POINTS = 5000
#: Grid engine: default side (bandwidths) of the cells of the seeds' path merging.
PATH_CELL = 0.02
#: Grid engine: default cut of the Gaussian (bandwidths); see Notes of :func:`mean_shift`.
GRID_CUTOFF = 5.0
#: Grid engine: default cells per reach of each kernel.  The flat kernel's reach of one
#: bandwidth makes cells of 0.5 in every feature at 2, hundreds of neighbour rows a tile:
#: on the lung1 20k sample, bin seeding, 1 thread, 14.0 s at 2 and 1.7 s at 1, same clusters.
CELLS_PER_REACH = {"gaussian": 2, "flat": 1}
#: Grid engine, opt-in ``coarse_cutoff``: the value measured with ``cutoff=6`` (see Notes of
#: :func:`mean_shift`).  Not the default: it agrees with exact at 20k points (ARI 0.997) but
#: only 0.936 with one climb at 100k (lung1 tissue).
COARSE_CUTOFF = 4.0

_KERNELS = ("gaussian", "flat")
_MODES = ("auto", "exact", "grid")


@dataclass(frozen=True, eq=False)
class MeanShiftResult:
    """Output of :func:`mean_shift`.

    Attributes
    ----------
    centres : (K, D) float64 ndarray
        Modes, in the units of the input points, largest cluster first.
    labels : (N,) int64 ndarray
        Index into ``centres`` of each point's nearest mode.
    cluster_sizes : (K,) int64 ndarray
        Points per cluster, non-increasing.
    n_iter : int
        Iterations run (the slowest seed's; coarse-to-fine: both stages' added).
    n_seeds : int
        Seeds started (all points, the thinned points, the bin seeds or the seeds given).
    mode : str
        Engine used: ``"exact"`` or ``"grid"``.
    device : str
        Torch device the work ran on.
    """

    centres: np.ndarray
    labels: np.ndarray
    cluster_sizes: np.ndarray
    n_iter: int
    n_seeds: int
    mode: str
    device: str


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes
    ----------
    centres : (k, D) float64 ndarray
        Cluster centres, in the units of the input points.
    labels : (N,) int64 ndarray
        Index into ``centres`` of each point's nearest centre.
    n_iter : int
        Lloyd iterations run.
    inertia : float
        Sum of squared distances of the points to their centres.
    """

    centres: np.ndarray
    labels: np.ndarray
    n_iter: int
    inertia: float


# --------------------------------------------------------------------------- checks


def _resolve_dtype(dtype, dev):
    import torch

    if dtype is None:
        return torch.float64 if dev.type == "cpu" else torch.float32
    table = {"float32": torch.float32, "float64": torch.float64,
             torch.float32: torch.float32, torch.float64: torch.float64,
             np.float32: torch.float32, np.float64: torch.float64}
    try:
        return table[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be None, 'float32' or 'float64', got {dtype!r}") from None


def _check_points(points, name="points") -> np.ndarray:
    arr = np.asarray(points)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be a numeric (N, D) array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (N points, D features), "
                         f"got shape {arr.shape}; reshape a single feature with x[:, None]")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; drop or fill the {int((~np.isfinite(arr)).sum())} "
                         "NaN/inf values first")
    return arr


def _check_positive(name, value, *, integer=False, allow_none=False):
    if value is None and allow_none:
        return None
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return int(value)
    try:
        val = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    if not (math.isfinite(val) and val > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return val


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")


def _check_bandwidth(bandwidth, n_dims) -> np.ndarray:
    bw = np.asarray(bandwidth, dtype=np.float64) if not isinstance(bandwidth, str) else None
    if bw is None or bw.ndim > 1:
        raise ValueError(f"bandwidth must be a number or a ({n_dims},) array (one per feature), "
                         f"got {bandwidth!r}")
    if bw.ndim == 0:
        bw = np.full(n_dims, float(bw))
    if bw.shape != (n_dims,):
        raise ValueError(f"bandwidth has {bw.shape[0]} values but the points have {n_dims} "
                         "features; give one number or one per feature")
    if not np.all(np.isfinite(bw) & (bw > 0)):
        raise ValueError(f"bandwidth must be finite and > 0 in every feature, got {bw.tolist()}")
    return bw


def _check_cell(name, value, off):
    """A cell side in bandwidths, >= 0 (0: ``off``), or None (the engine's default)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or None, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0 bandwidths (0: {off}), got {value!r}")
    return value


def _check_bin_seeding(bin_seeding):
    if bin_seeding is not None and not isinstance(bin_seeding, (bool, np.bool_)):
        raise TypeError(f"bin_seeding must be True, False or None, got {bin_seeding!r}")
    return bool(bin_seeding)


def _check_seeds(seeds, n_dims, bin_seeding):
    if seeds is None:
        return None
    seeds = _check_points(seeds, "seeds")
    if seeds.shape[1] != n_dims:
        raise ValueError(f"seeds have {seeds.shape[1]} features but points have {n_dims}")
    if bin_seeding:
        raise ValueError("give either seeds or bin_seeding=True, not both")
    return seeds


def _check_grid_dims(grid_dims, n_dims):
    if grid_dims is None:
        return None
    gd = np.asarray(grid_dims)
    if gd.ndim != 1 or gd.size == 0 or not np.issubdtype(gd.dtype, np.integer) \
            or gd.min() < 0 or gd.max() >= n_dims or len(set(gd.tolist())) != gd.size:
        raise ValueError(f"grid_dims must be distinct feature indices in [0, {n_dims}), "
                         f"got {grid_dims!r}")
    return sorted(gd.tolist())


# --------------------------------------------------------------------------- mean shift


def mean_shift(points, bandwidth, *, kernel="gaussian", max_iter=50, tol=1e-3, seeds=None,
               mode="auto", cutoff=GRID_CUTOFF, bin_seeding=None, min_bin_freq=1,
               merge_radius=None, grid_dims=None, path_cell=None, seed_cell=0.0, bin_size=None,
               cells_per_reach=None, coarse_cutoff=None, device=None, dtype=None,
               seed=0) -> MeanShiftResult:
    """Cluster points by mean shift: move seeds uphill on the kernel density to its modes.

    Parameters
    ----------
    points : (N, D) array_like of float
        One row per point, features in any units (e.g. ``z, y, x`` in mm, HU, shape index).
    bandwidth : float or (D,) array_like of float
        Kernel width in the units of the points, one for all features or one per feature
        (each feature is divided by its own, so the kernel is isotropic afterwards).
    kernel : {"gaussian", "flat"}
        ``"gaussian"``: weights ``exp(-d^2 / (2 h^2))``; ``"flat"``: weight 1 within one
        bandwidth, as :class:`sklearn.cluster.MeanShift`.
    max_iter : int
        Most iterations per seed (coarse-to-fine: in each stage).
    tol : float
        A seed has converged when it moves less than ``tol`` bandwidths in an iteration.
    seeds : (M, D) array_like of float, optional
        Starting positions (input units).  Default: the bin seeds when ``bin_seeding``,
        else one point per cell of ``seed_cell`` when given, else every point.
    mode : {"auto", "exact", "grid"}
        Engine (see the module notes).  ``"auto"``: exact up to
        ``AUTO_EXACT_MAX_POINTS`` points, grid above.
    cutoff : float
        The grid engine truncates the Gaussian at ``cutoff`` bandwidths (weight
        ``exp(-cutoff^2/2)``: 0.011 at 3, 3.7e-6 at 5, 1.5e-8 at 6).  Default
        ``GRID_CUTOFF`` (5).  Ignored by the flat kernel (reach 1) and by the exact engine.
    bin_seeding : bool, optional
        Seed from the occupied bins of a grid of one bandwidth (at least ``min_bin_freq``
        points each) instead of every point, as scikit-learn's.  Default False.
    min_bin_freq : int
        Fewest points for a bin to give a seed.
    merge_radius : float, optional
        Modes closer than this many *bandwidths* are merged, the denser kept.  Default 1
        (scikit-learn merges within one bandwidth).
    grid_dims : sequence of int, optional
        Features hashed by the grid engine; default: those spanning at least three
        cells.  The kernel always uses all features.
    path_cell : float, optional
        Path merging (spatial discretisation): a seed that stops, after an iteration, in a
        cell of this side (bandwidths) where another seed has stopped before follows that
        seed to its mode instead of climbing on alone.  Default ``PATH_CELL`` (0.02) for the
        grid engine, 0 (off) for the exact one.
    seed_cell : float
        Seed thinning (opt-in), when neither ``seeds`` nor ``bin_seeding`` is given: one
        seed per occupied cell of this side (bandwidths), the cell's first point in input
        order, so the seeds are data points and the kernel still sums over every point.
        Default 0: every point a seed.  Faster on dense clouds, at the cost of the modes
        whose basins no seed falls in (see Notes).
    bin_size : float, optional
        Pool the points in cubic bins of this side (bandwidths) and sum the kernel over
        the bins' means weighted by their counts (a binned kernel density estimate); the
        labels are still given to every point.  Default: no pooling.  Pays on dense
        clouds (a whole lung at 1 bandwidth: 5.5 points a bin), at some agreement with
        the exact engine (see Notes).
    cells_per_reach : int, optional
        The grid engine's cells have side ``cutoff / cells_per_reach`` (the flat kernel's
        reach: 1) and a cell's neighbours are the cells within that reach of it (a ball of
        cells): 2 visits about 40 % fewer candidate points than 1 on lung clouds.  Default
        ``CELLS_PER_REACH`` of the kernel: 2 for the Gaussian, 1 for the flat kernel.
    coarse_cutoff : float, optional
        Grid engine, Gaussian kernel, ``coarse_cutoff < cutoff`` (e.g. 4 with ``cutoff=6``):
        coarse-to-fine.  Every
        seed first climbs with the Gaussian cut at ``coarse_cutoff`` bandwidths (float32
        arithmetic; stops at 0.01 bandwidths of movement, paths merged in cells of 0.05),
        and only the distinct end points (one per cell of 0.1 bandwidths) climb on with the
        full ``cutoff`` to ``tol``: the modes and their densities are the full kernel's,
        found from far fewer seeds.  Default None: one climb.  ``COARSE_CUTOFF`` (4) is the
        value measured (Notes).
    device : str or torch.device, optional
        ``None``/``"auto"``: CUDA when available, else CPU.
    dtype : {"float32", "float64"}, optional
        Working precision; default float32, except the exact engine on the CPU (float64:
        the reference).
    seed : int
        Accepted for a uniform interface; mean shift draws no random numbers, so the result
        depends on ``seed`` not at all (and on the device only within rounding).

    Returns
    -------
    MeanShiftResult
        ``centres`` (K, D) in input units, ``labels`` (N,), ``cluster_sizes`` (K,) sorted
        largest first, ``n_iter``, ``n_seeds``, ``mode``, ``device``.

    Raises
    ------
    TypeError
        Non-numeric points or seeds, non-integer ``max_iter``/``min_bin_freq``.
    ValueError
        Wrong shapes, non-finite values, non-positive bandwidth or settings, unknown
        ``kernel``/``mode``, bin seeding that leaves no seed.

    Notes
    -----
    The engines differ by the truncation at ``cutoff``, path merging, snapping and, where
    asked for, seed thinning, bin seeding and binned points.  The truncation matters in five
    dimensions: the Gaussian keeps ``P(chi2_D <= cutoff^2)`` of its mass, 89 % at
    ``cutoff=3`` for D = 5 (99.98 % at 5), and on sparse 5-D clouds with hundreds of weak
    modes this moves modes.  Measured on the lung1 tissue cloud of ``bench/cluster.py`` (the
    pipeline's feature scales as bandwidth; adjusted Rand index of the labels against the
    exact engine at 20k points, and at 100k against the grid engine with the cut at 7, every
    point a seed, no path merging or snapping, float64, which equals the exact engine at 20k,
    ARI 1.0): the defaults (cut at 5, float32) 0.9987 and 0.9958; the cut at 6 (the
    defaults of 4c91416) 0.9987 and 0.9953; at 4, 0.9975 and 0.959.  Seed thinning keeps
    20k points exact-grade but not 100k, whose denser cells hold points of several small
    basins: ``seed_cell=1`` 0.9994 and 0.956, ``seed_cell=2`` 0.987 and 0.911 (cut at 5);
    so it stays opt-in.  Coarse-to-fine with ``coarse_cutoff=4`` (and ``cutoff=6``) agrees
    with the cut at 6 to 0.997 at 20k and 0.936 at 100k; ``path_cell=0.05`` 0.991 at 20k;
    the ``fast`` preset of ``bench/cluster.py`` (``cutoff=3``, bin seeding,
    ``bin_size=1``) 0.82.  Against the exact engine itself at 100k (run once, 7,189 s) the
    defaults give 0.9959 and ``path_cell`` 0.03 and 0.04 give 0.991 and 0.977 (0.9983 and
    0.9982 at 20k), so path merging stays at 0.02; without it (``path_cell=0``) a whole
    lung takes 2.5x as long.  ``bench/cluster.json`` records the time of each setting.

    Examples
    --------
    >>> pts = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    >>> res = mean_shift(pts, 1.0, device="cpu")
    >>> res.labels.tolist()
    [0, 0, 0, 1, 1]
    >>> np.round(res.centres, 2).tolist()
    [[0.03, 0.03], [5.05, 5.0]]
    """
    pts_np = _check_points(points)
    n, d = pts_np.shape
    bw = _check_bandwidth(bandwidth, d)
    kernel = _check_choice("kernel", kernel, _KERNELS)
    mode = _check_choice("mode", mode, _MODES)
    max_iter = _check_positive("max_iter", max_iter, integer=True)
    tol = _check_positive("tol", tol)
    cutoff = _check_positive("cutoff", cutoff)
    min_bin_freq = _check_positive("min_bin_freq", min_bin_freq, integer=True)
    merge_radius = _check_positive("merge_radius", merge_radius, allow_none=True) or 1.0
    cells_per_reach = (CELLS_PER_REACH[kernel] if cells_per_reach is None
                       else _check_positive("cells_per_reach", cells_per_reach, integer=True))
    bin_size = _check_positive("bin_size", bin_size, allow_none=True)
    coarse_cutoff = _check_positive("coarse_cutoff", coarse_cutoff, allow_none=True)
    path_cell = _check_cell("path_cell", path_cell, "no path merging")
    seed_cell = _check_cell("seed_cell", seed_cell, "every point a seed") or 0.0
    bin_seeding = _check_bin_seeding(bin_seeding)
    _check_seed(seed)
    seeds_np = _check_seeds(seeds, d, bin_seeding)
    grid_dims = _check_grid_dims(grid_dims, d)
    dev = pick_device(device)
    engine = mode if mode != "auto" else ("exact" if n <= AUTO_EXACT_MAX_POINTS else "grid")
    tdtype = _resolve_dtype(dtype if dtype is not None or engine == "exact" else "float32", dev)
    if path_cell is None:
        path_cell = PATH_CELL if engine == "grid" else 0.0
    opts = _meanshift.Options(kernel=kernel, engine=engine, max_iter=max_iter, tol=tol,
                              cutoff=cutoff, bin_seeding=bin_seeding, min_bin_freq=min_bin_freq,
                              merge_radius=merge_radius, grid_dims=grid_dims, path_cell=path_cell,
                              bin_size=bin_size, cells_per_reach=cells_per_reach,
                              budget=pair_budget(dev), coarse_cutoff=coarse_cutoff,
                              seed_cell=seed_cell)
    centres, labels, sizes, n_iter, n_seeds = _meanshift.run(pts_np, bw, seeds_np, opts, dev, tdtype)
    return MeanShiftResult(centres=centres, labels=labels, cluster_sizes=sizes, n_iter=n_iter,
                           n_seeds=n_seeds, mode=engine, device=str(dev))


# --------------------------------------------------------------------------- k-means


def kmeans(points, k, *, init="farthest", max_iter=100, tol=1e-4, device=None,
           dtype="float32", seed=0) -> KMeansResult:
    """Lloyd's k-means with scikit-learn's stopping rules, on the GPU when present.

    Parameters
    ----------
    points : (N, D) array_like of float
        One row per point (scale the features first: distances are Euclidean).
    k : int
        Number of clusters, ``1 <= k <= N``.
    init : {"farthest", "k-means++"}
        ``"farthest"``: a random first centre, then each next centre the point farthest
        from those chosen; ``"k-means++"``: scikit-learn's greedy k-means++, each next
        centre the best (least summed squared distance) of ``2 + int(log(k))`` points drawn
        with probability proportional to the squared distance to the nearest chosen one.
    max_iter : int
        Most Lloyd iterations.
    tol : float
        Stop when the summed squared centre shift is at most ``tol`` times the mean feature
        variance, or at once when no label changed (scikit-learn's rules); labels are then
        those of the final centres.
    device : str or torch.device, optional
        ``None``/``"auto"``: CUDA when available, else CPU.
    dtype : {"float32", "float64"}
        Precision of the point-to-centre distances, on either device.  Centres are always
        float64 means of the points (exact sums), the inertia a float64 sum.
    seed : int
        Seed of the initialisation; the same seed gives the same labels on the same
        device.

    Returns
    -------
    KMeansResult
        ``centres`` (k, D), ``labels`` (N,), ``n_iter``, ``inertia``.

    Raises
    ------
    TypeError
        Non-numeric points, non-integer ``k``/``max_iter``/``seed``.
    ValueError
        Wrong shape, non-finite values, ``k`` outside ``[1, N]``, unknown ``init``.

    Notes
    -----
    The labels, centres and iteration count are those of scikit-learn's ``KMeans``
    (``algorithm="lloyd"``) from the same first centres, up to the rounding of ``dtype``;
    :mod:`stages._kmeans` reaches them with less work: Hamerly's distance bounds skip the
    points that cannot change cluster, and the cluster sums, kept exact in 64-bit fixed
    point, are updated with the points that moved only.  A cluster left empty by an
    iteration is given the point farthest from its own centre (the next farthest for the
    next empty cluster), as scikit-learn does.  On the CPU the call runs on torch's threads;
    :data:`stages._kmeans.CPU_THREADS` caps them for the call (restored after) where the
    cores are shared with other work.

    Examples
    --------
    >>> pts = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> res = kmeans(pts, 2, device="cpu")
    >>> sorted(np.round(res.centres, 2).tolist())
    [[0.05, 0.0], [5.05, 5.0]]
    >>> bool(res.labels[0] == res.labels[1] != res.labels[2])
    True
    """
    pts_np = _check_points(points)
    n = pts_np.shape[0]
    k = _check_positive("k", k, integer=True)
    if k > n:
        raise ValueError(f"k={k} is larger than the number of points ({n}); use k <= {n}")
    if init not in ("farthest", "k-means++"):
        raise ValueError(f"init must be 'farthest' or 'k-means++', got {init!r}")
    max_iter = _check_positive("max_iter", max_iter, integer=True)
    tol = _check_positive("tol", tol)
    _check_seed(seed)
    dev = pick_device(device)
    centres, labels, n_iter, inertia = _kmeans.run(pts_np, k, init=init, max_iter=max_iter, tol=tol,
                                                   seed=seed, device=dev,
                                                   dtype=_resolve_dtype(dtype, dev))
    return KMeansResult(centres=centres, labels=labels, n_iter=n_iter, inertia=inertia)
