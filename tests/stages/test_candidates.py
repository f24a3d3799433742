import numpy as np
import pandas as pd
import pytest

from stages.candidates import CANDIDATE_COLUMNS, FEATURE_COLUMNS, find_candidates
from stages.volume import Volume


def _lung_with_nodule_and_vessel(direction=np.eye(3)):
    """Lung parenchyma with a 10 mm nodule and a long 4 mm vessel; all inside the mask."""
    shape = (50, 60, 70)
    z, y, x = np.indices(shape, dtype=np.float64)
    arr = np.full(shape, -850, np.int16)
    arr[(y - 40) ** 2 + (z - 25) ** 2 <= 4] = 40  # vessel along x through the whole lung
    arr[(z - 20) ** 2 + (y - 18) ** 2 + (x - 45) ** 2 <= 25] = 30  # nodule
    vol = Volume(arr, spacing_mm=(1, 1, 1), origin_mm=(-200.0, 30.0, -80.0), direction=direction,
                 scan_id="synthetic")
    return vol, vol.with_array(np.ones(shape, np.uint8)), vol.index_to_world([20, 18, 45])


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([1.0, -1.0, -1.0])])
def test_nodule_found_vessel_not(direction):
    vol, mask, nod_zyx = _lung_with_nodule_and_vessel(direction)
    cands = find_candidates(vol, mask, device="cpu")
    assert list(cands.columns) == CANDIDATE_COLUMNS + FEATURE_COLUMNS
    assert (cands["seriesuid"] == "synthetic").all()
    assert cands["score"].is_monotonic_decreasing
    best = cands.iloc[0]
    xyz = best[["coordX", "coordY", "coordZ"]].to_numpy(float)
    assert np.linalg.norm(xyz - nod_zyx[::-1]) < 1.5  # world LPS, LUNA16 order
    assert 8.0 < best["diameter_mm"] < 13.0
    assert best["sphericity"] > 0.8 and best["shape_index"] > 0.85
    assert best["volume_mm3"] == best["n_voxels"] * 1.0
    # nothing scored on the vessel's middle (its straight part is a ridge, not a cap)
    world = cands[["coordZ", "coordY", "coordX"]].to_numpy(float)
    idx = vol.world_to_index(world)
    on_vessel = (np.abs(idx[:, 0] - 25) < 4) & (np.abs(idx[:, 1] - 40) < 4) & \
                (idx[:, 2] > 10) & (idx[:, 2] < 60)
    assert not on_vessel.any()


def test_kmeans_finds_the_nodule_too():
    vol, mask, nod_zyx = _lung_with_nodule_and_vessel()
    cands = find_candidates(vol, mask, method="kmeans", device="cpu", seed=1)
    d = np.linalg.norm(cands[["coordX", "coordY", "coordZ"]].to_numpy(float) - nod_zyx[::-1], axis=1)
    assert d[0] < 2.0


def test_rules_and_limits():
    vol, mask, _ = _lung_with_nodule_and_vessel()
    assert find_candidates(vol, mask, device="cpu", min_diameter_mm=14.0).empty
    assert len(find_candidates(vol, mask, device="cpu", max_candidates=1)) == 1
    empty = find_candidates(vol, mask.with_array(np.zeros(vol.shape, np.uint8)), device="cpu")
    assert list(empty.columns) == CANDIDATE_COLUMNS + FEATURE_COLUMNS and empty.empty


def test_dist_to_pleura():
    vol, mask, _ = _lung_with_nodule_and_vessel()
    m = mask.array.copy()
    m[:, :, 52:] = 0  # lung border 7 mm from the nodule centre (x = 45)
    best = find_candidates(vol, mask.with_array(m), device="cpu").iloc[0]
    assert best["dist_to_pleura_mm"] == pytest.approx(7.0, abs=1.0)


def test_errors():
    vol, mask, _ = _lung_with_nodule_and_vessel()
    with pytest.raises(ValueError, match="method"):
        find_candidates(vol, mask, method="dbscan")
    with pytest.raises(ValueError, match="bandwidth"):
        find_candidates(vol, mask, bandwidth=0)
    with pytest.raises(ValueError, match="max_candidates"):
        find_candidates(vol, mask, max_candidates=0)
    with pytest.raises(ValueError, match="geometry"):
        find_candidates(vol, Volume(mask.array, spacing_mm=(2, 2, 2)))
    with pytest.raises(TypeError, match="Volume"):
        find_candidates(vol.array, mask)


