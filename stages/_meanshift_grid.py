"""The grid engine of mean shift (internals of :mod:`stages.cluster`, ``mode="grid"``).

Points are sorted by the id of a grid cell of side ``reach / per_reach`` (bandwidths); the
neighbour cells of a cell, those within the kernel's reach (a ball of cells), are a few
rows of cells, each a contiguous index range of the sorted points (``searchsorted``).
Once per grid, the sorted points are cut into tiles of consecutive points within a row;
each call sorts the seeds by cell too and cuts them the same way.  The (seed, point) pairs
are then computed in small dense blocks with batched matrix products, in one of two
layouts, the cheaper for the call's seeds:

* seed-major: a tile of seeds meets the point tiles of its neighbour rows (contiguous
  runs of them), several at a time; best with many seeds, e.g. every point a seed;
* point-major: a point tile meets the seeds of its neighbour rows (contiguous runs of the
  sorted seeds) gathered into tiles; best with few seeds spread out, as in the last
  iterations of mean shift, where seed tiles would be mostly padding.

Cost O(seeds x neighbours) per iteration instead of the exact engine's O(seeds x N).

Everything is in bandwidth units (the points already divided by the bandwidth).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from stages._cluster_dense import row_major_strides

__all__ = ["Grid", "choose_grid_dims", "shift_grid", "radius_pairs", "TILE_SHAPES"]

#: (seeds, points) ``TS x TC`` of the tiles per device type.  On 2 CPU cores (lung1 cloud
#: of 309k points, every point a seed, seed-major) 64 x 32 ran as fast as 32 x 32,
#: 128 x 32 and 64 x 16 (8 to 16 point tiles a block).  Not measured on a GPU.
TILE_SHAPES = {"cpu": (64, 32), "cuda": (64, 32)}
#: Seed-major: point tiles a block holds, so a block's sums are one matrix product over
#: ``BLOCK_TILES * TC`` points (its buffers stay in cache on the CPU).
BLOCK_TILES = {"cpu": 8, "cuda": 8}
#: Cost of a point-major (seed, point) pair relative to a seed-major one: :func:`shift_grid`
#: takes the layout with the lesser cost.  2 CPU cores, lung1 cloud, random seeds from
#: every point to 0.3 % of them: 0.6-0.9 ns a seed-major pair, 2.8-4.4 ns a point-major one.
#: Not measured on a GPU.
POINT_MAJOR_COST = {"cpu": 4.5, "cuda": 4.5}
#: ``log2(e)``: the kernel's exponents are computed in base 2, since torch's ``exp2`` runs
#: about 2.7x faster than ``exp`` on the CPU (float32, AVX-512: 0.32 against 0.85 ns a value)
#: at the same accuracy (7e-7 relative on [-13.5, 0] against float64).
LOG2E = 1.0 / math.log(2.0)
#: A tile spans at most this many reaches along the last hashed dimension: the neighbours
#: of a tile are those of its span, and its coordinates stay near the tile's mean.
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
        return _runs_in(self.ids, *self.neighbour_spans(base, base))

    def neighbour_spans(self, cell_lo, cell_hi):
        """(Q, R) first and last cell ids of the neighbour cells, one span per neighbour row,
        of each span ``[cell_lo, cell_hi]`` of one grid row: the cells within ``m`` of it
        along each row in ``offsets``."""
        lo = cell_lo[:, None] + self.offsets[None, :] - self.m
        return lo, cell_hi[:, None] + self.offsets[None, :] + self.m


def _runs_in(sorted_ids, lo, hi, ends=None):
    """(Q, R) start and end indices of the entries of ``sorted_ids`` in the id spans
    ``[lo, hi]`` (Q, R); with ``ends`` (last ids, non-decreasing, of entries that span ids
    themselves: tiles), the entries crossing each span."""
    import torch

    start = torch.searchsorted(sorted_ids if ends is None else ends, lo.reshape(-1), right=False)
    end = torch.searchsorted(sorted_ids, hi.reshape(-1), right=True)
    return start.reshape(lo.shape), end.reshape(lo.shape)


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


def _cut_tiles(grid, ids, size):
    """Cut a sequence of cell ids sorted as the grid's into tiles of at most ``size``
    consecutive entries of one grid row (cells differing only along the last hashed
    dimension), a new tile starting every :data:`TILE_REACHES` reaches along that row.

    Returns ``(slot, tile, n_tiles)``: each entry's row in the flat ``(n_tiles * size)``
    tiles, its tile, and the number of tiles; only a run's last tile is padded.
    """
    import torch

    n, dev = ids.numel(), ids.device
    last = ids % grid.sizes[-1]
    key = ids - last + torch.div(last, TILE_REACHES * grid.m, rounding_mode="floor")
    _, count = torch.unique_consecutive(key, return_counts=True)
    n_tiles = (count + size - 1) // size
    run = torch.repeat_interleave(torch.arange(count.numel(), device=dev), count, output_size=n)
    rank = torch.arange(n, device=dev) - (torch.cumsum(count, 0) - count)[run]
    slot = (torch.cumsum(n_tiles, 0) - n_tiles)[run] * size + rank
    return slot, torch.div(slot, size, rounding_mode="floor"), int(n_tiles.sum())


def _tile_ends(ids, tile, n_tiles):
    """Cell ids of the first and last entry of each tile (entries in the sort order)."""
    import torch

    idx = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((n_tiles,), ids.numel(), dtype=torch.long, device=ids.device)
    final = torch.zeros(n_tiles, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, tile, idx, reduce="amin")
    final.scatter_reduce_(0, tile, idx, reduce="amax")
    return ids[first], ids[final]


class _PointTiles(NamedTuple):
    """The grid's points cut into tiles of ``TC`` (:func:`_cut_tiles`), one all-padding
    tile last, stored ready for the kernel's matrix products in either layout.

    Attributes
    ----------
    pts : (T + 1, D, TC) torch.Tensor
        Point coordinates (bandwidths), one row a dimension; 0 on padding.
    rhs : (T + 1, TC, D + 1) torch.Tensor
        ``mass * [c, 1]`` of each point ``c``: its product with a block's weights gives the
        numerators and denominators; 0 on padding, so padding weighs nothing wherever it is.
    ref : (T + 1, D) torch.Tensor
        Each tile's mean (bandwidths).
    aug : (T + 1, TC, D + 2) torch.Tensor
        ``[c - ref, 1, -|c - ref|^2 / 2] * LOG2E``, for the point-major layout; padding
        rows are 0 but for ``-inf`` in the last column.
    cell_lo, cell_hi : (T,) int64 torch.Tensor
        Cell ids of each tile's first and last point (one grid row), non-decreasing.
    box_lo, box_hi : (T + 1, D) torch.Tensor
        Each tile's bounding box (bandwidths); the padding tile's is empty (``+inf``, ``-inf``).
    """

    pts: object
    rhs: object
    ref: object
    aug: object
    cell_lo: object
    cell_hi: object
    box_lo: object
    box_hi: object


def _point_tiles(grid):
    """The :class:`_PointTiles` of ``grid``, built on the first call and kept on it."""
    import torch

    tiles = getattr(grid, "_tiles", None)
    if tiles is not None:
        return tiles
    pts, dev = grid.pts, grid.pts.device
    n_d = pts.shape[1]
    tc = TILE_SHAPES["cuda" if dev.type == "cuda" else "cpu"][1]
    slot, tile, n_t = _cut_tiles(grid, grid.ids, tc)
    ones = torch.ones(pts.shape[0], 1, dtype=pts.dtype, device=dev)
    ref = _tile_means(pts, tile, n_t + 1)
    rel = pts - ref[tile]
    flat = torch.zeros((n_t + 1) * tc, n_d, dtype=pts.dtype, device=dev)
    flat[slot] = pts
    aug = torch.zeros((n_t + 1) * tc, n_d + 2, dtype=pts.dtype, device=dev)
    aug[:, n_d + 1] = -math.inf                                    # padding: weight 0
    aug[slot] = torch.cat([rel, ones, -0.5 * (rel * rel).sum(1, keepdim=True)], 1) * LOG2E
    rhs = torch.zeros((n_t + 1) * tc, n_d + 1, dtype=pts.dtype, device=dev)
    rhs[slot] = torch.cat([pts, ones], 1)
    if grid.mass is not None:
        rhs[slot] *= grid.mass[:, None].to(pts.dtype)
    lo, hi = _tile_ends(grid.ids, tile, n_t)
    grid._tiles = _PointTiles(flat.reshape(n_t + 1, tc, n_d).transpose(1, 2).contiguous(),
                              rhs.reshape(n_t + 1, tc, n_d + 1),
                              ref, aug.reshape(n_t + 1, tc, n_d + 2), lo, hi,
                              *_tile_boxes(pts, tile, n_t + 1))
    return grid._tiles


def _tile_boxes(x, tile, n_tiles):
    """(n_tiles, D) lower and upper corners of the bounding box of the rows of ``x`` in each
    tile (``+inf`` and ``-inf`` for an empty tile)."""
    import torch

    idx = tile[:, None].expand(-1, x.shape[1])
    lo = torch.full((n_tiles, x.shape[1]), math.inf, dtype=x.dtype, device=x.device)
    hi = torch.full((n_tiles, x.shape[1]), -math.inf, dtype=x.dtype, device=x.device)
    lo.scatter_reduce_(0, idx, x, reduce="amin")
    return lo, hi.scatter_reduce_(0, idx, x, reduce="amax")


def _tile_means(x, tile, n_tiles):
    """(n_tiles, D) mean of the rows of ``x`` in each tile (0 for an empty tile)."""
    import torch

    size = torch.zeros(n_tiles, 1, dtype=x.dtype, device=x.device)
    size.index_add_(0, tile, torch.ones_like(x[:, :1]))
    total = torch.zeros(n_tiles, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, tile, x)
    return total / size.clamp(min=1)


def _seed_tiles(spos, slot, tile, n_t, ts):
    """Seed-major layout: the seeds (sorted by cell) in tiles of ``ts``, as columns
    ``[s - ref, 1, -|s - ref|^2 / 2] * LOG2E`` relative to each tile's mean ``ref``.

    Returns ``ref`` (n_t, D) and ``col`` (n_t, D + 2, ts), 0 on padding.
    """
    import torch

    n_d = spos.shape[1]
    ref = _tile_means(spos, tile, n_t)
    rel = spos - ref[tile]
    col = torch.zeros(n_t * ts, n_d + 2, dtype=spos.dtype, device=spos.device)
    col[slot] = torch.cat([rel, torch.ones_like(rel[:, :1]),
                           -0.5 * (rel * rel).sum(1, keepdim=True)], 1) * LOG2E
    return ref, col.reshape(n_t, ts, n_d + 2).transpose(1, 2).contiguous()


def _point_runs(grid, tiles, cell_lo, cell_hi):
    """(Q, R) start and end indices, into the point tiles, of those crossing the neighbour
    cells of each span ``[cell_lo, cell_hi]`` of one grid row.

    A cell's neighbour cells lie in the neighbour rows of its cell (``grid.offsets``), within
    ``m`` cells of it along the row, so the point tiles a span meets in neighbour row ``o``
    are those crossing ``[cell_lo + o - m, cell_hi + o + m]``: one contiguous run of the
    point tiles (sorted, each in one row), and no point tile falls in two runs.
    """
    return _runs_in(tiles.cell_lo, *grid.neighbour_spans(cell_lo, cell_hi), ends=tiles.cell_hi)


def _seed_major_pairs(tiles, seed_box, first, end, reach2):
    """The (seed tile, point tile) pairs of the seed-major layout, by seed tile: each seed
    tile's runs of point tiles (:func:`_point_runs`), less the point tiles whose bounding box
    is beyond reach of the seed tile's (``seed_box``: lower and upper corners)."""
    st, pt = expand_pairs(first, end)
    gap = (tiles.box_lo[pt] - seed_box[1][st]).maximum(seed_box[0][st] - tiles.box_hi[pt])
    near = (gap.clamp(min=0) ** 2).sum(1) <= reach2 * (1.0 + 1e-6)   # farther pairs weigh 0
    return st[near], pt[near]


