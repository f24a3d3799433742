"""Voxel features for candidate clustering: position, HU and the volumetric shape index.

Shape index and curvedness
--------------------------
The volume is smoothed with a Gaussian of ``sigma_mm`` and its gradient and Hessian
(central differences, per mm) are taken at the voxels asked for.  Where the gradient is
clear, the Hessian restricted to the plane normal to it has eigenvalues ``k1 >= k2``: the
principal curvatures of the local iso-surface times the gradient magnitude, which the
shape index does not see.  Near a blob's or a tube's centre the gradient vanishes; there
the Hessian eigenvalue of largest magnitude is taken as the normal one and the other two
are ``k1 >= k2`` (the limit of the same quantity).  Then (Koenderink;
Yoshida & Näppi 2001, IEEE TMI 20(12):1261-1274)::

    SI = 1/2 - (1/pi) * arctan((k1 + k2) / (k1 - k2))           in [0, 1]
    CV = sigma_mm**2 * sqrt((k1**2 + k2**2) / 2)                  in HU

so a bright blob (cap, all curvatures negative and equal) gives SI = 1, a bright tube
(ridge: ``k1 = 0 > k2``) 0.75, a flat sheet or plateau 0.5 (its curvedness is about 0),
a dark tube (rut) 0.25 and a dark blob (cup) 0.  Curvedness is scale-normalised
(``sigma**2`` times second derivatives), in HU.

Eigenvalues come from the closed form for symmetric 3x3 matrices (Smith 1961),
vectorised over voxels in chunks, so only the voxels needed are ever computed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from stages.volume import Volume, check_volume

__all__ = ["shape_index", "extract_features", "hessian_eigenvalues", "HU_FLOOR",
           "SIGMA_MM", "SCALE_MM", "SCALE_HU", "SCALE_SI", "FEATURE_NAMES"]

#: Voxels at or below this many HU are lung parenchyma (about -850), not structure: not
#: features.  Ground-glass nodules are about -600 HU, so the floor sits below them.
HU_FLOOR = -700.0
#: Gaussian smoothing (mm) before second derivatives; about the radius of a 3 mm nodule.
SIGMA_MM = 1.5
#: Feature scales: a difference of one scale unit in any feature counts as much as one
#: of one unit in another, so a single mean-shift bandwidth (1.0) fits all.
SCALE_MM = 4.0
SCALE_HU = 250.0
SCALE_SI = 0.2
#: Columns of the feature matrix, before scaling.
FEATURE_NAMES = ("z_mm", "y_mm", "x_mm", "hu", "shape_index")
#: The gradient gives the iso-surface normal where ``|grad| >= GRADIENT_RATIO * sigma_mm *
#: max|eigenvalue|`` (off a blob's or tube's centre by about half a sigma); nearer the
#: centre the normal is the eigenvector of largest magnitude.
GRADIENT_RATIO = 0.5
#: Voxels handled at once (bounds memory: about 200 bytes each).
CHUNK_VOXELS = 1 << 20


def _check_positive(name, value):
    if not np.isscalar(value) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _eig_sym3(a, b, c, d, e, f):
    """Eigenvalues (N, 3), ascending, of [[a, d, e], [d, b, f], [e, f, c]] (float64)."""
    p1 = d * d + e * e + f * f
    q = (a + b + c) / 3.0
    p2 = (a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe = p > 1e-12 * (np.abs(q) + 1.0)
    ps = np.where(safe, p, 1.0)
    ba, bb, bc = (a - q) / ps, (b - q) / ps, (c - q) / ps
    bd, be, bf = d / ps, e / ps, f / ps
    det = ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)
    r = np.clip(det / 2.0, -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    hi = q + 2.0 * ps * np.cos(phi)
    lo = q + 2.0 * ps * np.cos(phi + 2.0 * np.pi / 3.0)
    mid = 3.0 * q - hi - lo
    out = np.stack([lo, mid, hi], axis=-1)
    out[~safe] = q[~safe, None]
    return out


def _smoothed_box(vol: Volume, index_zyx: np.ndarray, sigma_mm: float):
    """Gaussian-smoothed float32 crop around the points (margin for the kernel), and its offset."""
    margin = [int(np.ceil(4 * sigma_mm / s)) + 2 for s in vol.spacing_mm]
    lo = np.maximum(index_zyx.min(axis=0) - margin, 0)
    hi = np.minimum(index_zyx.max(axis=0) + margin + 1, vol.shape)
    crop = vol.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    sig = [sigma_mm / s for s in vol.spacing_mm]
    sm = ndi.gaussian_filter(crop, sig, mode="nearest")
    return np.pad(sm, 1, mode="edge"), lo - 1


def hessian_eigenvalues(vol: Volume, index_zyx, *, sigma_mm: float = SIGMA_MM) -> np.ndarray:
    """Eigenvalues of the Gaussian-smoothed Hessian at the given voxels, ascending.

    Parameters
    ----------
    vol : Volume
        Scan (any numeric dtype; HU for CT).
    index_zyx : (N, 3) array_like of int
        Voxel indices ``(z, y, x)`` inside the array.
    sigma_mm : float
        Standard deviation (mm) of the Gaussian smoothing.

    Returns
    -------
    (N, 3) ndarray of float64
        Eigenvalues in HU/mm^2 (units of the array per mm^2), smallest first.

    Examples
    --------
    >>> z, y, x = np.mgrid[:21, :21, :21]
    >>> ball = Volume(np.where((z-10)**2 + (y-10)**2 + (x-10)**2 <= 16, 100, 0), spacing_mm=(1, 1, 1))
    >>> lam = hessian_eigenvalues(ball, [[10, 10, 10]])
    >>> bool(np.all(lam < 0)), bool(np.allclose(lam, lam[0, 0]))
    (True, True)
    """
    check_volume(vol, allow_bool=False)
    _check_positive("sigma_mm", sigma_mm)
    idx = np.asarray(index_zyx)
    if idx.ndim != 2 or idx.shape[1] != 3 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"index_zyx must be an (N, 3) integer array, got shape {idx.shape} "
                         f"dtype {idx.dtype}")
    if idx.shape[0] == 0:
        return np.zeros((0, 3))
    if np.any(idx < 0) or np.any(idx >= np.asarray(vol.shape)):
        raise ValueError(f"index_zyx must lie inside the array of shape {vol.shape}")
    _, hess = _derivatives(vol, idx, sigma_mm)
    return _eig_sym3(*hess.T)


def _derivatives(vol: Volume, idx: np.ndarray, sigma_mm: float):
    """Gradient (N, 3) and Hessian (N, 6: zz, yy, xx, zy, zx, yx) of the smoothed volume, per mm."""
    sm, off = _smoothed_box(vol, idx, sigma_mm)
    dz, dy, dx = vol.spacing_mm
    grad = np.empty((idx.shape[0], 3))
    hess = np.empty((idx.shape[0], 6))
    for start in range(0, idx.shape[0], CHUNK_VOXELS):
        p = idx[start:start + CHUNK_VOXELS] - off
        z, y, x = p[:, 0], p[:, 1], p[:, 2]
        c = sm[z, y, x].astype(np.float64)
        end = start + len(p)

        def at(oz, oy, ox):
            return sm[z + oz, y + oy, x + ox].astype(np.float64)

        grad[start:end, 0] = (at(1, 0, 0) - at(-1, 0, 0)) / (2 * dz)
        grad[start:end, 1] = (at(0, 1, 0) - at(0, -1, 0)) / (2 * dy)
        grad[start:end, 2] = (at(0, 0, 1) - at(0, 0, -1)) / (2 * dx)
        hess[start:end, 0] = (at(1, 0, 0) - 2 * c + at(-1, 0, 0)) / (dz * dz)
        hess[start:end, 1] = (at(0, 1, 0) - 2 * c + at(0, -1, 0)) / (dy * dy)
        hess[start:end, 2] = (at(0, 0, 1) - 2 * c + at(0, 0, -1)) / (dx * dx)
        hess[start:end, 3] = (at(1, 1, 0) - at(1, -1, 0) - at(-1, 1, 0) + at(-1, -1, 0)) / (4 * dz * dy)
        hess[start:end, 4] = (at(1, 0, 1) - at(1, 0, -1) - at(-1, 0, 1) + at(-1, 0, -1)) / (4 * dz * dx)
        hess[start:end, 5] = (at(0, 1, 1) - at(0, 1, -1) - at(0, -1, 1) + at(0, -1, -1)) / (4 * dy * dx)
    return grad, hess


def _si_cv(grad: np.ndarray, hess: np.ndarray, sigma_mm: float):
    """Shape index and curvedness from gradient (N, 3) and Hessian (N, 6) (module notes)."""
    lam = _eig_sym3(*hess.T)
    l1, l2, l3 = lam[:, 0], lam[:, 1], lam[:, 2]
    drop_low = np.abs(l1) >= np.abs(l3)
    k1 = np.where(drop_low, l3, l2)
    k2 = np.where(drop_low, l2, l1)
    # where the gradient is clear, the normal is its direction: curvatures of the
    # Hessian restricted to the tangent plane (robust at an edge's inflection)
    gnorm = np.linalg.norm(grad, axis=1)
    edge = (gnorm > 0) & (gnorm >= GRADIENT_RATIO * sigma_mm * np.abs(lam).max(axis=1))
    if edge.any():
        n = grad[edge] / gnorm[edge, None]
        h = hess[edge]
        hm = np.empty((n.shape[0], 3, 3))
        hm[:, 0, 0], hm[:, 1, 1], hm[:, 2, 2] = h[:, 0], h[:, 1], h[:, 2]
        hm[:, 0, 1] = hm[:, 1, 0] = h[:, 3]
        hm[:, 0, 2] = hm[:, 2, 0] = h[:, 4]
        hm[:, 1, 2] = hm[:, 2, 1] = h[:, 5]
        axis = np.eye(3)[np.argmin(np.abs(n), axis=1)]
        u = np.cross(n, axis)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        v = np.cross(n, u)
        huu = np.einsum("ni,nij,nj->n", u, hm, u)
        hvv = np.einsum("ni,nij,nj->n", v, hm, v)
        huv = np.einsum("ni,nij,nj->n", u, hm, v)
        half = np.sqrt(((huu - hvv) / 2) ** 2 + huv ** 2)
        k1[edge] = (huu + hvv) / 2 + half
        k2[edge] = (huu + hvv) / 2 - half
    si = 0.5 - np.arctan2(k1 + k2, k1 - k2) / np.pi
    cv = sigma_mm ** 2 * np.sqrt((k1 * k1 + k2 * k2) / 2.0)
    return si.astype(np.float32), cv.astype(np.float32)


def shape_index(vol: Volume, *, sigma_mm: float = SIGMA_MM, mask: Volume | None = None):
    """Volumetric shape index and curvedness of a scan (see the module notes).

    Parameters
    ----------
    vol : Volume
        Scan in HU (any numeric dtype).
    sigma_mm : float
        Gaussian smoothing (mm) before the second derivatives: the scale of the shapes seen.
    mask : Volume, optional
        Compute only where ``mask.array`` is non-zero (same grid as ``vol``); NaN elsewhere.
        Default: everywhere.

    Returns
    -------
    shape_index : Volume
        float32 in [0, 1] (1 bright blob, 0.75 bright tube, 0.5 flat, 0 dark blob).
    curvedness : Volume
        float32, scale-normalised curvedness in HU (>= 0).

    Raises
    ------
    TypeError
        If ``vol`` or ``mask`` is not a numeric Volume.
    ValueError
        If ``sigma_mm`` is not positive or ``mask`` is on another grid.

    Examples
    --------
    >>> z, y, x = np.mgrid[:21, :21, :21]
    >>> ball = Volume(np.where((z-10)**2 + (y-10)**2 + (x-10)**2 <= 16, 0, -1000), spacing_mm=(1, 1, 1))
    >>> si, cv = shape_index(ball)
    >>> si.array.dtype.name, round(float(si.array[10, 10, 10]), 3)
    ('float32', 1.0)
    """
    check_volume(vol, allow_bool=False)
    _check_positive("sigma_mm", sigma_mm)
    if mask is not None:
        check_volume(mask, "mask")
        vol.check_same_geometry(mask)
        sel = mask.array != 0
    else:
        sel = np.ones(vol.shape, bool)
    si = np.full(vol.shape, np.nan, np.float32)
    cv = np.full(vol.shape, np.nan, np.float32)
    idx = np.argwhere(sel)
    if idx.shape[0]:
        s, c = _si_cv(*_derivatives(vol, idx, sigma_mm), sigma_mm)
        si[sel] = s
        cv[sel] = c
    return vol.with_array(si), vol.with_array(cv)


def extract_features(vol: Volume, mask: Volume, *, hu_floor: float = HU_FLOOR,
                     sigma_mm: float = SIGMA_MM, scale_mm: float = SCALE_MM,
                     scale_hu: float = SCALE_HU, scale_si: float = SCALE_SI):
    """Feature points of the dense voxels inside the lungs, scaled for one mean-shift bandwidth.

    Parameters
    ----------
    vol : Volume
        CT in HU.
    mask : Volume
        Lung mask on the same grid (non-zero inside), e.g. from :func:`stages.lungmask.segment_lungs`.
    hu_floor : float
        Only voxels above this many HU are kept (vessels, nodules, walls; not parenchyma).
    sigma_mm : float
        Smoothing (mm) for the shape index.
    scale_mm, scale_hu, scale_si : float
        Divisors of the world position (mm), the HU value and the shape index.

    Returns
    -------
    points : (N, 5) ndarray of float32
        ``(z_mm, y_mm, x_mm, hu, shape_index)`` (:data:`FEATURE_NAMES`), world LPS
        coordinates, each column divided by its scale: ``points[:, :3] * scale_mm`` is the
        world position in mm, ``points[:, 3] * scale_hu`` the HU, ``points[:, 4] * scale_si``
        the shape index.
    index_zyx : (N, 3) ndarray of int64
        The voxel index of each point, in the same order.

    Raises
    ------
    TypeError
        If ``vol`` or ``mask`` is not a numeric Volume.
    ValueError
        If a scale or ``sigma_mm`` is not positive or ``mask`` is on another grid.

    Examples
    --------
    >>> arr = np.full((12, 12, 12), -900, np.int16); arr[4:8, 4:8, 4:8] = 0
    >>> vol = Volume(arr, spacing_mm=(1, 1, 1)); mask = vol.with_array(np.ones(arr.shape, np.uint8))
    >>> pts, idx = extract_features(vol, mask, scale_hu=100.0)
    >>> pts.shape, idx.shape, float(pts[0, 3])     # 0 HU / 100
    ((64, 5), (64, 3), 0.0)
    """
    check_volume(vol, allow_bool=False)
    check_volume(mask, "mask")
    vol.check_same_geometry(mask)
    for name, value in (("sigma_mm", sigma_mm), ("scale_mm", scale_mm), ("scale_hu", scale_hu),
                        ("scale_si", scale_si)):
        _check_positive(name, value)
    if not np.isfinite(hu_floor):
        raise ValueError(f"hu_floor must be finite, got {hu_floor!r}")
    sel = (mask.array != 0) & (vol.array > hu_floor)
    idx = np.argwhere(sel)
    if idx.shape[0] == 0:
        return np.zeros((0, 5), np.float32), np.zeros((0, 3), np.int64)
    si, _ = _si_cv(*_derivatives(vol, idx, sigma_mm), sigma_mm)
    world = vol.index_to_world(idx)
    pts = np.empty((idx.shape[0], 5), np.float32)
    pts[:, :3] = world / scale_mm
    pts[:, 3] = vol.array[sel].astype(np.float64) / scale_hu
    pts[:, 4] = si / scale_si
    return pts, idx.astype(np.int64)
