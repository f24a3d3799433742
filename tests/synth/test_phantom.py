import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

import synth.phantom as ph
from synth.phantom import KINDS, make_luna_tree, make_phantom, phantom_uid, write_phantom_scan

SMALL = dict(shape_zyx=(48, 112, 112), spacing_mm=(6.0, 3.2, 3.2))


@pytest.fixture(scope="module")
def default_phantom():
    """The default grid (120, 256, 256), 8 random nodules: two of each kind."""
    return make_phantom(seed=3, n_nodules=8, return_truth=True)


def _centre_index(vol, row):
    return tuple(np.rint(vol.world_to_index([row.coordZ, row.coordY, row.coordX])).astype(int))


def test_deterministic_for_a_seed():
    a = make_phantom(seed=5, return_truth=True, **SMALL)
    b = make_phantom(seed=5, return_truth=True, **SMALL)
    np.testing.assert_array_equal(a[0].array, b[0].array)
    pd.testing.assert_frame_equal(a[1], b[1])
    for key in ("lung_mask", "nodule_mask", "airway_mask"):
        np.testing.assert_array_equal(a[2][key], b[2][key])
    assert a[0].origin_mm == b[0].origin_mm and a[0].scan_id == b[0].scan_id
    c = make_phantom(seed=6, **SMALL)
    assert not np.array_equal(a[0].array, c[0].array)
    assert c[0].scan_id != a[0].scan_id
    assert not np.allclose(a[1][["coordX", "coordY", "coordZ"]], c[1][["coordX", "coordY", "coordZ"]])


@pytest.mark.parametrize("shape, spacing", [((40, 64, 80), (7.5, 5.0, 4.0)), ((64, 128, 96), (4.0, 2.5, 3.3))])
def test_shape_spacing_origin_and_ids(shape, spacing):
    vol, ann = make_phantom(shape, spacing, seed=2, n_nodules=3)
    assert vol.shape == shape and vol.spacing_mm == spacing and vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.direction, np.eye(3))
    fov = (np.array(shape) - 1) * np.array(spacing)
    np.testing.assert_allclose(vol.origin_mm, [-340.0, -fov[1] / 2, -fov[2] / 2], atol=10.0)
    assert vol.origin_mm[0] < -300  # far from (0, 0, 0): index/world mix-ups show
    assert vol.scan_id == phantom_uid(2) and vol.scan_id.startswith("1.2.826.0.1.3680043.8.498.")
    assert len(vol.scan_id) <= 64 and all(p.isdigit() and (p == "0" or p[0] != "0") for p in vol.scan_id.split("."))
    assert list(ann.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "kind"]
    assert (ann.seriesuid == vol.scan_id).all() and ann.kind.tolist() == list(KINDS[:3])
    assert vol.array.min() >= -1024 and vol.array.max() <= 3071
    own, _ = make_phantom(shape, spacing, seed=2, n_nodules=0, scan_id="abc", origin_mm=(1.0, 2.0, 3.0))
    assert own.scan_id == "abc" and own.origin_mm == (1.0, 2.0, 3.0)


def test_nodule_centres_are_nodule_like(default_phantom):
    vol, ann, truth = default_phantom
    assert sorted(ann.kind) == sorted(KINDS * 2)
    assert ann.diameter_mm.between(3.0, 25.0).all()
    lung_mean = vol.array[truth["lung_mask"] > 0].mean()
    for i, row in ann.iterrows():
        idx = _centre_index(vol, row)
        assert truth["nodule_mask"][idx] == i + 1
        inside = vol.array[truth["nodule_mask"] == i + 1].astype(float)
        if row.kind == "ground-glass":
            assert -720 < inside.mean() < -450, (row.kind, inside.mean())
        elif row.kind == "part-solid":  # mostly halo, with a solid core
            assert -650 < inside.mean() < -250 and inside.max() > -100, (row.kind, inside.mean())
        else:
            assert inside.mean() > lung_mean + 400, (row.kind, inside.mean())
        if row.diameter_mm >= 6 and row.kind != "ground-glass":
            assert vol.array[idx] > -250, (row.kind, row.diameter_mm, vol.array[idx])
        # the mask has about the sphere's volume
        expect = np.pi / 6 * row.diameter_mm ** 3 / np.prod(vol.spacing_mm)
        if row.diameter_mm >= 8:
            assert 0.7 * expect < inside.size < 1.3 * expect


