import numpy as np
import pytest

from stages.lungmask import LEFT_LUNG, RIGHT_LUNG, lung_volume_ml, segment_lungs
from stages.volume import AIR_HU, Volume

SOFT_HU, LUNG_HU = 40, -850


def _chest(shape=(60, 100, 140), *, lungs=("right", "left"), body_to_edge=False,
           spacing=(2.0, 2.0, 2.0), nodule_mm=None, bridge=False, trachea=False):
    """A body ellipse (or a body filling the image width) with ellipsoid lungs, in HU."""
    z, y, x = np.indices(shape, dtype=np.float64)
    cz, cy, cx = (np.asarray(shape) - 1) / 2
    arr = np.full(shape, AIR_HU, np.int16)
    if body_to_edge:
        arr[:, 10:-10, :] = SOFT_HU
    else:
        arr[((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.46 * shape[2])) ** 2 <= 1] = SOFT_HU
    centres = {"right": cx - 0.22 * shape[2], "left": cx + 0.22 * shape[2]}
    for side in lungs:
        inside = (((z - cz) / (0.4 * shape[0])) ** 2 + ((y - cy) / (0.3 * shape[1])) ** 2
                  + ((x - centres[side]) / (0.17 * shape[2])) ** 2) <= 1
        arr[inside] = LUNG_HU
    if bridge:  # lungs joined by a thin band of lung (anterior junction line)
        zs, ys = slice(int(cz) - 8, int(cz) + 8), slice(int(cy) - 2, int(cy) + 2)
        arr[zs, ys, int(centres["right"]):int(centres["left"])] = LUNG_HU
    if trachea:  # a tube from the top down to the carina, bronchi into both lungs
        r2 = (y - cy) ** 2 + (x - cx) ** 2
        arr[(r2 <= 9) & (z >= cz + 5)] = AIR_HU
        for side in ("right", "left"):
            t = np.linspace(0, 1, 60)
            for zz, xx in zip(cz + 5 - 6 * t, cx + (centres[side] - cx) * 0.8 * t):
                arr[((z - zz) ** 2 + (y - cy) ** 2 + (x - xx) ** 2) <= 4] = AIR_HU
    if nodule_mm is not None:  # a solid nodule on the lateral wall of the right lung
        wall_x = centres["right"] - 0.17 * shape[2]
        r = nodule_mm / 2 / spacing[2]
        ball = ((z - cz) ** 2 + (y - cy) ** 2 + (x - (wall_x + 0.3 * r)) ** 2) <= r * r
        arr[ball] = SOFT_HU
        return Volume(arr, spacing_mm=spacing), ball
    return Volume(arr, spacing_mm=spacing)


def test_two_lungs_labelled_by_world_x():
    vol = _chest()
    mask = segment_lungs(vol)
    assert mask.array.dtype == np.uint8 and mask.shape == vol.shape
    assert mask.same_geometry(vol)
    lab = mask.array
    cx = vol.shape[2] // 2
    assert np.all(lab[:, :, :cx][lab[:, :, :cx] > 0] == RIGHT_LUNG)  # low x: patient's right
    assert np.all(lab[:, :, cx:][lab[:, :, cx:] > 0] == LEFT_LUNG)
    truth = vol.array == LUNG_HU
    dice = 2 * np.sum((lab > 0) & truth) / (np.sum(lab > 0) + truth.sum())
    assert dice > 0.97


def test_labels_follow_world_x_when_the_x_axis_is_flipped():
    vol = _chest()
    flipped = Volume(vol.array, spacing_mm=vol.spacing_mm, direction=np.diag([1.0, 1.0, -1.0]))
    lab = segment_lungs(flipped).array
    cx = vol.shape[2] // 2
    # array column 0 is now at the highest world x: the patient's left
    assert np.all(lab[:, :, :cx][lab[:, :, :cx] > 0] == LEFT_LUNG)
    assert np.all(lab[:, :, cx:][lab[:, :, cx:] > 0] == RIGHT_LUNG)


