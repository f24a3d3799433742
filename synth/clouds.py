"""Point clouds for the clustering tests: lung tissue's shape in five features.

A lung's tissue voxels, as :func:`stages.features.extract_features` gives them, are vessels
(long thin tubes with many weak density modes along them) and nodules (compact blobs);
:func:`tubes_and_blobs` draws such a cloud, already in bandwidths.
"""
from __future__ import annotations

import numpy as np

__all__ = ["tubes_and_blobs"]


def tubes_and_blobs(rng, n_tubes=4, n_per=200, n_blobs=3, *, tube_hu_sd=0.3, tube_si_sd=0.2):
    """A 5-D cloud like lung tissue: ``n_tubes`` vessels and ``n_blobs`` nodules.

    Parameters
    ----------
    rng : numpy.random.Generator
        The draws, in a fixed order (the same generator state gives the same cloud).
    n_tubes, n_per, n_blobs : int
        Tubes, points per tube, blobs (``n_per // 2`` points each).
    tube_hu_sd, tube_si_sd : float
        Spread of the tubes' intensity and shape-index features (bandwidths).

    Returns
    -------
    (n_tubes * n_per + n_blobs * (n_per // 2), 5) float64 ndarray
        z, y, x (in a 25-bandwidth box), intensity, shape index; tubes first.
    """
    parts = []
    for _ in range(n_tubes):
        a, b = rng.uniform(0, 25, 3), rng.uniform(0, 25, 3)
        t = rng.uniform(0, 1, (n_per, 1))
        xyz = a + t * (b - a) + rng.normal(0, 0.3, (n_per, 3))
        parts.append(np.column_stack([xyz, rng.normal(1.5, tube_hu_sd, n_per),
                                      rng.normal(3.0, tube_si_sd, n_per)]))
    for _ in range(n_blobs):
        c = rng.uniform(0, 25, 3)
        xyz = c + rng.normal(0, 0.6, (n_per // 2, 3))
        parts.append(np.column_stack([xyz, rng.normal(3.0, 0.3, n_per // 2),
                                      rng.normal(4.0, 0.2, n_per // 2)]))
    return np.concatenate(parts)