def test_juxta_pleural_touches_the_wall_and_others_do_not(default_phantom):
    vol, ann, truth = default_phantom
    lung = truth["lung_mask"]
    outside = (lung == 0) & ~truth["airway_mask"]
    for i, row in ann.iterrows():
        idx = _centre_index(vol, row)
        # the nodule's neighbourhood: a box reaching 12 mm past its radius
        half = np.ceil((row.diameter_mm / 2 + 12.0) / np.array(vol.spacing_mm)).astype(int)
        box = tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(idx, half))
        nod = truth["nodule_mask"][box] == i + 1
        assert nod.sum() == (truth["nodule_mask"] == i + 1).sum()  # the box holds it all
        touches = (ndimage.binary_dilation(nod) & outside[box]).any()
        depth_box = ndimage.distance_transform_edt(lung[box] > 0, sampling=vol.spacing_mm)
        depth = depth_box[tuple(c - b.start for c, b in zip(idx, box))]  # mm to the lung's edge
        assert lung[idx] > 0  # centred in a lung
        if row.kind == "juxta-pleural":
            assert touches
            assert depth < row.diameter_mm / 2 + max(vol.spacing_mm)
        else:
            assert not touches, row.kind
            assert depth > row.diameter_mm / 2


def test_lungs_trachea_and_sides(default_phantom):
    vol, _, truth = default_phantom
    lung, air = truth["lung_mask"], truth["airway_mask"]
    assert set(np.unique(lung)) == {0, 1, 2}
    assert -880 < vol.array[lung > 0].mean() < -790
    # LPS: +x is the patient's left, so the left lung (2) has the larger x
    x1 = vol.index_to_world(np.argwhere(lung == 1).mean(axis=0))[2]
    x2 = vol.index_to_world(np.argwhere(lung == 2).mean(axis=0))[2]
    assert x1 < 0 < x2 or x1 < x2
    # the lungs do not touch each other, and each is one piece
    assert not (ndimage.binary_dilation(lung == 1, iterations=2) & (lung == 2)).any()
    for lab in (1, 2):
        assert ndimage.label(lung == lab)[1] == 1
    # the trachea reaches the top slice and its air joins both lungs
    assert air[-1].any() and not (air & (lung > 0)).any()
    comp, _ = ndimage.label(vol.array < -400)
    top = comp[-1][air[-1]]
    top_label = np.bincount(top[top > 0]).argmax()
    joined = comp == top_label
    assert (joined & (lung == 1)).sum() > 0.9 * (lung == 1).sum()
    assert (joined & (lung == 2)).sum() > 0.9 * (lung == 2).sum()
    # the body (outside air excluded) holds bone (ribs, spine) and fat
    assert (vol.array > 400).sum() > 1000
    assert ((vol.array > -150) & (vol.array < -50)).sum() > 1000


def test_explicit_nodules():
    vol0, _ = make_phantom(seed=1, n_nodules=0, noise_hu=0.0, **SMALL)
    centre = vol0.index_to_world([24, 56, 30])
    nodules = [{"centre_zyx_mm": centre, "diameter_mm": 20.0, "kind": "solid"},
               {"centre_zyx_mm": vol0.index_to_world([30, 56, 80]), "diameter_mm": 18.0, "kind": "ground-glass"}]
    vol, ann, truth = make_phantom(seed=1, nodules=nodules, noise_hu=0.0, return_truth=True, **SMALL)
    np.testing.assert_allclose(ann[["coordZ", "coordY", "coordX"]].to_numpy()[0], centre)
    assert ann.kind.tolist() == ["solid", "ground-glass"] and ann.diameter_mm.tolist() == [20.0, 18.0]
    assert vol.array[24, 56, 30] == ph.SOLID_HU
    assert vol.array[30, 56, 80] == max(ph.GROUND_GLASS_HU, int(vol0.array[30, 56, 80]))
    assert truth["nodule_mask"][24, 56, 30] == 1 and truth["nodule_mask"][30, 56, 80] == 2
    # nothing else changed far from the nodules
    far = ndimage.binary_dilation(truth["nodule_mask"] > 0, iterations=3)
    np.testing.assert_array_equal(vol.array[~far], vol0.array[~far])


def test_noise_level():
    quiet, _ = make_phantom(seed=4, noise_hu=0.0, n_nodules=0, **SMALL)
    noisy, _ = make_phantom(seed=4, noise_hu=30.0, n_nodules=0, **SMALL)
    diff = noisy.array.astype(float) - quiet.array
    inner = (quiet.array > -900) & (quiet.array < 1000)  # away from the clipping at -1024
    assert 28 < diff[inner].std() < 32 and abs(diff[inner].mean()) < 1


def test_mhd_round_trip_keeps_world_coordinates(tmp_path):
    path, ann = write_phantom_scan(tmp_path, fmt="mhd", seed=8, n_nodules=4, **SMALL)
    vol, _ = make_phantom(seed=8, n_nodules=4, **SMALL)
    assert path == tmp_path / f"{vol.scan_id}.mhd" and path.with_suffix(".raw").exists()
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(arr, vol.array)
    for _, row in ann.iterrows():
        ix, iy, iz = img.TransformPhysicalPointToIndex((row.coordX, row.coordY, row.coordZ))
        assert (iz, iy, ix) == _centre_index(vol, row)
        cz, cy, cx = vol.world_to_index([row.coordZ, row.coordY, row.coordX])
        np.testing.assert_allclose(img.TransformPhysicalPointToContinuousIndex(
            (row.coordX, row.coordY, row.coordZ)), (cx, cy, cz), atol=1e-6)