@pytest.mark.parametrize("side,label", [("left", LEFT_LUNG), ("right", RIGHT_LUNG)])
def test_single_lung(side, label):
    vol = _chest(lungs=(side,))
    lab = segment_lungs(vol).array
    assert set(np.unique(lab).tolist()) == {0, label}
    truth = vol.array == LUNG_HU
    assert np.sum((lab > 0) & truth) / truth.sum() > 0.97


def test_body_touching_the_image_edge_keeps_the_lungs():
    vol = _chest(body_to_edge=True)
    lab = segment_lungs(vol).array
    truth = vol.array == LUNG_HU
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    assert np.sum((lab > 0) & truth) / truth.sum() > 0.97
    outside_air = (vol.array == AIR_HU) & ~truth
    assert not np.any(lab[outside_air])


def test_lung_cut_by_the_field_of_view_edge_is_kept():
    full = _chest()
    cut = Volume(full.array[:, :, 30:], spacing_mm=full.spacing_mm)  # the right lung runs off the image
    truth = cut.array == LUNG_HU
    assert truth[:, :, 0].any()
    lab = segment_lungs(cut).array
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    right = truth.copy()
    right[:, :, 40:] = False  # the cut lung: everything left of the mid-line
    assert 2 * np.sum((lab == RIGHT_LUNG) & right) / (np.sum(lab == RIGHT_LUNG) + right.sum()) > 0.97
    outside_air = (cut.array == AIR_HU) & ~truth
    assert outside_air[:, :, 0].any() and not np.any(lab[outside_air])
    # treating every border-touching air as outside (the old rule) loses the cut lung
    old = segment_lungs(cut, outside_air_fraction=0).array
    assert np.sum(old == RIGHT_LUNG) < 0.1 * right.sum()


def test_real_lungs_cut_by_the_field_of_view_are_found(pycerr):
    """pycerr's chest CTs are cropped to one lung, which touches the image edge in every scan."""
    from stages.ingest import read_scan
    from stages.resample import resample

    for name, folder in pycerr.items():
        ct = resample(read_scan(folder))
        ml = lung_volume_ml(segment_lungs(ct))["total_ml"]
        assert ml > 600, f"{name}: {ml} mL"  # was 60-109 mL: only air pockets away from the edge


def test_scan_cut_through_apex_and_base():
    full = _chest(shape=(60, 100, 140))
    cut = Volume(full.array[15:45], spacing_mm=full.spacing_mm)  # lungs reach both z faces
    lab = segment_lungs(cut).array
    truth = cut.array == LUNG_HU
    assert truth[0].any() and truth[-1].any()
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    assert 2 * np.sum((lab > 0) & truth) / (np.sum(lab > 0) + truth.sum()) > 0.97


def test_joined_lungs_are_split():
    vol = _chest(bridge=True)
    lab = segment_lungs(vol).array
    cx = vol.shape[2] // 2
    assert np.sum(lab == RIGHT_LUNG) > 0 and np.sum(lab == LEFT_LUNG) > 0
    right, left = lab == RIGHT_LUNG, lab == LEFT_LUNG
    xs = np.arange(vol.shape[2])
    assert xs[right.any(axis=(0, 1))].mean() < cx < xs[left.any(axis=(0, 1))].mean()
    # the two halves are about the same size (the bridge is split, not given to one side)
    assert 0.8 < right.sum() / left.sum() < 1.25


def test_trachea_and_main_bronchi_are_not_lung():
    vol = _chest(trachea=True, shape=(60, 100, 140))
    lab = segment_lungs(vol).array
    z, y, x = np.indices(vol.shape)
    cz, cy, cx = (np.asarray(vol.shape) - 1) / 2
    trachea = ((y - cy) ** 2 + (x - cx) ** 2 <= 9) & (z >= cz + 8)
    assert not np.any(lab[trachea])
    assert {1, 2} <= set(np.unique(lab).tolist())


