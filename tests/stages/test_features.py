import numpy as np
import pytest

from stages.features import (FEATURE_NAMES, _eig_sym3, extract_features, hessian_eigenvalues,
                             shape_index)
from stages.volume import Volume


def _sphere(n=41, r_mm=5.0, spacing=(1.0, 1.0, 1.0), inside=0, outside=-1000):
    z, y, x = np.indices((n, n, n), dtype=np.float64)
    c = (n - 1) / 2
    d2 = sum(((a - c) * s) ** 2 for a, s in zip((z, y, x), spacing))
    return Volume(np.where(d2 <= r_mm ** 2, inside, outside).astype(np.int16), spacing_mm=spacing)


def _tube_along_x(shape=(41, 41, 41), r_mm=3.0, spacing=(1.0, 1.0, 1.0)):
    z, y, x = np.indices(shape, dtype=np.float64)
    cz, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    d2 = ((z - cz) * spacing[0]) ** 2 + ((y - cy) * spacing[1]) ** 2
    return Volume(np.where(d2 <= r_mm ** 2, 0, -1000).astype(np.int16), spacing_mm=spacing)


def test_closed_form_eigenvalues_match_numpy(rng):
    a = rng.normal(size=(500, 3, 3)) * rng.uniform(0.1, 100, size=(500, 1, 1))
    a = a + a.transpose(0, 2, 1)
    a[:50] = np.diag([2.0, 2.0, -1.0])  # repeated eigenvalues
    got = _eig_sym3(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    np.testing.assert_allclose(got, np.linalg.eigvalsh(a), rtol=1e-9, atol=1e-9)


def test_sphere_is_a_cap():
    vol = _sphere()
    si, cv = shape_index(vol)
    assert si.array.dtype == np.float32 and cv.array.dtype == np.float32
    assert si.shape == vol.shape and si.same_geometry(vol)
    assert si.array[20, 20, 20] == pytest.approx(1.0, abs=0.02)
    # the whole ball and its rim, not just the centre
    z, y, x = np.indices(vol.shape)
    d = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    assert np.median(si.array[d <= 6]) > 0.95
    assert cv.array[20, 20, 20] > 1.0


def test_dark_sphere_is_a_cup():
    si, _ = shape_index(_sphere(inside=-1000, outside=0))
    assert si.array[20, 20, 20] == pytest.approx(0.0, abs=0.02)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_tube_is_a_ridge(spacing):
    shape = (21 if spacing[0] == 2.0 else 41, 41, 41)
    vol = _tube_along_x(shape, spacing=spacing)
    si, cv = shape_index(vol)
    cz, cy = shape[0] // 2, 20
    axis = si.array[cz, cy, 10:31]
    np.testing.assert_allclose(axis, 0.75, atol=0.03)
    # across the tube (every voxel within its radius), still a ridge
    z, y = np.indices(shape[:2])
    inside = ((z - cz) * spacing[0]) ** 2 + ((y - cy) * spacing[1]) ** 2 <= 9
    assert np.median(si.array[:, :, 20][inside]) == pytest.approx(0.75, abs=0.05)


def test_flat_slab_has_no_curvedness():
    arr = np.full((31, 31, 31), -1000, np.int16)
    arr[13:18] = 0
    si, cv = shape_index(Volume(arr, spacing_mm=(1, 1, 1)))
    assert np.nanmax(cv.array[:, 5:26, 5:26]) < 1e-3
    ball_cv = shape_index(_sphere())[1].array[20, 20, 20]
    assert ball_cv > 1000 * np.nanmax(cv.array[:, 5:26, 5:26])


def _gauss_blob(n, spacing, s_mm=3.0, amp=1000.0):
    c = (n - 1) / 2
    z, y, x = np.indices((n, n, n), dtype=np.float64)
    d2 = sum(((a - c) * spacing) ** 2 for a in (z, y, x))
    return Volume((amp * np.exp(-d2 / (2 * s_mm ** 2))).astype(np.float32),
                  spacing_mm=(spacing,) * 3)


def test_curvedness_is_scale_normalised_in_mm():
    """The same physical blob sampled at 1 mm and 0.5 mm gives the same SI and curvedness."""
    si_c, cv_c = shape_index(_gauss_blob(31, 1.0), sigma_mm=1.5)
    si_f, cv_f = shape_index(_gauss_blob(61, 0.5), sigma_mm=1.5)
    assert si_c.array[15, 15, 15] == pytest.approx(1.0, abs=0.01)
    assert si_f.array[30, 30, 30] == pytest.approx(1.0, abs=0.01)
    assert cv_c.array[15, 15, 15] == pytest.approx(cv_f.array[30, 30, 30], rel=0.05)


def test_mask_limits_the_work():
    vol = _sphere()
    m = np.zeros(vol.shape, np.uint8)
    m[20, 20, 20] = 1
    si, cv = shape_index(vol, mask=vol.with_array(m))
    assert np.isnan(si.array[0, 0, 0]) and np.isnan(cv.array[0, 0, 0])
    assert si.array[20, 20, 20] == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="geometry"):
        shape_index(vol, mask=Volume(m, spacing_mm=(2, 2, 2)))


