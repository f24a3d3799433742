"""The one data type every stage passes around: a scan array with its geometry.

Conventions (read these once, they hold everywhere in lungscreen)
-----------------------------------------------------------------
* Arrays are indexed ``(z, y, x)``: slice, row, column.
* Every per-axis quantity on a :class:`Volume` is in **array axis order**
  ``(z, y, x)``: ``spacing_mm``, ``origin_mm`` (the world position of voxel
  ``(0, 0, 0)``'s centre) and the rows/columns of ``direction``.
* World coordinates are the ITK / DICOM patient coordinate system (LPS:
  +x towards the patient's Left, +y Posterior, +z Superior), in millimetres.
  A world point stored on a Volume or passed to its methods is written
  ``(z, y, x)`` too; LUNA16's ``coordX, coordY, coordZ`` are the same numbers
  in reverse order (see :func:`xyz_to_zyx`).
* ``direction`` is the 3x3 matrix whose column ``j`` is the unit world vector,
  in ``(z, y, x)`` components, along array axis ``j``.  Hence::

      world_zyx = origin_mm + direction @ (spacing_mm * index_zyx)

  It is SimpleITK's direction matrix with rows and columns reversed; the only
  place that converts between the two is :mod:`stages.ingest`
  (:func:`Volume.from_sitk_geometry` / :meth:`Volume.sitk_geometry`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

__all__ = ["Volume", "xyz_to_zyx", "zyx_to_xyz", "check_volume", "block_mask", "unblock",
           "AIR_HU", "MAX_VOXELS"]

#: Largest number of voxels a scan may have before it is refused (about 2 GB of
#: int16).  A 512x512x1500 scan is 3.9e8 voxels; anything larger is a broken header.
MAX_VOXELS = 1_000_000_000
#: Air in Hounsfield units: what padding, the world outside a scan and the chest wall seen
#: "as air" are given.
AIR_HU = -1000


def check_volume(vol, name: str = "vol", *, allow_bool: bool = True) -> None:
    """Refuse anything but a :class:`Volume` holding numbers (TypeError naming ``name``).

    Examples
    --------
    >>> check_volume(Volume(np.zeros((2, 2, 2), np.int16), spacing_mm=(1, 1, 1)))
    >>> check_volume(np.zeros((2, 2, 2)), "ct")
    Traceback (most recent call last):
    ...
    TypeError: ct must be a stages.volume.Volume, got ndarray; wrap the array with Volume(array, spacing_mm=..., origin_mm=...)
    """
    if not isinstance(vol, Volume):
        raise TypeError(f"{name} must be a stages.volume.Volume, got {type(vol).__name__}; "
                        "wrap the array with Volume(array, spacing_mm=..., origin_mm=...)")
    kinds = "biuf" if allow_bool else "iuf"
    if vol.array.dtype.kind not in kinds:
        raise TypeError(f"{name}.array must hold numbers{'' if allow_bool else ' (not bool)'}, "
                        f"got dtype {vol.array.dtype}")


def xyz_to_zyx(points) -> np.ndarray:
    """Reverse the last axis: LUNA16 ``(coordX, coordY, coordZ)`` -> ``(z, y, x)``.

    Examples
    --------
    >>> xyz_to_zyx([1.0, 2.0, 3.0]).tolist()
    [3.0, 2.0, 1.0]
    """
    return np.asarray(points, dtype=np.float64)[..., ::-1].copy()


zyx_to_xyz = xyz_to_zyx  # the reversal is its own inverse


def block_mask(mask: np.ndarray, factors) -> np.ndarray:
    """Shrink a boolean mask by integer ``factors`` per axis (the coarse grids of the lung mask
    and the mass pass): a block is set when at least half of it is (the edge padded with unset).

    Examples
    --------
    >>> block_mask(np.array([[[1, 1, 0, 1, 0]]], bool), (1, 1, 2)).astype(int).tolist()
    [[[1, 1, 0]]]
    """
    f = tuple(int(k) for k in factors)
    if f == (1, 1, 1):
        return mask
    pad = [(0, (-s) % k) for s, k in zip(mask.shape, f)]
    m = np.pad(mask, pad).astype(np.float32)
    z, y, x = m.shape
    m = m.reshape(z // f[0], f[0], y // f[1], f[1], x // f[2], f[2]).mean(axis=(1, 3, 5))
    return m >= 0.5


def unblock(array: np.ndarray, factors, shape) -> np.ndarray:
    """Undo :func:`block_mask`'s grid: repeat each coarse voxel ``factors`` times per axis and
    crop to ``shape`` (any dtype: masks, labels)."""
    out = array
    for ax, k in enumerate(factors):
        if k > 1:
            out = np.repeat(out, k, axis=ax)
    return out[:shape[0], :shape[1], :shape[2]]


def _vec3(name: str, value) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,):
        raise ValueError(f"{name} must have 3 values (z, y, x), got {np.asarray(value).shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D scan (or label map) and its place in the world.

    Parameters
    ----------
    array : (Z, Y, X) ndarray
        Voxel values: int16 Hounsfield units for CT, uint8 labels for masks,
        float32 for feature maps.
    spacing_mm : tuple of float, shape (3,)
        Distance between voxel centres along ``(z, y, x)``, in mm, all > 0.
    origin_mm : tuple of float, shape (3,)
        World position (LPS, mm) of the centre of voxel ``(0, 0, 0)``,
        written ``(z, y, x)``.
    direction : (3, 3) array_like, optional
        Orthonormal matrix; column ``j`` is array axis ``j``'s world direction
        in ``(z, y, x)`` components.  Identity by default (axial scan,
        rows along +y (posterior), columns along +x (left)).
    scan_id : str
        Stable identifier: the SeriesInstanceUID for DICOM, the file stem
        otherwise (LUNA16's ``seriesuid``).
    meta : mapping, optional
        Non-identifying facts about the acquisition (modality, kernel,
        slice thickness...).  Never patient name, ID, birth date or accession.

    Raises
    ------
    ValueError
        If the array is not 3-D, a spacing is not positive, or the direction
        is not orthonormal.

    Examples
    --------
    >>> vol = Volume(np.zeros((2, 3, 4), np.int16), spacing_mm=(2.0, 0.5, 0.5),
    ...              origin_mm=(-10.0, 0.0, 0.0), scan_id="demo")
    >>> vol.index_to_world([1, 2, 2]).tolist()
    [-8.0, 1.0, 1.0]
    >>> vol.world_to_index([-8.0, 1.0, 1.0]).tolist()
    [1.0, 2.0, 2.0]
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    scan_id: str = "scan"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"Volume.array must be 3-D (z, y, x), got shape {arr.shape}")
        spacing = _vec3("spacing_mm", self.spacing_mm)
        if min(spacing) <= 0:
            raise ValueError(f"spacing_mm must be > 0 on every axis, got {spacing}")
        origin = _vec3("origin_mm", self.origin_mm)
        direction = np.array(self.direction, dtype=np.float64)
        if direction.shape != (3, 3):
            raise ValueError(f"direction must be 3x3, got shape {direction.shape}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError(f"direction must be orthonormal, got {direction.tolist()}")
        direction.setflags(write=False)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", origin)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "scan_id", str(self.scan_id))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(Z, Y, X)``."""
        return tuple(self.array.shape)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(z, y, x, 1)`` indices to world ``(z, y, x, 1)`` mm."""
        out = np.eye(4)
        out[:3, :3] = self.direction * np.asarray(self.spacing_mm)[None, :]
        out[:3, 3] = self.origin_mm
        return out

    def index_to_world(self, index_zyx) -> np.ndarray:
        """Continuous voxel index(es) ``(..., 3)`` in ``(z, y, x)`` -> world mm ``(z, y, x)``."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        return (idx * np.asarray(self.spacing_mm)) @ self.direction.T + np.asarray(self.origin_mm)

    def world_to_index(self, world_zyx) -> np.ndarray:
        """World mm ``(..., 3)`` in ``(z, y, x)`` -> continuous voxel index ``(z, y, x)``.

        Round the result to get the nearest voxel; it may fall outside the array.
        """
        pts = np.asarray(world_zyx, dtype=np.float64) - np.asarray(self.origin_mm)
        return (pts @ self.direction) / np.asarray(self.spacing_mm)

    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """World ``(z, y, x)`` minimum and maximum over the 8 corner voxel centres."""
        corners = np.array([[i, j, k] for i in (0, self.shape[0] - 1)
                            for j in (0, self.shape[1] - 1) for k in (0, self.shape[2] - 1)])
        world = self.index_to_world(corners)
        return world.min(axis=0), world.max(axis=0)

    def same_geometry(self, other: "Volume", *, atol_mm: float = 1e-3) -> bool:
        """True when ``other`` has this shape, spacing, origin and direction (within ``atol_mm``)."""
        return (self.shape == other.shape
                and np.allclose(self.spacing_mm, other.spacing_mm, atol=atol_mm)
                and np.allclose(self.origin_mm, other.origin_mm, atol=atol_mm)
                and np.allclose(self.direction, other.direction, atol=1e-6))

    def check_same_geometry(self, other: "Volume", *, what: str = "mask", atol_mm: float = 1e-3) -> None:
        """Raise ``ValueError`` naming the difference when ``other`` is not on this grid."""
        if not self.same_geometry(other, atol_mm=atol_mm):
            raise ValueError(
                f"{what} geometry differs from the volume's: shape {other.shape} vs {self.shape}, "
                f"spacing {other.spacing_mm} vs {self.spacing_mm}, origin {other.origin_mm} vs "
                f"{self.origin_mm}; resample it onto the volume first (stages.resample.resample_like)")

    # ------------------------------------------------------------------ copies
    def with_array(self, array: np.ndarray, **changes) -> "Volume":
        """A new Volume on the same grid holding ``array`` (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.shape and not {"spacing_mm", "origin_mm"} & changes.keys():
            raise ValueError(f"with_array needs shape {self.shape}, got {array.shape}")
        return replace(self, array=array, **changes)

    # ------------------------------------------------------------------ SimpleITK
    @classmethod
    def from_sitk_geometry(cls, array_zyx: np.ndarray, spacing_xyz, origin_xyz, direction_xyz_flat,
                           **kwargs) -> "Volume":
        """Build a Volume from SimpleITK's ``GetSpacing/GetOrigin/GetDirection`` (x, y, z order)."""
        d = np.asarray(direction_xyz_flat, dtype=np.float64).reshape(3, 3)
        return cls(array_zyx, spacing_mm=tuple(spacing_xyz)[::-1], origin_mm=tuple(origin_xyz)[::-1],
                   direction=d[::-1, ::-1], **kwargs)

    def sitk_geometry(self) -> tuple[tuple, tuple, tuple]:
        """``(spacing_xyz, origin_xyz, direction_xyz_flat)`` for SimpleITK's setters."""
        d = self.direction[::-1, ::-1]
        return (tuple(self.spacing_mm[::-1]), tuple(self.origin_mm[::-1]),
                tuple(float(v) for v in d.reshape(-1)))

    def __repr__(self) -> str:
        return (f"Volume(id={self.scan_id!r}, shape={self.shape}, dtype={self.array.dtype}, "
                f"spacing_mm={tuple(round(s, 4) for s in self.spacing_mm)}, "
                f"origin_mm={tuple(round(o, 3) for o in self.origin_mm)})")
