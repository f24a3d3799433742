import numpy as np
import pytest

from stages.patches import extract_patch, extract_patches
from stages.volume import Volume


def _scan():
    arr = np.full((30, 40, 50), -800, np.int16)
    arr[12, 17, 33] = 500
    return Volume(arr, spacing_mm=(2.5, 0.7, 0.8), origin_mm=(-400.0, 12.0, -30.0),
                  direction=np.diag([1.0, 1.0, -1.0]))


def test_bright_voxel_lands_at_the_centre():
    vol = _scan()
    centre = vol.index_to_world([12, 17, 33])
    for size in (32.0, 31.0):
        p = extract_patch(vol, centre_zyx_mm=centre, size_mm=size)
        n = int(round(size))
        assert p.shape == (n, n, n) and p.dtype == np.float32
        assert p[n // 2, n // 2, n // 2] == pytest.approx(500.0)
        assert np.unravel_index(np.argmax(p), p.shape) == (n // 2,) * 3


def test_patch_axes_follow_the_world():
    vol = _scan()
    centre = vol.index_to_world([12, 17, 33])
    # the bright voxel seen from 4 mm towards -x (world) sits 4 samples to +x in the patch
    p = extract_patch(vol, centre_zyx_mm=centre - [0, 0, 4.0], size_mm=16.0, order=0)
    assert p[8, 8, 12] == 500.0
    p = extract_patch(vol, centre_zyx_mm=centre + [5.0, 0, 0], size_mm=16.0, order=0)
    assert p[3, 8, 8] == 500.0


def test_xyz_and_zyx_agree_and_batch_matches_single():
    vol = _scan()
    c = vol.index_to_world([[12, 17, 33], [3, 30, 5]])
    a = extract_patches(vol, centres_zyx_mm=c, size_mm=12.0)
    b = extract_patches(vol, centres_xyz_mm=c[:, ::-1], size_mm=12.0)
    assert a.shape == (2, 12, 12, 12)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1], extract_patch(vol, centre_xyz_mm=c[1, ::-1], size_mm=12.0))


def test_outside_is_air_and_spacing_sets_the_side():
    vol = _scan()
    lo, hi = vol.bounds_mm()
    p = extract_patch(vol, centre_zyx_mm=hi + 100.0, size_mm=20.0, spacing_mm=2.0)
    assert p.shape == (10, 10, 10)
    assert np.all(p == -1000.0)
    edge = extract_patch(vol, centre_zyx_mm=lo, size_mm=20.0)
    assert (edge == -1000.0).mean() > 0.5 and (edge == -800.0).any()


def test_errors():
    vol = _scan()
    with pytest.raises(ValueError, match="exactly one"):
        extract_patch(vol, centre_zyx_mm=[0, 0, 0], centre_xyz_mm=[0, 0, 0])
    with pytest.raises(ValueError, match="exactly one"):
        extract_patches(vol)
    with pytest.raises(ValueError, match="size_mm"):
        extract_patch(vol, centre_zyx_mm=[0, 0, 0], size_mm=0)
    with pytest.raises(ValueError, match="shape"):
        extract_patches(vol, centres_zyx_mm=np.zeros((2, 2)))
    with pytest.raises(TypeError, match="Volume"):
        extract_patch(vol.array, centre_zyx_mm=[0, 0, 0])


def test_axis_aligned_fast_path_matches_map_coordinates_inside_at_and_beyond_the_edges():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    arr = rng.integers(-1000, 400, size=(20, 23, 26)).astype(np.int16)
    vol = Volume(arr, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(-5.0, 3.0, 7.5))
    # centres inside, straddling each face, on exact voxel centres, and wholly outside the scan
    idx = np.concatenate([rng.uniform(-3, np.array(arr.shape) + 2, size=(40, 3)),
                          [[0, 0, 0], [19, 22, 25], [10.0, 11.5, 12.25], [-30, 5, 5]]])
    centres = vol.index_to_world(idx)
    got = extract_patches(vol, centres_zyx_mm=centres, size_mm=9.0)
    offs = np.arange(9) - 9 // 2
    grid = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), axis=-1).reshape(-1, 3)
    for c, cube in zip(idx, got):
        ref = ndi.map_coordinates(arr.astype(np.float32), (grid + c).T, order=1, mode="constant",
                                  cval=-1000.0).reshape(9, 9, 9)
        np.testing.assert_allclose(cube, ref, atol=2e-3)
    assert (got[-1] == -1000).all() and not (got[0] == -1000).all()
