"""The mean-shift iteration shared by both engines (internals of :mod:`stages.cluster`).

:func:`run` takes checked numpy inputs and :class:`Options`, and does the work in torch:
divide the points by the bandwidth and centre them, place the seeds (given, bin seeds,
one point per seed cell or every point), optionally pool the points in bins, move every
seed uphill with the engine's shift (:func:`shift_exact` or
:func:`stages._meanshift_grid.shift_grid`) until it stops (:func:`climb`), merge close
modes keeping the denser (:func:`merge_modes`) and label every point by its nearest mode,
largest cluster first.  The same code runs on CPU and CUDA.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from stages._cluster_dense import kernel_weights, nearest, row_major_strides, sqdist
from stages._meanshift_grid import Grid, choose_grid_dims, radius_pairs, shift_grid
from stages._meanshift_paths import PathMerger, make_snapper

__all__ = ["Options", "run", "climb", "shift_exact", "merge_modes", "thin_seeds", "SNAP_RADIUS"]

#: Grid engine: a moving seed closer than this many bandwidths to a converged one stops
#: there (it would reach the same mode; saves the slow tail of Gaussian mean shift).
SNAP_RADIUS = 0.1
#: Coarse-to-fine grid engine (:func:`coarse_candidates`): the coarse climb stops a seed that
#: moves less than this many bandwidths (the fine climb goes on to ``tol``) ...
COARSE_TOL = 1e-2
#: ... merges paths in cells of this side (bandwidths) ...
COARSE_PATH_CELL = 0.05
#: ... and hands the fine climb one end point per cell of this side (bandwidths).
CANDIDATE_CELL = 0.1


@dataclass(frozen=True)
class Options:
    """Checked settings of one :func:`stages.cluster.mean_shift` call; lengths in bandwidths.

    ``engine`` is ``"exact"`` or ``"grid"`` (``"auto"`` already resolved), ``path_cell`` and
    ``seed_cell`` numbers (0: off), ``merge_radius`` a number, ``grid_dims`` sorted feature indices or
    None, ``budget`` the most (seed, point) pairs computed at once.
    """

    kernel: str
    engine: str
    max_iter: int
    tol: float
    cutoff: float
    bin_seeding: bool
    min_bin_freq: int
    merge_radius: float
    grid_dims: list | None
    path_cell: float
    bin_size: float | None
    cells_per_reach: int
    budget: int
    coarse_cutoff: float | None = None
    seed_cell: float = 0.0


def run(points, bandwidth, seeds, opts, device, dtype):
    """Mean shift of checked inputs.

    Parameters
    ----------
    points : (N, D) float64 ndarray
        Input units.
    bandwidth : (D,) float64 ndarray
        Input units per feature.
    seeds : (M, D) float64 ndarray or None
        Starting positions (input units); None: bin seeds, thinned points or every point,
        per ``opts``.
    opts : Options
    device : torch.device
    dtype : torch.dtype
        Working precision.

    Returns
    -------
    centres : (K, D) float64 ndarray
        Modes in input units, largest cluster first.
    labels : (N,) int64 ndarray
    sizes : (K,) int64 ndarray
    n_iter : int
    n_seeds : int
    """
    import torch

    scaled = points / bandwidth
    start = _start_positions(scaled, None if seeds is None else seeds / bandwidth, opts)
    centre = scaled.mean(0)  # work near the origin: better float32 distances
    pts = torch.as_tensor(scaled - centre, dtype=dtype, device=device)
    start = torch.as_tensor(start - centre, dtype=dtype, device=device)
    kpts, mass = (pts, None) if not opts.bin_size else bin_points(pts, opts.bin_size)
    n_start, n_coarse = start.shape[0], 0
    if _coarse_first(opts):
        start, n_coarse = coarse_candidates(kpts, mass, start, opts)
    snap = make_snapper(pts, SNAP_RADIUS) if opts.engine == "grid" else None
    merger = _path_merger(pts, opts.path_cell, start.shape[0])
    pos, density, converged, n_iter = climb(_shifter(kpts, mass, opts), start, opts.max_iter,
                                            opts.tol, snap=snap, merger=merger)
    n_iter += n_coarse
    modes = merge_modes(pos, _mode_density(density, converged, merger), opts.merge_radius,
                        opts.budget)
    if modes.shape[0] == 0:  # only possible with explicit seeds far from every point
        raise ValueError("no seed has any point within the kernel's reach; give seeds near "
                         "the points or a larger bandwidth")
    modes, labels, sizes = _largest_first(modes, nearest(pts, modes, opts.budget))
    centres = (modes.double().cpu().numpy() + centre) * bandwidth
    return centres, labels, sizes, int(n_iter), int(n_start)


def _coarse_first(opts):
    """Whether the grid engine climbs first with the Gaussian cut at ``coarse_cutoff``."""
    return (opts.engine == "grid" and opts.kernel == "gaussian" and opts.coarse_cutoff is not None
            and opts.coarse_cutoff < opts.cutoff)


def coarse_candidates(kpts, mass, start, opts):
    """Coarse-to-fine, first stage: where the seeds' modes can be, found cheaply.

    Every seed climbs the density with the Gaussian cut at ``opts.coarse_cutoff`` (a third
    of the candidate points of ``opts.cutoff=6`` on lung clouds), float32 arithmetic where
    the working precision is float64, until it moves less than ``COARSE_TOL`` bandwidths,
    follows another (path merging in cells of ``COARSE_PATH_CELL``) or meets a converged one
    (``SNAP_RADIUS``).  The end points of the seeds that climbed alone, one per cell of side
    ``CANDIDATE_CELL``, are the candidates the fine stage climbs on from with the full
    ``opts.cutoff``: the modes it keeps are the modes of the full kernel, each with its own
    density.  The labels do not depend on any seed's path: every point goes to its nearest
    mode.

    Parameters
    ----------
    kpts : (P, D) torch.Tensor
        Kernel points (bandwidths), binned or not.
    mass : (P,) torch.Tensor or None
    start : (M, D) torch.Tensor
        Seeds (bandwidths).
    opts : Options

    Returns
    -------
    candidates : (C, D) torch.Tensor
        In the dtype of ``start``.
    n_iter : int
        Coarse iterations run.
    """
    import torch

    work = torch.float32 if kpts.device.type == "cpu" else kpts.dtype
    cpts = kpts.to(work)
    cmass = None if mass is None else mass.to(work)
    copts = dataclasses.replace(opts, cutoff=opts.coarse_cutoff)
    merger = _path_merger(cpts, COARSE_PATH_CELL, start.shape[0])
    pos, _, _, n_iter = climb(_shifter(cpts, cmass, copts), start.to(work), opts.max_iter,
                              COARSE_TOL, snap=make_snapper(cpts, SNAP_RADIUS), merger=merger)
    if merger is not None:
        pos = pos[torch.unique(merger.roots())]
    cells = torch.floor(pos.double() / CANDIDATE_CELL).long()
    _, inverse = torch.unique(cells, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), pos.shape[0], dtype=torch.long,
                       device=pos.device).scatter_reduce_(
        0, inverse, torch.arange(pos.shape[0], device=pos.device), reduce="amin")
    return pos[torch.sort(first).values].to(start.dtype), n_iter


def _start_positions(scaled, seeds_scaled, opts):
    """The seeds (bandwidths): the ones given, else the bin seeds if asked for, else one point
    per cell of side ``opts.seed_cell`` (:func:`thin_seeds`), else every point."""
    import torch

    if seeds_scaled is not None:
        return seeds_scaled
    if not opts.bin_seeding:
        return scaled[thin_seeds(scaled, opts.seed_cell)] if opts.seed_cell else scaled
    cells = np.round(scaled)  # one int64 key per bin: far faster than np.unique(axis=0)
    _, first, counts = np.unique(flat_keys(torch.as_tensor(cells.astype(np.int64))).numpy(),
                                 return_index=True, return_counts=True)
    seeds = cells[first[counts >= opts.min_bin_freq]]
    if seeds.shape[0] == 0:
        raise ValueError(f"no bin holds min_bin_freq={opts.min_bin_freq} points (largest bin: "
                         f"{counts.max()}); lower min_bin_freq or use bin_seeding=False")
    return seeds


def thin_seeds(scaled, side):
    """Seed thinning: the index of the first point (in input order) of every occupied cell of
    a grid of side ``side`` (bandwidths) over ``scaled`` (N, D) points, increasing.

    The seeds stay data points, so every mode they climb to is one the exact engine finds
    from that point; on dense clouds a cell holds many points that climb to the same mode
    (whole lung1 tissue cloud, side 2: 22,227 seeds for 309,086 points).
    """
    import torch

    keys = flat_keys(torch.as_tensor(np.floor(scaled / side).astype(np.int64))).numpy()
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _shifter(kpts, mass, opts):
    """The engine's shift: a function of the seed positions giving (numerator, denominator)."""
    import torch

    if opts.engine == "exact":
        return partial(shift_exact, kpts, (kpts * kpts).sum(1), kernel=opts.kernel,
                       budget=opts.budget, mass=mass)
    reach = 1.0 if opts.kernel == "flat" else opts.cutoff
    dims = (choose_grid_dims(kpts, reach / opts.cells_per_reach) if opts.grid_dims is None
            else torch.as_tensor(opts.grid_dims, device=kpts.device))
    grid = Grid(kpts, reach, dims, opts.cells_per_reach, mass=mass)
    return partial(shift_grid, grid, kernel=opts.kernel, reach2=reach * reach, budget=opts.budget)