def test_juxta_pleural_nodule_stays_inside_the_mask():
    vol, ball = _chest(nodule_mm=14.0, spacing=(1.5, 1.5, 1.5), shape=(70, 110, 150))
    inside_lung_side = ball & (np.indices(vol.shape)[2] >= ball.nonzero()[2].mean())
    with_closing = segment_lungs(vol).array
    without = segment_lungs(vol, closing_radius_mm=0).array
    assert (without[inside_lung_side] > 0).mean() < 0.5  # the closing is what keeps it
    assert (with_closing[inside_lung_side] == RIGHT_LUNG).mean() > 0.9


def test_no_lung_gives_an_empty_mask():
    vol = Volume(np.full((20, 30, 30), SOFT_HU, np.int16), spacing_mm=(2, 2, 2))
    assert not segment_lungs(vol).array.any()


def test_phantom_matches_truth():
    from synth.phantom import make_phantom

    vol, _, truth = make_phantom((56, 96, 96), (4.0, 2.5, 2.5), seed=3, n_nodules=2,
                                 return_truth=True)
    lab = segment_lungs(vol).array
    for side in (RIGHT_LUNG, LEFT_LUNG):
        a, b = lab == side, truth["lung_mask"] == side
        assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.95, side


def test_lung1_mask_volume_and_nodule(lung1):
    import SimpleITK as sitk
    from stages.resample import resample, resample_like

    def read(path):
        img = sitk.ReadImage(str(path))
        return Volume.from_sitk_geometry(sitk.GetArrayFromImage(img), img.GetSpacing(),
                                         img.GetOrigin(), img.GetDirection())

    image, label = read(lung1[0]), read(lung1[1])
    vol = resample(image, (1.0, 1.0, 1.0), device="cpu")
    nodule = resample_like(label, vol, order=0, device="cpu").array > 0
    mask = segment_lungs(vol)
    ml = lung_volume_ml(mask)
    assert 2000 < ml["total_ml"] < 8000
    assert ml["right_ml"] > 500 and ml["left_ml"] > 500
    assert nodule.sum() > 100
    assert (mask.array[nodule] > 0).mean() >= 0.95
    # the nodule lies at world x < 0 of the mid-line: the patient's right lung
    assert np.bincount(mask.array[nodule], minlength=3).argmax() == RIGHT_LUNG


def test_lung_volume_ml():
    m = np.zeros((10, 10, 10), np.uint8)
    m[:2] = RIGHT_LUNG
    m[2:3] = LEFT_LUNG
    out = lung_volume_ml(Volume(m, spacing_mm=(1.0, 2.0, 5.0)))
    assert out == {"right_ml": 2.0, "left_ml": 1.0, "total_ml": 3.0}
    with pytest.raises(TypeError, match="integer labels"):
        lung_volume_ml(Volume(m.astype(np.float32), spacing_mm=(1, 1, 1)))


def test_bad_input():
    with pytest.raises(TypeError, match="Volume"):
        segment_lungs(np.zeros((4, 4, 4)))
    vol = Volume(np.zeros((4, 4, 4), np.int16), spacing_mm=(1, 1, 1))
    with pytest.raises(ValueError, match="closing_radius_mm"):
        segment_lungs(vol, closing_radius_mm=-1)
    with pytest.raises(ValueError, match="second_lung_ratio"):
        segment_lungs(vol, second_lung_ratio=2)
    with pytest.raises(TypeError, match="numbers"):
        segment_lungs(Volume(np.zeros((4, 4, 4), bool), spacing_mm=(1, 1, 1)))


@pytest.fixture(scope="module")
def phantom_1mm():
    """A synthetic chest at 1 mm that the lesion net never trained on (it saw seeds 11-13)."""
    from stages.resample import resample
    from synth.phantom import make_phantom

    vol, _, truth = make_phantom((130, 200, 200), (1.5, 1.5, 1.5), seed=3, n_nodules=0, return_truth=True)
    ct = resample(vol)
    from stages.resample import resample_like

    lungs = resample_like(vol.with_array(truth["lung_mask"]), ct, order=0).array
    return ct, lungs


