import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import stages.resample as rs
from stages.resample import resample, resample_like, resampled_shape
from stages.volume import Volume

CUDA = torch.cuda.is_available()


def _rotation(deg_z=20.0, deg_y=-10.0):
    """An orthonormal (z, y, x) direction matrix: rotations about two axes."""
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_y)
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


def _smooth(rng, shape, scale_hu=300.0):
    arr = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return arr / arr.std() * scale_hu


def _to_sitk(vol):
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array))
    spacing, origin, direction = vol.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _sitk_resample(vol, ref, interp, default):
    """SimpleITK's answer on ref's grid, as a float64 (z, y, x) array."""
    img = sitk.Cast(_to_sitk(vol), sitk.sitkFloat64)
    spacing, origin, direction = ref.sitk_geometry()
    out = sitk.Resample(img, ref.shape[::-1], sitk.Transform(), interp, origin, spacing,
                        direction, float(default), sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.0), 1.5])
def test_shape_dtype_and_geometry(dtype, spacing, rng):
    arr = rng.integers(0, 200, size=(7, 9, 11)).astype(dtype)
    vol = Volume(arr, spacing_mm=(2.5, 0.7, 0.9), origin_mm=(-300.0, -180.5, 170.25),
                 direction=_rotation(), scan_id="s1", meta={"kernel": "B30f"})
    out = resample(vol, spacing, device="cpu")
    sp = (spacing,) * 3 if np.isscalar(spacing) else spacing
    expect = tuple(int(np.floor((n - 1) * si / so + 1e-9)) + 1
                   for n, si, so in zip(arr.shape, vol.spacing_mm, sp))
    assert out.shape == expect
    assert out.array.dtype == np.dtype(dtype)
    assert out.spacing_mm == tuple(float(s) for s in sp)
    assert out.origin_mm == vol.origin_mm
    np.testing.assert_allclose(out.direction, vol.direction)
    assert out.scan_id == "s1" and out.meta["kernel"] == "B30f"
    # the output never passes the input's last voxel centre
    assert np.all((np.array(out.shape) - 1) * np.array(sp) <= (np.array(arr.shape) - 1) * np.array(vol.spacing_mm) + 1e-9)


def test_resampled_shape_float_slack():
    # (4-1)*0.3/0.1 is 8.999999999999998 in floating point: must still give 10
    assert resampled_shape((4, 2, 2), (0.3, 1.0, 1.0), (0.1, 1.0, 1.0)) == (10, 2, 2)


@pytest.mark.parametrize("direction", [np.eye(3), _rotation()])
def test_linear_ramp_in_world_is_exact(direction):
    shape, spacing, origin = (9, 12, 10), (2.5, 0.7, 1.1), (-312.0, -175.3, -180.0)
    coef = np.array([0.8, -1.7, 2.3])
    base = Volume(np.zeros(shape, np.float32), spacing_mm=spacing, origin_mm=origin, direction=direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    ramp = base.index_to_world(idx) @ coef
    vol = base.with_array(ramp.astype(np.float32))
    out = resample(vol, (1.0, 0.9, 0.6), device="cpu")
    oidx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), axis=-1)
    expect = out.index_to_world(oidx) @ coef
    np.testing.assert_allclose(out.array, expect, atol=2e-3)


def test_int16_ramp_rounds_to_nearest():
    arr = (np.arange(6, dtype=np.int16) * 3).reshape(6, 1, 1)  # 0, 3, 6 ... per 2 mm
    vol = Volume(arr, spacing_mm=(2.0, 1.0, 1.0))
    out = resample(vol, (0.5, 1.0, 1.0), device="cpu")
    z_mm = np.arange(out.shape[0]) * 0.5
    np.testing.assert_array_equal(out.array.ravel(), np.rint(z_mm * 1.5).astype(np.int16))


@pytest.mark.parametrize("order", [0, 1])
def test_bright_voxel_keeps_its_world_position(order):
    arr = np.full((12, 14, 16), -1000, np.int16)
    arr[5, 6, 9] = 1000
    vol = Volume(arr, spacing_mm=(2.5, 0.75, 0.75), origin_mm=(-250.0, -120.0, 95.5), direction=_rotation())
    world = vol.index_to_world([5, 6, 9])
    out = resample(vol, (0.5, 0.25, 0.25), order=order, device="cpu")  # input centres are on the grid
    at = out.world_to_index(world)
    np.testing.assert_allclose(at, np.rint(at), atol=1e-6)
    assert out.array[tuple(np.rint(at).astype(int))] == 1000
    bright = np.argwhere(out.array == 1000)
    if order == 1:
        assert len(bright) == 1
    # the bright blob (nearest: a block) is centred on the same world point
    centre = out.index_to_world(bright.mean(axis=0))
    assert np.linalg.norm(centre - world) <= 0.5 * np.linalg.norm(out.spacing_mm) + 1e-6
    # off-grid (finer) target spacing: the peak is within half an output voxel per axis
    out = resample(vol, (1.0, 0.6, 0.6), order=order, device="cpu")
    peak = np.argwhere(out.array == out.array.max()).mean(axis=0)
    off = np.abs(out.world_to_index(world) - peak)
    assert np.all(off <= 0.5 + 1e-6), off


