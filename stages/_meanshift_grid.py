"""The grid engine of mean shift (internals of :mod:`stages.cluster`, ``mode="grid"``).

Points are sorted by the id of a grid cell of side ``reach / per_reach`` (bandwidths).  The
seeds of one cell share one candidate list: the points of the cells within the kernel's reach
around it (a ball of cells), gathered as contiguous index ranges of the sorted points
(``searchsorted``).  Each cell's seeds and candidates are cut into tiles, and every (seed
tile, candidate tile) block is solved as a small dense problem with batched matrix products.
Cost O(seeds x neighbours) per iteration instead of the exact engine's O(seeds x N).

Everything is in bandwidth units (the points already divided by the bandwidth).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from stages._cluster_dense import row_major_strides

__all__ = ["Grid", "choose_grid_dims", "shift_grid", "radius_pairs", "TILE_SHAPES"]

#: (seeds, points) shapes of the dense blocks per device type; each call takes the one with
#: the least padding (few seeds a cell: 4 x 128; many: 32 x 16).  On an H100 the smaller
#: blocks' extra gathers cost more than their padding saves (whole-lung cloud: 4.7 s with
#: these shapes, 3.8 s with 16 x 64), on 2 CPU cores the padding dominates.
TILE_SHAPES = {"cpu": ((4, 128), (8, 64), (16, 32), (32, 16)), "cuda": ((16, 64),)}
#: Hashed grid dimensions are chosen among those spanning at least this many cells.
MIN_CELLS_TO_HASH = 3
#: At most this many dimensions are hashed (3**k neighbour cells per seed).
MAX_HASHED_DIMS = 5


class Grid:
    """Points sorted by the id of a regular grid over some of their dimensions.

    Cells have side ``reach / per_reach``; the neighbour cells of a cell are those within
    ``per_reach`` cells along every hashed dimension whose nearest corner is within
    ``reach`` (a ball of cells, not a cube; corners are pruned from ``per_reach=3`` on, in
    all hashed dimensions but the last).  Finer cells fit the reach closer: on the lung1
    tissue cloud at ``reach=3`` a seed's candidates fall from 8.1k (side ``reach``) to
    5.1k (``per_reach=2``) and 3.9k (``per_reach=3``).  The last hashed dimension's cells of
    one neighbour row are contiguous in the sort order, so each row is one index range.

    Parameters
    ----------
    pts : (N, D) torch.Tensor
        Points, in bandwidths.
    reach : float
        Neighbourhood radius (bandwidths).
    dims : (k,) int64 torch.Tensor
        The hashed dimensions, increasing.
    per_reach : int
        Cells per ``reach``.
    mass : (N,) torch.Tensor, optional
        Weight of each point (binned points), in the input order.

    Attributes
    ----------
    pts : (N, D) torch.Tensor
        The points in the grid's sort order; ``order`` maps it back to the input's.
    mass : (N,) torch.Tensor or None
        ``mass`` in the sort order.
    """

    def __init__(self, pts, reach, dims, per_reach=1, mass=None):
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
        if float(self.sizes.double().prod()) > 2 ** 62:
            raise ValueError("the grid over the points is too large; increase bandwidth or cutoff")
        self.strides = row_major_strides(self.sizes)
        ids = (coords * self.strides).sum(1)
        self.order = torch.argsort(ids, stable=True)
        self.ids = ids[self.order].contiguous()
        self.pts = pts[self.order].contiguous()
        self.mass = None if mass is None else mass[self.order]
        self.offsets = _row_offsets(len(dims), m, cell, reach, self.strides)

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


def _row_offsets(k, m, cell, reach, strides):
    """Id offsets of the neighbour rows of a cell: every combination of the first ``k - 1``
    hashed dimensions within ``m`` cells whose nearest corner is within ``reach``."""
    import torch

    if k == 1:
        return torch.zeros(1, dtype=torch.long, device=strides.device)
    axis = torch.arange(-m, m + 1, device=strides.device)
    grids = torch.meshgrid(*([axis] * (k - 1)), indexing="ij")
    off = torch.stack([g.reshape(-1) for g in grids], 1)
    gap = (off.abs() - 1).clamp(min=0).double() * cell     # nearest-corner distance
    off = off[(gap * gap).sum(1) <= reach * reach + 1e-9]
    return (off * strides[:-1]).sum(1)


def choose_grid_dims(pts, cell):
    """Dimensions worth hashing in cells of side ``cell``: those spanning at least
    :data:`MIN_CELLS_TO_HASH` cells, widest first, at most :data:`MAX_HASHED_DIMS`;
    the widest one if none does.  Returns them increasing, as an int64 tensor."""
    import torch

    span = ((pts.max(0).values - pts.min(0).values) / cell).tolist()
    order = sorted(range(len(span)), key=lambda d: (-span[d], d))
    dims = [d for d in order if span[d] >= MIN_CELLS_TO_HASH][:MAX_HASHED_DIMS]
    if not dims:
        dims = order[:1]
    return torch.tensor(sorted(dims), dtype=torch.long, device=pts.device)


def chunks_by_cost(cost, budget):
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


def expand_pairs(start, end):
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


class _Tiling(NamedTuple):
    """The seeds of each occupied cell and that cell's candidate points, cut into tiles.

    Per cell: ``s_first``/``s_count`` locate its seeds in ``s_sorted`` (seed ids by cell,
    then the padding id ``n_seeds``), ``c_first``/``c_count`` its candidates in ``cand``
    (sorted point indices, then one padding index), ``n_ct`` its candidate tiles and
    ``n_blk`` its (seed tile, candidate tile) blocks.
    """

    n_seeds: int
    tile_seeds: int
    tile_points: int
    s_sorted: object
    s_first: object
    s_count: object
    cand: object
    c_first: object
    c_count: object
    n_ct: object
    n_blk: object


def _tile_cells(grid, pos):
    """Group the seeds ``pos`` by grid cell and tile each cell's seeds and candidates."""
    import torch

    n_s = pos.shape[0]
    cell = grid.cell_ids(pos)
    s_order = torch.argsort(cell, stable=True)
    ucell, s_count = torch.unique_consecutive(cell[s_order], return_counts=True)
    start, end = grid.ranges_of_cells(ucell)
    _, cand = expand_pairs(start, end)                        # candidates grouped by cell
    c_count = (end - start).clamp(min=0).sum(1)
    tile_seeds, tile_points = _tile_shape(s_count, c_count)
    n_st = (s_count + tile_seeds - 1) // tile_seeds
    n_ct = (c_count + tile_points - 1) // tile_points
    pad = torch.full((1,), n_s, dtype=torch.long, device=pos.device)
    return _Tiling(n_s, tile_seeds, tile_points, torch.cat([s_order, pad]),
                   torch.cumsum(s_count, 0) - s_count, s_count,
                   torch.cat([cand, torch.zeros(1, dtype=torch.long, device=pos.device)]),
                   torch.cumsum(c_count, 0) - c_count, c_count, n_ct, n_st * n_ct)