def _seed_major_blocks(st, pt, cnt, group, pad_tile):
    """Seed-major blocks: each seed tile's point tiles (``st``, ``pt``: pairs sorted by seed
    tile; ``cnt``: the pairs of each seed tile) cut into groups of ``group``, the last one
    padded with ``pad_tile``.

    Returns ``blk_seed`` (B,), the seed tile of each block (non-decreasing), and
    ``blk_pts`` (B, group), its point tiles.
    """
    import torch

    dev, n_st = st.device, cnt.numel()
    n_blk = (cnt + group - 1) // group
    total = int(n_blk.sum())
    rank = torch.arange(pt.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt)[st]
    blk_pts = torch.full((total * group,), pad_tile, dtype=torch.long, device=dev)
    blk_pts[((torch.cumsum(n_blk, 0) - n_blk) * group)[st] + rank] = pt
    blk_seed = torch.repeat_interleave(torch.arange(n_st, device=dev), n_blk, output_size=total)
    return blk_seed, blk_pts.reshape(-1, group)


def _seed_major_sums(tiles, ref, col, blk_seed, blk_pts, kernel, reach2, aug, expo, out):
    """Kernel-weighted sums of each seed-major block's points for its seed tile: ``out``
    (B, D + 1, TS), the numerators then the denominators.

    The exponent ``-d^2 / 2`` (base 2) of every (point, seed) pair is one product of the
    points' ``[c, -|c|^2 / 2, 1]`` with the seeds' ``[s, 1, -|s|^2 / 2] * LOG2E`` (``col``),
    both relative to the seed tile's mean ``ref``, and the sums one product of the points'
    ``mass * [c, 1]`` with the weights.  ``aug`` (B, D + 2, P) and ``expo`` (B, P, TS) are
    work buffers (``P`` points a block), ``aug`` one row a dimension (the points' rows built
    with a few passes over contiguous rows: 3.4x faster than one row a point), its last row
    already 1.
    """
    import torch

    n_b, n_p = blk_pts.shape[0], aug.shape[2]
    n_d, tc = tiles.pts.shape[1], tiles.pts.shape[2]
    flat = blk_pts.reshape(-1)
    rel = aug[:, :n_d]
    torch.sub(tiles.pts.index_select(0, flat).reshape(n_b, -1, n_d, tc).transpose(1, 2),
              ref.index_select(0, blk_seed)[:, :, None, None], out=rel.view(n_b, n_d, -1, tc))
    torch.mul((rel * rel).sum(1), -0.5, out=aug[:, n_d])
    w = _weights(torch.bmm(aug.transpose(1, 2), col.index_select(0, blk_seed), out=expo),
                 kernel, reach2)
    rhs = tiles.rhs.index_select(0, flat).reshape(n_b, n_p, n_d + 1)
    return torch.bmm(rhs.transpose(1, 2), w, out=out)


