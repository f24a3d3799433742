"""The type of each finding from its HU profile: solid, part-solid, ground glass or calcified.

Lung-RADS (:mod:`stages.lungrads`) grades a nodule by its type and size; the candidates
table has the size (``diameter_mm``) but not the type, so :func:`nodule_types` measures it on
the CT around every candidate, inside the sphere of the finding's diameter (about 2 ms a
candidate: 2 s for a scan's 1000 on the shared 2-core machine):

* lesion voxels: at least ``LESION_HU`` (-800 HU; aerated lung lies below);
* solid voxels: at least ``SOLID_HU`` (-300 HU, a usual solid-component threshold; ground
  glass is about -750 to -300 HU);
* the *core*: the sphere of radius ``d / 4`` (half the finding's radius).

Rules, in order: **calcified** when at least ``CALCIFIED_FRACTION`` of the lesion voxels are
at least ``CALCIFIED_HU`` (200 HU: mostly dense, as a completely calcified granuloma);
**ground_glass** when under ``CORE_SOLID_FRACTION`` of the core is solid (no solid core);
**part_solid** when under ``PART_SOLID_FRACTION`` of the lesion voxels are solid; else
**solid**.  ``solid_diameter_mm`` is the equivalent-sphere diameter of the solid voxels.

The thresholds were set on the LIDC-shape benchmark's *training* nodules
(``data/bench96/train``, 97 nodules >= 3 mm, truth centres and diameters), by LIDC texture
rating (1-2 ground glass, 3 part-solid, 4-5 solid): the core's solid fraction is <= 0.25 for
the ground-glass nodules and >= 0.70 for the part-solid ones (solid: 10th percentile 0.75);
the whole sphere's solid fraction 0.15-0.52 for part-solid, 0.38 / 0.66 (10th percentile /
median) for solid nodules, so some small solid nodules, whose sphere holds much partial
volume, are read as part-solid.  Only 3 ground-glass and 3 part-solid training nodules: the
split between those two types and solid is rough.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["nodule_types", "LESION_HU", "SOLID_HU", "CALCIFIED_HU"]

#: Voxels at least this dense (HU) inside a finding's sphere are lesion, not aerated lung.
LESION_HU = -800.0
#: Solid tissue, HU (ground glass lies between ``LESION_HU`` and this).
SOLID_HU = -300.0
#: Calcium, HU.
CALCIFIED_HU = 200.0
#: Calcified: at least this fraction of the lesion voxels are calcium.
CALCIFIED_FRACTION = 0.4
#: Ground glass: less than this fraction of the core (radius d / 4) is solid.
CORE_SOLID_FRACTION = 0.5
#: Part-solid: less than this fraction of the lesion voxels are solid (and a solid core).
PART_SOLID_FRACTION = 0.35
#: Extra edge (mm) of the cube cut around a finding beyond its diameter.
MARGIN_MM = 4.0


def _type_of(cube: np.ndarray, diameter_mm: float) -> tuple[str, float]:
    n = cube.shape[0]
    c = (n - 1) / 2.0
    zz, yy, xx = np.ogrid[:n, :n, :n]
    r = np.sqrt((zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2)
    inside = cube[r <= max(diameter_mm / 2.0, 0.5)]
    core = cube[r <= max(diameter_mm / 4.0, 1.0)]
    lesion = inside >= LESION_HU
    n_lesion = max(int(lesion.sum()), 1)
    n_solid = int((inside >= SOLID_HU).sum())
    solid_mm = float(np.cbrt(6.0 * n_solid / np.pi))  # 1 mm voxels
    if (inside >= CALCIFIED_HU).sum() / n_lesion >= CALCIFIED_FRACTION:
        return "calcified", solid_mm
    if (core >= SOLID_HU).mean() < CORE_SOLID_FRACTION:
        return "ground_glass", 0.0
    if n_solid / n_lesion < PART_SOLID_FRACTION:
        return "part_solid", solid_mm
    return "solid", solid_mm


def nodule_types(ct, candidates: pd.DataFrame) -> pd.DataFrame:
    """Add ``nodule_type`` and ``solid_diameter_mm`` to every candidate.

    Parameters
    ----------
    ct : Volume
        The HU volume the candidates were found on (any spacing; sampled at 1 mm).
    candidates : DataFrame
        ``coordX, coordY, coordZ`` (world mm) and ``diameter_mm``.

    Returns
    -------
    DataFrame
        ``candidates`` (same rows, same order) with ``nodule_type`` (``"solid"``,
        ``"part_solid"``, ``"ground_glass"`` or ``"calcified"``) and
        ``solid_diameter_mm`` (mm; 0 for ground glass).
    """
    from stages.patches import extract_patches

    out = candidates.copy()
    kinds = np.full(len(out), "", dtype=object)
    solid = np.full(len(out), np.nan)
    if len(out):
        xyz = out[["coordX", "coordY", "coordZ"]].to_numpy(float)
        diam = out["diameter_mm"].to_numpy(float)
        for i in range(len(out)):
            size = float(np.ceil(diam[i] + MARGIN_MM))
            cube = extract_patches(ct, centres_xyz_mm=xyz[i:i + 1], size_mm=size, spacing_mm=1.0)[0]
            kinds[i], solid[i] = _type_of(cube, diam[i])
    out["nodule_type"] = pd.Series(kinds, index=out.index, dtype=str)
    out["solid_diameter_mm"] = np.round(solid, 2)
    return out
