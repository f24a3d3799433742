"""Cubes of a scan around world points, for the nodule classifier.

A patch is sampled on a grid aligned with the world axes (z, y, x), ``size_mm`` wide at
``spacing_mm``, whatever the scan's own spacing and direction, by trilinear interpolation
(:func:`scipy.ndimage.map_coordinates`; on a scan already at the patch's spacing and axes, as
the screen's 1 mm scans are, the same interpolation done as a blend of shifted blocks).  Sample ``n // 2`` along each axis (``n`` the
patch side in samples) lies exactly on the centre, so a patch centred on a voxel holds that
voxel's value at ``[n // 2, n // 2, n // 2]``.  Outside the scan the value is air,
``fill_hu`` (-1000 HU).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from stages.volume import AIR_HU, Volume

__all__ = ["extract_patch", "extract_patches", "PATCH_SIZE_MM", "PATCH_SPACING_MM", "FILL_HU"]

#: Side of a patch (mm): room for a 30 mm nodule and some context.
PATCH_SIZE_MM = 32.0
#: Sample spacing inside a patch (mm).
PATCH_SPACING_MM = 1.0
#: Value outside the scan: air.
FILL_HU = float(AIR_HU)


def _side(size_mm, spacing_mm) -> int:
    for name, v in (("size_mm", size_mm), ("spacing_mm", spacing_mm)):
        if not np.isscalar(v) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    n = int(round(size_mm / spacing_mm))
    if n < 1:
        raise ValueError(f"size_mm / spacing_mm must give at least one sample, "
                         f"got {size_mm} / {spacing_mm}")
    return n


def _centres(centres_zyx_mm, centres_xyz_mm, what) -> np.ndarray:
    if (centres_zyx_mm is None) == (centres_xyz_mm is None):
        raise ValueError(f"give exactly one of {what}_zyx_mm (world z, y, x) or {what}_xyz_mm "
                         "(LUNA16 coordX, coordY, coordZ)")
    c = np.asarray(centres_zyx_mm if centres_zyx_mm is not None else centres_xyz_mm, dtype=np.float64)
    if c.ndim == 1:
        c = c[None]
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"{what} must be (3,) or (n, 3) world mm, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{what} must be finite, got {c[~np.isfinite(c).all(axis=1)][:3].tolist()}")
    return c if centres_zyx_mm is not None else c[:, ::-1].copy()


def extract_patches(vol: Volume, *, centres_zyx_mm=None, centres_xyz_mm=None,
                    size_mm: float = PATCH_SIZE_MM, spacing_mm: float = PATCH_SPACING_MM,
                    order: int = 1, fill_hu: float = FILL_HU) -> np.ndarray:
    """Cubes of ``vol`` centred on world points.

    Parameters
    ----------
    vol : Volume
        Scan (HU).
    centres_zyx_mm : (n, 3) array_like of float, optional
        Patch centres, world LPS mm, ``(z, y, x)``.
    centres_xyz_mm : (n, 3) array_like of float, optional
        The same in LUNA16 order ``(coordX, coordY, coordZ)``.  Give exactly one of the two.
    size_mm : float
        Side of the cube (mm).
    spacing_mm : float
        Sample spacing in the patch (mm); the side is ``round(size_mm / spacing_mm)`` samples.
    order : int
        Spline order of the interpolation (0 nearest, 1 trilinear).
    fill_hu : float
        Value outside the scan.

    Returns
    -------
    (n, s, s, s) ndarray of float32
        Axes ``(patch, z, y, x)`` along the world axes; sample ``s // 2`` is the centre.

    Raises
    ------
    TypeError
        If ``vol`` is not a Volume.
    ValueError
        If both or neither centre arguments are given, or shapes/sizes are wrong.

    Examples
    --------
    >>> arr = np.zeros((9, 9, 9), np.int16); arr[4, 5, 6] = 100
    >>> vol = Volume(arr, spacing_mm=(1, 1, 1), origin_mm=(10.0, 0.0, 0.0))
    >>> p = extract_patches(vol, centres_zyx_mm=[[14.0, 5.0, 6.0]], size_mm=5.0)
    >>> p.shape, float(p[0, 2, 2, 2]), float(p[0, 0, 0, 0])
    ((1, 5, 5, 5), 100.0, 0.0)
    """
    if not isinstance(vol, Volume):
        raise TypeError(f"vol must be a stages.volume.Volume, got {type(vol).__name__}")
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"order must be 0..5, got {order!r}")
    n = _side(size_mm, spacing_mm)
    centres = _centres(centres_zyx_mm, centres_xyz_mm, "centres")
    offs = (np.arange(n) - n // 2) * float(spacing_mm)
    grid = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), axis=-1).reshape(-1, 3)
    out = np.empty((len(centres), n, n, n), np.float32)
    if order == 1 and np.allclose(vol.direction, np.eye(3)) and np.allclose(vol.spacing_mm, spacing_mm):
        # the patch grid is the scan's grid shifted by a fraction of a voxel: interpolate axis by axis
        for i, c in enumerate(vol.world_to_index(centres)):
            out[i] = _shifted_cube(vol.array, c, n, fill_hu)
        return out
    src = vol.array if vol.array.dtype in (np.float32, np.float64) else vol.array.astype(np.float32)
    for i, c in enumerate(centres):
        idx = vol.world_to_index(grid + c)
        vals = ndi.map_coordinates(src, idx.T, order=order, mode="constant", cval=float(fill_hu),
                                   prefilter=order > 1)
        out[i] = vals.reshape(n, n, n)
    return out


def extract_patch(vol: Volume, *, centre_zyx_mm=None, centre_xyz_mm=None,
                  size_mm: float = PATCH_SIZE_MM, spacing_mm: float = PATCH_SPACING_MM,
                  order: int = 1, fill_hu: float = FILL_HU) -> np.ndarray:
    """One cube of ``vol`` centred on a world point (see :func:`extract_patches`).

    Give exactly one of ``centre_zyx_mm`` (world z, y, x) or ``centre_xyz_mm`` (LUNA16
    coordX, coordY, coordZ).  Returns an ``(s, s, s)`` float32 array, ``s = round(size_mm /
    spacing_mm)``, air (``fill_hu``) outside the scan.

    Examples
    --------
    >>> vol = Volume(np.full((4, 4, 4), 7, np.int16), spacing_mm=(1, 1, 1))
    >>> p = extract_patch(vol, centre_xyz_mm=(0.0, 0.0, 0.0), size_mm=4.0)
    >>> p.shape, float(p[2, 2, 2]), float(p[0, 0, 0])
    ((4, 4, 4), 7.0, -1000.0)
    """
    if (centre_zyx_mm is None) == (centre_xyz_mm is None):
        raise ValueError("give exactly one of centre_zyx_mm (world z, y, x) or centre_xyz_mm "
                         "(LUNA16 coordX, coordY, coordZ)")
    c = centre_zyx_mm if centre_zyx_mm is not None else centre_xyz_mm
    if np.asarray(c).shape != (3,):
        raise ValueError(f"the centre must be 3 numbers, got shape {np.asarray(c).shape}")
    kw = {"centres_zyx_mm": [c]} if centre_zyx_mm is not None else {"centres_xyz_mm": [c]}
    return extract_patches(vol, size_mm=size_mm, spacing_mm=spacing_mm, order=order,
                           fill_hu=fill_hu, **kw)[0]


def _shifted_cube(arr: np.ndarray, centre_index, n: int, fill_hu: float) -> np.ndarray:
    """Trilinear cube of side ``n`` around a continuous index of ``arr``, on ``arr``'s own grid.

    The same numbers as ``map_coordinates(order=1, mode="constant")`` on those points (samples
    beyond the first or last voxel centre are ``fill_hu``), about 30 times faster: every
    sample shares one fractional offset, so the cube is 8 shifted blocks, blended axis by axis.
    """
    offs = np.arange(n) - n // 2
    base = np.floor(centre_index).astype(np.int64)
    frac = (np.asarray(centre_index, np.float64) - base).astype(np.float32)
    lo = base + offs[0]
    block = np.full((n + 1,) * 3, fill_hu, np.float32)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(lo + n + 1, arr.shape)
    if np.all(src_lo < src_hi):
        block[tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi))] = \
            arr[tuple(slice(a, c) for a, c in zip(src_lo, src_hi))]
    f0, f1, f2 = frac
    cube = block[:-1] * (1 - f0) + block[1:] * f0
    cube = cube[:, :-1] * (1 - f1) + cube[:, 1:] * f1
    cube = cube[:, :, :-1] * (1 - f2) + cube[:, :, 1:] * f2
    for axis in range(3):  # samples outside the scan's extent on this axis
        pos = base[axis] + offs + frac[axis]
        outside = (pos < 0) | (pos > arr.shape[axis] - 1)
        if outside.any():
            index = [slice(None)] * 3
            index[axis] = outside
            cube[tuple(index)] = fill_hu
    return cube
