import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import stages.resample as rs
from stages.resample import resample, resample_like, resampled_shape
from stages.volume import Volume

CUDA = torch.cuda.is_available()
# both CPU backends: SimpleITK (the CPU default) and torch (the GPU code, run on the CPU)
BACKENDS = pytest.mark.parametrize("method", ["sitk", "torch"])


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


@BACKENDS
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.0), 1.5])
def test_shape_dtype_and_geometry(dtype, spacing, method, rng):
    arr = rng.integers(0, 200, size=(7, 9, 11)).astype(dtype)
    vol = Volume(arr, spacing_mm=(2.5, 0.7, 0.9), origin_mm=(-300.0, -180.5, 170.25),
                 direction=_rotation(), scan_id="s1", meta={"kernel": "B30f"})
    out = resample(vol, spacing, device="cpu", method=method)
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


@BACKENDS
@pytest.mark.parametrize("direction", [np.eye(3), _rotation()])
def test_linear_ramp_in_world_is_exact(direction, method):
    shape, spacing, origin = (9, 12, 10), (2.5, 0.7, 1.1), (-312.0, -175.3, -180.0)
    coef = np.array([0.8, -1.7, 2.3])
    base = Volume(np.zeros(shape, np.float32), spacing_mm=spacing, origin_mm=origin, direction=direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    ramp = base.index_to_world(idx) @ coef
    vol = base.with_array(ramp.astype(np.float32))
    out = resample(vol, (1.0, 0.9, 0.6), device="cpu", method=method)
    oidx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), axis=-1)
    expect = out.index_to_world(oidx) @ coef
    np.testing.assert_allclose(out.array, expect, atol=2e-3)


@BACKENDS
def test_int16_ramp_rounds_to_nearest(method):
    arr = (np.arange(6, dtype=np.int16) * 3).reshape(6, 1, 1)  # 0, 3, 6 ... per 2 mm
    vol = Volume(arr, spacing_mm=(2.0, 1.0, 1.0))
    out = resample(vol, (0.5, 1.0, 1.0), device="cpu", method=method)
    z_mm = np.arange(out.shape[0]) * 0.5
    np.testing.assert_array_equal(out.array.ravel(), np.rint(z_mm * 1.5).astype(np.int16))


@BACKENDS
def test_halves_round_to_even(method):
    # midpoints 0.5, 1.5, 2.5 are exact in float32: both backends round them half to even
    vol = Volume(np.arange(4, dtype=np.int16).reshape(4, 1, 1), spacing_mm=(2.0, 1.0, 1.0))
    out = resample(vol, (1.0, 1.0, 1.0), device="cpu", method=method)
    assert out.array.ravel().tolist() == [0, 0, 1, 2, 2, 2, 3]


@BACKENDS
@pytest.mark.parametrize("order", [0, 1])
def test_bright_voxel_keeps_its_world_position(order, method):
    arr = np.full((12, 14, 16), -1000, np.int16)
    arr[5, 6, 9] = 1000
    vol = Volume(arr, spacing_mm=(2.5, 0.75, 0.75), origin_mm=(-250.0, -120.0, 95.5), direction=_rotation())
    world = vol.index_to_world([5, 6, 9])
    out = resample(vol, (0.5, 0.25, 0.25), order=order, device="cpu", method=method)  # input centres are on the grid
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
    out = resample(vol, (1.0, 0.6, 0.6), order=order, device="cpu", method=method)
    peak = np.argwhere(out.array == out.array.max()).mean(axis=0)
    off = np.abs(out.world_to_index(world) - peak)
    assert np.all(off <= 0.5 + 1e-6), off


@BACKENDS
def test_matches_simpleitk_linear_with_rotated_direction(method, rng):
    arr = np.rint(_smooth(rng, (14, 30, 28))).astype(np.int16)
    vol = Volume(arr, spacing_mm=(2.5, 0.8, 0.9), origin_mm=(-300.0, -180.0, -175.0), direction=_rotation())
    out = resample(vol, (1.0, 1.0, 1.0), device="cpu", method=method)
    ref = _sitk_resample(vol, out, sitk.sitkLinear, -1000)
    assert np.mean(np.abs(out.array - ref)) < 1.0
    assert np.max(np.abs(out.array - ref)) <= 0.5 + 1e-3  # only int16 rounding differs


