"""k-means in torch (internals of :func:`stages.cluster.kmeans`).

Lloyd's algorithm with scikit-learn's stopping rules, made cheap by three things; the same
code runs on CPU and CUDA:

* Hamerly's bounds (Hamerly, "Making k-means even faster", SDM 2010): each point keeps an
  upper bound on the distance to its centre and a lower bound on the distance to every other
  centre, moved by the centres' drifts after each update.  A point whose upper bound is below
  ``max(lower bound, half the distance from its centre to the nearest other centre)`` cannot
  change cluster and is skipped: after the first iterations 85-95 % of the lung1 tissue
  cloud is.
* Centre sums kept in 64-bit fixed point (:class:`_Fixed`) and updated with the points that
  moved only: integer sums are exact and do not depend on the order of the additions, so
  the incremental update equals a full recount and CUDA's atomic ``index_add_`` is as
  deterministic as the CPU's.
* Distances of the points that need them from one matrix product per chunk
  (``|c|^2 - 2 x.c``, on centred points); the distance to the chosen centre again from the
  difference, so that the upper bound is exact to rounding.

On the CPU it runs on torch's threads, at most :data:`CPU_THREADS` when that is set.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from stages._cluster_dense import pair_budget

__all__ = ["run", "init_centres", "lloyd"]

#: Bits of the 64-bit fixed-point sums left free: the sum of all points' magnitudes stays
#: below ``2**FIXED_BITS``, so no partial sum can overflow an int64.
FIXED_BITS = 62
#: torch CPU threads of a k-means run at most (None: torch's own setting, all cores by default,
#: as scikit-learn's OpenMP uses).  On the 2-core machine with nothing else running, the
#: whole-lung run (309,086 points, k=64, median of 5 seeds) took 1.09 s on 2 threads and
#: 1.75 s on 1 (scikit-learn, 2 threads: 1.91 s); at load 4 (other jobs on the cores) 1
#: thread was faster (3.3 s against 16.2 s), so a batch that shares its cores may set 1 here.
CPU_THREADS = None


class _Fixed:
    """Centred points (float64 tensor) as int64 multiples of ``2**-shift``: exact,
    order-free sums."""

    def __init__(self, centred):
        import torch

        n = centred.shape[0]
        top = float(centred.abs().max())
        self.shift = (0 if top == 0.0 else
                      min(1000, math.floor(FIXED_BITS - math.log2(n) - math.log2(top)) - 1))
        self.q = torch.round(centred * math.ldexp(1.0, self.shift)).to(torch.int64)
        self.unit = math.ldexp(1.0, -self.shift)

    def means(self, sums, counts, old):
        """float64 means of clusters with ``counts > 0``; ``old`` for the empty ones."""
        import torch

        mean = sums.double() * self.unit / counts.clamp(min=1)[:, None].double()
        return torch.where((counts > 0)[:, None], mean, old)


def run(points, k, *, init, max_iter, tol, seed, device, dtype):
    """k-means of checked inputs.

    Parameters
    ----------
    points : (N, D) float64 ndarray
    k : int
    init : {"farthest", "k-means++"}
    max_iter : int
    tol : float
        Relative to the mean feature variance (see :func:`stages.cluster.kmeans`).
    seed : int
    device : torch.device
    dtype : torch.dtype
        Working precision of the distances.

    Returns
    -------
    centres : (k, D) float64 ndarray
        Input units.
    labels : (N,) int64 ndarray
    n_iter : int
    inertia : float
        Sum of squared distances of the points to their centres (squared input units).
    """
    with _cpu_threads(device, CPU_THREADS):
        return _run(points, k, init=init, max_iter=max_iter, tol=tol, seed=seed, device=device,
                    dtype=dtype)


@contextmanager
def _cpu_threads(device, n):
    """torch's CPU threads at most ``n`` inside the block (set back after; nothing on CUDA or
    when ``n`` is None)."""
    import torch

    before = torch.get_num_threads()
    if device.type != "cpu" or n is None or before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(points, k, *, init, max_iter, tol, seed, device, dtype):
    import torch

    budget = pair_budget(device)
    x = torch.as_tensor(points, dtype=torch.float64, device=device)
    mean = x.mean(0)
    centred = x - mean
    thresh = tol * float((centred * centred).mean(0).mean())  # mean feature variance
    pts = centred.to(dtype)
    fixed = _Fixed(centred)
    del x, centred
    first = init_centres(pts, k, init, np.random.default_rng(seed))
    centres = fixed.q[first].double() * fixed.unit
    centres, labels, n_iter = lloyd(pts, fixed, centres, max_iter, thresh, budget)
    resid = fixed.q.double() * fixed.unit - centres[labels]
    inertia = float((resid * resid).sum())
    return ((centres + mean).cpu().numpy(), labels.cpu().numpy(), int(n_iter), inertia)


def _sq_to(rows, pts_t, sq):
    """(R, N) squared distances of ``rows`` to the points ``pts_t`` (D, N) with norms ``sq``,
    clamped at 0.  The (D, N) layout makes the thin matrix product stream the points once."""
    import torch

    return torch.addmm(sq[None, :], rows, pts_t, alpha=-2.0).add_(
        (rows * rows).sum(1)[:, None]).clamp_(min=0)


def local_trials(k):
    """Draws per centre of greedy k-means++: ``2 + int(log(k))``, scikit-learn's number."""
    return 2 + int(np.log(k))