@pytest.mark.parametrize("seed", [1, 2])
def test_phantom_chain_finds_every_nodule(seed):
    from synth.phantom import make_phantom
    from stages.lungmask import segment_lungs
    from stages.resample import resample

    vol, ann = make_phantom((64, 128, 128), (3.0, 1.8, 1.8), seed=seed, n_nodules=4)
    assert set(ann["kind"]) >= {"juxta-pleural"} and (ann["diameter_mm"] >= 3).all()
    vol = resample(vol, (1.0, 1.0, 1.0), device="cpu")
    cands = find_candidates(vol, segment_lungs(vol), device="cpu", max_candidates=30)
    assert 0 < len(cands) <= 30
    xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy(float)
    for _, nod in ann.iterrows():
        d = np.linalg.norm(xyz - nod[["coordX", "coordY", "coordZ"]].to_numpy(float), axis=1)
        assert d.min() <= nod["diameter_mm"] / 2, (nod["kind"], nod["diameter_mm"], d.min())


def test_phantom_smallest_nodules_are_found():
    """A 3 mm solid nodule inside the lung and a 5 mm juxta-pleural one on its lateral wall."""
    from scipy import ndimage as ndi

    from synth.phantom import make_phantom
    from stages.lungmask import segment_lungs
    from stages.resample import resample

    shape, spacing = (64, 128, 128), (3.0, 1.8, 1.8)
    vol0, _, truth = make_phantom(shape, spacing, seed=11, n_nodules=0, return_truth=True)
    lungs = truth["lung_mask"]
    depth = ndi.distance_transform_edt(lungs == 1, sampling=spacing)
    clear = ndi.distance_transform_edt(~((vol0.array > -500) & (lungs > 0)), sampling=spacing)
    deep = np.unravel_index(np.argmax(np.minimum(depth, clear)), shape)  # away from vessels
    z, y = deep[0], deep[1]
    wall_x = np.flatnonzero(lungs[z, y] == 1).min()  # lateral wall of the right lung
    small = vol0.index_to_world(deep)
    juxta = vol0.index_to_world([z, y, wall_x]) + [0.0, 0.0, 1.0]
    nodules = [{"centre_zyx_mm": small, "diameter_mm": 3.0, "kind": "solid"},
               {"centre_zyx_mm": juxta, "diameter_mm": 5.0, "kind": "juxta-pleural"}]
    vol, ann = make_phantom(shape, spacing, seed=11, nodules=nodules)
    vol = resample(vol, (1.0, 1.0, 1.0), device="cpu")
    cands = find_candidates(vol, segment_lungs(vol), device="cpu", max_candidates=30)
    assert len(cands) <= 30
    xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy(float)
    for _, nod in ann.iterrows():
        d = np.linalg.norm(xyz - nod[["coordX", "coordY", "coordZ"]].to_numpy(float), axis=1)
        assert d.min() <= nod["diameter_mm"] / 2, (nod["kind"], d.min())


def test_lung1_nodule_in_top_three(lung1):
    import SimpleITK as sitk
    from stages.lungmask import segment_lungs
    from stages.resample import resample

    img = sitk.ReadImage(str(lung1[0]))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(lung1[1])))
    vol = Volume.from_sitk_geometry(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                                    img.GetDirection(), scan_id="lung1")
    nodule_zyx = vol.index_to_world(np.argwhere(lab > 0).mean(axis=0))
    vol = resample(vol, (1.0, 1.0, 1.0), device="cpu")
    cands = find_candidates(vol, segment_lungs(vol), device="cpu")
    d = np.linalg.norm(cands[["coordX", "coordY", "coordZ"]].to_numpy(float) - nodule_zyx[::-1], axis=1)
    assert d[:3].min() < 7.0  # radius of the ~14 mm nodule
    best = cands.iloc[int(np.argmin(d[:3]))]
    assert 8.0 < best["diameter_mm"] < 25.0


