"""Dense torch kernels shared by mean shift and k-means (internals of :mod:`stages.cluster`).

Squared distances come from ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product), on chunks of
queries whose (query, point) pairs stay under :data:`PAIR_BUDGET`, so memory is bounded on
any cloud.  All tensors stay on the device they come on; nothing here picks a device.
"""
from __future__ import annotations

__all__ = ["PAIR_BUDGET", "pair_budget", "sqdist", "kernel_weights", "nearest", "row_major_strides"]

#: (query, point) pairs handled at once: bounds the memory of one chunk (about 100 bytes
#: per pair for 5-D float32 points).
PAIR_BUDGET = {"cpu": 1 << 21, "cuda": 1 << 26}


def pair_budget(device) -> int:
    """The :data:`PAIR_BUDGET` entry of a torch device (CUDA, or the CPU one for any other)."""
    return PAIR_BUDGET["cuda" if device.type == "cuda" else "cpu"]


def sqdist(a, b, b_sq=None):
    """Squared Euclidean distances between the rows of ``a`` and ``b``, clamped at 0.

    Parameters
    ----------
    a : (A, D) torch.Tensor
    b : (B, D) torch.Tensor
        Same dtype and device as ``a``.
    b_sq : (B,) torch.Tensor, optional
        ``(b * b).sum(1)``, when the caller reuses it over chunks of ``a``.

    Returns
    -------
    (A, B) torch.Tensor
        In the squared units of the rows.
    """
    a_sq = (a * a).sum(1)
    if b_sq is None:
        b_sq = (b * b).sum(1)
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_(min=0)


def kernel_weights(d2, kernel, reach2=None):
    """Mean-shift kernel weights of squared distances ``d2`` (squared bandwidths).

    ``"flat"``: 1 within one bandwidth, else 0.  ``"gaussian"``: ``exp(-d2 / 2)``, set to 0
    beyond ``reach2`` (squared bandwidths) when given, untruncated otherwise.
    """
    import torch

    if kernel == "flat":
        return (d2 <= 1.0).to(d2.dtype)
    w = torch.exp(-0.5 * d2)
    if reach2 is not None:
        w = torch.where(d2 <= reach2, w, torch.zeros((), dtype=d2.dtype, device=d2.device))
    return w


def nearest(pts, centres, budget):
    """Index of the nearest centre of every point, computed on chunks of points.

    Parameters
    ----------
    pts : (N, D) torch.Tensor
    centres : (K, D) torch.Tensor
    budget : int
        Most (point, centre) pairs per chunk.

    Returns
    -------
    labels : (N,) int64 torch.Tensor
    """
    import torch

    labels = torch.empty(pts.shape[0], dtype=torch.long, device=pts.device)
    c_sq = (centres * centres).sum(1)
    step = max(1, budget // max(1, centres.shape[0]))
    for a in range(0, pts.shape[0], step):
        labels[a:a + step] = torch.argmin(sqdist(pts[a:a + step], centres, c_sq), 1)
    return labels


def row_major_strides(sizes):
    """Strides (int64 tensor) that number the cells of a grid of ``sizes`` cells per axis
    in row-major order: cell ``c`` gets ``(c * strides).sum()``."""
    import torch

    strides = torch.ones_like(sizes)
    for i in range(sizes.numel() - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    return strides