def test_matches_simpleitk_linear_with_rotated_direction(rng):
    arr = np.rint(_smooth(rng, (14, 30, 28))).astype(np.int16)
    vol = Volume(arr, spacing_mm=(2.5, 0.8, 0.9), origin_mm=(-300.0, -180.0, -175.0), direction=_rotation())
    out = resample(vol, (1.0, 1.0, 1.0), device="cpu")
    ref = _sitk_resample(vol, out, sitk.sitkLinear, -1000)
    assert np.mean(np.abs(out.array - ref)) < 1.0
    assert np.max(np.abs(out.array - ref)) <= 0.5 + 1e-3  # only int16 rounding differs


FLIP_Y = np.diag([1.0, -1.0, 1.0])                       # separable path, a negative step
SWAP_YX = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # general path, axes exchanged


@pytest.mark.parametrize("direction", [_rotation(25, 15), FLIP_Y, SWAP_YX], ids=["rotated", "flip", "swap"])
@pytest.mark.parametrize("order, interp", [(1, sitk.sitkLinear), (0, sitk.sitkNearestNeighbor)])
def test_resample_like_matches_simpleitk_across_directions(order, interp, direction, rng):
    arr = _smooth(rng, (16, 26, 24)).astype(np.float32)
    vol = Volume(arr, spacing_mm=(2.0, 1.0, 1.2), origin_mm=(-40.0, -12.0, -14.0))
    # a reoriented, shifted reference that partly leaves the volume (fill is tested too)
    ref = Volume(np.zeros((20, 22, 25), np.int16), spacing_mm=(1.5, 1.1, 1.0),
                 origin_mm=(-35.0, 2.0, -16.0), direction=direction)
    out = resample_like(vol, ref, order=order, device="cpu", fill_value=-1000)
    assert out.same_geometry(ref)
    expect = _sitk_resample(vol, ref, interp, -1000)
    assert (expect == -1000).mean() > 0.05  # the reference does stick out
    if order == 1:
        np.testing.assert_allclose(out.array, expect, atol=2e-3)  # float32 vs float64
    else:
        np.testing.assert_array_equal(out.array, expect)  # same half-up rounding, same edge rule


def test_labels_stay_labels(rng):
    labels = rng.choice(np.array([0, 3, 7], np.uint8), size=(10, 12, 12))
    vol = Volume(labels, spacing_mm=(2.5, 0.7, 0.7), direction=_rotation())
    out = resample(vol, 1.0, order=0, device="cpu")
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) <= {0, 3, 7}
    assert set(np.unique(out.array)) == {0, 3, 7}
    ref = Volume(np.zeros((9, 10, 11), np.int16), spacing_mm=(2.0, 1.0, 1.0), origin_mm=(-3.0, 1.0, 2.0),
                 direction=_rotation(10, 30))
    back = resample_like(vol, ref)
    assert set(np.unique(back.array)) <= {0, 3, 7}


def test_mask_round_trip_is_exact(rng):
    mask = (ndimage.gaussian_filter(rng.standard_normal((8, 20, 18)), 1.5) > 0).astype(np.uint8)
    vol = Volume(mask, spacing_mm=(2.5, 1.0, 1.5), origin_mm=(-100.0, 50.0, -60.0))
    fine = resample(vol, 0.5, order=0, device="cpu")  # every coarse centre is a fine centre
    back = resample_like(fine, vol, order=0, device="cpu")
    assert back.same_geometry(vol)
    np.testing.assert_array_equal(back.array, mask)