def _block_members(t, a, b):
    """Seed ids (``n_seeds`` = padding), candidate point indices and the candidates' validity
    mask of every block of cells ``a:b``: (B, TS), (B, TC), (B, TC)."""
    import torch

    dev = t.n_blk.device
    nb = t.n_blk[a:b]
    blk_cell = torch.repeat_interleave(torch.arange(a, b, device=dev), nb)
    local = torch.arange(blk_cell.numel(), device=dev) - (torch.cumsum(nb, 0) - nb)[blk_cell - a]
    ti = torch.div(local, t.n_ct[blk_cell], rounding_mode="floor")
    tj = local - ti * t.n_ct[blk_cell]
    srow = ti[:, None] * t.tile_seeds + torch.arange(t.tile_seeds, device=dev)[None, :]
    s_ok = srow < t.s_count[blk_cell][:, None]
    sidx = torch.where(s_ok, t.s_first[blk_cell][:, None] + srow, t.n_seeds)  # into sorted seeds
    crow = tj[:, None] * t.tile_points + torch.arange(t.tile_points, device=dev)[None, :]
    c_ok = crow < t.c_count[blk_cell][:, None]
    cidx = torch.where(c_ok, t.c_first[blk_cell][:, None] + crow, t.cand.numel() - 1)
    return t.s_sorted[sidx], t.cand[cidx], c_ok