FLIP_Y = np.diag([1.0, -1.0, 1.0])                       # separable path, a negative step
SWAP_YX = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # general path, axes exchanged


@BACKENDS
@pytest.mark.parametrize("direction", [_rotation(25, 15), FLIP_Y, SWAP_YX], ids=["rotated", "flip", "swap"])
@pytest.mark.parametrize("order, interp", [(1, sitk.sitkLinear), (0, sitk.sitkNearestNeighbor)])
def test_resample_like_matches_simpleitk_across_directions(order, interp, direction, method, rng):
    arr = _smooth(rng, (16, 26, 24)).astype(np.float32)
    vol = Volume(arr, spacing_mm=(2.0, 1.0, 1.2), origin_mm=(-40.0, -12.0, -14.0))
    # a reoriented, shifted reference that partly leaves the volume (fill is tested too)
    ref = Volume(np.zeros((20, 22, 25), np.int16), spacing_mm=(1.5, 1.1, 1.0),
                 origin_mm=(-35.0, 2.0, -16.0), direction=direction)
    out = resample_like(vol, ref, order=order, device="cpu", method=method, fill_value=-1000)
    assert out.same_geometry(ref)
    expect = _sitk_resample(vol, ref, interp, -1000)
    assert (expect == -1000).mean() > 0.05  # the reference does stick out
    if order == 1:
        np.testing.assert_allclose(out.array, expect, atol=2e-3)  # float32 vs float64
    else:
        np.testing.assert_array_equal(out.array, expect)  # same half-up rounding, same edge rule


@BACKENDS
def test_labels_stay_labels(method, rng):
    labels = rng.choice(np.array([0, 3, 7], np.uint8), size=(10, 12, 12))
    vol = Volume(labels, spacing_mm=(2.5, 0.7, 0.7), direction=_rotation())
    out = resample(vol, 1.0, order=0, device="cpu", method=method)
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) <= {0, 3, 7}
    assert set(np.unique(out.array)) == {0, 3, 7}
    ref = Volume(np.zeros((9, 10, 11), np.int16), spacing_mm=(2.0, 1.0, 1.0), origin_mm=(-3.0, 1.0, 2.0),
                 direction=_rotation(10, 30))
    back = resample_like(vol, ref, method=method)
    assert set(np.unique(back.array)) <= {0, 3, 7}


@BACKENDS
@pytest.mark.parametrize("direction", [np.eye(3), _rotation()], ids=["axial", "rotated"])
def test_mask_round_trip_is_exact(direction, method, rng):
    mask = (ndimage.gaussian_filter(rng.standard_normal((8, 20, 18)), 1.5) > 0).astype(np.uint8)
    vol = Volume(mask, spacing_mm=(2.5, 1.0, 1.5), origin_mm=(-100.0, 50.0, -60.0), direction=direction)
    fine = resample(vol, 0.5, order=0, device="cpu", method=method)  # every coarse centre is a fine centre
    back = resample_like(fine, vol, order=0, device="cpu", method=method)
    assert back.same_geometry(vol)
    np.testing.assert_array_equal(back.array, mask)


@BACKENDS
def test_agrees_with_scipy_map_coordinates(method, rng):
    arr = np.rint(_smooth(rng, (11, 17, 19))).astype(np.int16)
    vol = Volume(arr, spacing_mm=(3.0, 0.9, 0.7), origin_mm=(5.0, -7.0, 3.0))
    out = resample(vol, (1.1, 1.0, 1.0), device="cpu", method=method)
    coords = np.stack(np.meshgrid(*[np.arange(n) * so / si for n, so, si in
                                    zip(out.shape, out.spacing_mm, vol.spacing_mm)], indexing="ij"))
    expect = ndimage.map_coordinates(arr.astype(np.float64), coords, order=1, mode="nearest")
    assert np.max(np.abs(out.array - expect)) <= 0.5 + 1e-3
    near = resample(vol, (1.1, 1.0, 1.0), order=0, device="cpu", method=method)
    idx = np.floor(coords + 0.5).astype(int)
    np.testing.assert_array_equal(near.array, arr[idx[0], idx[1], idx[2]])