def test_mark_sits_on_the_dense_core_of_a_blob_with_a_faint_part():
    """A 3 mm-radius solid ball fused with a ground-glass lobe 4 mm to its side: one cluster.
    The plain mean of its voxels lies 2.4 mm towards the faint lobe; the HU-weighted mark
    (``centre_hu_power=2``, the default) stays on the solid core."""
    z, y, x = np.mgrid[:40, :40, :40]
    arr = np.full((40, 40, 40), -850, np.int16)
    arr[(z - 20) ** 2 + (y - 20) ** 2 + (x - 21) ** 2 <= 9] = 20
    arr[((z - 20) ** 2 + (y - 20) ** 2 + (x - 25) ** 2 <= 12) & (arr < 0)] = -550
    vol = Volume(arr, spacing_mm=(1, 1, 1), scan_id="lobed")
    mask = vol.with_array(np.ones(arr.shape, np.uint8))
    core = np.array([21.0, 20.0, 20.0])  # (x, y, z) of the solid ball
    plain = find_candidates(vol, mask, device="cpu", centre_hu_power=0.0)
    weighted = find_candidates(vol, mask, device="cpu")
    assert len(plain) == len(weighted) == 1
    d_plain = np.linalg.norm(plain.loc[0, ["coordX", "coordY", "coordZ"]].to_numpy(float) - core)
    d_weighted = np.linalg.norm(weighted.loc[0, ["coordX", "coordY", "coordZ"]].to_numpy(float) - core)
    assert d_plain > 2.0 and d_weighted < 0.5
    # the measures do not depend on where the mark is
    cols = ["diameter_mm", "volume_mm3", "mean_hu", "sphericity", "n_voxels"]
    assert np.allclose(plain[cols].to_numpy(float), weighted[cols].to_numpy(float))
    with pytest.raises(ValueError, match="centre_hu_power"):
        find_candidates(vol, mask, device="cpu", centre_hu_power=-1.0)


def test_one_candidate_per_compact_dense_blob():
    """Two solid balls joined by a thin solid bridge: two clusters (the bridge is a tube, not
    a candidate point), one compact dense blob.  The merge keeps the bigger ball's mark with
    the best score of the two; a blob wider than max_diameter_mm (a vessel tree) is not merged."""
    z, y, x = np.mgrid[:48, :48, :64]
    arr = np.full(z.shape, -850, np.int16)
    arr[22:25, 23:25, 26:36] = 30
    for cx, r in ((20, 6), (38, 4)):
        arr[(z - 24) ** 2 + (y - 24) ** 2 + (x - cx) ** 2 <= r * r] = 30
    vol = Volume(arr, spacing_mm=(1, 1, 1), scan_id="dumbbell")
    mask = vol.with_array(np.ones(arr.shape, np.uint8))
    apart = find_candidates(vol, mask, device="cpu", blob_hu=None)
    merged = find_candidates(vol, mask, device="cpu")
    assert sorted(apart["coordX"].round().tolist()) == [20.0, 38.0]
    assert len(merged) == 1 and round(merged.loc[0, "coordX"]) == 20.0
    assert merged.loc[0, "score"] == pytest.approx(apart["score"].max())
    assert merged.loc[0, "volume_mm3"] == apart["volume_mm3"].max()
    # the blob spans 29 mm along x: with a 25 mm limit it is no nodule and nothing is merged
    assert len(find_candidates(vol, mask, device="cpu", max_diameter_mm=25.0)) == 2


@pytest.mark.parametrize("radius_mm, centre_x", [(2.5, 12.0), (3.0, 12.5)])
def test_juxta_pleural_nodule_is_a_blob_once_the_wall_is_air(radius_mm, centre_x):
    # a small nodule on the chest wall (x < 12 mm), kept inside the lung mask
    z, y, x = np.mgrid[:48, :48, :48]
    arr = np.where(x < 12, 40, -850).astype(np.int16)
    ball = (z - 24) ** 2 + (y - 24) ** 2 + (x - centre_x) ** 2 <= radius_mm ** 2
    arr[ball] = 40
    vol = Volume(arr, spacing_mm=(1, 1, 1), scan_id="jp")
    mask = vol.with_array(((x >= 12) | ball).astype(np.uint8))
    found = {}
    for outside in (None, -1000.0):
        c = find_candidates(vol, mask, device="cpu", outside_hu=outside)
        off = np.linalg.norm(c[["coordZ", "coordY", "coordX"]].to_numpy() - [24, 24, centre_x], axis=1)
        found[outside] = {"shape_index": c["shape_index"].iloc[int(off.argmin())], "off_mm": off.min()}
    # with the wall, the nodule is a bump (shape index about 0.91); with the wall as air, a
    # blob (about 0.99), and the mark sits on its centre
    assert found[None]["shape_index"] < 0.95 < found[-1000.0]["shape_index"]
    assert found[-1000.0]["off_mm"] < 0.25 and found[-1000.0]["off_mm"] < found[None]["off_mm"]
    with pytest.raises(ValueError, match="outside_hu"):
        find_candidates(vol, mask, device="cpu", outside_hu=float("nan"))