def _block_sums(grid, pos, seeds, points, c_ok, kernel, reach2):
    """Kernel-weighted sums of each block's candidates for its seeds: (B, TS, D), (B, TS).

    Two batched matrix products per block instead of a chain of elementwise passes: the
    exponent ``-d^2 / 2`` of every (seed, candidate) pair is one product of the seeds
    ``[s, -|s|^2 / 2, 1]`` with the candidates ``[c, 1, -|c|^2 / 2]`` (padding candidates
    get ``-inf``: weight 0), and the numerator and denominator are one product of the
    weights with ``[c, 1]``.  Coordinates are taken relative to the block's first seed, so
    float32 keeps the exponent to about 1e-5.
    """
    import torch

    n_d = pos.shape[1]
    sp = pos[seeds.clamp(max=pos.shape[0] - 1)]                   # (B, TS, D)
    cp = grid.pts[points]                                         # (B, TC, D)
    ref = sp[:, :1, :]                                            # work near the block
    sp = sp - ref
    cp = cp - ref
    c_half = (-0.5 * (cp * cp).sum(2, keepdim=True)).masked_fill_(~c_ok[:, :, None], -math.inf)
    cand = torch.cat([cp, torch.ones_like(c_half), c_half], 2)   # (B, TC, D + 2)
    seed = torch.cat([sp, -0.5 * (sp * sp).sum(2, keepdim=True), torch.ones_like(sp[:, :, :1])], 2)
    expo = torch.bmm(seed, cand.transpose(1, 2))                  # -d^2 / 2, <= 0 up to rounding
    if kernel == "flat":
        w = (expo >= -0.5).to(pos.dtype)
    else:
        if reach2 is not None:
            expo.masked_fill_(expo < -0.5 * reach2, -math.inf)
        w = torch.exp_(expo)
    if grid.mass is not None:                                     # weighted (binned) points
        w = w * grid.mass[points][:, None, :]
    sums = torch.bmm(w, cand[:, :, :n_d + 1])                    # [sum w c, sum w]
    den = sums[:, :, n_d]
    return sums[:, :, :n_d] + ref * den[:, :, None], den


def shift_grid(grid, pos, *, kernel, reach2, budget):
    """Kernel-weighted sums of the grid points around each position: (numerator, denominator).

    Parameters
    ----------
    grid : Grid
        The points (bandwidths), with their weights if binned.
    pos : (S, D) torch.Tensor
        Seed positions (bandwidths).
    kernel : {"gaussian", "flat"}
    reach2 : float
        Squared reach (squared bandwidths): the Gaussian is cut there.
    budget : int
        Most (seed, point) pairs, padding included, computed at once.

    Returns
    -------
    num : (S, D) torch.Tensor
        ``sum_j w_ij x_j``; the new position of seed ``i`` is ``num[i] / den[i]``.
    den : (S,) torch.Tensor
        ``sum_j w_ij`` (0 where no point is within reach).
    """
    import torch

    n_s, n_d = pos.shape
    t = _tile_cells(grid, pos)
    num = torch.zeros(n_s + 1, n_d, dtype=pos.dtype, device=pos.device)  # row n_s: padding
    den = torch.zeros(n_s + 1, dtype=pos.dtype, device=pos.device)
    for a, b in chunks_by_cost(t.n_blk, max(1, budget // (t.tile_seeds * t.tile_points))):
        seeds, points, c_ok = _block_members(t, a, b)
        part_num, part_den = _block_sums(grid, pos, seeds, points, c_ok, kernel, reach2)
        num.index_add_(0, seeds.reshape(-1), part_num.reshape(-1, n_d))
        den.index_add_(0, seeds.reshape(-1), part_den.reshape(-1))
    return num[:n_s], den[:n_s]


def radius_pairs(pts, radius, budget):
    """All pairs ``(i, j)``, ``i != j``, of rows of ``pts`` closer than ``radius``:
    two int64 tensors, in no particular order."""
    import torch

    grid = Grid(pts, radius, choose_grid_dims(pts, radius))
    start, end = grid.ranges(grid.pts)
    cost = (end - start).clamp(min=0).sum(1)
    out_i, out_j = [], []
    for a, b in chunks_by_cost(cost, budget):
        qi, pj = expand_pairs(start[a:b], end[a:b])
        qi = qi + a
        near = ((grid.pts[qi] - grid.pts[pj]) ** 2).sum(1) < radius * radius
        near &= qi != pj
        out_i.append(grid.order[qi[near]])
        out_j.append(grid.order[pj[near]])
    if not out_i:
        empty = torch.zeros(0, dtype=torch.long, device=pts.device)
        return empty, empty
    return torch.cat(out_i), torch.cat(out_j)
