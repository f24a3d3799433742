import numpy as np
import pytest
import SimpleITK as sitk

from stages.volume import Volume, xyz_to_zyx


def _oblique_direction():
    a = np.deg2rad(20)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return rot


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]), _oblique_direction()])
def test_index_world_round_trip_matches_sitk(direction):
    arr = np.zeros((5, 6, 7), np.int16)
    vol = Volume(arr, spacing_mm=(2.5, 0.7, 0.8), origin_mm=(-100.0, 20.0, -30.5), direction=direction)
    img = sitk.GetImageFromArray(arr)
    spacing, origin, d = vol.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(d)
    for idx_zyx in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        expect_xyz = img.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx_zyx[::-1]))
        np.testing.assert_allclose(vol.index_to_world(idx_zyx), expect_xyz[::-1], atol=1e-9)
        np.testing.assert_allclose(vol.world_to_index(vol.index_to_world(idx_zyx)), idx_zyx, atol=1e-9)
    back = Volume.from_sitk_geometry(arr, img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    assert back.same_geometry(vol)


def test_affine_agrees_with_index_to_world():
    vol = Volume(np.zeros((3, 3, 3)), spacing_mm=(2, 1, 0.5), origin_mm=(1, 2, 3))
    idx = np.array([1.0, 2.0, 2.0])
    np.testing.assert_allclose((vol.affine @ np.r_[idx, 1])[:3], vol.index_to_world(idx))


def test_xyz_to_zyx_reverses_last_axis():
    pts = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(xyz_to_zyx(pts), pts[:, ::-1])


@pytest.mark.parametrize("kwargs, match", [
    ({"array": np.zeros((2, 2)), "spacing_mm": (1, 1, 1)}, "must be 3-D"),
    ({"array": np.zeros((2, 2, 2)), "spacing_mm": (1, 0, 1)}, "spacing_mm must be > 0"),
    ({"array": np.zeros((2, 2, 2)), "spacing_mm": (1, 1)}, "must have 3 values"),
    ({"array": np.zeros((2, 2, 2)), "spacing_mm": (1, 1, 1), "direction": np.ones((3, 3))}, "orthonormal"),
])
def test_invalid_volume_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Volume(**kwargs)


def test_check_same_geometry_names_the_difference():
    a = Volume(np.zeros((2, 2, 2)), spacing_mm=(1, 1, 1))
    b = Volume(np.zeros((2, 2, 2)), spacing_mm=(1, 1, 2))
    a.check_same_geometry(a.with_array(np.ones((2, 2, 2))))
    with pytest.raises(ValueError, match="mask geometry differs"):
        a.check_same_geometry(b)


def test_meta_is_read_only():
    vol = Volume(np.zeros((1, 1, 1)), spacing_mm=(1, 1, 1), meta={"modality": "CT"})
    with pytest.raises(TypeError):
        vol.meta["modality"] = "MR"
