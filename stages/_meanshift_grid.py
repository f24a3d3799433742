"""The grid engine of mean shift (internals of :mod:`stages.cluster`, ``mode="grid"``).

Points are sorted by the id of a grid cell of side ``reach / per_reach`` (bandwidths); the
neighbour cells of a cell, those within the kernel's reach (a ball of cells), are a few
rows of cells, each a contiguous index range of the sorted points (``searchsorted``).
Once per grid, the sorted points are cut into tiles of consecutive points within a row,
stored ready for the kernel's matrix products.  Each call sorts the seeds by cell too: the
seeds around a point tile are then a few contiguous runs of them, cut into seed tiles, and
every (point tile, seed tile) block is solved as a small dense problem with batched matrix
products.  Per block only the seeds are gathered, so the gathering is small next to the
``TS x TC`` kernel values.  Cost O(seeds x neighbours) per iteration instead of the exact
engine's O(seeds x N).

Everything is in bandwidth units (the points already divided by the bandwidth).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from stages._cluster_dense import row_major_strides

__all__ = ["Grid", "choose_grid_dims", "shift_grid", "radius_pairs", "TILE_SHAPES"]

#: (seeds, points) shape ``TS x TC`` of the dense blocks per device type: one tile of
#: ``TC`` grid points meets up to ``TS`` seeds.  On 2 CPU cores (1 thread, lung1 cloud of
#: 309k points, 92k seeds) 64 x 32, 64 x 64 and 128 x 64 ran alike, 64 x 32 ran a 20k-point
#: cloud fastest.  Not measured on a GPU.
TILE_SHAPES = {"cpu": (64, 32), "cuda": (64, 32)}
#: A point tile spans at most this many reaches along the last hashed dimension: a seed meets
#: a tile if within reach of its span, and its coordinates stay near the tile's mean.
TILE_REACHES = 4
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


class _PointTiles(NamedTuple):
    """The grid's points cut into tiles, augmented for the kernel's matrix products.

    The points of one grid row (cells differing only along the last hashed dimension, one
    run of the sort order) are cut into tiles of ``TC`` points, a new tile starting every
    :data:`TILE_REACHES` reaches along that dimension; only a run's last tile is padded.

    Attributes
    ----------
    aug : (T, TC, D + 2) torch.Tensor
        ``[c - ref, 1, -|c - ref|^2 / 2]`` (bandwidths) of the tile's points ``c``,
        relative to its mean ``ref`` (float32 keeps the exponent to about 1e-5); padding
        rows are 0 but for ``-inf`` in the last column (weight 0).
    rhs : (T, D + 1, TC) torch.Tensor
        ``mass * [c, 1]`` transposed (0 on padding): its product with a block's weights
        gives the numerators and denominators.
    ref : (T, D) torch.Tensor
        Each tile's mean (bandwidths).
    cell_lo, cell_hi : (T,) int64 torch.Tensor
        Cell ids of each tile's first and last point (one grid row).
    """

    aug: object
    rhs: object
    ref: object
    cell_lo: object
    cell_hi: object


def _point_tiles(grid):
    """The :class:`_PointTiles` of ``grid``, built on the first call and kept on it."""
    import torch

    tiles = getattr(grid, "_tiles", None)
    if tiles is not None:
        return tiles
    pts, dev = grid.pts, grid.pts.device
    n_pts, n_d = pts.shape
    # runs of points sharing a row and a span of TILE_REACHES reaches along the last hashed
    # dimension (stride 1, ids in the sort order)
    last = grid.ids % grid.sizes[-1]
    key = grid.ids - last + torch.div(last, TILE_REACHES * grid.m, rounding_mode="floor")
    _, count = torch.unique_consecutive(key, return_counts=True)
    tc = TILE_SHAPES["cuda" if dev.type == "cuda" else "cpu"][1]
    n_tiles = (count + tc - 1) // tc
    run = torch.repeat_interleave(torch.arange(count.numel(), device=dev), count,
                                  output_size=n_pts)
    rank = torch.arange(n_pts, device=dev) - (torch.cumsum(count, 0) - count)[run]
    slot = (torch.cumsum(n_tiles, 0) - n_tiles)[run] * tc + rank   # row in the flat tiles
    tile = torch.div(slot, tc, rounding_mode="floor")
    n_t = int(n_tiles.sum())
    ones = torch.ones(n_pts, 1, dtype=pts.dtype, device=dev)
    size = torch.zeros(n_t, 1, dtype=pts.dtype, device=dev).index_add_(0, tile, ones)
    ref = torch.zeros(n_t, n_d, dtype=pts.dtype, device=dev).index_add_(0, tile, pts) / size
    rel = pts - ref[tile]
    aug = torch.zeros(n_t * tc, n_d + 2, dtype=pts.dtype, device=dev)
    aug[:, n_d + 1] = -math.inf                                    # padding: weight 0
    aug[slot] = torch.cat([rel, ones, -0.5 * (rel * rel).sum(1, keepdim=True)], 1)
    rhs = torch.zeros(n_t * tc, n_d + 1, dtype=pts.dtype, device=dev)
    rhs[slot] = torch.cat([pts, ones], 1)
    if grid.mass is not None:
        rhs[slot] *= grid.mass[:, None].to(pts.dtype)
    idx = torch.arange(n_pts, device=dev)
    first = torch.full((n_t,), n_pts, dtype=torch.long, device=dev).scatter_reduce_(
        0, tile, idx, reduce="amin")
    final = torch.zeros(n_t, dtype=torch.long, device=dev).scatter_reduce_(
        0, tile, idx, reduce="amax")
    grid._tiles = _PointTiles(aug.reshape(n_t, tc, n_d + 2),
                              rhs.reshape(n_t, tc, n_d + 1).transpose(1, 2).contiguous(),
                              ref, grid.ids[first], grid.ids[final])
    return grid._tiles


def _tile_seeds(grid, tiles, s_cell):
    """(T, R) start and end indices, into the seeds sorted by cell id (``s_cell``: their
    sorted cell ids), of the seeds around each point tile.

    The neighbourhood is symmetric: a seed's neighbour cells hold a point's cell exactly
    when the point's hold the seed's.  So the seeds that need a tile are those of its
    cells' neighbour rows, each one contiguous run of the seeds' sort order, widened to
    the tile's span along the row (its extra seeds are cut by distance).  A seed falls in
    at most one run of a tile: it meets each tile once.
    """
    import torch

    lo_ids = (tiles.cell_lo[:, None] + grid.offsets[None, :] - grid.m).reshape(-1)
    hi_ids = (tiles.cell_hi[:, None] + grid.offsets[None, :] + grid.m).reshape(-1)
    start = torch.searchsorted(s_cell, lo_ids, right=False)
    end = torch.searchsorted(s_cell, hi_ids, right=True)
    n_t = tiles.cell_lo.shape[0]
    return start.reshape(n_t, -1), end.reshape(n_t, -1)


def _block_sums(tiles, spos, blk_tile, seeds, kernel, reach2):
    """Kernel-weighted sums of each block's point tile for its seeds: (B, TS, D + 1),
    the numerators then the denominators.

    Two batched matrix products per block instead of a chain of elementwise passes: the
    exponent ``-d^2 / 2`` of every (point, seed) pair is one product of the tile's
    ``[c, 1, -|c|^2 / 2]`` (padding points: ``-inf``, weight 0) with the seeds
    ``[s, -|s|^2 / 2, 1]``, both relative to the tile's mean, and the sums are one
    product of the tile's ``mass * [c, 1]`` with the weights.

    Parameters
    ----------
    tiles : _PointTiles
    spos : (S + 1, D) torch.Tensor
        Seed positions (bandwidths), sorted by cell, then a padding row.
    blk_tile : (B,) int64 torch.Tensor
        The point tile of each block.
    seeds : (B, TS) int64 torch.Tensor
        Its seeds, rows of ``spos``.
    kernel : {"gaussian", "flat"}
    reach2 : float
        Squared reach (squared bandwidths).
    """
    import torch
    import torch.nn.functional as F

    n_b, n_ts = seeds.shape
    ref = tiles.ref.index_select(0, blk_tile)[:, None, :]                       # (B, 1, D)
    sp = spos.index_select(0, seeds.reshape(-1)).reshape(n_b, n_ts, -1) - ref   # (B, TS, D)
    seed = torch.cat([sp, -0.5 * (sp * sp).sum(2, keepdim=True), torch.ones_like(sp[:, :, :1])], 2)
    expo = torch.bmm(tiles.aug.index_select(0, blk_tile), seed.transpose(1, 2))  # (B, TC, TS)
    if kernel == "flat":
        w = (expo >= -0.5).to(spos.dtype)
    else:
        # The cut in three cheap passes: exp is several times slower on -inf or underflowing
        # arguments, so pairs beyond reach (and padding) get exp(cut - 1), then 0.
        cut = -0.5 * reach2
        w = torch.exp_(F.threshold_(expo, cut, cut - 1.0))
        w = F.threshold_(w, 0.5 * math.exp(cut), 0.0)
    return torch.bmm(tiles.rhs.index_select(0, blk_tile), w).transpose(1, 2)


def shift_grid(grid, pos, *, kernel, reach2, budget):
    """Kernel-weighted sums of the grid points around each position: (numerator, denominator).

    The grid's points are cut into tiles (:func:`_point_tiles`, once per grid); the seeds
    around each tile (:func:`_tile_seeds`) are cut into tiles of ``TS``, and every (point
    tile, seed tile) block is one small dense problem (:func:`_block_sums`), gathering
    ``TS`` seeds for ``TS x TC`` pairs.  A seed meets each tile of its neighbour cells
    once, and the kernel is cut at ``reach2`` by distance.

    Parameters
    ----------
    grid : Grid
        The points (bandwidths), with their weights if binned.
    pos : (S, D) torch.Tensor
        Seed positions (bandwidths).
    kernel : {"gaussian", "flat"}
    reach2 : float
        Squared reach (squared bandwidths): the Gaussian is cut there (at the grid's reach
        if None).
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
    dev = pos.device
    if reach2 is None:
        reach2 = (grid.cell * grid.m) ** 2
    tiles = _point_tiles(grid)
    ts, tc = TILE_SHAPES["cuda" if dev.type == "cuda" else "cpu"][0], tiles.aug.shape[1]
    cell = grid.cell_ids(pos)
    s_cell, s_order = torch.sort(cell, stable=True)
    spos = torch.cat([pos[s_order], torch.zeros(1, n_d, dtype=pos.dtype, device=dev)])
    start, end = _tile_seeds(grid, tiles, s_cell)
    n_seed = (end - start).clamp(min=0).sum(1)                   # seeds around each tile
    n_blk = (n_seed + ts - 1) // ts
    sums = torch.zeros(n_s + 1, n_d + 1, dtype=pos.dtype, device=dev)  # row n_s: padding
    for a, b in chunks_by_cost(n_blk, max(1, budget // (ts * tc))):
        blk = n_blk[a:b]
        n_b = int(blk.sum())
        if n_b == 0:
            continue
        t_loc, sidx = expand_pairs(start[a:b], end[a:b])          # (tile, seed), by tile
        cnt = n_seed[a:b]
        rank = torch.arange(sidx.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt)[t_loc]
        seeds = torch.full((n_b * ts,), n_s, dtype=torch.long, device=dev)  # n_s: padding
        seeds[((torch.cumsum(blk, 0) - blk) * ts)[t_loc] + rank] = sidx
        seeds = seeds.reshape(n_b, ts)
        blk_tile = torch.repeat_interleave(torch.arange(a, b, device=dev), blk, output_size=n_b)
        part = _block_sums(tiles, spos, blk_tile, seeds, kernel, reach2)
        sums.index_add_(0, seeds.reshape(-1), part.reshape(-1, n_d + 1))
    out = torch.empty(n_s, n_d + 1, dtype=pos.dtype, device=dev)
    out[s_order] = sums[:n_s]
    return out[:, :n_d], out[:, n_d]


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