def _mass_case(phantom_1mm, site, diameter_mm, seed):
    from stages.lungmask import _slab_hulls
    from synth.masses import insert_mass

    ct, _ = phantom_1mm
    with_mass, mass = insert_mass(ct, segment_lungs(ct, lesions=None), diameter_mm=diameter_mm,
                                  site=site, seed=seed)
    classical = segment_lungs(with_mass, lesions=None).array
    kept = segment_lungs(with_mass).array
    envelope = _slab_hulls(classical, np.ones(ct.shape, bool), 3)  # where the mass fills the lung
    return mass, classical, kept, envelope


def test_a_50mm_mass_against_the_chest_wall_is_kept(phantom_1mm):
    """The classical mask keeps 6% of it; the lesion step keeps what fills the lung (the part
    inside the lung's envelope) and leaves the heart and mediastinum out."""
    mass, classical, kept, envelope = _mass_case(phantom_1mm, "wall", 50.0, 1)
    assert (classical[mass] > 0).mean() < 0.2
    assert (kept[mass & envelope] > 0).mean() >= 0.85
    extra = (kept > 0) & (classical == 0) & ~mass
    assert extra.sum() < 0.1 * mass.sum()


@pytest.mark.xfail(strict=True, reason="known gap (#17): the shipped lesion net does not yet keep a "
                   "synthetic hilar mass (it keeps 1% of the part the classical mask misses)")
def test_a_40mm_hilar_mass_is_kept(phantom_1mm):
    mass, classical, kept, envelope = _mass_case(phantom_1mm, "hilar", 40.0, 4)
    assert (kept[mass & envelope] > 0).mean() >= 0.85


def test_the_lesion_step_leaves_a_lung_without_lesions_alone(phantom_1mm):
    ct, truth = phantom_1mm
    classical = segment_lungs(ct, lesions=None).array
    net = segment_lungs(ct).array

    def dice(lab):
        return 2 * np.sum((lab > 0) & (truth > 0)) / (np.sum(lab > 0) + np.sum(truth > 0))

    assert dice(net) >= dice(classical) - 0.002
    assert np.sum((net > 0) & (classical == 0)) < 5000  # mL: 5


def test_lesion_weights_missing_or_off(tmp_path, monkeypatch):
    import nets.lesionnet

    vol = _chest()
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt: lesion net weights not found"):
        segment_lungs(vol, lesions=str(tmp_path / "nothing.pt"))
    # with the step off the weights are never looked for: the classical mask, as before it
    monkeypatch.setattr(nets.lesionnet, "DEFAULT_WEIGHTS", tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match=r"gone\.pt"):
        segment_lungs(vol)
    truth = vol.array == LUNG_HU
    lab = segment_lungs(vol, lesions=None).array
    assert 2 * np.sum((lab > 0) & truth) / (np.sum(lab > 0) + truth.sum()) > 0.97


def test_real_tumours_stay_inside_the_mask(pycerr):
    """pycerr's four tumours (88, 23, 28 and 62 mm; wall, central, hilar, paravertebral).  The
    shipped net trained on these scans (its model card gives the leave-one-patient-out
    numbers); this holds the shipped mask to what it reaches there (classical mask: 0.13,
    0.65, 0.03, 0.09; issue #17 asks 0.95 for each)."""
    floor = {"pat_1": 0.94, "pat_2": 0.79, "pat_3": 0.80, "pat_4": 0.95}
    from stages.contours import read_rtstruct
    from stages.ingest import read_scan
    from stages.resample import resample, resample_like

    for name, folder in pycerr.items():
        ct = read_scan(folder)
        (rs,) = sorted(folder.glob("DCM_RS_*.dcm"))
        ct1 = resample(ct)
        gtv = resample_like(read_rtstruct(rs, ct, names=["GTV-1"])["GTV-1"], ct1, order=0).array > 0
        assert (segment_lungs(ct1).array[gtv] > 0).mean() >= floor[name], name
