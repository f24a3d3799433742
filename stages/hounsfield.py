"""Stored CT pixel values -> Hounsfield units (HU), the way DICOM defines them.

DICOM tags used (group, element) and what this module does with each
---------------------------------------------------------------------
(0028,1053) *Rescale Slope* and (0028,1052) *Rescale Intercept*
    The Modality LUT of a CT image: ``hu = slope * stored + intercept``
    (PS3.3 C.11.1.1.2).  Absent tags mean slope 1 and intercept 0.  They may
    differ from slice to slice, so :func:`stages.ingest.read_scan` passes
    each slice's own values.
(0028,0120) *Pixel Padding Value*
    A *stored* value marking pixels outside the reconstruction circle.  Such
    pixels become ``air_hu``.  Scanners that do not set it still write a value
    far below air (typically -2000, -2048 or -3024 HU after rescale), so every
    voxel at or below ``padding_hu`` after rescale is treated as padding too.
(0028,0004) *Photometric Interpretation*
    ``MONOCHROME1`` and ``MONOCHROME2`` are accepted, anything else (RGB,
    palette colour) is refused.  For ``MONOCHROME1`` the values are **not**
    inverted: the standard applies the Modality LUT to the stored values
    whatever the photometric interpretation, and ``MONOCHROME1`` only tells a
    viewer to show the lowest value as white (PS3.3 C.7.6.3.1.2, C.11.1).
    Inverting would turn air into bone.
(0028,0101) *Bits Stored*
    When smaller than the array's bit depth, bits above it (overlays, junk)
    are masked off and the value is sign-extended for signed arrays.

Arithmetic is float64 (exact for every 16-bit value and the usual slopes); the
result is rounded half to even, clipped to ``clip_hu`` and returned as int16.
"""
from __future__ import annotations

import numpy as np

from stages.volume import AIR_HU

__all__ = ["to_hounsfield", "CLIP_HU", "PADDING_HU"]

#: HU range kept by default: -1024 (below air, the lowest value CT writes) to 3071
#: (the top of the usual 12-bit range: dense bone, metal saturates here).
CLIP_HU = (-1024, 3071)
#: Any voxel at or below this many HU after rescale is outside-FOV padding: no tissue
#: and not even air (-1000) reaches it; scanners pad with -2000, -2048 or -3024.
PADDING_HU = -2000

_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def _per_slice(name: str, value, stored: np.ndarray) -> np.ndarray:
    """Scalar, or one value per slice (length Z) for a 3-D ``stored``; checked finite."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        pass
    elif arr.ndim == 1 and stored.ndim == 3 and arr.shape[0] == stored.shape[0]:
        arr = arr.reshape(-1, 1, 1)
    else:
        raise ValueError(f"{name} must be a number or, for a (Z, Y, X) array, {stored.shape[0] if stored.ndim == 3 else 'Z'}"
                         f" numbers (one per slice); got shape {arr.shape} for an array of shape {stored.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.ravel()[:5].tolist()}")
    return arr


def to_hounsfield(stored, *, slope=1.0, intercept=0.0, pixel_padding_value=None,
                  photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                  clip_hu=CLIP_HU, air_hu: int = AIR_HU, padding_hu: float = PADDING_HU) -> np.ndarray:
    """Convert stored CT values (one slice or a volume) to int16 Hounsfield units.

    Parameters
    ----------
    stored : (Y, X) or (Z, Y, X) ndarray of int or float
        Stored pixel values as decoded from (7FE0,0010) *Pixel Data*, before any rescale.
    slope : float or (Z,) array_like of float
        (0028,1053) *Rescale Slope*; one per slice allowed for a 3-D ``stored``.  Not 0.
    intercept : float or (Z,) array_like of float
        (0028,1052) *Rescale Intercept*, in HU; one per slice allowed for a 3-D ``stored``.
    pixel_padding_value : int, optional
        (0028,0120) *Pixel Padding Value*, a stored value; matching pixels become ``air_hu``.
    photometric : {"MONOCHROME2", "MONOCHROME1"}
        (0028,0004) *Photometric Interpretation*.  Both give the same HU (see module notes).
    bits_stored : int, optional
        (0028,0101) *Bits Stored*; higher bits are masked off (1 to 32).
    clip_hu : (int, int)
        Lowest and highest HU kept; values outside are clipped.  Must fit int16.
    air_hu : int
        HU given to outside-field-of-view padding; must lie within ``clip_hu``.
    padding_hu : float
        Voxels at or below this value after rescale are padding as well, HU.

    Returns
    -------
    hu : ndarray of int16, same shape as ``stored``
        ``clip(rint(slope * stored + intercept))`` with padding set to ``air_hu``,
        computed in float64.

    Raises
    ------
    TypeError
        If ``stored`` is not a numeric array.
    ValueError
        If slope is 0 or not finite, ``photometric`` is not monochrome, ``bits_stored`` is out of
        range, ``clip_hu`` is not an increasing pair within int16, or ``air_hu`` lies outside it.

    Examples
    --------
    >>> import numpy as np
    >>> to_hounsfield(np.array([[0, 24, 1024, 5000]], np.uint16), intercept=-1024).tolist()
    [[-1024, -1000, 0, 3071]]
    >>> to_hounsfield(np.array([[-2000, 0]], np.int16), intercept=-1024).tolist()
    [[-1000, -1024]]
    """
    arr = np.asarray(stored)
    if arr.dtype.kind not in "iuf" or arr.ndim not in (2, 3):
        raise TypeError(f"stored must be a 2-D or 3-D integer or float array, got dtype {arr.dtype} "
                        f"with shape {arr.shape}")
    slope_arr = _per_slice("slope", slope, arr)
    intercept_arr = _per_slice("intercept", intercept, arr)
    if np.any(slope_arr == 0):
        raise ValueError("slope (0028,1053 Rescale Slope) must not be 0; a missing tag means 1")
    if str(photometric).strip().upper() not in _PHOTOMETRIC:
        raise ValueError(f"photometric must be one of {_PHOTOMETRIC} for CT, got {photometric!r}")
    lo, hi = (int(v) for v in clip_hu)
    if not (-32768 <= lo < hi <= 32767):
        raise ValueError(f"clip_hu must be (low, high) with low < high within int16, got {tuple(clip_hu)}")
    if not lo <= air_hu <= hi:
        raise ValueError(f"air_hu={air_hu} must lie within clip_hu={lo, hi}")

    if bits_stored is not None and arr.dtype.kind in "iu":
        nbits = arr.dtype.itemsize * 8
        if not 1 <= int(bits_stored) <= nbits:
            raise ValueError(f"bits_stored must be 1..{nbits} for a {arr.dtype} array, got {bits_stored}")
        if bits_stored < nbits:
            work = arr.astype(np.int64) & ((1 << int(bits_stored)) - 1)
            if arr.dtype.kind == "i":  # sign-extend from the top stored bit
                sign = 1 << (int(bits_stored) - 1)
                work = (work ^ sign) - sign
            arr = work

    hu = arr.astype(np.float64) * slope_arr + intercept_arr
    padding = hu <= padding_hu
    if pixel_padding_value is not None:
        padding |= np.asarray(stored) == pixel_padding_value
    np.rint(hu, out=hu)
    np.clip(hu, lo, hi, out=hu)
    hu[padding] = air_hu
    return hu.astype(np.int16)