def init_centres(pts, k, init, rng):
    """Indices (int64 tensor, on ``pts``' device) of ``k`` rows of ``pts`` to start from.

    A random first row (from ``rng``), then ``"farthest"``: the row farthest from those
    chosen; ``"k-means++"``: scikit-learn's greedy k-means++ (Arthur & Vassilvitskii 2007),
    :func:`local_trials` rows drawn with probability proportional to the squared distance to
    the nearest chosen one and the one that lowers the summed squared distance most kept.
    No step waits for the device: every choice stays a tensor.
    """
    import torch

    n, dev = pts.shape[0], pts.device
    pts_t = pts.T.contiguous()
    sq = (pts * pts).sum(1)
    idx = torch.empty(k, dtype=torch.long, device=dev)
    first = int(rng.integers(n))
    idx[0] = first
    closest = _sq_to(pts[first:first + 1], pts_t, sq)[0]
    if init == "farthest":
        for c in range(1, k):
            nxt = torch.argmax(closest)
            idx[c] = nxt
            closest = torch.minimum(closest, _sq_to(pts[nxt][None], pts_t, sq)[0])
        return idx
    trials = local_trials(k)
    draws = torch.as_tensor(rng.random((max(k - 1, 0), trials)), dtype=torch.float64, device=dev)
    pot = closest.sum(dtype=torch.float64)
    for c in range(1, k):
        csum = torch.cumsum(closest, 0, dtype=torch.float64)
        cand = torch.searchsorted(csum, draws[c - 1] * pot).clamp_(max=n - 1)
        d2 = torch.minimum(_sq_to(pts[cand], pts_t, sq), closest[None, :])
        pots = d2.sum(1, dtype=torch.float64)
        best = torch.argmin(pots)
        pot = pots[best]
        closest = d2[best]
        idx[c] = cand[best]
    return idx