def _path_merger(pts, path_cell, n_seeds):
    """A :class:`PathMerger` in cells of side ``path_cell`` (bandwidths), or None when off."""
    if not path_cell:
        return None
    hasher = make_snapper(pts, path_cell * math.sqrt(pts.shape[1]))  # cells of side path_cell
    return PathMerger(hasher, n_seeds, pts.device) if hasher is not None else None


def climb(shift, start, max_iter, tol, *, snap=None, merger=None):
    """Move the seeds uphill with ``shift`` until each stops or ``max_iter`` iterations ran.

    A seed stops when it moves less than ``tol`` (bandwidths) in an iteration, has no point
    within reach, lies in a cell of ``snap`` (a converged seed's) or follows another seed
    (``merger``, path merging); only the moving seeds are shifted.

    Parameters
    ----------
    shift : callable
        ``shift(pos) -> (num, den)`` for (S, D) positions.
    start : (M, D) torch.Tensor
        Seed positions (bandwidths); not modified.
    max_iter : int
    tol : float
    snap : Snapper, optional
    merger : PathMerger, optional

    Returns
    -------
    pos : (M, D) torch.Tensor
        Final positions.
    density : (M,) torch.Tensor
        Kernel sum at each seed's last shift.
    converged : (M,) bool torch.Tensor
        Seeds that stopped with points within reach (followers excepted).
    n_iter : int
        Iterations run (the slowest seed's).
    """
    import torch

    pos = start.clone()
    n_seeds, dev, dt = pos.shape[0], pos.device, pos.dtype
    density = torch.zeros(n_seeds, dtype=dt, device=dev)
    active = torch.arange(n_seeds, device=dev)
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
        new = torch.where(ok[:, None], num / den.clamp(min=torch.finfo(dt).tiny)[:, None], old)
        moved = torch.linalg.vector_norm(new - old, dim=1)
        pos[active] = new
        density[active] = den
        n_iter = it + 1
        done = ~ok | (moved < tol)
        if snap is not None and bool(done.any()) and not bool(done.all()):
            done |= snap.add(pos[active[done & ok]]).hits(pos[active])
        converged[active[done & ok]] = True
        if merger is not None:
            done |= ~merger.claim(pos[active], active)
        active = active[~done]
    return pos, density, converged, n_iter