@pytest.mark.parametrize("fmt, suffix", [("nrrd", ".nrrd"), ("nii", ".nii.gz")])
def test_other_formats(tmp_path, fmt, suffix):
    path, ann = write_phantom_scan(tmp_path, fmt=fmt, seed=9, n_nodules=1, **SMALL)
    assert path.name.endswith(suffix)
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == SMALL["shape_zyx"][::-1]
    np.testing.assert_allclose(img.GetSpacing(), SMALL["spacing_mm"][::-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dicom_series_reads_back(tmp_path, seed):
    from stages.ingest import read_scan

    folder, ann = write_phantom_scan(tmp_path / "series", seed=seed, n_nodules=2, **SMALL)
    vol, _ = make_phantom(seed=seed, n_nodules=2, **SMALL)
    files = sorted(folder.iterdir())
    assert len(files) == SMALL["shape_zyx"][0]
    assert all(f.suffix == "" and len(f.name) == 16 for f in files)  # shuffled hex names
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == ph.RESCALES[seed % len(ph.RESCALES)]
    assert ds.SeriesInstanceUID == vol.scan_id == ann.seriesuid[0]
    back = read_scan(folder)
    assert back.scan_id == vol.scan_id
    np.testing.assert_allclose(back.origin_mm, vol.origin_mm, atol=1e-3)
    np.testing.assert_allclose(back.spacing_mm, vol.spacing_mm, atol=1e-4)
    np.testing.assert_array_equal(back.array, vol.array)


def test_luna_tree_layout(tmp_path):
    ann, cand = make_luna_tree(tmp_path, n_scans=3, subsets=2, seed=1, negatives_per_scan=6)
    mhds = sorted(tmp_path.glob("subset*/*.mhd"))
    assert [p.parent.name for p in mhds].count("subset0") == 2 and len(mhds) == 3
    uids = {p.stem for p in mhds}
    assert all(p.with_suffix(".raw").exists() for p in mhds)
    a = pd.read_csv(tmp_path / "annotations.csv", dtype={"seriesuid": str})
    c = pd.read_csv(tmp_path / "candidates_V2.csv", dtype={"seriesuid": str})
    assert list(a.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert list(c.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert set(a.seriesuid) == uids == set(c.seriesuid)
    assert (tmp_path / "evaluationScript/annotations/seriesuids.csv").read_text().split() == ann.seriesuid.unique().tolist()
    assert len(a) == 3 * 2 and set(c["class"]) == {0, 1}
    assert (c["class"] == 0).groupby(c.seriesuid).sum().tolist() == [6, 6, 6]
    np.testing.assert_allclose(a[["coordX", "coordY", "coordZ"]], ann[["coordX", "coordY", "coordZ"]])
    for _, row in a.iterrows():
        mine = c[c.seriesuid == row.seriesuid]
        d = np.linalg.norm(mine[["coordX", "coordY", "coordZ"]].to_numpy() - row[["coordX", "coordY", "coordZ"]]
                           .to_numpy(float), axis=1)
        assert ((d < row.diameter_mm / 2) & (mine["class"] == 1)).sum() == 2
        assert (d[mine["class"].to_numpy() == 0] > row.diameter_mm / 2 + 5).all()
    # the scans are the phantoms of seeds 1000..1002, and annotations land on their nodules
    img = sitk.ReadImage(str(tmp_path / "subset0" / f"{phantom_uid(1000)}.mhd"))
    arr = sitk.GetArrayFromImage(img)
    for _, row in a[a.seriesuid == phantom_uid(1000)].iterrows():
        ix, iy, iz = img.TransformPhysicalPointToIndex((row.coordX, row.coordY, row.coordZ))
        assert arr[iz, iy, ix] > -700


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="shape_zyx"):
        make_phantom((8, 64, 64))
    with pytest.raises(ValueError, match="spacing_mm"):
        make_phantom(spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="seed"):
        make_phantom(seed=-1)
    with pytest.raises(ValueError, match="kind"):
        make_phantom(nodules=[{"centre_zyx_mm": (0, 0, 0), "diameter_mm": 5, "kind": "calcified"}], **SMALL)
    with pytest.raises(ValueError, match="centre_zyx_mm"):
        make_phantom(nodules=[{"diameter_mm": 5}], **SMALL)
    with pytest.raises(ValueError, match="noise_hu"):
        make_phantom(noise_hu=-1.0, **SMALL)
    with pytest.raises(ValueError, match="fmt"):
        write_phantom_scan(tmp_path, fmt="png", **SMALL)
    with pytest.raises(ValueError, match="n_scans"):
        make_luna_tree(tmp_path, n_scans=0)