def _nearest(x, sq, cw, c_sq, budget):
    """Nearest centre of each row of ``x`` (norms ``sq``), the distance to it (from the
    difference, exact to rounding) and to the second nearest (from the matrix product; inf
    with one centre), on chunks of at most ``budget`` (row, centre) pairs."""
    import torch

    k = cw.shape[0]
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    second = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    step = max(1, budget // k)
    for a in range(0, n, step):
        part = torch.addmm(c_sq, x[a:a + step], cw.T, alpha=-2.0)  # |c|^2 - 2 x.c
        j = torch.argmin(part, 1)
        labels[a:a + step] = j
        if k > 1:
            second[a:a + step] = part.scatter_(1, j[:, None], float("inf")).amin(1)
    diff = x - cw[labels]
    return labels, (diff * diff).sum(1).sqrt_(), second.add_(sq).clamp_(min=0).sqrt_()


def _half_gaps(centres, dtype):
    """Half the distance from each centre to the nearest other one (None for one centre):
    a point within it of its centre is nearer to it than to any other."""
    import torch

    if centres.shape[0] < 2:
        return None
    gap = torch.cdist(centres, centres).fill_diagonal_(float("inf"))
    return (0.5 * gap.amin(1)).to(dtype)


class _State:
    """Labels, distance bounds and fixed-point cluster sums of one k-means run.

    Hamerly's bounds: ``upper`` bounds each point's distance to its centre, ``lower`` its
    distance to every other centre; a point whose ``upper`` is at most the larger of
    ``lower`` and half the distance from its centre to the nearest other centre cannot
    change cluster and is skipped.
    """

    def __init__(self, pts, fixed, centres, budget):
        import torch

        self.pts, self.fixed, self.budget = pts, fixed, budget
        self.sq = (pts * pts).sum(1)
        k = centres.shape[0]
        cw = centres.to(pts.dtype)
        self.labels, self.upper, self.lower = _nearest(pts, self.sq, cw, (cw * cw).sum(1), budget)
        self.sums = torch.zeros((k, pts.shape[1]), dtype=torch.long, device=pts.device)
        self.sums.index_add_(0, self.labels, fixed.q)
        self.counts = torch.bincount(self.labels, minlength=k)

    def assign(self, centres):
        """Move every point that the bounds do not pin to its nearest centre; points moved."""
        import torch

        cw = centres.to(self.pts.dtype)
        bound = self.lower
        half = _half_gaps(centres, self.pts.dtype)
        if half is not None:
            bound = torch.maximum(half[self.labels], bound)
        cand = torch.nonzero(self.upper > bound).reshape(-1)
        if cand.numel() == 0:
            return 0
        diff = self.pts[cand] - cw[self.labels[cand]]
        tight = (diff * diff).sum(1).sqrt_()
        self.upper[cand] = tight
        cand = cand[tight > bound[cand]]
        if cand.numel() == 0:
            return 0
        new, self.upper[cand], self.lower[cand] = _nearest(
            self.pts[cand], self.sq[cand], cw, (cw * cw).sum(1), self.budget)
        old = self.labels[cand]
        self.labels[cand] = new
        moved = new != old
        rows = cand[moved]
        if rows.numel() == 0:
            return 0
        self._move(rows, old[moved], new[moved])
        return int(rows.numel())

    def _move(self, rows, old, new):
        import torch

        q = self.fixed.q[rows]
        self.sums.index_add_(0, new, q).index_add_(0, old, -q)
        one = torch.ones_like(old)
        self.counts.index_add_(0, new, one).index_add_(0, old, -one)

    def relocate_empty(self, centres):
        """Give each empty cluster the point farthest from its centre (scikit-learn's rule;
        the next farthest for the next one), when that point is not on its centre.  Returns
        the number of clusters filled."""
        import torch

        empty = torch.nonzero(self.counts == 0).reshape(-1)
        if empty.numel() == 0:
            return 0
        diff = self.pts - centres.to(self.pts.dtype)[self.labels]
        dist = (diff * diff).sum(1)
        far = torch.argsort(dist, descending=True, stable=True)[:empty.numel()]
        far = far[dist[far] > 0]
        if far.numel() == 0:
            return 0
        to = empty[:far.numel()]
        self._move(far, self.labels[far], to)
        self.labels[far] = to
        self.upper[far] = float("inf")  # examined again at the next assignment
        self.lower[far] = 0.0
        return int(far.numel())

    def drift(self, old, new):
        """Widen the bounds by the centres' moves from ``old`` to ``new``: each point's
        ``upper`` by its centre's move, ``lower`` by the largest move of the other centres.
        Returns the summed squared move."""
        import torch

        step = ((new - old) ** 2).sum(1)
        move = step.sqrt().to(self.pts.dtype)
        self.upper += move[self.labels]
        if move.numel() > 1:
            top, who = torch.topk(move, 2)
            self.lower -= torch.where(self.labels == who[0], top[1], top[0])
        return float(step.sum())


def lloyd(pts, fixed, centres, max_iter, thresh, budget):
    """Lloyd iterations from ``centres`` (float64, centred units) with scikit-learn's rules:
    stop when no label changed (strict convergence) or when the summed squared centre shift
    is at most ``thresh`` (then one more assignment, so that labels match the centres), or
    after ``max_iter`` iterations.  Returns (centres, labels, iterations run).

    An iteration with a cluster left empty gives it a point (:meth:`_State.relocate_empty`)
    and does not count as converged.
    """
    state = _State(pts, fixed, centres, budget)
    for it in range(max_iter):
        if it and state.assign(centres) == 0:
            return centres, state.labels, it + 1
        filled = state.relocate_empty(centres)
        new = fixed.means(state.sums, state.counts, centres)
        shift = state.drift(centres, new)
        centres = new
        if shift <= thresh and not filled:
            break
    state.assign(centres)
    return centres, state.labels, it + 1
