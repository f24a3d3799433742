"""Lloyd's k-means in torch (internals of :func:`stages.cluster.kmeans`).

The same code runs on CPU and CUDA; distances come in chunks of points
(:func:`stages._cluster_dense.nearest`).
"""
from __future__ import annotations

import numpy as np

from stages._cluster_dense import nearest, pair_budget, sqdist

__all__ = ["run", "init_centres", "lloyd"]


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
        Working precision.

    Returns
    -------
    centres : (k, D) float64 ndarray
        Input units.
    labels : (N,) int64 ndarray
    n_iter : int
    inertia : float
        Sum of squared distances of the points to their centres (squared input units).
    """
    import torch

    budget = pair_budget(device)
    mean = points.mean(0)
    pts = torch.as_tensor(points - mean, dtype=dtype, device=device)
    thresh = tol * float(points.var(0).mean())
    centres = init_centres(pts, k, init, np.random.default_rng(seed))
    centres, n_iter = lloyd(pts, centres, max_iter, thresh, budget)
    labels, dist = nearest(pts, centres, budget, with_distance=True)
    return (centres.double().cpu().numpy() + mean, labels.cpu().numpy().astype(np.int64),
            int(n_iter), float(dist.double().sum()))


def init_centres(pts, k, init, rng):
    """``k`` rows of ``pts`` as first centres: a random first one (from ``rng``), then the
    farthest point from those chosen (``"farthest"``) or one drawn with probability
    proportional to the squared distance to them (``"k-means++"``)."""
    import torch

    n = pts.shape[0]
    first = int(rng.integers(n))
    chosen = [first]
    dmin = sqdist(pts, pts[first:first + 1])[:, 0]
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
        dmin = torch.minimum(dmin, sqdist(pts, pts[nxt:nxt + 1])[:, 0])
    return pts[torch.tensor(chosen, device=pts.device)].clone()


def lloyd(pts, centres, max_iter, thresh, budget):
    """Lloyd iterations from ``centres`` until the summed squared centre shift is at most
    ``thresh`` (with no empty cluster) or ``max_iter`` ran: (centres, iterations run).

    A cluster left empty is given the point farthest from its own centre (the next
    farthest for the next empty cluster), so the result stays deterministic.
    """
    import torch

    k = centres.shape[0]
    n_iter = 0
    for it in range(max_iter):
        labels, dist = nearest(pts, centres, budget, with_distance=True)
        sums = torch.zeros_like(centres).index_add_(0, labels, pts)
        counts = torch.bincount(labels, minlength=k)
        new = sums / counts.clamp(min=1)[:, None].to(pts.dtype)
        empty = torch.nonzero(counts == 0).reshape(-1)
        if empty.numel():
            far = torch.argsort(dist, descending=True, stable=True)[:empty.numel()]
            new[empty] = pts[far]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        n_iter = it + 1
        if shift <= thresh and not empty.numel():
            break
    return centres, n_iter