def test_wall_pass_adds_a_centred_mark_for_a_juxta_pleural_nodule():
    """A 3.5 mm-radius nodule half in the chest wall (x < 12 mm) and a free one: the first
    pass sees only the nodule's lung-facing rim as blob-like, so its mark sits off-centre;
    the wall pass clusters the nodule's dense in-mask voxels with the wall as air and adds a
    mark on its centre.  Every first-pass mark stays; the free nodule gets no second mark."""
    z, y, x = np.mgrid[:48, :48, :48]
    arr = np.where(x < 12, 40, -850).astype(np.int16)
    jp = (z - 24) ** 2 + (y - 16) ** 2 + (x - 13) ** 2 <= 3.5 ** 2
    free = (z - 24) ** 2 + (y - 34) ** 2 + (x - 30) ** 2 <= 3.5 ** 2
    arr[jp | free] = 40
    vol = Volume(arr, spacing_mm=(1, 1, 1), scan_id="wall")
    mask = vol.with_array(((x >= 12) | jp).astype(np.uint8))
    xyz = ["coordZ", "coordY", "coordX"]

    def off(c, centre):
        return np.linalg.norm(c[xyz].to_numpy() - centre, axis=1)

    first = find_candidates(vol, mask, device="cpu", wall_pass_hu=None)
    both = find_candidates(vol, mask, device="cpu")  # the wall pass is on by default
    assert off(first, [24, 16, 13]).min() > 1.0            # off the juxta-pleural centre
    assert off(both, [24, 16, 13]).min() < 0.5             # the wall pass's mark
    assert (off(both, [24, 34, 30]) < 3.5).sum() == 1      # the free nodule: one mark
    for _, row in first.iterrows():                        # every first-pass mark is kept
        assert np.linalg.norm(both[xyz].to_numpy() - row[xyz].to_numpy(float), axis=1).min() == 0
    assert len(both) == len(first) + 1
    # a wall-pass mark within wall_dedupe_mm of a first-pass mark is not added
    far = find_candidates(vol, mask, device="cpu", wall_pass_hu=-320.0, wall_dedupe_mm=50.0)
    pd.testing.assert_frame_equal(far, first)
    # only voxels denser than wall_pass_hu take part: the nodule is 40 HU
    pd.testing.assert_frame_equal(find_candidates(vol, mask, device="cpu", wall_pass_hu=100.0), first)
    with pytest.raises(ValueError, match="wall_pass_hu"):
        find_candidates(vol, mask, device="cpu", wall_pass_hu=float("nan"))
    with pytest.raises(ValueError, match="wall_dedupe_mm"):
        find_candidates(vol, mask, device="cpu", wall_pass_hu=-320.0, wall_dedupe_mm=-1.0)


def test_a_mass_is_one_finding_and_nothing_inside_it_is_marked():
    shape = (90, 100, 100)
    z, y, x = np.indices(shape, dtype=np.float64)
    arr = np.full(shape, -850, np.int16)
    mass = (z - 45) ** 2 + ((y - 50) / 0.9) ** 2 + (x - 45) ** 2 <= 25 ** 2  # about 48 mm
    arr[mass] = 35
    arr[(y - 20) ** 2 + (z - 45) ** 2 <= 4] = 40  # a vessel, thin: never part of a mass
    arr[(z - 20) ** 2 + (y - 80) ** 2 + (x - 80) ** 2 <= 16] = 30  # an 8 mm nodule
    vol = Volume(arr, spacing_mm=(1, 1, 1), scan_id="mass")
    cands = find_candidates(vol, vol.with_array(np.ones(shape, np.uint8)), device="cpu")
    masses = cands[cands["finding"] == "mass"]
    assert len(masses) == 1
    m = masses.iloc[0]
    assert m["diameter_mm"] == pytest.approx((6 * mass.sum() / np.pi) ** (1 / 3), rel=0.05)
    assert np.allclose(m[["coordX", "coordY", "coordZ"]].to_numpy(float), (45, 50, 45), atol=1.0)
    # every mark inside the mass carries its mass_id (classify folds them into it); none outside
    idx = np.rint(cands[["coordZ", "coordY", "coordX"]].to_numpy(float)).astype(int)
    inside = mass[tuple(idx.T)]
    assert (cands.loc[inside, "mass_id"] == 1).all() and (cands.loc[~inside, "mass_id"] == 0).all()
    assert cands.loc[inside, "finding"].tolist().count("mass") == 1
    nod = np.linalg.norm(cands[["coordX", "coordY", "coordZ"]].to_numpy(float) - (80, 80, 20), axis=1)
    assert nod.min() < 2 and cands.loc[nod.argmin(), "finding"] == "nodule"
    # without the mass pass, a lesion over 30 mm is not found at all
    off = find_candidates(vol, vol.with_array(np.ones(shape, np.uint8)), device="cpu", mass_hu=None)
    centred = np.linalg.norm(off[["coordX", "coordY", "coordZ"]].to_numpy(float) - (45, 50, 45), axis=1)
    assert (off["finding"] == "nodule").all() and not (centred < 5).any()