def test_agrees_with_scipy_map_coordinates(rng):
    arr = np.rint(_smooth(rng, (11, 17, 19))).astype(np.int16)
    vol = Volume(arr, spacing_mm=(3.0, 0.9, 0.7), origin_mm=(5.0, -7.0, 3.0))
    out = resample(vol, (1.1, 1.0, 1.0), device="cpu")
    coords = np.stack(np.meshgrid(*[np.arange(n) * so / si for n, so, si in
                                    zip(out.shape, out.spacing_mm, vol.spacing_mm)], indexing="ij"))
    expect = ndimage.map_coordinates(arr.astype(np.float64), coords, order=1, mode="nearest")
    assert np.max(np.abs(out.array - expect)) <= 0.5 + 1e-3
    near = resample(vol, (1.1, 1.0, 1.0), order=0, device="cpu")
    idx = np.floor(coords + 0.5).astype(int)
    np.testing.assert_array_equal(near.array, arr[idx[0], idx[1], idx[2]])


def test_slabs_give_the_same_answer(rng, monkeypatch):
    arr = _smooth(rng, (12, 15, 13)).astype(np.float32)
    vol = Volume(arr, spacing_mm=(2.5, 0.8, 0.8))
    ref = Volume(np.zeros((10, 12, 12), np.uint8), spacing_mm=(1.7, 1.0, 1.0), origin_mm=(2.0, 1.0, 0.5),
                 direction=_rotation())
    whole = resample(vol, 1.0, device="cpu").array
    whole_like = resample_like(vol, ref, order=1, device="cpu").array
    monkeypatch.setattr(rs, "SLAB_ELEMENTS", 300)  # forces one output slice per slab
    np.testing.assert_array_equal(resample(vol, 1.0, device="cpu").array, whole)
    np.testing.assert_allclose(resample_like(vol, ref, order=1, device="cpu").array, whole_like, atol=2e-3)


def test_resample_like_fills_outside():
    vol = Volume(np.full((4, 4, 4), 50, np.int16), spacing_mm=(1.0, 1.0, 1.0))
    ref = Volume(np.zeros((4, 4, 8), np.int16), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, -2.0))
    ct = resample_like(vol, ref, order=1, device="cpu").array
    np.testing.assert_array_equal(ct[..., :2], -1000)
    np.testing.assert_array_equal(ct[..., 2:6], 50)
    np.testing.assert_array_equal(ct[..., 6:], -1000)
    lab = resample_like(vol.with_array(np.ones((4, 4, 4), np.uint8)), ref, device="cpu").array
    assert lab[..., :2].max() == 0 and lab[..., 2:6].min() == 1
    # the CT fill (-1000) does not fit uint8: it is clipped to 0, not wrapped around
    lin = resample_like(vol.with_array(np.full((4, 4, 4), 7, np.uint8)), ref, order=1, device="cpu").array
    assert lin[..., :2].max() == 0 and lin[..., 2:6].min() == 7
    own = resample_like(vol, ref, order=1, device="cpu", fill_value=-2048).array
    assert own[..., 0].max() == -2048


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_matches_cpu(rng):
    arr = np.rint(_smooth(rng, (30, 64, 60))).astype(np.int16)
    vol = Volume(arr, spacing_mm=(2.5, 0.7, 0.7), direction=_rotation())
    cpu = resample(vol, 1.0, device="cpu").array.astype(int)
    gpu = resample(vol, 1.0, device="cuda").array.astype(int)
    assert np.max(np.abs(cpu - gpu)) <= 1 and np.mean(cpu != gpu) < 1e-3
    lab = vol.with_array((arr > 0).astype(np.uint8))
    ref = Volume(np.zeros((20, 30, 30), np.uint8), spacing_mm=(2.0, 1.3, 1.3), direction=_rotation(5, 5))
    np.testing.assert_array_equal(resample_like(lab, ref, device="cpu").array,
                                  resample_like(lab, ref, device="cuda").array)
    assert resample(vol, 1.0).array.shape == cpu.shape  # device=None picks cuda


@pytest.mark.parametrize("bad", [0.0, -1.0, (1.0, 1.0), (1.0, np.nan, 1.0), "1mm", (1.0, 0.0, 1.0)])
def test_bad_spacing_raises(bad):
    vol = Volume(np.zeros((3, 3, 3), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        resample(vol, bad, device="cpu")


def test_bad_arguments_raise():
    vol = Volume(np.zeros((3, 3, 3), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="order"):
        resample(vol, order=3, device="cpu")
    with pytest.raises(TypeError, match="Volume"):
        resample(np.zeros((3, 3, 3)), device="cpu")
    with pytest.raises(TypeError, match="reference"):
        resample_like(vol, np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="device"):
        resample(vol, device="tpu:banana")
    with pytest.raises(ValueError, match="exceeds"):
        resample(Volume(np.zeros((300, 512, 512), np.int16), spacing_mm=(2.5, 1.0, 1.0)), 0.05, device="cpu")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            resample(vol, device="cuda")