def _mode_density(density, converged, merger):
    """The density of each seed's end point as a mode: 0 for followers (a follower ends where
    the seed it follows ends) and, once any seed converged, for seeds still moving (no modes:
    their points go elsewhere)."""
    import torch

    zero = torch.zeros((), dtype=density.dtype, device=density.device)
    if merger is not None:
        root = merger.roots()
        follower = root != torch.arange(density.numel(), device=density.device)
        converged = converged[root]
        density = torch.where(follower, zero, density)
    if bool(converged.any()):
        density = torch.where(converged, density, zero)
    return density


def shift_exact(pts, pts_sq, pos, *, kernel, budget, mass=None):
    """The exact engine's shift: kernel-weighted sums over *all* points, on chunks of seeds.

    ``pts`` (N, D) and ``pos`` (S, D) in bandwidths, ``pts_sq`` ``(pts * pts).sum(1)``,
    ``mass`` (N,) the points' weights (binned points) or None.  Returns (numerator (S, D),
    denominator (S,)); the Gaussian is not truncated.
    """
    import torch

    num = torch.empty_like(pos)
    den = torch.empty(pos.shape[0], dtype=pos.dtype, device=pos.device)
    step = max(1, budget // max(1, pts.shape[0]))
    for a in range(0, pos.shape[0], step):
        w = kernel_weights(sqdist(pos[a:a + step], pts, pts_sq), kernel)
        if mass is not None:
            w = w * mass[None, :]
        num[a:a + step] = w @ pts
        den[a:a + step] = w.sum(1)
    return num, den


def flat_keys(cells):
    """One int64 per row of integer cell coordinates (N, D), equal for equal rows."""
    cells = cells - cells.min(0).values
    span = cells.max(0).values + 1
    if float(span.double().log().sum()) > math.log(2 ** 62):
        raise ValueError("the bins over the points are too many to number; use a larger bin size")
    return (cells * row_major_strides(span)).sum(1)


def bin_points(pts, bin_size):
    """Points pooled in cubic bins of side ``bin_size``: (bin means, point counts).

    The density of the pooled points, each weighted by its count, is the binned kernel
    density estimate: within a bin the points are replaced by their mean, which moves no
    point farther than the bin's diagonal and keeps the total mass and the first moment.
    """
    import torch

    _, inverse = torch.unique(flat_keys(torch.floor(pts / bin_size).long()), return_inverse=True)
    n_bins = int(inverse.max()) + 1
    count = torch.bincount(inverse, minlength=n_bins).to(pts.dtype)
    sums = torch.zeros(n_bins, pts.shape[1], dtype=pts.dtype, device=pts.device)
    sums.index_add_(0, inverse, pts)
    return sums / count[:, None], count


def merge_modes(modes, density, merge_radius, budget):
    """Greedy suppression (scikit-learn's rule): keep the densest mode, drop modes within
    ``merge_radius`` of a kept one, repeat.  Modes of density 0 are dropped first.

    Parameters
    ----------
    modes : (M, D) torch.Tensor
        Bandwidths.
    density : (M,) torch.Tensor
    merge_radius : float
        Bandwidths.
    budget : int

    Returns
    -------
    (K, D) torch.Tensor
        The kept modes, densest first.
    """
    import torch

    keep = density > 0
    modes, density = modes[keep], density[keep]
    if modes.shape[0] == 0:
        return modes
    modes = _one_per_small_cell(modes[torch.argsort(-density, stable=True)], merge_radius)
    n = modes.shape[0]
    i, j = radius_pairs(modes, merge_radius, budget)
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


def _one_per_small_cell(modes, merge_radius):
    """The first (densest) of the modes (sorted densest first) in each cell of side
    ``merge_radius / (2 sqrt(D))``: modes sharing a cell are closer than ``merge_radius / 2``."""
    import torch

    q = merge_radius / (2.0 * math.sqrt(modes.shape[1]))
    cells = torch.floor((modes - modes.min(0).values) / q).long()
    _, inverse = torch.unique(cells, dim=0, return_inverse=True)
    rank = torch.arange(modes.shape[0], device=modes.device)
    leader = torch.full((int(inverse.max()) + 1,), modes.shape[0], dtype=torch.long,
                        device=modes.device).scatter_reduce_(0, inverse, rank, reduce="amin")
    return modes[torch.sort(leader).values]


def _largest_first(modes, labels):
    """Renumber the clusters by size, largest first (ties: lower mode first): modes (K, D)
    tensor, labels (N,) and sizes (K,) int64 ndarrays."""
    import torch

    sizes = torch.bincount(labels, minlength=modes.shape[0])
    order = torch.argsort(-sizes, stable=True)
    remap = torch.empty_like(order)
    remap[order] = torch.arange(order.numel(), device=order.device)
    return (modes[order], remap[labels].cpu().numpy().astype(np.int64),
            sizes[order].cpu().numpy().astype(np.int64))
