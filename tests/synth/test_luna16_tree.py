"""A benchmark written in LUNA16's layout (synth.luna16_tree)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import luna16
from stages.ingest import read_scan
from synth.luna16_tree import ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, assign_subsets, write_luna16_tree
from synth.phantom import write_phantom_scan

SPLITS = {"train": 6, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """12 phantom scans of 16x32x32 in train/val/test, with annotations and excluded findings."""
    root = tmp_path_factory.mktemp("bench")
    seed = 0
    for split, n in SPLITS.items():
        folder = root / split
        folder.mkdir()
        anns, excl = [], []
        for _ in range(n):
            path, ann = write_phantom_scan(folder, fmt="mhd", shape_zyx=(16, 32, 32),
                                           spacing_mm=(10.0, 10.0, 10.0), seed=seed, n_nodules=1,
                                           scan_id=f"bench-{split}-{seed:03d}")
            anns.append(ann)
            if seed % 3 == 0:
                a = ann.iloc[0]
                excl.append({"seriesuid": a.seriesuid, "coordX": a.coordX + 1.25, "coordY": a.coordY,
                             "coordZ": a.coordZ, "diameter_mm": 2.5})
            seed += 1
        pd.concat(anns)[ANNOTATION_COLUMNS].to_csv(folder / "annotations.csv", index=False,
                                                    float_format="%.4f")
        pd.DataFrame(excl, columns=ANNOTATION_COLUMNS).to_csv(folder / "annotations_excluded.csv",
                                                              index=False, float_format="%.4f")
    # one scan whose data file has another name: the tree's header must be rewritten
    mhd = root / "val" / "bench-val-006.mhd"
    (root / "val" / "bench-val-006.raw").rename(root / "val" / "pixels.raw")
    mhd.write_text(mhd.read_text().replace("bench-val-006.raw", "pixels.raw"))
    return root


@pytest.fixture(scope="module")
def tree(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("luna16")
    return out, write_luna16_tree(bench, out, negatives_per_scan=5)


def _sources(bench):
    return {p.stem: p for p in bench.glob("*/*.mhd")}


def test_every_scan_once_in_ten_subsets(bench, tree):
    out, info = tree
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("subset")) == \
        [f"subset{k}" for k in range(10)]
    found = luna16.find_luna_scans(out)
    assert sorted(found["seriesuid"]) == sorted(_sources(bench)) and found["seriesuid"].is_unique
    counts = found.groupby("subset").size()
    assert len(counts) == 10 and counts.min() >= 12 // 10 and counts.max() <= 2
    assert {k: sorted(v) for k, v in info["subsets"].items()} == \
        {k: sorted(g["seriesuid"]) for k, g in found.groupby("subset")}


def test_scans_read_the_same_as_their_sources(bench, tree):
    out, _ = tree
    sources = _sources(bench)
    for row in luna16.find_luna_scans(out).itertuples():
        got, want = luna16.read_luna_scan(row.path), read_scan(sources[row.seriesuid])
        np.testing.assert_array_equal(got.array, want.array)
        np.testing.assert_allclose(got.origin_mm, want.origin_mm)
        np.testing.assert_allclose(got.spacing_mm, want.spacing_mm)
        assert got.scan_id == row.seriesuid
    renamed = next(out.glob("subset*/bench-val-006.mhd"))
    assert "ElementDataFile = bench-val-006.raw" in renamed.read_text()
    assert not list(out.glob("subset*/pixels.raw"))


def test_csvs_are_luna16s(bench, tree):
    out, info = tree
    ev = out / "evaluationScript" / "annotations"
    headers = {out / "annotations.csv": ANNOTATION_COLUMNS, ev / "annotations.csv": ANNOTATION_COLUMNS,
               ev / "annotations_excluded.csv": ANNOTATION_COLUMNS,
               out / "candidates_V2" / "candidates_V2.csv": CANDIDATE_COLUMNS}
    for path, cols in headers.items():
        assert path.read_text().splitlines()[0] == ",".join(cols), path
    for name in ("annotations.csv", "annotations_excluded.csv"):
        want = pd.concat([pd.read_csv(bench / s / name, dtype=str) for s in SPLITS])
        got = pd.read_csv(ev / name, dtype=str)
        key = ANNOTATION_COLUMNS
        assert sorted(map(tuple, got[key].to_numpy())) == sorted(map(tuple, want[key].to_numpy())), name
    assert info["n_annotations"] == 12 and info["n_excluded"] == 4
    uids = (ev / "seriesuids.csv").read_text().split()
    assert sorted(uids) == sorted(_sources(bench)) and luna16.read_seriesuids(out) == uids

    cands = luna16.read_candidates(out)
    ann = luna16.read_annotations(out)
    pos = cands[cands["class"] == 1]
    key = ["seriesuid", "coordX", "coordY", "coordZ"]
    assert sorted(map(tuple, pos[key].to_numpy())) == sorted(map(tuple, ann[key].to_numpy()))
    neg = cands[cands["class"] == 0]
    assert set(cands["class"]) == {0, 1} and neg.groupby("seriesuid").size().min() >= 1
    for row in neg.itertuples():  # inside the scan, away from every finding
        vol = read_scan(next(out.glob(f"subset*/{row.seriesuid}.mhd")))
        idx = vol.world_to_index(np.array([row.coordZ, row.coordY, row.coordX]))
        assert np.all(idx >= -1e-6) and np.all(idx <= np.array(vol.shape) - 1 + 1e-6)
        mine = ann[ann["seriesuid"] == row.seriesuid]
        d = np.linalg.norm(mine[["coordX", "coordY", "coordZ"]].to_numpy() -
                           [row.coordX, row.coordY, row.coordZ], axis=1)
        assert np.all(d >= mine["diameter_mm"].to_numpy() / 2 + 10.0 - 1e-3)


def test_deterministic_and_rewritable(bench, tree, tmp_path):
    out, info = tree
    again = write_luna16_tree(bench, tmp_path, negatives_per_scan=5)
    assert again == info
    assert (tmp_path / "candidates_V2" / "candidates_V2.csv").read_bytes() == \
        (out / "candidates_V2" / "candidates_V2.csv").read_bytes()
    other = write_luna16_tree(bench, tmp_path, negatives_per_scan=5, seed=1)  # over the old tree
    assert sorted(p.stem for p in tmp_path.glob("subset*/*.mhd")) == sorted(_sources(bench))
    assert other["subsets"] != info["subsets"]


def test_assign_subsets_is_round_robin():
    got = assign_subsets([f"u{i}" for i in range(31)], 10, seed=4)
    assert sorted(np.bincount(list(got.values()))) == [3] * 9 + [4]
    assert got == assign_subsets(reversed([f"u{i}" for i in range(31)]), 10, seed=4)


def test_command_line(bench, tmp_path, capsys):
    from pipeline.__main__ import main

    assert main(["luna16-tree", "--bench", str(bench), "--out", str(tmp_path / "t"), "--negatives", "2"]) == 0
    assert "12 scans in 10 subsets" in capsys.readouterr().out
    assert main(["luna16-tree", "--bench", str(tmp_path / "none"), "--out", str(tmp_path / "u")]) == 2
    assert "is not a folder" in capsys.readouterr().err
