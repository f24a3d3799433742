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
    bandwidths.  The seeds of one cell share one candidate list: the points of the cells
    within the kernel's reach around it (a ball of cells), gathered as contiguous index
    ranges of the sorted points (``searchsorted``), and every (seed tile, candidate tile)
    block is solved as a small dense problem with batched matrix products.  Three further
    savings: path merging (a seed that stops in a small cell another seed has stopped in
    follows that seed, after Carreira-Perpinan's spatial discretisation, CVPR 2006),
    optional bin seeding (scikit-learn's: seeds at the occupied bins of one bandwidth),
    optional binned points (the kernel summed over bin means weighted by their counts).
    Cost O(seeds x neighbours) per iteration.

In both, seeds that moved less than ``tol`` bandwidths are dropped from the work, modes
closer than ``merge_radius`` are merged keeping the denser one (scikit-learn's rule), and
every point is labelled by its nearest mode.  Cluster 0 is the largest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stages.device import pick_device

__all__ = ["MeanShiftResult", "KMeansResult", "mean_shift", "kmeans"]

#: ``mode="auto"`` uses the exact engine up to this many points, the grid engine above.
AUTO_EXACT_MAX_POINTS = 5000
#: (seed, point) pairs handled at once: bounds the memory of one chunk (about 100 bytes
#: per pair for 5-D float32 points).
PAIR_BUDGET = {"cpu": 1 << 21, "cuda": 1 << 26}
#: Grid engine: a moving seed closer than this many bandwidths to a converged one stops
#: there (it would reach the same mode; saves the slow tail of Gaussian mean shift).
SNAP_RADIUS = 0.1
#: Grid engine: side (bandwidths) of the cells of the seeds' path merging; 0 turns it off.
PATH_CELL = 0.02
#: (seeds, points) shapes of the grid engine's dense blocks per device type; each call takes
#: the one with the least padding (few seeds a cell: 4 x 128; many: 32 x 16).  On an H100
#: the smaller blocks' extra gathers cost more than their padding saves (whole-lung cloud:
#: 4.7 s with these shapes, 3.8 s with 16 x 64), on 2 CPU cores the padding dominates.
TILE_SHAPES = {"cpu": ((4, 128), (8, 64), (16, 32), (32, 16)), "cuda": ((16, 64),)}
#: Hashed grid dimensions are chosen among those spanning at least this many cells.
MIN_CELLS_TO_HASH = 3
#: At most this many dimensions are hashed (3**k neighbour cells per seed).
MAX_HASHED_DIMS = 5

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
        Iterations run (the slowest seed's).
    n_seeds : int
        Seeds started (all points, the bin seeds or the seeds given).
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


# --------------------------------------------------------------------------- grid


class _Grid:
    """Points sorted by the id of a regular grid over some of their dimensions.

    Cells have side ``reach / per_reach``; the neighbour cells of a cell are those within
    ``per_reach`` cells along every hashed dimension whose nearest corner is within
    ``reach`` (a ball of cells, not a cube; corners are pruned from ``per_reach=3`` on, in
    all hashed dimensions but the last).  Finer cells fit the reach closer: on the lung1
    tissue cloud at ``reach=3`` a seed's candidates fall from 8.1k (side ``reach``) to
    5.1k (``per_reach=2``) and 3.9k (``per_reach=3``).  The last hashed dimension's cells of
    one neighbour row are contiguous in the sort order, so each row is one index range.
    """

    def __init__(self, pts, reach, dims, per_reach=1):
        import torch

        m = int(per_reach)
        cell = reach / m
        self.dims = dims
        self.cell = cell
        self.m = m
        sub = pts[:, dims]
        self.lo = sub.min(0).values
        coords = torch.floor((sub - self.lo) / cell).long() + m  # m empty cells of padding
        self.sizes = coords.max(0).values + 1 + m
        strides = torch.ones(len(dims), dtype=torch.long, device=pts.device)
        for i in range(len(dims) - 2, -1, -1):
            strides[i] = strides[i + 1] * self.sizes[i + 1]
        if float(self.sizes.double().prod()) > 2 ** 62:
            raise ValueError("the grid over the points is too large; increase bandwidth or cutoff")
        self.strides = strides
        ids = (coords * strides).sum(1)
        order = torch.argsort(ids, stable=True)
        self.order = order
        self.ids = ids[order].contiguous()
        self.pts = pts[order].contiguous()
        self.mass = None  # per-point weights (binned points), in the sorted order
        k = len(dims)
        if k > 1:
            axis = torch.arange(-m, m + 1, device=pts.device)
            grids = torch.meshgrid(*([axis] * (k - 1)), indexing="ij")
            off = torch.stack([g.reshape(-1) for g in grids], 1)
            gap = (off.abs() - 1).clamp(min=0).double() * cell     # nearest-corner distance
            off = off[(gap * gap).sum(1) <= reach * reach + 1e-9]
            self.offsets = (off * strides[:-1]).sum(1)
        else:
            self.offsets = torch.zeros(1, dtype=torch.long, device=pts.device)

    def cell_ids(self, queries):
        """Cell id of each query; queries outside the grid go to the nearest inner cell,
        whose neighbourhood holds every point theirs would."""
        import torch

        c = torch.floor((queries[:, self.dims] - self.lo) / self.cell).long() + self.m
        c = torch.minimum(torch.clamp(c, min=self.m), self.sizes - 1 - self.m)
        return (c * self.strides).sum(1)

    def ranges(self, queries):
        """(Q, R) start and end indices into the sorted points of each query's neighbour cells."""
        return self.ranges_of_cells(self.cell_ids(queries))

    def ranges_of_cells(self, base):
        """(Q, R) start and end indices into the sorted points of the cells around ``base``."""
        import torch

        lo_ids = (base[:, None] + self.offsets[None, :] - self.m).reshape(-1)
        hi_ids = (base[:, None] + self.offsets[None, :] + self.m).reshape(-1)
        start = torch.searchsorted(self.ids, lo_ids, right=False)
        end = torch.searchsorted(self.ids, hi_ids, right=True)
        n_q = base.shape[0]
        return start.reshape(n_q, -1), end.reshape(n_q, -1)


def _chunks_by_cost(cost, budget):
    """Split ``range(len(cost))`` into consecutive slices whose summed cost is about ``budget``."""
    import torch

    n = cost.numel()
    if n == 0:
        return []
    csum = torch.cumsum(cost, 0)
    total = int(csum[-1])
    if total <= budget:
        return [(0, n)]
    marks = torch.arange(budget, total, budget, device=cost.device, dtype=csum.dtype)
    cuts = torch.searchsorted(csum, marks, right=True).tolist()
    bounds, prev = [], 0
    for cut in cuts + [n]:
        cut = max(cut, prev + 1)  # a single query over budget still gets its own chunk
        if cut > n:
            break
        bounds.append((prev, cut))
        prev = cut
    if prev < n:
        bounds.append((prev, n))
    return bounds


def _expand_pairs(start, end):
    """Flatten (Q, R) index ranges into (query index, point index) pairs."""
    import torch

    n_q, n_r = start.shape
    counts = (end - start).clamp(min=0).reshape(-1)
    total = int(counts.sum())
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=start.device), counts,
                                  output_size=total)
    first = torch.cumsum(counts, 0) - counts
    point = start.reshape(-1)[seg] + (torch.arange(total, device=start.device) - first[seg])
    return torch.div(seg, n_r, rounding_mode="floor"), point


def _weights(d2, kernel, reach2):
    import torch

    if kernel == "flat":
        return (d2 <= 1.0).to(d2.dtype)
    w = torch.exp(-0.5 * d2)
    if reach2 is not None:
        w = torch.where(d2 <= reach2, w, torch.zeros((), dtype=d2.dtype, device=d2.device))
    return w


def _tile_shape(s_count, c_count):
    """The block shape of :data:`TILE_SHAPES` that computes the fewest (seed, point) pairs,
    padding included, for cells of ``s_count`` seeds and ``c_count`` candidate points."""
    import torch

    choices = TILE_SHAPES["cuda" if s_count.device.type == "cuda" else "cpu"]
    if len(choices) == 1:
        return choices[0]
    shapes = torch.tensor(choices, device=s_count.device)
    ts, tp = shapes[:, :1], shapes[:, 1:]
    cost = (((s_count[None] + ts - 1) // ts) * ((c_count[None] + tp - 1) // tp)).sum(1) \
        * ts[:, 0] * tp[:, 0]
    return choices[int(torch.argmin(cost))]


def _shift_grid(grid, pos, kernel, reach2, budget, tile_seeds=None, tile_points=None):
    """Kernel-weighted sums of the grid points around each position: (numerator, denominator).

    Seeds are grouped by grid cell; all seeds of a cell share one candidate list (the points
    of the cells around it).  Each cell's seeds are cut into tiles of ``tile_seeds`` and
    its candidates into tiles of ``tile_points`` (default: the device's :data:`TILE_SHAPES`
    entry with the least padding); every (seed tile, candidate tile) block is a small dense problem,
    solved for many blocks at once with batched matrix products.
    """
    import torch

    dev, dt = pos.device, pos.dtype
    n_s, n_d = pos.shape
    cell = grid.cell_ids(pos)
    s_order = torch.argsort(cell, stable=True)
    ucell, s_count = torch.unique_consecutive(cell[s_order], return_counts=True)
    s_first = torch.cumsum(s_count, 0) - s_count
    start, end = grid.ranges_of_cells(ucell)
    _, cand = _expand_pairs(start, end)                       # candidates grouped by cell
    c_count = (end - start).clamp(min=0).sum(1)
    c_first = torch.cumsum(c_count, 0) - c_count
    if tile_seeds is None or tile_points is None:
        tile_seeds, tile_points = _tile_shape(s_count, c_count)
    n_st = (s_count + tile_seeds - 1) // tile_seeds
    n_ct = (c_count + tile_points - 1) // tile_points
    n_blk = n_st * n_ct
    num = torch.zeros(n_s + 1, n_d, dtype=dt, device=dev)     # row n_s collects padding
    den = torch.zeros(n_s + 1, dtype=dt, device=dev)
    ar_s = torch.arange(tile_seeds, device=dev)
    ar_c = torch.arange(tile_points, device=dev)
    pad_seed = torch.full((1,), n_s, dtype=torch.long, device=dev)
    s_idx_sorted = torch.cat([s_order, pad_seed])
    cand = torch.cat([cand, torch.zeros(1, dtype=torch.long, device=dev)])
    per_block = tile_seeds * tile_points
    for a, b in _chunks_by_cost(n_blk, max(1, budget // per_block) * 1):
        nb = n_blk[a:b]
        blk_cell = torch.repeat_interleave(torch.arange(a, b, device=dev), nb)
        local = torch.arange(blk_cell.numel(), device=dev) - (torch.cumsum(nb, 0) - nb)[blk_cell - a]
        ti = torch.div(local, n_ct[blk_cell], rounding_mode="floor")
        tj = local - ti * n_ct[blk_cell]
        srow = ti[:, None] * tile_seeds + ar_s[None, :]               # (B, TS) within the cell
        s_ok = srow < s_count[blk_cell][:, None]
        sidx = torch.where(s_ok, s_first[blk_cell][:, None] + srow, n_s)  # into sorted seeds
        seeds = s_idx_sorted[sidx]                                    # seed ids, n_s = padding
        crow = tj[:, None] * tile_points + ar_c[None, :]
        c_ok = crow < c_count[blk_cell][:, None]
        cidx = torch.where(c_ok, c_first[blk_cell][:, None] + crow, cand.numel() - 1)
        sp = pos[seeds.clamp(max=n_s - 1)]                            # (B, TS, D)
        cp = grid.pts[cand[cidx]]                                     # (B, TC, D)
        ref = sp[:, :1, :]
        sp = sp - ref
        cp = cp - ref
        d2 = ((sp * sp).sum(2)[:, :, None] + (cp * cp).sum(2)[:, None, :]
              - 2.0 * torch.bmm(sp, cp.transpose(1, 2))).clamp_(min=0)
        w = _weights(d2, kernel, reach2) * c_ok[:, None, :].to(dt)
        if grid.mass is not None:                                     # weighted (binned) points
            w = w * grid.mass[cand[cidx]][:, None, :]
        part = torch.bmm(w, cp) + ref * w.sum(2, keepdim=True)        # sum w * point
        num.index_add_(0, seeds.reshape(-1), part.reshape(-1, n_d))
        den.index_add_(0, seeds.reshape(-1), w.sum(2).reshape(-1))
    return num[:n_s], den[:n_s]


def _sqdist(a, b, b_sq=None):
    """(A, B) squared distances by ``|a|^2 + |b|^2 - 2 a.b``, clamped at 0."""
    a_sq = (a * a).sum(1)
    if b_sq is None:
        b_sq = (b * b).sum(1)
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_(min=0)


def _shift_exact(pts, pts_sq, pos, kernel, budget, mass=None):
    import torch

    num = torch.empty_like(pos)
    den = torch.empty(pos.shape[0], dtype=pos.dtype, device=pos.device)
    step = max(1, budget // max(1, pts.shape[0]))
    for a in range(0, pos.shape[0], step):
        w = _weights(_sqdist(pos[a:a + step], pts, pts_sq), kernel, None)
        if mass is not None:
            w = w * mass[None, :]
        num[a:a + step] = w @ pts
        den[a:a + step] = w.sum(1)
    return num, den


def _choose_grid_dims(pts, reach):
    """Dimensions worth hashing: those spanning at least MIN_CELLS_TO_HASH cells, widest first."""
    import torch

    span = ((pts.max(0).values - pts.min(0).values) / reach).tolist()
    order = sorted(range(len(span)), key=lambda d: (-span[d], d))
    dims = [d for d in order if span[d] >= MIN_CELLS_TO_HASH][:MAX_HASHED_DIMS]
    if not dims:
        dims = order[:1]
    return torch.tensor(sorted(dims), dtype=torch.long, device=pts.device)


def _radius_pairs(pts, radius, budget):
    """All pairs (i, j), i != j, of rows of ``pts`` closer than ``radius``."""
    import torch

    grid = _Grid(pts, radius, _choose_grid_dims(pts, radius))
    start, end = grid.ranges(grid.pts)
    cost = (end - start).clamp(min=0).sum(1)
    out_i, out_j = [], []
    for a, b in _chunks_by_cost(cost, budget):
        qi, pj = _expand_pairs(start[a:b], end[a:b])
        qi = qi + a
        near = ((grid.pts[qi] - grid.pts[pj]) ** 2).sum(1) < radius * radius
        near &= qi != pj
        out_i.append(grid.order[qi[near]])
        out_j.append(grid.order[pj[near]])
    if not out_i:
        empty = torch.zeros(0, dtype=torch.long, device=pts.device)
        return empty, empty
    return torch.cat(out_i), torch.cat(out_j)


class _Snapper:
    """Converged positions hashed into cells of side ``radius / sqrt(D)``: a query in the
    same cell as one of them is closer than ``radius`` to it."""

    def __init__(self, radius, lo, strides):
        self.q, self.lo, self.strides = radius, lo, strides
        self.keys = None
        self.top = None

    def _keys(self, x):
        import torch

        c = torch.floor((x - self.lo) / self.q).long()
        c = torch.minimum(c.clamp(min=0), self.top)
        return (c * self.strides).sum(1)

    def add(self, x):
        import torch

        k = self._keys(x)
        self.keys = torch.unique(k if self.keys is None else torch.cat([self.keys, k]))
        return self

    def hits(self, x):
        import torch

        return torch.isin(self._keys(x), self.keys)


def _snapper(pts, radius):
    """An empty :class:`_Snapper` over the bounding box of ``pts`` (where mean shift keeps
    every seed that has neighbours), or None where the cell keys could overflow int64."""
    import torch

    q = radius / math.sqrt(pts.shape[1])
    lo = pts.min(0).values - q
    n_cells = torch.ceil((pts.max(0).values - lo) / q).double() + 2
    if float(n_cells.log().sum()) > math.log(2 ** 62):
        return None
    span = n_cells.long()
    strides = torch.ones(pts.shape[1], dtype=torch.long, device=pts.device)
    for i in range(pts.shape[1] - 2, -1, -1):
        strides[i] = strides[i + 1] * span[i + 1]
    snap = _Snapper(q, lo, strides)
    snap.top = span - 1
    return snap


def _insert_sorted(keys, values, new_keys, new_values):
    """Merge sorted, distinct ``new_keys`` (absent from sorted ``keys``) into ``keys``,
    carrying ``values`` along; O(len) instead of a sort."""
    import torch

    where = torch.searchsorted(keys, new_keys) + torch.arange(new_keys.numel(), device=keys.device)
    n = keys.numel() + new_keys.numel()
    old = torch.ones(n, dtype=torch.bool, device=keys.device)
    old[where] = False
    out_k = torch.empty(n, dtype=keys.dtype, device=keys.device)
    out_v = torch.empty(n, dtype=values.dtype, device=keys.device)
    out_k[where], out_v[where] = new_keys, new_values
    out_k[old], out_v[old] = keys, values
    return out_k, out_v


class _PathMerger:
    """Spatial discretisation of the seeds' paths (Carreira-Perpinan, CVPR 2006).

    Every cell of side ``q`` a seed stops in after an iteration is recorded with that seed
    as its owner; a seed that later stops in a cell another seed owns would follow that
    seed's path from there on, so it stops and follows it (``parent``).  Seeds arriving in
    one unowned cell in the same iteration follow the lowest-numbered of them.  The cells
    are hashed like :class:`_Snapper`'s (sorted int64 keys, ``searchsorted`` lookups).
    """

    def __init__(self, hasher, n_seeds, device):
        import torch

        self.h = hasher
        self.keys = torch.zeros(0, dtype=torch.long, device=device)
        self.owner = torch.zeros(0, dtype=torch.long, device=device)
        self.parent = torch.arange(n_seeds, device=device)

    def claim(self, x, ids):
        """Record the cells of positions ``x`` of seeds ``ids`` (increasing); returns the
        mask of those that own their cell (the others now follow an owner)."""
        import torch

        k = self.h._keys(x)
        follow = torch.zeros(k.numel(), dtype=torch.bool, device=k.device)
        if self.keys.numel():
            idx = torch.searchsorted(self.keys, k).clamp(max=self.keys.numel() - 1)
            found = self.keys[idx] == k
            owner = self.owner[idx]
            follow = found & (owner != ids)
            self.parent[ids[follow]] = owner[follow]
            new = ~found
        else:
            new = torch.ones(k.numel(), dtype=torch.bool, device=k.device)
        sel = torch.nonzero(new).reshape(-1)
        if sel.numel():
            kn = k[sel]
            order = torch.argsort(kn, stable=True)          # ids stay increasing in a group
            ks, first_sel = kn[order], sel[order]
            head = torch.ones(ks.numel(), dtype=torch.bool, device=k.device)
            head[1:] = ks[1:] != ks[:-1]
            group = torch.cumsum(head.long(), 0) - 1
            leader = first_sel[head][group]                 # index into x of each group's owner
            dup = first_sel != leader
            self.parent[ids[first_sel[dup]]] = ids[leader[dup]]
            follow[first_sel[dup]] = True
            self.keys, self.owner = _insert_sorted(self.keys, self.owner, ks[head],
                                                   ids[first_sel[head]])
        return ~follow

    def roots(self):
        """Each seed's final owner (following chains of owners)."""
        import torch

        root = self.parent.clone()
        while True:
            nxt = root[root]
            if torch.equal(nxt, root):
                return root
            root = nxt


def _flat_keys(cells):
    """One int64 per row of integer cell coordinates (N, D), equal for equal rows."""
    import torch

    cells = cells - cells.min(0).values
    span = cells.max(0).values + 1
    if float(span.double().log().sum()) > math.log(2 ** 62):
        raise ValueError("the bins over the points are too many to number; use a larger bin size")
    strides = torch.ones_like(span)
    for i in range(cells.shape[1] - 2, -1, -1):
        strides[i] = strides[i + 1] * span[i + 1]
    return (cells * strides).sum(1)


def _bin_points(pts, bin_size):
    """Points pooled in cubic bins of side ``bin_size``: (bin means, point counts).

    The density of the pooled points, each weighted by its count, is the binned kernel
    density estimate: within a bin the points are replaced by their mean, which moves no
    point farther than the bin's diagonal and keeps the total mass and the first moment.
    """
    import torch

    _, inverse = torch.unique(_flat_keys(torch.floor(pts / bin_size).long()), return_inverse=True)
    n_bins = int(inverse.max()) + 1
    count = torch.bincount(inverse, minlength=n_bins).to(pts.dtype)
    sums = torch.zeros(n_bins, pts.shape[1], dtype=pts.dtype, device=pts.device)
    sums.index_add_(0, inverse, pts)
    return sums / count[:, None], count


def _merge_modes(modes, density, merge_radius, budget):
    """Greedy suppression (scikit-learn's rule): keep the densest mode, drop modes within
    ``merge_radius`` of a kept one, repeat.  Returns the kept modes."""
    import torch

    keep = density > 0
    modes, density = modes[keep], density[keep]
    if modes.shape[0] == 0:
        return modes
    order = torch.argsort(-density, stable=True)
    modes = modes[order]
    # collapse modes sharing a cell of merge_radius / (2 sqrt(D)): all closer than radius / 2
    q = merge_radius / (2.0 * math.sqrt(modes.shape[1]))
    cells = torch.floor((modes - modes.min(0).values) / q).long()
    _, inverse = torch.unique(cells, dim=0, return_inverse=True)
    rank = torch.arange(modes.shape[0], device=modes.device)
    leader = torch.full((int(inverse.max()) + 1,), modes.shape[0], dtype=torch.long,
                        device=modes.device).scatter_reduce_(0, inverse, rank, reduce="amin")
    leader = torch.sort(leader).values
    modes = modes[leader]
    n = modes.shape[0]
    i, j = _radius_pairs(modes, merge_radius, budget)
    # parallel form of the greedy pass: decided in rank order (index = rank)
    state = torch.zeros(n, dtype=torch.int8, device=modes.device)  # 0 open, 1 kept, 2 dropped
    higher = j < i
    while True:
        open_ = state == 0
        if not bool(open_.any()):
            break
        blocked = torch.zeros(n, dtype=torch.bool, device=modes.device)
        sel = higher & open_[i] & open_[j]
        blocked[i[sel]] = True
        state[open_ & ~blocked] = 1
        kept = state == 1
        drop = open_[i] & (state[i] == 0) & kept[j]
        state[i[drop]] = 2
    return modes[state == 1]


def _label_nearest(pts, centres, budget):
    import torch

    labels = torch.empty(pts.shape[0], dtype=torch.long, device=pts.device)
    c_sq = (centres * centres).sum(1)
    step = max(1, budget // max(1, centres.shape[0]))
    for a in range(0, pts.shape[0], step):
        labels[a:a + step] = torch.argmin(_sqdist(pts[a:a + step], centres, c_sq), 1)
    return labels


# --------------------------------------------------------------------------- mean shift


def mean_shift(points, bandwidth, *, kernel="gaussian", max_iter=50, tol=1e-3, seeds=None,
               mode="auto", cutoff=6.0, bin_seeding=None, min_bin_freq=1, merge_radius=None,
               grid_dims=None, path_cell=None, bin_size=None, cells_per_reach=2, device=None,
               dtype=None, seed=0) -> MeanShiftResult:
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
        Most iterations per seed.
    tol : float
        A seed has converged when it moves less than ``tol`` bandwidths in an iteration.
    seeds : (M, D) array_like of float, optional
        Starting positions (input units).  Default: the bin seeds when ``bin_seeding``,
        else every point.
    mode : {"auto", "exact", "grid"}
        Engine (see the module notes).  ``"auto"``: exact up to
        ``AUTO_EXACT_MAX_POINTS`` points, grid above.
    cutoff : float
        The grid engine truncates the Gaussian at ``cutoff`` bandwidths (weight
        ``exp(-cutoff^2/2)``: 0.011 at 3, 1.5e-8 at 6).  Ignored by the flat kernel
        (reach 1) and by the exact engine.
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
    bin_size : float, optional
        Pool the points in cubic bins of this side (bandwidths) and sum the kernel over
        the bins' means weighted by their counts (a binned kernel density estimate); the
        labels are still given to every point.  Default: no pooling.  Pays on dense
        clouds (a whole lung at 1 bandwidth: 5.5 points a bin), at some agreement with
        the exact engine (see Notes).
    cells_per_reach : int
        The grid engine's cells have side ``cutoff / cells_per_reach`` and a cell's
        neighbours are the cells within ``cutoff`` of it (a ball of cells): 2 visits
        about 40 % fewer candidate points than 1 on lung clouds.
    device : str or torch.device, optional
        ``None``/``"auto"``: CUDA when available, else CPU.
    dtype : {"float32", "float64"}, optional
        Working precision; default float64 on CPU, float32 on CUDA.
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
    The engines differ by the truncation at ``cutoff``, path merging and, where asked
    for, bin seeding and binned points.  The truncation matters in five dimensions: the
    Gaussian keeps ``P(chi2_D <= cutoff^2)`` of its mass, 89 % at ``cutoff=3`` for D = 5
    (99.98 % at 5), and on sparse 5-D clouds with hundreds of weak modes this moves modes.
    Measured on a 20k-point sample of the lung1 tissue cloud of ``bench/cluster.py``
    (the pipeline's feature scales as bandwidth; exact engine as the reference, adjusted
    Rand index of the labels, CPU float64): the defaults (``cutoff=6``, every point a seed,
    ``path_cell=0.02``) 0.998; ``path_cell=0.05`` 0.991; no path merging 0.998; its
    ``fast`` preset (``cutoff=3``, bin seeding, ``bin_size=1``) 0.82.  ``bench/cluster.json``
    records the time of each setting.

    Examples
    --------
    >>> pts = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    >>> res = mean_shift(pts, 1.0, device="cpu")
    >>> res.labels.tolist()
    [0, 0, 0, 1, 1]
    >>> np.round(res.centres, 2).tolist()
    [[0.03, 0.03], [5.05, 5.0]]
    """
    import torch

    pts_np = _check_points(points)
    n, d = pts_np.shape
    bw = _check_bandwidth(bandwidth, d)
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    max_iter = _check_positive("max_iter", max_iter, integer=True)
    tol = _check_positive("tol", tol)
    cutoff = _check_positive("cutoff", cutoff)
    min_bin_freq = _check_positive("min_bin_freq", min_bin_freq, integer=True)
    merge_radius = _check_positive("merge_radius", merge_radius, allow_none=True) or 1.0
    cells_per_reach = _check_positive("cells_per_reach", cells_per_reach, integer=True)
    bin_size = _check_positive("bin_size", bin_size, allow_none=True)
    if path_cell is not None:
        try:
            path_cell = float(path_cell)
        except (TypeError, ValueError):
            raise TypeError(f"path_cell must be a number or None, got {path_cell!r}") from None
        if not (math.isfinite(path_cell) and path_cell >= 0):
            raise ValueError(f"path_cell must be >= 0 bandwidths (0: no path merging), got {path_cell!r}")
    if bin_seeding is not None and not isinstance(bin_seeding, (bool, np.bool_)):
        raise TypeError(f"bin_seeding must be True, False or None, got {bin_seeding!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if seeds is not None:
        seeds_np = _check_points(seeds, "seeds")
        if seeds_np.shape[1] != d:
            raise ValueError(f"seeds have {seeds_np.shape[1]} features but points have {d}")
        if bin_seeding:
            raise ValueError("give either seeds or bin_seeding=True, not both")
    if grid_dims is not None:
        gd = np.asarray(grid_dims)
        if gd.ndim != 1 or gd.size == 0 or not np.issubdtype(gd.dtype, np.integer) \
                or gd.min() < 0 or gd.max() >= d or len(set(gd.tolist())) != gd.size:
            raise ValueError(f"grid_dims must be distinct feature indices in [0, {d}), "
                             f"got {grid_dims!r}")
    dev = pick_device(device)
    tdtype = _resolve_dtype(dtype, dev)
    engine = mode if mode != "auto" else ("exact" if n <= AUTO_EXACT_MAX_POINTS else "grid")
    if bin_seeding is None:
        bin_seeding = False
    if path_cell is None:
        path_cell = PATH_CELL if engine == "grid" else 0.0
    budget = PAIR_BUDGET["cuda" if dev.type == "cuda" else "cpu"]

    scaled = pts_np / bw
    if seeds is not None:
        seeds_scaled = seeds_np / bw
    elif bin_seeding:
        cells = np.round(scaled)  # one int64 key per bin: far faster than np.unique(axis=0)
        _, first, counts = np.unique(_flat_keys(torch.as_tensor(cells.astype(np.int64))).numpy(),
                                     return_index=True, return_counts=True)
        seeds_scaled = cells[first[counts >= min_bin_freq]]
        if seeds_scaled.shape[0] == 0:
            raise ValueError(f"no bin holds min_bin_freq={min_bin_freq} points (largest bin: "
                             f"{counts.max()}); lower min_bin_freq or use bin_seeding=False")
    else:
        seeds_scaled = scaled
    centre = scaled.mean(0)  # work near the origin: better float32 distances
    pts = torch.as_tensor(scaled - centre, dtype=tdtype, device=dev)
    pos = torch.as_tensor(seeds_scaled - centre, dtype=tdtype, device=dev).clone()
    n_seeds = pos.shape[0]
    kpts, mass = pts, None  # the points the density sums over, and their weights
    if bin_size:
        kpts, mass = _bin_points(pts, bin_size)

    if engine == "grid":
        reach = 1.0 if kernel == "flat" else cutoff
        dims = (torch.as_tensor(sorted(np.asarray(grid_dims).tolist()), device=dev)
                if grid_dims is not None else _choose_grid_dims(kpts, reach / cells_per_reach))
        grid = _Grid(kpts, reach, dims, cells_per_reach)
        if mass is not None:
            grid.mass = mass[grid.order]
        reach2 = reach * reach

        def shift(p):
            return _shift_grid(grid, p, kernel, reach2, budget)
    else:
        kpts_sq = (kpts * kpts).sum(1)

        def shift(p):
            return _shift_exact(kpts, kpts_sq, p, kernel, budget, mass)

    density = torch.zeros(n_seeds, dtype=tdtype, device=dev)
    active = torch.arange(n_seeds, device=dev)
    snap = _snapper(pts, SNAP_RADIUS) if engine == "grid" else None
    merger = None
    if path_cell:
        hasher = _snapper(pts, path_cell * math.sqrt(d))  # cells of side path_cell
        merger = _PathMerger(hasher, n_seeds, dev) if hasher is not None else None
    if merger is not None:
        active = active[merger.claim(pos, active)]
    converged = torch.zeros(n_seeds, dtype=torch.bool, device=dev)
    n_iter = 0
    for it in range(max_iter):
        if active.numel() == 0:
            break
        old = pos[active]
        num, den = shift(old)
        ok = den > 0
        new = torch.where(ok[:, None], num / den.clamp(min=torch.finfo(tdtype).tiny)[:, None], old)
        moved = torch.linalg.vector_norm(new - old, dim=1)
        pos[active] = new
        density[active] = den
        n_iter = it + 1
        done = ~ok | (moved < tol)
        if snap is not None and bool(done.any()) and not bool(done.all()):
            done |= snap.add(pos[active[done & ok]]).hits(pos[active])
        converged[active[done & ok]] = True
        if merger is not None:
            owns = merger.claim(pos[active], active)
            done |= ~owns
        active = active[~done]

    if merger is not None:  # a follower ends where the seed it follows ends
        root = merger.roots()
        follower = root != torch.arange(n_seeds, device=dev)
        converged = converged[root]
        density = torch.where(follower, torch.zeros((), dtype=tdtype, device=dev), density)
    if bool(converged.any()):  # seeds still moving are no modes: their points go elsewhere
        density = torch.where(converged, density, torch.zeros((), dtype=tdtype, device=dev))
    modes = _merge_modes(pos, density, merge_radius, budget)
    if modes.shape[0] == 0:  # only possible with explicit seeds far from every point
        raise ValueError("no seed has any point within the kernel's reach; give seeds near "
                         "the points or a larger bandwidth")
    labels = _label_nearest(pts, modes, budget)
    sizes = torch.bincount(labels, minlength=modes.shape[0])
    order = torch.argsort(-sizes, stable=True)
    remap = torch.empty_like(order)
    remap[order] = torch.arange(order.numel(), device=dev)
    centres = (modes[order].double().cpu().numpy() + centre) * bw
    return MeanShiftResult(centres=centres, labels=remap[labels].cpu().numpy().astype(np.int64),
                           cluster_sizes=sizes[order].cpu().numpy().astype(np.int64),
                           n_iter=int(n_iter), n_seeds=int(n_seeds), mode=engine,
                           device=str(dev))


# --------------------------------------------------------------------------- k-means


def _init_centres(pts, k, init, rng, budget):
    import torch

    n = pts.shape[0]
    first = int(rng.integers(n))
    chosen = [first]
    dmin = _sqdist(pts, pts[first:first + 1])[:, 0]
    for _ in range(1, k):
        if init == "farthest":
            nxt = int(torch.argmax(dmin))
        else:  # k-means++: probability proportional to squared distance
            csum = torch.cumsum(dmin.double(), 0)
            total = float(csum[-1])
            if total <= 0:
                nxt = int(torch.argmax(dmin))
            else:
                u = torch.tensor([rng.random() * total], dtype=torch.float64, device=pts.device)
                nxt = min(int(torch.searchsorted(csum, u, right=True)), n - 1)
        chosen.append(nxt)
        dmin = torch.minimum(dmin, _sqdist(pts, pts[nxt:nxt + 1])[:, 0])
    return pts[torch.tensor(chosen, device=pts.device)].clone()


def _assign(pts, centres, budget):
    import torch

    labels = torch.empty(pts.shape[0], dtype=torch.long, device=pts.device)
    dist = torch.empty(pts.shape[0], dtype=pts.dtype, device=pts.device)
    c_sq = (centres * centres).sum(1)
    step = max(1, budget // max(1, centres.shape[0]))
    for a in range(0, pts.shape[0], step):
        dmin, lab = torch.min(_sqdist(pts[a:a + step], centres, c_sq), 1)
        labels[a:a + step], dist[a:a + step] = lab, dmin
    return labels, dist


def kmeans(points, k, *, init="farthest", max_iter=100, tol=1e-4, device=None, dtype=None,
           seed=0) -> KMeansResult:
    """Lloyd's k-means with batched distances, on the GPU when present.

    Parameters
    ----------
    points : (N, D) array_like of float
        One row per point (scale the features first: distances are Euclidean).
    k : int
        Number of clusters, ``1 <= k <= N``.
    init : {"farthest", "k-means++"}
        ``"farthest"``: a random first centre, then each next centre the point farthest
        from those chosen; ``"k-means++"``: each next centre drawn with probability
        proportional to the squared distance to the nearest chosen one.
    max_iter : int
        Most Lloyd iterations.
    tol : float
        Stop when the summed squared centre shift is below ``tol`` times the mean feature
        variance (scikit-learn's rule).
    device : str or torch.device, optional
        ``None``/``"auto"``: CUDA when available, else CPU.
    dtype : {"float32", "float64"}, optional
        Working precision; default float64 on CPU, float32 on CUDA.
    seed : int
        Seed of the initialisation; the same seed gives the same result.

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
    A cluster left empty by an iteration is given the point farthest from its own centre
    (the next farthest for the next empty cluster), so the result stays deterministic.

    Examples
    --------
    >>> pts = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> res = kmeans(pts, 2, device="cpu")
    >>> sorted(np.round(res.centres, 2).tolist())
    [[0.05, 0.0], [5.05, 5.0]]
    >>> bool(res.labels[0] == res.labels[1] != res.labels[2])
    True
    """
    import torch

    pts_np = _check_points(points)
    n = pts_np.shape[0]
    k = _check_positive("k", k, integer=True)
    if k > n:
        raise ValueError(f"k={k} is larger than the number of points ({n}); use k <= {n}")
    if init not in ("farthest", "k-means++"):
        raise ValueError(f"init must be 'farthest' or 'k-means++', got {init!r}")
    max_iter = _check_positive("max_iter", max_iter, integer=True)
    tol = _check_positive("tol", tol)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    dev = pick_device(device)
    tdtype = _resolve_dtype(dtype, dev)
    budget = PAIR_BUDGET["cuda" if dev.type == "cuda" else "cpu"]
    rng = np.random.default_rng(seed)

    mean = pts_np.mean(0)
    pts = torch.as_tensor(pts_np - mean, dtype=tdtype, device=dev)
    thresh = tol * float(pts_np.var(0).mean())
    centres = _init_centres(pts, k, init, rng, budget)
    n_iter = 0
    for it in range(max_iter):
        labels, dist = _assign(pts, centres, budget)
        sums = torch.zeros_like(centres).index_add_(0, labels, pts)
        counts = torch.bincount(labels, minlength=k)
        new = sums / counts.clamp(min=1)[:, None].to(tdtype)
        empty = torch.nonzero(counts == 0).reshape(-1)
        if empty.numel():
            far = torch.argsort(dist, descending=True, stable=True)[:empty.numel()]
            new[empty] = pts[far]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        n_iter = it + 1
        if shift <= thresh and not empty.numel():
            break
    labels, dist = _assign(pts, centres, budget)
    return KMeansResult(centres=centres.double().cpu().numpy() + mean,
                        labels=labels.cpu().numpy().astype(np.int64), n_iter=int(n_iter),
                        inertia=float(dist.double().sum()))
