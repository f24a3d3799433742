"""Resampling: bring a scan to isotropic spacing, or a mask onto another scan's grid.

Both functions work in world coordinates (LPS mm, see :mod:`stages.volume`), so a world
point shows the same anatomy before and after.  Two backends give the same numbers
(labels exactly, CT to within 1 HU from float32 rounding):

* **SimpleITK** (``method="sitk"``, the default on the CPU) -- ``sitk.Resample`` with a
  linear or nearest-neighbour interpolator on the output grid, multi-threaded, computing
  in float32 (float64 for float64 input); integer results are then rounded half to even
  and clipped to the dtype, as the torch backend does.  Nearest neighbour on an
  axis-aligned grid (labels in :func:`resample`, masks mapped back by
  :func:`resample_like`) is instead a plain numpy gather with the torch backend's indices,
  which is tens of times faster than ``sitkNearestNeighbor``.  On 2 cores this backend
  is 2-3 times faster than the torch one on the CPU.
* **torch** (``method="torch"``, the default when ``device`` is a CUDA GPU, and available
  on the CPU so that the GPU code is tested everywhere).  Two code paths, chosen from the
  geometry:

  - *separable* -- when every output axis maps onto a single input axis (same direction,
    any spacing/origin), as in :func:`resample` and in most :func:`resample_like` calls:
    1-D linear (or nearest) interpolation along one axis at a time, the axis that shrinks
    most first (usually y, then x on the input slices, then z).  Exact for data that is
    linear in world coordinates.
  - *general* -- any other direction: ``torch.nn.functional.grid_sample`` with
    ``align_corners=True`` (trilinear or nearest), coordinates computed in float64 and cast.

  The output is built in slabs of output slices so that a 512x512x300 scan needs a few
  hundred MB at most, not several GB; only the input slices a slab needs are moved to the
  device.

Both use ITK's edge rule: an output voxel whose centre lies within half a voxel outside
the input's edge voxel centres takes the edge value; further out it takes the fill value.
Nearest neighbour rounds half up (``floor(p + 0.5)``) in both; at an exact half-voxel tie
the two may still pick different neighbours when float error in the world coordinates
tips the tie one way (not the case for the grids :func:`resample` makes from usual CT
spacings, nor for mapping a mask back onto a grid whose centres it contains).
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np

from stages.device import pick_device
from stages.volume import AIR_HU, MAX_VOXELS, Volume, check_volume

__all__ = ["resample", "resample_like", "resampled_shape"]

#: Value given to label voxels outside the input grid (background).
LABEL_FILL = 0
#: Work per slab, in float32 elements of the largest intermediate (about 64 MB).
SLAB_ELEMENTS = 1 << 24
#: An output voxel whose centre falls within half a voxel of the input's edge voxel
#: centres (continuous index in ``[-0.5, n - 0.5)``, the voxels' own extent) is inside and
#: takes the edge value; this is ITK's rule (``ImageFunction::IsInsideBuffer``).
_HALF = 0.5

_ORDERS = (0, 1)
#: Backends: "auto" = torch on a CUDA device, SimpleITK on the CPU.
METHODS = ("auto", "sitk", "torch")


# --------------------------------------------------------------------------- checks
def _check_spacing(spacing_mm) -> tuple[float, float, float]:
    if isinstance(spacing_mm, Real):
        spacing_mm = (spacing_mm,) * 3
    try:
        arr = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"spacing_mm must be a number or 3 numbers (z, y, x) in mm, "
                         f"got {spacing_mm!r}") from None
    if arr.shape != (3,):
        raise ValueError(f"spacing_mm must be a number or 3 numbers (z, y, x) in mm, "
                         f"got {len(arr)} values: {spacing_mm!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"spacing_mm must be finite and > 0 on every axis, got {arr.tolist()}; "
                         "use e.g. spacing_mm=(1.0, 1.0, 1.0)")
    return tuple(float(v) for v in arr)


def _check_order(order) -> int:
    if isinstance(order, bool) or order not in _ORDERS:
        raise ValueError(f"order must be 0 (nearest, for labels) or 1 (linear, for CT), got {order!r}")
    return int(order)





def _pick_backend(method, device):
    """``("sitk", None)`` or ``("torch", torch.device)`` from the ``method``/``device`` arguments."""
    if method is None:
        method = "auto"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} ('auto': torch on a CUDA GPU, "
                         f"SimpleITK on the CPU), got {method!r}")
    dev = pick_device(device)  # checks the device argument whatever the method
    if method == "sitk":
        auto_device = device is None or (isinstance(device, str) and device == "auto")
        if dev.type != "cpu" and not auto_device:
            raise ValueError(f"method='sitk' runs on the CPU, but device={device!r} was asked for; "
                             "use method='torch' (or 'auto') for the GPU, or device='cpu'")
        return "sitk", None
    if method == "auto" and dev.type == "cpu":
        return "sitk", None
    return "torch", dev


def resampled_shape(shape_zyx, spacing_in_mm, spacing_out_mm) -> tuple[int, int, int]:
    """Output shape of :func:`resample`: ``floor((n - 1) * s_in / s_out) + 1`` per axis.

    The output grid starts on the input's first voxel centre and never passes its last.

    Examples
    --------
    >>> resampled_shape((10, 5, 5), (2.5, 0.7, 0.7), (1.0, 1.0, 1.0))
    (23, 3, 3)
    """
    out = []
    for n, s_in, s_out in zip(shape_zyx, spacing_in_mm, spacing_out_mm):
        # the tiny slack keeps (n-1)*s_in/s_out = 3.9999999 (float error) at 4
        out.append(int(math.floor((n - 1) * s_in / s_out + 1e-9)) + 1)
    return tuple(out)


# --------------------------------------------------------------------------- public
def resample(vol: Volume, spacing_mm=(1.0, 1.0, 1.0), *, order: int = 1, device=None,
             method: str = "auto", fill_hu: float = AIR_HU) -> Volume:
    """Resample a volume to new (by default isotropic 1 mm) voxel spacing.

    The output keeps the input's direction and origin: voxel ``(0, 0, 0)`` has the same
    world centre before and after, and output voxel ``i`` sits at
    ``origin_mm + direction @ (i * spacing_mm)``.  Its shape is
    ``floor((n - 1) * s_in / s_out) + 1`` per axis, so every output voxel lies inside the
    input (see :func:`resampled_shape`).

    Parameters
    ----------
    vol : Volume
        The scan (int16 HU), a label map (uint8) or a float map, array ``(Z, Y, X)``.
    spacing_mm : float or tuple of float, shape (3,)
        Target distance between voxel centres ``(z, y, x)`` in mm; a single number means
        isotropic.
    order : {0, 1}
        1: linear interpolation (CT, float maps).  0: nearest neighbour (labels: no new
        values are created).
    device : None, str or torch.device
        ``None`` (or ``"auto"``): CUDA when torch sees a GPU, else CPU.  ``"cpu"`` forces
        the CPU.
    method : {"auto", "sitk", "torch"}
        Backend.  ``"auto"``: torch on a CUDA device, SimpleITK (multi-threaded, faster)
        on the CPU.  ``"sitk"`` always uses SimpleITK (CPU; an explicit CUDA ``device`` is
        an error); ``"torch"`` uses torch on ``device`` (to test or time the GPU code on
        the CPU).  Both give the same result: labels identical, CT within 1 HU.
    fill_hu : float
        Value for output voxels whose centre falls outside the input.  With the grid
        chosen here there are none (it is a safeguard, and the value :func:`resample_like`
        uses for CT); label maps (``order=0``) are filled with 0 whatever this says.

    Returns
    -------
    Volume
        Same dtype as the input (integer results are rounded to nearest and clipped to the
        dtype's range), ``spacing_mm`` as asked, same origin, direction, scan_id and meta.

    Raises
    ------
    TypeError
        If ``vol`` is not a Volume or its dtype is not numeric.
    ValueError
        If ``spacing_mm`` is not 1 or 3 finite positive numbers, ``order`` is not 0 or 1,
        ``method`` is unknown, the device is not available (or is a GPU with
        ``method="sitk"``), or the output would exceed ``MAX_VOXELS``.

    Examples
    --------
    >>> vol = Volume(np.arange(3, dtype=np.float32).reshape(3, 1, 1) * 10,
    ...              spacing_mm=(2.0, 1.0, 1.0), origin_mm=(-5.0, 0.0, 0.0))
    >>> out = resample(vol, 1.0, device="cpu")
    >>> out.shape, out.array.ravel().tolist()
    ((5, 1, 1), [0.0, 5.0, 10.0, 15.0, 20.0])
    >>> out.origin_mm
    (-5.0, 0.0, 0.0)
    >>> resample(vol, 1.0, method="torch", device="cpu").array.ravel().tolist()
    [0.0, 5.0, 10.0, 15.0, 20.0]
    """
    check_volume(vol)
    spacing = _check_spacing(spacing_mm)
    order = _check_order(order)
    if not math.isfinite(float(fill_hu)):
        raise ValueError(f"fill_hu must be a finite number, got {fill_hu!r}")
    backend, dev = _pick_backend(method, device)
    shape = resampled_shape(vol.shape, vol.spacing_mm, spacing)
    _check_size(shape)
    # the target grid; a zero-stride array, so it costs no memory
    ref = Volume(np.broadcast_to(np.zeros((), np.uint8), shape), spacing_mm=spacing,
                 origin_mm=vol.origin_mm, direction=vol.direction, scan_id=vol.scan_id)
    fill = LABEL_FILL if order == 0 else fill_hu
    array = _resample_onto(vol, ref, order=order, backend=backend, dev=dev, fill=fill)
    return Volume(array, spacing_mm=spacing, origin_mm=vol.origin_mm, direction=vol.direction,
                  scan_id=vol.scan_id, meta=dict(vol.meta))


def resample_like(vol: Volume, reference: Volume, *, order: int = 0, device=None,
                  method: str = "auto", fill_value: float | None = None) -> Volume:
    """Resample ``vol`` onto ``reference``'s grid (shape, spacing, origin, direction).

    Used to bring a mask computed on a resampled scan back to the original scan.  Each
    output voxel takes the value of ``vol`` at the same world (LPS) position, so the two
    volumes may differ in spacing, origin and direction.

    Parameters
    ----------
    vol : Volume
        What to resample: a label map (uint8) or a scan.
    reference : Volume
        The grid to land on; only its geometry is used (its array may be any dtype).
    order : {0, 1}
        0: nearest neighbour (default, labels); 1: linear.
    device : None, str or torch.device
        As in :func:`resample`.
    method : {"auto", "sitk", "torch"}
        As in :func:`resample`.
    fill_value : float, optional
        Value for output voxels whose centre lies outside ``vol``'s voxels (more than half
        a voxel beyond its edge voxel centres, ITK's rule; within that half voxel the edge
        value is used).  Clipped to an integer dtype's range.  Default: 0 with
        ``order=0`` (label background), ``AIR_HU`` (-1000) with ``order=1`` (CT).

    Returns
    -------
    Volume
        ``vol``'s dtype, scan_id and meta on ``reference``'s geometry.

    Raises
    ------
    TypeError
        If either argument is not a Volume.
    ValueError
        If ``order`` is not 0 or 1, ``method`` is unknown, or the device is not available.

    Examples
    --------
    >>> mask = Volume(np.array([[[0, 1, 1, 0]]], np.uint8), spacing_mm=(1.0, 1.0, 2.0))
    >>> ref = Volume(np.zeros((1, 1, 7), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    >>> resample_like(mask, ref, device="cpu").array.ravel().tolist()
    [0, 1, 1, 1, 1, 0, 0]
    """
    check_volume(vol)
    if not isinstance(reference, Volume):
        raise TypeError(f"reference must be a stages.volume.Volume, got {type(reference).__name__}")
    order = _check_order(order)
    if fill_value is None:
        fill_value = LABEL_FILL if order == 0 else AIR_HU
    if not math.isfinite(float(fill_value)):
        raise ValueError(f"fill_value must be a finite number, got {fill_value!r}")
    backend, dev = _pick_backend(method, device)
    _check_size(reference.shape)
    array = _resample_onto(vol, reference, order=order, backend=backend, dev=dev, fill=fill_value)
    return Volume(array, spacing_mm=reference.spacing_mm, origin_mm=reference.origin_mm,
                  direction=reference.direction, scan_id=vol.scan_id, meta=dict(vol.meta))


def _check_size(shape) -> None:
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise ValueError(f"resampled shape {shape} exceeds {MAX_VOXELS} voxels; "
                         "choose a coarser spacing_mm")


# --------------------------------------------------------------------------- core
def _torch_dtypes(np_dtype, order):
    """(torch dtype to move the input as, torch dtype to compute in)."""
    import torch

    if order == 1:
        work = torch.float64 if np_dtype == np.float64 else torch.float32
        return work, work
    # nearest: gather in a dtype torch has; uint16/uint32/uint64 are widened
    table = {np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8,
             np.dtype(np.int8): torch.int8, np.dtype(np.int16): torch.int16,
             np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
             np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
             np.dtype(np.float64): torch.float64}
    t = table.get(np.dtype(np_dtype), torch.int64)
    return t, t


def _to_numpy_dtype(t, np_dtype) -> np.ndarray:
    """Round/clip a result tensor into ``np_dtype`` and bring it to the host."""
    import torch

    np_dtype = np.dtype(np_dtype)
    if np_dtype.kind in "iu" and t.is_floating_point():
        info = np.iinfo(np_dtype)
        t = torch.round(t).clamp_(float(info.min), float(info.max))
    elif np_dtype.kind == "b" and t.is_floating_point():
        t = t >= 0.5
    out = t.cpu().numpy()
    return out.astype(np_dtype, copy=False)


def _index_map(vol: Volume, ref: Volume):
    """Affine map from ``ref`` indices to ``vol`` continuous indices: ``p = A @ j + b``."""
    s_v = np.asarray(vol.spacing_mm)
    s_r = np.asarray(ref.spacing_mm)
    a = (vol.direction.T @ ref.direction) * s_r[None, :] / s_v[:, None]
    b = (vol.direction.T @ (np.asarray(ref.origin_mm) - np.asarray(vol.origin_mm))) / s_v
    return a, b


def _fill_for(dtype: np.dtype, fill: float):
    """``fill`` as the output dtype holds it: clipped to an integer dtype's range (so the
    CT default -1000 becomes 0 in a uint16 map), ``fill > 0`` for bool."""
    if dtype.kind == "b":
        return bool(fill > 0)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(np.clip(np.rint(fill), info.min, info.max))
    return fill


def _resample_onto(vol: Volume, ref: Volume, *, order: int, backend: str, dev, fill) -> np.ndarray:
    dtype = vol.array.dtype
    fill = _fill_for(dtype, fill)
    if 0 in vol.shape or 0 in ref.shape:
        return np.full(ref.shape, fill, dtype=dtype)
    a, b = _index_map(vol, ref)
    off = a - np.diag(np.diag(a))
    separable = bool(np.all(np.abs(off) * np.asarray(ref.shape)[None, :] < 1e-6))
    if backend == "sitk":
        if order == 0 and separable:
            return _gather_nearest(vol.array, np.diag(a).copy(), b, ref.shape, fill)
        return _sitk_onto(vol, ref, order=order, fill=fill)
    out = np.empty(ref.shape, dtype=dtype)
    if separable:
        _separable(vol.array, np.diag(a).copy(), b, out, order=order, dev=dev, fill=fill)
    else:
        _general(vol.array, a, b, out, order=order, dev=dev, fill=fill)
    return out


# --------------------------------------------------------------------------- SimpleITK
#: numpy dtypes SimpleITK images hold as they are (nearest neighbour copies their values).
_SITK_DTYPES = {np.dtype(d) for d in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                                      np.uint64, np.int64, np.float32, np.float64)}


def _sitk_onto(vol: Volume, ref: Volume, *, order: int, fill) -> np.ndarray:
    """``sitk.Resample`` of ``vol`` onto ``ref``'s grid, in ``vol``'s dtype.

    Linear: computed in float32 (float64 for float64 input) and rounded/clipped like the
    torch backend.  Nearest: computed in the input's own pixel type, so values are copied
    exactly (bool goes through uint8, float16 through float32).
    """
    import SimpleITK as sitk

    dtype = vol.array.dtype
    src = vol.array
    if dtype.kind == "b":
        src = src.astype(np.uint8)
    elif dtype not in _SITK_DTYPES:  # float16, long double
        src = src.astype(np.float64 if dtype.itemsize > 8 else np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(src))  # copies
    spacing, origin, direction = vol.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    if order == 1:
        interp = sitk.sitkLinear
        work = sitk.sitkFloat64 if src.dtype == np.float64 else sitk.sitkFloat32
    else:
        interp = sitk.sitkNearestNeighbor
        work = img.GetPixelID()
    r_spacing, r_origin, r_direction = ref.sitk_geometry()
    size = [int(n) for n in ref.shape[::-1]]
    res = sitk.Resample(img, size, sitk.Transform(), interp, r_origin, r_spacing, r_direction,
                        float(fill), work)
    del img, src
    if order == 0 and dtype in _SITK_DTYPES:
        return sitk.GetArrayFromImage(res)
    view = sitk.GetArrayViewFromImage(res)  # valid while `res` lives
    out = np.empty(ref.shape, dtype=dtype)
    plane = max(1, ref.shape[1] * ref.shape[2])
    step = max(1, SLAB_ELEMENTS // plane)  # bounds the float temporaries
    for z0 in range(0, ref.shape[0], step):
        part = view[z0:z0 + step]
        if dtype.kind in "iu" and order == 1:
            info = np.iinfo(dtype)
            part = np.rint(part)  # half to even, as torch.round
            np.clip(part, info.min, info.max, out=part)
        elif dtype.kind == "b":
            part = part >= 0.5
        out[z0:z0 + step] = part
    return out


def _gather_nearest(src: np.ndarray, scale, shift, shape, fill) -> np.ndarray:
    """Nearest neighbour on an axis-aligned grid: one integer gather per axis (numpy).

    The same indices as the torch separable path (``floor(p + 0.5)``), so the same labels;
    about 100 times faster than ``sitkNearestNeighbor`` on lung1's 512x512x48 mask
    (3 ms against 0.35 s on 2 cores).
    """
    idx, inside = [], []
    for ax in range(3):
        p, ins = _axis_positions(shape[ax], src.shape[ax], scale[ax], shift[ax])
        idx.append(np.floor(p + 0.5).astype(np.intp))
        inside.append(ins)
    out = src
    # the axis that shrinks most first keeps the intermediates small
    for ax in sorted(range(3), key=lambda k: shape[k] / src.shape[k]):
        out = out.take(idx[ax], axis=ax)
    out = np.ascontiguousarray(out)
    out[~inside[0]] = fill
    out[:, ~inside[1]] = fill
    out[:, :, ~inside[2]] = fill
    return out


# --------------------------------------------------------------------------- torch
def _axis_positions(n_out: int, n_in: int, scale: float, shift: float):
    """float64 input positions of ``n_out`` output voxels and which of them are inside."""
    p = shift + scale * np.arange(n_out, dtype=np.float64)
    inside = (p >= -_HALF) & (p < n_in - _HALF)
    return np.clip(p, 0.0, n_in - 1), inside


def _interp_axis(x, axis: int, p: np.ndarray, lo: int, order: int):
    """Interpolate tensor ``x`` (which starts at input index ``lo``) at positions ``p``."""
    import torch

    n = x.shape[axis]

    def take(idx):
        t = torch.from_numpy(idx).to(x.device)
        # torch's CPU index_select along dim 0 is slow; plain indexing is not
        return x[t] if axis == 0 else x.index_select(axis, t)

    if order == 0:
        return take(np.clip(np.floor(p + 0.5).astype(np.int64) - lo, 0, n - 1))
    i0 = np.clip(np.floor(p).astype(np.int64), lo, lo + max(n - 2, 0))
    w = p - i0  # in [0, 1]; exactly 0 on input voxel centres
    i1 = np.minimum(i0 + 1 - lo, n - 1)
    i0 = i0 - lo
    shape = [1, 1, 1]
    shape[axis] = len(p)
    wt = torch.from_numpy(w.reshape(shape)).to(device=x.device, dtype=x.dtype)
    # x0 + (x1 - x0) * w in one pass; torch.lerp is exact at w = 0 and w = 1
    return take(i0).lerp_(take(i1), wt)


def _needed(p: np.ndarray, order: int, n_in: int) -> tuple[int, int]:
    """Input index range ``[lo, hi)`` that positions ``p`` read from."""
    if order == 0:
        idx = np.clip(np.floor(p + 0.5), 0, n_in - 1)
        return int(idx.min()), int(idx.max()) + 1
    return int(np.floor(p.min())), min(int(np.floor(p.max())) + 2, n_in)


def _separable(src: np.ndarray, scale, shift, out: np.ndarray, *, order, dev, fill) -> None:
    import torch

    move_dtype, _ = _torch_dtypes(src.dtype, order)
    pos = []
    for ax in range(3):
        pos.append(_axis_positions(out.shape[ax], src.shape[ax], scale[ax], shift[ax]))
    (pz, iz), (py, iy), (px, ix) = pos
    if not (iy.any() and ix.any()):
        out[...] = fill
        return
    ylo, yhi = _needed(py[iy], order, src.shape[1])
    xlo, xhi = _needed(px[ix], order, src.shape[2])
    plane_in = (yhi - ylo) * (xhi - xlo)
    plane_out = out.shape[1] * out.shape[2]
    per_slice = plane_in * max(abs(scale[0]), 0.05) + plane_in + 2 * plane_out
    slab = max(1, int(SLAB_ELEMENTS // per_slice))
    yx_inside = iy[:, None] & ix[None, :]
    for z0 in range(0, out.shape[0], slab):
        z1 = min(z0 + slab, out.shape[0])
        zin = iz[z0:z1]
        if not zin.any():
            out[z0:z1] = fill
            continue
        pzs = pz[z0:z1]
        zlo, zhi = _needed(pzs[zin], order, src.shape[0])
        chunk = np.ascontiguousarray(src[zlo:zhi, ylo:yhi, xlo:xhi])
        if chunk.dtype.kind == "u" and chunk.dtype.itemsize > 1 and order == 0:
            chunk = chunk.astype(np.int64)
        x = torch.from_numpy(chunk).to(device=dev, dtype=move_dtype)
        # the axis that shrinks most first (usually in-plane, on the fewer input slices,
        # then z; z first when mapping a fine scan back onto thick slices)
        steps = {1: (py, ylo, yhi), 2: (px, xlo, xhi), 0: (pzs, zlo, zhi)}
        # (input voxels per output voxel, not slab sizes: every slab takes the same order)
        for ax in sorted(steps, key=lambda k: (-abs(scale[k]), (1, 2, 0).index(k))):
            p, lo, hi = steps[ax]
            x = _interp_axis(x, ax, np.clip(p, lo, hi - 1), lo, order)
        _store(x, out[z0:z1])
        if not (zin.all() and yx_inside.all()):
            out[z0:z1][~(zin[:, None, None] & yx_inside[None])] = fill


def _store(t, dest: np.ndarray) -> None:
    """Write result tensor ``t`` into ``dest`` (rounded and clipped for integer dtypes)."""
    import torch

    if dest.dtype.kind in "iu" and t.is_floating_point():
        info = np.iinfo(dest.dtype)
        t = torch.round(t).clamp_(float(info.min), float(info.max))
    if dest.dtype.kind == "b" and t.is_floating_point():
        t = t >= 0.5
    if t.device.type == "cpu" and dest.flags.c_contiguous and dest.dtype in _COPY_DTYPES:
        torch.from_numpy(dest).copy_(t)  # converts in place, no host temporaries
    else:
        dest[...] = t.cpu().numpy().astype(dest.dtype, copy=False)


_COPY_DTYPES = {np.dtype(d) for d in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                                      np.float16, np.float32, np.float64)}


def _general(src: np.ndarray, a, b, out: np.ndarray, *, order, dev, fill) -> None:
    """Any direction: grid_sample on the input box each output slab reads."""
    import torch
    import torch.nn.functional as F

    nz, ny, nx = out.shape
    plane = ny * nx
    slab = max(1, SLAB_ELEMENTS // (8 * plane))  # p and g are (slab, Y, X, 3) float64
    n_in = np.asarray(src.shape)
    jy = np.arange(ny, dtype=np.float64)
    jx = np.arange(nx, dtype=np.float64)
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        jz = np.arange(z0, z1, dtype=np.float64)
        # input positions, float64, as (Zs, Y, X, 3) in (z, y, x)
        p = (b[None, None, None, :]
             + jz[:, None, None, None] * a[:, 0]
             + jy[None, :, None, None] * a[:, 1]
             + jx[None, None, :, None] * a[:, 2])
        inside = np.all((p >= -_HALF) & (p < n_in - _HALF), axis=-1)
        if not inside.any():
            out[z0:z1] = fill
            continue
        q = p[inside]
        lo = np.maximum(np.floor(q.min(axis=0)).astype(int) - 1, 0)
        hi = np.minimum(np.floor(q.max(axis=0)).astype(int) + 3, n_in)
        chunk = np.ascontiguousarray(src[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
        size = hi - lo
        p = np.clip(p - lo, 0.0, size - 1)
        # grid_sample wants (x, y, z) normalised to [-1, 1] with align_corners=True
        denom = np.maximum(size - 1, 1).astype(np.float64)
        g = 2.0 * p / denom - 1.0
        g[..., size == 1] = 0.0
        if order == 0:
            res = _grid_nearest(chunk, p, dev)
        else:
            work, _ = _torch_dtypes(chunk.dtype, 1)
            x = torch.from_numpy(chunk).to(device=dev, dtype=work)
            grid = torch.from_numpy(np.ascontiguousarray(g[..., ::-1])).to(device=dev, dtype=work)
            res_t = F.grid_sample(x[None, None], grid[None], mode="bilinear",
                                  padding_mode="border", align_corners=True)[0, 0]
            res = _to_numpy_dtype(res_t, out.dtype)
        if not inside.all():
            res[~inside] = fill
        out[z0:z1] = res


def _grid_nearest(chunk: np.ndarray, p: np.ndarray, dev) -> np.ndarray:
    """Nearest neighbour by exact integer gather (no float round trip of the values)."""
    import torch

    idx = np.floor(p + 0.5).astype(np.int64)
    for ax in range(3):
        np.clip(idx[..., ax], 0, chunk.shape[ax] - 1, out=idx[..., ax])
    flat = (idx[..., 0] * chunk.shape[1] + idx[..., 1]) * chunk.shape[2] + idx[..., 2]
    move, _ = _torch_dtypes(chunk.dtype, 0)
    data = chunk
    if chunk.dtype.kind == "u" and chunk.dtype.itemsize > 1:
        data = chunk.astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).to(device=dev, dtype=move)
    res = t[torch.from_numpy(flat.reshape(-1)).to(dev)].reshape(flat.shape)
    return res.cpu().numpy().astype(chunk.dtype, copy=False)
