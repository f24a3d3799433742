"""Lung-RADS v2022 category of a baseline screening CT from its findings.

One public verb, :func:`lung_rads_category`: every finding gets the category its type and
size give in the table below, and the exam gets the highest of them, with the finding that
sets it named in the reason.

The table implemented (ACR Lung-RADS v2022, *baseline* exam rows only; sizes are the mean
diameter rounded to the nearest 0.1 mm, as Lung-RADS asks, so 5.95 mm counts as 6.0 mm)::

    category  solid                  part-solid                          ground glass
    1         no nodule; a calcified nodule (benign calcification)
    2         < 6 mm                 total < 6 mm                        < 30 mm
    3         6 to < 8 mm            total >= 6 mm, solid part < 6 mm    >= 30 mm
    4A        8 to < 15 mm           solid part 6 to < 8 mm              -
    4B        >= 15 mm               solid part >= 8 mm                  -

A finding over 30 mm (``finding == "mass"``) is read by the same rows (a solid mass is 4B).

Limits
------
* Baseline only: there is no prior exam, so no "new" or "growing" nodule rows, no
  stability downgrades, and no category 0 for a comparison being located.
* 4X (a category 3 or 4 finding with additional features that raise suspicion: spiculation,
  lymphadenopathy, metastases, a growing ground-glass nodule ...) is never given: none of
  those features is measured.
* Category 0 for a scan that cannot be evaluated (part of the lungs missing) is not given
  here; :mod:`pipeline.patients` gives 0 to a scan that failed.
* Benign features other than calcification (fat, the v2022 juxtapleural / perifissural
  < 10 mm rule, airway or atypical pulmonary cysts) are not modelled; such a finding is
  graded by size like any other.
* The type comes from the finding's HU profile (:mod:`stages.nodule_type`), the size from the
  detector's diameter (mean extent along the principal axes, not calipers on one slice).
"""
from __future__ import annotations

import math

import pandas as pd

__all__ = ["lung_rads_category", "CATEGORIES", "NODULE_TYPES"]

#: Categories in increasing order of suspicion.
CATEGORIES = ("0", "1", "2", "3", "4A", "4B", "4X")
#: The finding types the table knows (:mod:`stages.nodule_type` writes them).
NODULE_TYPES = ("solid", "part_solid", "ground_glass", "calcified")

#: Solid nodule: below this mean diameter (mm) category 2, ...
SOLID_3_MM = 6.0
#: ... below this 3, ...
SOLID_4A_MM = 8.0
#: ... below this 4A, from it 4B.
SOLID_4B_MM = 15.0
#: Part-solid nodule: total mean diameter (mm) below this is category 2.
PART_SOLID_TOTAL_MM = 6.0
#: Part-solid nodule: solid component (mm) below this is 3, below ``SOLID_4A_MM`` 4A, else 4B.
PART_SOLID_CORE_4A_MM = 6.0
#: Ground-glass nodule: below this mean diameter (mm) category 2, from it 3.
GGN_3_MM = 30.0


def _size(value) -> float:
    """Lung-RADS measures to the nearest tenth of a millimetre."""
    return round(float(value), 1)


def _one(kind: str, diameter_mm: float, solid_mm: float) -> tuple[str, str]:
    d = _size(diameter_mm)
    if kind == "calcified":
        return "1", f"calcified nodule {d:.1f} mm (benign calcification)"
    if kind == "solid":
        cat = ("2" if d < SOLID_3_MM else "3" if d < SOLID_4A_MM else "4A" if d < SOLID_4B_MM else "4B")
        return cat, f"solid nodule {d:.1f} mm"
    if kind == "part_solid":
        s = _size(solid_mm)
        cat = ("2" if d < PART_SOLID_TOTAL_MM else "3" if s < PART_SOLID_CORE_4A_MM
               else "4A" if s < SOLID_4A_MM else "4B")
        return cat, f"part-solid nodule {d:.1f} mm (solid part {s:.1f} mm)"
    if kind == "ground_glass":
        return ("2" if d < GGN_3_MM else "3"), f"ground-glass nodule {d:.1f} mm"
    raise ValueError(f"unknown nodule type {kind!r}; expected one of {NODULE_TYPES}")


def lung_rads_category(findings: pd.DataFrame) -> tuple[str, str]:
    """Lung-RADS v2022 category of a baseline exam from its reported findings.

    Parameters
    ----------
    findings : DataFrame
        One row per finding to report (already chosen: e.g. the candidates whose nodule
        probability passes the screen's threshold), with ``nodule_type`` (one of
        :data:`NODULE_TYPES`), ``diameter_mm`` (mean diameter, mm) and, for part-solid
        findings, ``solid_diameter_mm`` (the solid component's diameter, mm).  Optional
        ``coordX, coordY, coordZ`` (world mm) are quoted in the reason.

    Returns
    -------
    category : str
        ``"1"``, ``"2"``, ``"3"``, ``"4A"`` or ``"4B"`` (see the module's table).
    reason : str
        The finding that sets it (type, size, position), or ``"no nodule"``.

    Examples
    --------
    >>> lung_rads_category(pd.DataFrame({"nodule_type": ["solid", "ground_glass"],
    ...                                  "diameter_mm": [7.0, 12.0]}))
    ('3', 'solid nodule 7.0 mm')
    >>> lung_rads_category(pd.DataFrame(columns=["nodule_type", "diameter_mm"]))
    ('1', 'no nodule')
    """
    missing = {"nodule_type", "diameter_mm"} - set(findings.columns)
    if missing:
        raise ValueError(f"findings need the columns {sorted(missing)}")
    best = ("1", "no nodule", -math.inf)
    for _, row in findings.iterrows():
        d = float(row["diameter_mm"])
        if not (math.isfinite(d) and d > 0):
            raise ValueError(f"diameter_mm must be a positive number of mm, got {row['diameter_mm']!r}")
        solid = row.get("solid_diameter_mm", math.nan)
        if row["nodule_type"] == "part_solid" and not (solid is not None and math.isfinite(float(solid))):
            raise ValueError("a part-solid finding needs solid_diameter_mm")
        cat, why = _one(str(row["nodule_type"]), d, float(solid) if solid is not None else math.nan)
        if all(c in row.index for c in ("coordX", "coordY", "coordZ")):
            why += f" at ({row['coordX']:.1f}, {row['coordY']:.1f}, {row['coordZ']:.1f}) mm"
        rank = CATEGORIES.index(cat)
        if (rank, d) > (CATEGORIES.index(best[0]), best[2]):
            best = (cat, why, d)
    return best[0], best[1]