@BACKENDS
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_slabs_give_the_same_answer(dtype, method, rng, monkeypatch):
    arr = (_smooth(rng, (12, 15, 13)) * 3).astype(dtype)
    vol = Volume(arr, spacing_mm=(2.5, 0.8, 0.8))
    ref = Volume(np.zeros((10, 12, 12), np.uint8), spacing_mm=(1.7, 1.0, 1.0), origin_mm=(2.0, 1.0, 0.5),
                 direction=_rotation())
    whole = resample(vol, 1.0, device="cpu", method=method).array
    whole_like = resample_like(vol, ref, order=1, device="cpu", method=method).array
    monkeypatch.setattr(rs, "SLAB_ELEMENTS", 300)  # forces one output slice per slab
    np.testing.assert_array_equal(resample(vol, 1.0, device="cpu", method=method).array, whole)
    np.testing.assert_allclose(resample_like(vol, ref, order=1, device="cpu", method=method).array,
                               whole_like, atol=2e-3)


@BACKENDS
def test_resample_like_fills_outside(method):
    vol = Volume(np.full((4, 4, 4), 50, np.int16), spacing_mm=(1.0, 1.0, 1.0))
    ref = Volume(np.zeros((4, 4, 8), np.int16), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, -2.0))
    ct = resample_like(vol, ref, order=1, device="cpu", method=method).array
    np.testing.assert_array_equal(ct[..., :2], -1000)
    np.testing.assert_array_equal(ct[..., 2:6], 50)
    np.testing.assert_array_equal(ct[..., 6:], -1000)
    lab = resample_like(vol.with_array(np.ones((4, 4, 4), np.uint8)), ref, device="cpu", method=method).array
    assert lab[..., :2].max() == 0 and lab[..., 2:6].min() == 1
    # the CT fill (-1000) does not fit uint8: it is clipped to 0, not wrapped around
    lin = resample_like(vol.with_array(np.full((4, 4, 4), 7, np.uint8)), ref, order=1, device="cpu",
                        method=method).array
    assert lin[..., :2].max() == 0 and lin[..., 2:6].min() == 7
    own = resample_like(vol, ref, order=1, device="cpu", method=method, fill_value=-2048).array
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
    # the same torch code on both devices: the same float32 arithmetic
    torch_cpu = resample(vol, 1.0, device="cpu", method="torch").array.astype(int)
    assert np.max(np.abs(torch_cpu - gpu)) <= 1
    np.testing.assert_array_equal(resample_like(lab, ref, device="cpu", method="torch").array,
                                  resample_like(lab, ref, device="cuda").array)


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


# --------------------------------------------------------------------------- sitk vs torch backends
def _hu_close(a, b):
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
    assert diff.max() <= 1, diff.max()
    assert diff.mean() < 0.05, diff.mean()


