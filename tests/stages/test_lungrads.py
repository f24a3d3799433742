"""Lung-RADS v2022 (baseline rows): each table boundary, from hand-built findings."""
import pandas as pd
import pytest

from stages.lungrads import lung_rads_category


def _cat(kind, diameter_mm, solid_mm=None):
    row = {"nodule_type": kind, "diameter_mm": diameter_mm}
    if solid_mm is not None:
        row["solid_diameter_mm"] = solid_mm
    return lung_rads_category(pd.DataFrame([row]))[0]


@pytest.mark.parametrize("diameter_mm, category", [
    (3.0, "2"), (5.9, "2"), (6.0, "3"), (5.95, "3"),  # 5.95 mm rounds to 6.0 (nearest 0.1 mm)
    (5.94, "2"), (7.9, "3"), (8.0, "4A"), (14.9, "4A"), (15.0, "4B"), (45.0, "4B")])
def test_solid_rows(diameter_mm, category):
    assert _cat("solid", diameter_mm) == category


@pytest.mark.parametrize("total_mm, solid_mm, category", [
    (5.9, 4.0, "2"), (6.0, 3.0, "3"), (12.0, 5.9, "3"), (12.0, 6.0, "4A"), (12.0, 7.9, "4A"),
    (12.0, 8.0, "4B"), (20.0, 15.0, "4B")])
def test_part_solid_rows(total_mm, solid_mm, category):
    assert _cat("part_solid", total_mm, solid_mm) == category


@pytest.mark.parametrize("diameter_mm, category", [(5.0, "2"), (29.9, "2"), (30.0, "3"), (42.0, "3")])
def test_ground_glass_rows(diameter_mm, category):
    assert _cat("ground_glass", diameter_mm) == category


def test_no_nodule_and_calcified_are_category_1():
    assert lung_rads_category(pd.DataFrame(columns=["nodule_type", "diameter_mm"])) == ("1", "no nodule")
    cat, reason = lung_rads_category(pd.DataFrame({"nodule_type": ["calcified"], "diameter_mm": [12.0]}))
    assert cat == "1" and "calcified" in reason


def test_the_most_suspicious_finding_sets_the_category_and_is_named():
    findings = pd.DataFrame({"nodule_type": ["ground_glass", "solid", "solid", "calcified"],
                             "diameter_mm": [25.0, 9.0, 7.0, 20.0], "solid_diameter_mm": [0.0, 9.0, 7.0, 20.0],
                             "coordX": [1.0, -40.5, 3.0, 4.0], "coordY": [2.0, 12.25, 3.0, 4.0],
                             "coordZ": [3.0, -100.0, 3.0, 4.0]})
    cat, reason = lung_rads_category(findings)
    assert cat == "4A"
    assert reason == "solid nodule 9.0 mm at (-40.5, 12.2, -100.0) mm"
    # the same category twice: the larger finding is named
    two = pd.DataFrame({"nodule_type": ["solid", "solid"], "diameter_mm": [6.2, 7.5]})
    assert lung_rads_category(two) == ("3", "solid nodule 7.5 mm")


def test_bad_findings_are_refused():
    with pytest.raises(ValueError, match="unknown nodule type"):
        _cat("fuzzy", 5.0)
    with pytest.raises(ValueError, match="solid_diameter_mm"):
        _cat("part_solid", 9.0)
    with pytest.raises(ValueError, match="positive"):
        _cat("solid", 0.0)
    with pytest.raises(ValueError, match="columns"):
        lung_rads_category(pd.DataFrame({"diameter_mm": [5.0]}))