def _weights(expo2, kernel, reach2):
    """The kernel's weights from the exponents ``-d^2 / 2`` in base 2 (times ``LOG2E``),
    in place."""
    import torch
    import torch.nn.functional as F

    if kernel == "flat":
        return expo2.ge_(-0.5 * LOG2E)
    # The cut: pairs beyond reach get -inf, so weight 0.  exp2 is as fast on -inf as on
    # the kernel's range (0.31 against 0.28 ns a value, float32, 1 thread) but twice as slow
    # on finite arguments that underflow (0.66 ns at -200 or -130).
    cut = -0.5 * reach2 * LOG2E
    return torch.exp2_(F.threshold_(expo2, cut, -math.inf))


def _shift_seed_major(tiles, spos, cut_seeds, pairs, kernel, reach2, budget, group):
    """Sums of the seeds (sorted by cell) in the seed-major layout: (S, D + 1)."""
    import torch

    slot, tile, n_st, ts = cut_seeds
    n_d, dev, dt = spos.shape[1], spos.device, spos.dtype
    ref, col = _seed_tiles(spos, slot, tile, n_st, ts)
    blk_seed, blk_pts = _seed_major_blocks(*pairs, group, tiles.cell_lo.numel())
    n_p = group * tiles.pts.shape[2]
    sums = torch.zeros(n_st, n_d + 1, ts, dtype=dt, device=dev)
    step = max(1, budget // (n_p * ts))
    width = min(step, blk_seed.numel())
    aug = torch.ones(width, n_d + 2, n_p, dtype=dt, device=dev)
    expo = torch.empty(width, n_p, ts, dtype=dt, device=dev)
    out = torch.empty(width, n_d + 1, ts, dtype=dt, device=dev)
    for a in range(0, blk_seed.numel(), step):
        b = min(a + step, blk_seed.numel())
        part = _seed_major_sums(tiles, ref, col, blk_seed[a:b], blk_pts[a:b], kernel, reach2,
                                aug[:b - a], expo[:b - a], out[:b - a])
        sums.index_add_(0, blk_seed[a:b], part)
    return sums.transpose(1, 2).reshape(-1, n_d + 1)[slot]


def _point_seed_runs(grid, tiles, s_cell):
    """Point-major layout: (T, R) start and end indices, into the seeds sorted by cell id
    (``s_cell``), of the seeds around each point tile.

    The neighbourhood is symmetric: a seed's neighbour cells hold a point's cell exactly
    when the point's hold the seed's.  So the seeds that need a tile are those of its
    cells' neighbour rows, each one contiguous run of the seeds' sort order, widened to
    the tile's span along the row (its extra seeds are cut by distance).  A seed falls in
    at most one run of a tile: it meets each tile once.
    """
    return _runs_in(s_cell, *grid.neighbour_spans(tiles.cell_lo, tiles.cell_hi))


def _point_major_sums(tiles, spos, blk_tile, seeds, kernel, reach2):
    """Kernel-weighted sums of each point-major block's point tile for its seeds:
    (B, TS, D + 1), the numerators then the denominators.

    The exponent of every pair (base 2) is one product of the tile's
    ``[c, 1, -|c|^2 / 2] * LOG2E`` with the seeds' ``[s, -|s|^2 / 2, 1]``, both relative to
    the tile's mean; ``seeds`` (B, TS)
    are rows of ``spos`` (S + 1, D), its last row padding.
    """
    import torch

    n_b, n_ts = seeds.shape
    ref = tiles.ref.index_select(0, blk_tile)[:, None, :]                       # (B, 1, D)
    sp = spos.index_select(0, seeds.reshape(-1)).reshape(n_b, n_ts, -1) - ref   # (B, TS, D)
    seed = torch.cat([sp, -0.5 * (sp * sp).sum(2, keepdim=True), torch.ones_like(sp[:, :, :1])], 2)
    w = _weights(torch.bmm(tiles.aug.index_select(0, blk_tile), seed.transpose(1, 2)),
                 kernel, reach2)                                                 # (B, TC, TS)
    # (D + 1, TC) x (TC, TS), transposed after: 4x faster than (TS, TC) x (TC, D + 1)
    return torch.bmm(tiles.rhs.index_select(0, blk_tile).transpose(1, 2), w).transpose(1, 2)


def _shift_point_major(tiles, spos, start, end, kernel, reach2, budget, ts):
    """Sums of the seeds (sorted by cell) in the point-major layout: (S, D + 1)."""
    import torch

    n_s, n_d = spos.shape
    dev, tc = spos.device, tiles.pts.shape[2]
    spos = torch.cat([spos, torch.zeros(1, n_d, dtype=spos.dtype, device=dev)])  # padding row
    n_seed = (end - start).clamp(min=0).sum(1)                   # seeds around each tile
    n_blk = (n_seed + ts - 1) // ts
    sums = torch.zeros(n_s + 1, n_d + 1, dtype=spos.dtype, device=dev)  # row n_s: padding
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
        part = _point_major_sums(tiles, spos, blk_tile, seeds, kernel, reach2)
        sums.index_add_(0, seeds.reshape(-1), part.reshape(-1, n_d + 1))
    return sums[:n_s]


def shift_grid(grid, pos, *, kernel, reach2, budget):
    """Kernel-weighted sums of the grid points around each position: (numerator, denominator).

    The grid's points are cut into tiles once per grid (:func:`_point_tiles`) and the
    positions, sorted by cell, into seed tiles each call.  The pairs are computed in dense
    blocks in one of two layouts, the one with fewer (seed, point) pairs to compute, padding
    included, where the point-major pairs count ``POINT_MAJOR_COST`` times:

    * seed-major (many seeds, e.g. every point a seed): each seed tile meets the point tiles
      of its neighbour cells ``BLOCK_TILES`` at a time; a block's sums add into its seed
      tile's, one row of ``(D + 1) x TS`` values.
    * point-major (few seeds, spread out, as in the last iterations): each point tile meets
      the seeds of its neighbour cells, gathered into tiles of ``TS``; a block's sums add
      into each seed's row.

    The kernel is cut at ``reach2`` by distance.

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
    if n_s == 0:
        return pos.new_zeros(0, n_d), pos.new_zeros(0)
    kind = "cuda" if pos.device.type == "cuda" else "cpu"
    ts, tc = TILE_SHAPES[kind]
    group = BLOCK_TILES[kind]
    tiles = _point_tiles(grid)
    s_cell, order = torch.sort(grid.cell_ids(pos), stable=True)
    spos = pos[order]
    slot, tile, n_st = _cut_tiles(grid, s_cell, ts)
    st, pt = _seed_major_pairs(tiles, _tile_boxes(spos, tile, n_st),
                               *_point_runs(grid, tiles, *_tile_ends(s_cell, tile, n_st)), reach2)
    pairs = (st, pt, torch.bincount(st, minlength=n_st))
    p_start, p_end = _point_seed_runs(grid, tiles, s_cell)
    # pairs computed, padding included
    seed_major = _padded(pairs[2][:, None], group) * tc * ts
    point_major = _padded(p_end - p_start, ts) * tc
    if seed_major <= POINT_MAJOR_COST[kind] * point_major:
        sums = _shift_seed_major(tiles, spos, (slot, tile, n_st, ts), pairs,
                                 kernel, reach2, budget, group)
    else:
        sums = _shift_point_major(tiles, spos, p_start, p_end, kernel, reach2, budget, ts)
    res = torch.empty(n_s, n_d + 1, dtype=pos.dtype, device=pos.device)
    res[order] = sums
    return res[:, :n_d], res[:, n_d]


def _padded(length, size):
    """Entries of the (Q, R) runs of ``length`` laid end to end per row and padded to a
    multiple of ``size``, summed over the rows."""
    total = length.clamp(min=0).sum(1)
    return int(((total + size - 1) // size).sum()) * size


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
