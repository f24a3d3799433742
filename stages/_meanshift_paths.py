"""Shortcuts of the mean-shift iteration (internals of :mod:`stages.cluster`).

Both hash positions into cells of a regular grid over the points' bounding box:

* :class:`Snapper`: a moving seed in the cell of a converged one is that close to it and
  stops there (it would reach the same mode; saves the slow tail of Gaussian mean shift).
* :class:`PathMerger`: path merging, after Carreira-Perpinan's spatial discretisation
  (CVPR 2006): a seed that stops in a small cell another seed has stopped in follows that
  seed to its mode instead of climbing on alone.

Positions and sides are in bandwidths.
"""
from __future__ import annotations

import math

from stages._cluster_dense import row_major_strides

__all__ = ["Snapper", "make_snapper", "PathMerger"]


class Snapper:
    """Converged positions hashed into cells of side ``radius / sqrt(D)``: a query in the
    same cell as one of them is closer than ``radius`` to it.  Build with :func:`make_snapper`."""

    def __init__(self, side, lo, strides, top):
        self.q, self.lo, self.strides, self.top = side, lo, strides, top
        self.keys = None

    def keys_of(self, x):
        """Cell key (int64) of each row of ``x``; rows outside the box go to its edge cells."""
        import torch

        c = torch.floor((x - self.lo) / self.q).long()
        c = torch.minimum(c.clamp(min=0), self.top)
        return (c * self.strides).sum(1)

    def add(self, x):
        """Record the cells of the rows of ``x``; returns self."""
        import torch

        k = self.keys_of(x)
        self.keys = torch.unique(k if self.keys is None else torch.cat([self.keys, k]))
        return self

    def hits(self, x):
        """Mask of the rows of ``x`` that lie in a recorded cell."""
        import torch

        return torch.isin(self.keys_of(x), self.keys)


def make_snapper(pts, radius):
    """An empty :class:`Snapper` of ``radius`` (bandwidths) over the bounding box of ``pts``
    (where mean shift keeps every seed that has neighbours), or None where the cell keys
    could overflow int64."""
    import torch

    q = radius / math.sqrt(pts.shape[1])
    lo = pts.min(0).values - q
    n_cells = torch.ceil((pts.max(0).values - lo) / q).double() + 2
    if float(n_cells.log().sum()) > math.log(2 ** 62):
        return None
    span = n_cells.long()
    return Snapper(q, lo, row_major_strides(span), span - 1)


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


class PathMerger:
    """Spatial discretisation of the seeds' paths (Carreira-Perpinan, CVPR 2006).

    Every cell a seed stops in after an iteration is recorded with that seed as its owner;
    a seed that later stops in a cell another seed owns would follow that seed's path from
    there on, so it stops and follows it (``parent``).  Seeds arriving in one unowned cell
    in the same iteration follow the lowest-numbered of them.  The cells are a
    :class:`Snapper`'s, their int64 keys kept in a few sorted runs of decreasing length
    (``searchsorted`` lookups in each): a new iteration's cells are a new run, merged with
    the last while it is at least half its length, so every key is moved O(log) times in
    all instead of once an iteration.

    Parameters
    ----------
    hasher : Snapper
        Gives the cells (its recorded keys are not used).
    n_seeds : int
        Seeds, numbered ``0 .. n_seeds - 1``.
    device : torch.device
    """

    def __init__(self, hasher, n_seeds, device):
        import torch

        self.h = hasher
        self.runs = []                  # (sorted keys, their owners), longest first
        self.parent = torch.arange(n_seeds, device=device)

    def claim(self, x, ids):
        """Record the cells of positions ``x`` of seeds ``ids`` (increasing); returns the
        mask of those that own their cell (the others now follow an owner)."""
        import torch

        k = self.h.keys_of(x)
        found = torch.zeros(k.numel(), dtype=torch.bool, device=k.device)
        owner = ids.clone()
        for keys, owners in self.runs:
            idx = torch.searchsorted(keys, k).clamp(max=keys.numel() - 1)
            hit = keys[idx] == k
            owner = torch.where(hit, owners[idx], owner)
            found |= hit
        follow = found & (owner != ids)
        self.parent[ids[follow]] = owner[follow]
        sel = torch.nonzero(~found).reshape(-1)
        if sel.numel():
            self._own_new_cells(k, ids, sel, follow)
        return ~follow

    def _own_new_cells(self, k, ids, sel, follow):
        """Give each cell ``k[sel]`` (none owned yet) to its lowest-numbered seed; the
        others in it follow that one (``follow`` is updated in place)."""
        import torch

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
        self.runs.append((ks[head], ids[first_sel[head]]))
        while len(self.runs) > 1 and 2 * self.runs[-1][0].numel() >= self.runs[-2][0].numel():
            new_keys, new_owners = self.runs.pop()
            self.runs[-1] = _insert_sorted(*self.runs[-1], new_keys, new_owners)

    def roots(self):
        """Each seed's final owner (following chains of owners)."""
        import torch

        root = self.parent.clone()
        while True:
            nxt = root[root]
            if torch.equal(nxt, root):
                return root
            root = nxt