@pytest.mark.parametrize("direction", [np.eye(3), FLIP_Y, _rotation(), SWAP_YX], ids=["axial", "flip", "rotated", "swap"])
def test_sitk_backend_equals_torch_backend(direction, rng):
    arr = np.rint(_smooth(rng, (14, 40, 36), 400.0)).astype(np.int16)
    vol = Volume(arr, spacing_mm=(2.5, 0.7, 0.8), origin_mm=(-212.5, -175.3, 160.7), direction=direction)
    for spacing in [(1.0, 1.0, 1.0), (0.9, 0.45, 1.3)]:
        ct = [resample(vol, spacing, device="cpu", method=m).array for m in ("sitk", "torch")]
        _hu_close(*ct)
    labels = rng.choice(np.array([0, 1, 2], np.uint8), size=arr.shape)
    lab = vol.with_array(labels)
    nn = [resample(lab, 1.0, order=0, device="cpu", method=m).array for m in ("sitk", "torch")]
    np.testing.assert_array_equal(*nn)
    # onto another, partly outside grid of another direction (general path for the rotated ones)
    ref = Volume(np.zeros((12, 30, 33), np.uint8), spacing_mm=(2.0, 1.1, 0.9), origin_mm=(-205.0, -170.0, 158.0),
                 direction=_rotation(10, 5))
    like = [resample_like(lab, ref, order=0, device="cpu", method=m).array for m in ("sitk", "torch")]
    np.testing.assert_array_equal(*like)
    like = [resample_like(vol, ref, order=1, device="cpu", method=m).array for m in ("sitk", "torch")]
    _hu_close(*like)
    assert (like[0] == rs.AIR_HU).mean() > 0.05  # the fill is exercised too


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint16, np.int32, np.float16, np.float64])
def test_sitk_backend_handles_every_dtype_like_torch(dtype, order, rng):
    arr = _smooth(rng, (6, 9, 8), 60.0)
    arr = arr > 0 if dtype is np.bool_ else np.clip(arr, *((0, 100) if dtype is np.uint16 else (-100, 100)))
    vol = Volume(arr.astype(dtype), spacing_mm=(2.0, 0.9, 1.1), direction=_rotation())
    ref = Volume(np.zeros((8, 9, 10), np.uint8), spacing_mm=(1.3, 1.0, 0.8), origin_mm=(1.0, -0.5, 0.2),
                 direction=_rotation(12, -4))
    for run in (lambda m: resample(vol, 0.7, order=order, device="cpu", method=m),
                lambda m: resample_like(vol, ref, order=order, device="cpu", method=m, fill_value=-50)):
        got, want = run("sitk").array, run("torch").array
        assert got.dtype == want.dtype == np.dtype(dtype)
        if order == 0 or dtype is np.bool_:
            np.testing.assert_array_equal(got, want)
        elif np.dtype(dtype).kind == "f":
            np.testing.assert_allclose(got, want, atol=0.06 if dtype is np.float16 else 1e-3)
        else:
            _hu_close(got, want)


def test_lung1_sitk_backend_equals_torch_backend(lung1):
    from stages.ingest import read_scan

    ct = read_scan(lung1[0])
    out = {m: resample(ct, (1.0, 1.0, 1.0), device="cpu", method=m) for m in ("sitk", "torch")}
    assert out["sitk"].shape == out["torch"].shape == resampled_shape(ct.shape, ct.spacing_mm, (1, 1, 1))
    assert out["sitk"].same_geometry(out["torch"])
    _hu_close(out["sitk"].array, out["torch"].array)
    label = read_scan(lung1[1])
    label = label.with_array((label.array > 0).astype(np.uint8))
    iso = {m: resample(label, 1.0, order=0, device="cpu", method=m).array for m in ("sitk", "torch")}
    np.testing.assert_array_equal(iso["sitk"], iso["torch"])
    assert iso["sitk"].sum() > 100
    # back onto the original grid, and onto a 2 mm, shifted grid
    fine = out["sitk"].with_array(iso["sitk"])
    coarse = Volume(np.zeros((40, 180, 180), np.uint8), spacing_mm=(6.0, 2.0, 2.0),
                    origin_mm=np.asarray(ct.origin_mm) + 3.3)
    for ref in (label, coarse):
        back = [resample_like(fine, ref, device="cpu", method=m).array for m in ("sitk", "torch")]
        np.testing.assert_array_equal(*back)
        assert back[0].sum() > 0


def test_bad_method_raises():
    vol = Volume(np.zeros((3, 3, 3), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        resample(vol, method="scipy")
    with pytest.raises(ValueError, match="method"):
        resample_like(vol, vol, method=1)
    with pytest.raises(ValueError, match="CUDA|CPU"):
        resample(vol, device="cuda", method="sitk")  # SimpleITK never runs on a GPU