def test_hessian_eigenvalues_of_a_gaussian_blob_in_hu_per_mm2():
    # a Gaussian of width s smoothed by sigma is a Gaussian of width sqrt(s^2 + sigma^2);
    # its second derivative at the centre is -amplitude / width^2 along every axis
    s_mm, sigma_mm, amp = 3.0, 1.5, 1000.0
    w2 = s_mm ** 2 + sigma_mm ** 2
    expected = -amp * (s_mm ** 2 / w2) ** 1.5 / w2
    for n, spacing in ((31, 1.0), (61, 0.5), (21, 1.5)):
        c = n // 2
        lam = hessian_eigenvalues(_gauss_blob(n, spacing, s_mm, amp), [[c, c, c]], sigma_mm=sigma_mm)
        np.testing.assert_allclose(lam, expected, rtol=0.06)
    with pytest.raises(ValueError, match="inside the array"):
        hessian_eigenvalues(_sphere(n=31), [[40, 0, 0]])


def test_extract_features_selects_and_scales(rng):
    arr = rng.integers(-1000, 200, size=(20, 24, 28)).astype(np.int16)
    vol = Volume(arr, spacing_mm=(2.0, 0.7, 0.7), origin_mm=(-300.0, 10.0, -5.0),
                 direction=np.diag([1.0, -1.0, 1.0]))
    mask = np.zeros(arr.shape, np.uint8)
    mask[3:15, 4:20, 2:25] = 2
    mvol = vol.with_array(mask)
    pts, idx = extract_features(vol, mvol, hu_floor=-500, sigma_mm=1.0, scale_mm=5.0,
                                scale_hu=300.0, scale_si=0.5)
    assert pts.dtype == np.float32 and pts.shape == (len(idx), len(FEATURE_NAMES)) == (len(idx), 5)
    expected = (mask > 0) & (arr > -500)
    assert len(idx) == expected.sum()
    assert np.all(expected[tuple(idx.T)])
    np.testing.assert_allclose(pts[:, :3] * 5.0, vol.index_to_world(idx), atol=1e-3)
    np.testing.assert_allclose(pts[:, 3] * 300.0, arr[tuple(idx.T)], atol=1e-2)
    si, _ = shape_index(vol, sigma_mm=1.0, mask=mvol)
    np.testing.assert_allclose(pts[:, 4] * 0.5, si.array[tuple(idx.T)], atol=1e-5)


def test_extract_features_empty_and_errors():
    vol = Volume(np.full((8, 8, 8), -900, np.int16), spacing_mm=(1, 1, 1))
    mask = vol.with_array(np.ones((8, 8, 8), np.uint8))
    pts, idx = extract_features(vol, mask)
    assert pts.shape == (0, 5) and idx.shape == (0, 3)
    with pytest.raises(ValueError, match="scale_hu"):
        extract_features(vol, mask, scale_hu=0)
    with pytest.raises(ValueError, match="geometry"):
        extract_features(vol, Volume(np.ones((8, 8, 9), np.uint8), spacing_mm=(1, 1, 1)))
    with pytest.raises(TypeError, match="Volume"):
        extract_features(vol.array, mask)
