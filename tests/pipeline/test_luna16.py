"""LUNA16 reader on a tiny fake tree laid out exactly like the distributed data set."""
import numpy as np
import pandas as pd
import pytest

from pipeline.io import write_volume
from pipeline.luna16 import (find_luna_scans, read_annotations, read_candidates, read_excluded,
                             read_luna_scan, read_seriesuids)
from stages.errors import ScanError
from stages.volume import Volume, xyz_to_zyx

UIDS = {"subset0": ["1.3.6.1.4.1.14519.5.2.1.6279.6001.100", "1.3.6.1.4.1.14519.5.2.1.6279.6001.101"],
        "subset1": ["1.3.6.1.4.1.14519.5.2.1.6279.6001.200"]}


@pytest.fixture
def luna_root(tmp_path, rng):
    for subset, uids in UIDS.items():
        for k, uid in enumerate(uids):
            arr = rng.integers(-1000, 400, size=(6, 8, 10)).astype(np.int16)
            arr[3, 4, 5] = 1234  # a marker at a known voxel
            vol = Volume(arr, spacing_mm=(2.5, 0.7, 0.7), origin_mm=(-300.0 - k, -150.0, -170.0), scan_id=uid)
            write_volume(vol, tmp_path / subset / f"{uid}.mhd")
    (tmp_path / "subset0" / "notes.txt").write_text("not a scan")
    marker_xyz = [-170.0 + 5 * 0.7, -150.0 + 4 * 0.7, -300.0 + 3 * 2.5]
    pd.DataFrame([[UIDS["subset0"][0], *marker_xyz, 6.5], [UIDS["subset1"][0], 1.0, 2.0, 3.0, 4.0]],
                 columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
                 ).to_csv(tmp_path / "annotations.csv", index=False)
    (tmp_path / "candidates_V2").mkdir()
    pd.DataFrame([[UIDS["subset0"][0], *marker_xyz, 1], [UIDS["subset0"][1], 0.0, 0.0, 0.0, 0]],
                 columns=["seriesuid", "coordX", "coordY", "coordZ", "class"]
                 ).to_csv(tmp_path / "candidates_V2" / "candidates_V2.csv", index=False)
    ev = tmp_path / "evaluationScript" / "annotations"
    ev.mkdir(parents=True)
    pd.DataFrame([[UIDS["subset1"][0], 5.0, 5.0, 5.0, -1.0]],
                 columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
                 ).to_csv(ev / "annotations_excluded.csv", index=False)
    (ev / "seriesuids.csv").write_text("\n".join(u for uids in UIDS.values() for u in uids) + "\n")
    return tmp_path


def test_find_scans_lists_subsets_and_uids(luna_root):
    scans = find_luna_scans(luna_root)
    assert scans.columns.tolist() == ["seriesuid", "path", "subset"]
    assert scans["seriesuid"].tolist() == UIDS["subset0"] + UIDS["subset1"]
    assert scans["subset"].tolist() == ["subset0", "subset0", "subset1"]
    assert all(p.endswith(".mhd") for p in scans["path"])
    with pytest.raises(FileNotFoundError, match="subset0"):
        find_luna_scans(luna_root / "missing")


def test_tables_read_from_root_or_file(luna_root):
    ann = read_annotations(luna_root)
    assert ann.equals(read_annotations(luna_root / "annotations.csv"))
    assert ann["seriesuid"].tolist() == [UIDS["subset0"][0], UIDS["subset1"][0]]
    assert ann["diameter_mm"].dtype == np.float64 and ann["diameter_mm"].tolist() == [6.5, 4.0]
    cand = read_candidates(luna_root)  # found in candidates_V2/
    assert cand["class"].tolist() == [1, 0] and cand["class"].dtype.kind == "i"
    exc = read_excluded(luna_root)
    assert exc["diameter_mm"].tolist() == [-1.0]
    assert read_seriesuids(luna_root) == UIDS["subset0"] + UIDS["subset1"]


def test_annotation_world_coordinates_land_on_the_marker_voxel(luna_root):
    scans = find_luna_scans(luna_root).set_index("seriesuid")
    row = read_annotations(luna_root).iloc[0]
    vol = read_luna_scan(scans.loc[row.seriesuid, "path"])
    assert vol.scan_id == row.seriesuid and vol.array.dtype == np.int16
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    idx = np.round(vol.world_to_index(xyz_to_zyx([row.coordX, row.coordY, row.coordZ]))).astype(int)
    assert idx.tolist() == [3, 4, 5] and vol.array[tuple(idx)] == 1234


def test_bad_inputs_are_reported(luna_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="candidates_V2.csv"):
        read_candidates(luna_root / "subset0")
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ\n1,2,3,4\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['diameter_mm'\]"):
        read_annotations(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1,x,3,4,5\n")
    with pytest.raises(ValueError, match="coordX"):
        read_annotations(bad)
    with pytest.raises(ScanError, match="SimpleITK"):
        read_luna_scan(luna_root / "subset0" / "notes.txt")
