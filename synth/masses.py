"""Lung masses inserted into chest CT: against the chest wall, at the hilum or anywhere on the
lung's border, for training and testing the lung mask on lesions it must keep.

:func:`insert_mass` puts one lobulated soft-tissue mass (an ellipsoid whose surface is
roughened by smooth noise) on the border of a lung: its centre sits on a border voxel of the
lung, moved along the border's outward normal by a fraction of its radius, so that it
presses into the lung and into the chest wall or the mediastinum behind it, as a real
tumour against the pleura does.  Its voxels get a solid-tumour density (20-60 HU, textured,
with the background's noise, a necrotic core for some large ones), blended at the edge
(partial volume); bone inside it is left as it was (ribs stay ribs).

Sites
-----
``"wall"``
    the costal surface: border voxels on the lateral half of the lung (away from the
    mediastinum, which is towards +x for the right lung and -x for the left, LPS);
``"hilar"``
    the medial surface in the middle third of the lung's height, where the hilum is;
``"any"``
    any border voxel.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from stages.volume import Volume

__all__ = ["insert_mass", "SITES"]

SITES = ("wall", "hilar", "any")
#: Tumour density range (HU) and its texture (standard deviation, HU).
MASS_HU = (20.0, 60.0)
TEXTURE_HU = 12.0
#: Voxels denser than this keep their value (bone inside the mass's outline).
BONE_HU = 250.0


def _border_voxels(lung: np.ndarray) -> np.ndarray:
    return np.argwhere(lung & ~ndi.binary_erosion(lung))


def _noise_hu(bg: np.ndarray) -> float:
    """The background's noise (HU): robust spread of its high-pass in the lung (at most 40)."""
    hp = bg - ndi.uniform_filter(bg, 3)
    vals = hp[bg < -500]
    if vals.size < 100:
        return 15.0
    return float(min(1.4826 * np.median(np.abs(vals - np.median(vals))) * 1.2, 40.0))


def insert_mass(ct: Volume, lung_mask: Volume, *, diameter_mm: float, site: str = "wall",
                depth: float | None = None, seed: int = 0) -> tuple[Volume, np.ndarray]:
    """Insert one mass on the border of a lung of ``ct``.

    Parameters
    ----------
    ct : Volume
        CT in HU, about 1 mm voxels.
    lung_mask : Volume
        Its lung labels (1 right, 2 left; :func:`stages.lungmask.segment_lungs`).
    diameter_mm : float
        Equivalent diameter of the ellipsoid before lobulation (mm).
    site : {"wall", "hilar", "any"}
        Where on the lung's border (see the module notes).
    depth : float, optional
        How far the centre moves from the border voxel along the border's outward normal,
        in radii (negative: into the lung); default a random value in [-0.8, -0.1]: mostly in
        the lung, pressing on the wall or the mediastinum.
    seed : int
        Everything random comes from it.

    Returns
    -------
    (Volume, ndarray)
        The CT with the mass (int16, same grid) and the mass's voxels (bool, bone left out).

    Raises
    ------
    ValueError
        For an unknown site or a mask with no lung.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    ct.check_same_geometry(lung_mask)
    rng = np.random.default_rng(seed)
    labels = lung_mask.array
    lung = labels > 0
    if not lung.any():
        raise ValueError(f"{ct.scan_id}: the lung mask is empty; nowhere to put a mass")
    spacing = np.asarray(ct.spacing_mm, float)
    border = _border_voxels(lung)
    side = labels[tuple(border.T)]
    if site != "any":
        # medial direction in array x: towards +world x for the right lung, -x for the left
        sign_world = np.where(side == 1, 1.0, -1.0)
        medial_x = sign_world * np.sign(ct.direction[2, 2] or 1.0)
        keep = np.zeros(len(border), bool)
        for lab in (1, 2):
            on = side == lab
            if not on.any():
                continue
            xs = border[on, 2] * medial_x[on]  # larger = more medial
            zs = border[on, 0]
            lo_x, hi_x = np.percentile(xs, [50, 85])
            lo_z, hi_z = np.percentile(zs, [33, 67])
            if site == "wall":
                ok = xs <= lo_x
            else:
                ok = (xs >= hi_x) & (zs >= lo_z) & (zs <= hi_z)
            keep[np.flatnonzero(on)[ok]] = True
        if keep.any():
            border = border[keep]
    point = border[rng.integers(len(border))]
    # outward normal of the lung at the point: minus the gradient of a smoothed lung mask
    r_mm = diameter_mm / 2.0
    half = np.ceil((r_mm * 1.6 + 8) / spacing).astype(int)
    lo = np.maximum(point - half, 0)
    hi = np.minimum(point + half + 1, ct.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    smooth = ndi.gaussian_filter(lung[box].astype(np.float32), 4.0 / spacing)
    grad = np.array([g[tuple(point - lo)] for g in np.gradient(smooth, *spacing)])
    normal = -grad / (np.linalg.norm(grad) + 1e-9)  # index-space axes, mm units
    depth = float(rng.uniform(-0.8, -0.1)) if depth is None else float(depth)
    centre = point * spacing + normal * depth * r_mm  # mm in index space
    # a randomly turned ellipsoid of the same volume, its surface roughened by smooth noise
    radii = r_mm * rng.uniform(0.8, 1.2, 3)
    radii *= r_mm / np.cbrt(np.prod(radii))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)],
                                indexing="ij"), axis=-1) - centre
    d = np.sqrt((((grid @ q) / radii) ** 2).sum(-1))
    rough = ndi.gaussian_filter(rng.normal(size=d.shape).astype(np.float32), r_mm / 3 / spacing)
    rough *= 0.12 / (rough.std() + 1e-9)
    inside = d + rough < 1.0
    bg = ct.array[box].astype(np.float32)
    inside &= bg < BONE_HU
    weight = ndi.gaussian_filter(inside.astype(np.float32), 0.7 / spacing)
    weight[bg >= BONE_HU] = 0.0
    base = rng.uniform(*MASS_HU)
    texture = ndi.gaussian_filter(rng.normal(size=d.shape).astype(np.float32), 1.5 / spacing)
    tissue = base + texture * (TEXTURE_HU / (texture.std() + 1e-9))
    if r_mm > 20 and rng.random() < 0.4:  # a necrotic core
        tissue -= np.clip(1.0 - d / 0.5, 0, 1) * rng.uniform(15, 35)
    tissue += rng.normal(0, _noise_hu(bg), size=d.shape)
    out = ct.array.copy()
    out[box] = np.clip(np.rint(bg * (1 - weight) + tissue * weight), -1024, 3071).astype(out.dtype)
    mass = np.zeros(ct.shape, bool)
    mass[box] = inside
    return ct.with_array(out), mass
