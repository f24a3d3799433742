import numpy as np
import pytest

from stages.hounsfield import CLIP_HU, PADDING_HU, to_hounsfield
from stages.volume import AIR_HU


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.float32])
def test_rescale_slope_intercept(dtype):
    stored = np.array([[0, 10, 1000], [1024, 2000, 3000]], dtype)
    hu = to_hounsfield(stored, slope=1.0, intercept=-1024)
    assert hu.dtype == np.int16
    assert hu.tolist() == [[-1024, -1014, -24], [0, 976, 1976]]


def test_fractional_slope_is_rounded_half_to_even():
    stored = np.array([[1, 3, 5, 2000]], np.uint16)
    assert to_hounsfield(stored, slope=0.5, intercept=0).tolist() == [[0, 2, 2, 1000]]


def test_clipped_to_clip_hu():
    stored = np.array([[-1500, 4000, 100]], np.int16)
    assert to_hounsfield(stored).tolist() == [[CLIP_HU[0], CLIP_HU[1], 100]]
    assert to_hounsfield(stored, clip_hu=(-1000, 400)).tolist() == [[-1000, 400, 100]]


def test_padding_below_threshold_becomes_air():
    # -2048 and -3024 circles; -1999 is just above the padding threshold and only clipped
    stored = np.array([[-2048, -3024, int(PADDING_HU), int(PADDING_HU) + 1, 0]], np.int16)
    assert to_hounsfield(stored).tolist() == [[AIR_HU, AIR_HU, AIR_HU, CLIP_HU[0], 0]]
    assert to_hounsfield(stored, air_hu=-1024).tolist()[0][:3] == [-1024] * 3


def test_pixel_padding_value_matches_stored_values():
    # (0028,0120) is a stored value: 0 here would rescale to -1024, i.e. above the threshold
    stored = np.array([[0, 1, 1024]], np.uint16)
    hu = to_hounsfield(stored, intercept=-1024, pixel_padding_value=0)
    assert hu.tolist() == [[AIR_HU, -1023, 0]]
    assert to_hounsfield(stored, intercept=-1024).tolist() == [[-1024, -1023, 0]]


def test_monochrome1_gives_the_same_hu():
    stored = np.array([[0, 500, 2000]], np.uint16)
    assert np.array_equal(to_hounsfield(stored, intercept=-1024, photometric="MONOCHROME1"),
                          to_hounsfield(stored, intercept=-1024, photometric="MONOCHROME2"))


def test_bits_stored_masks_high_bits_and_sign_extends():
    unsigned = np.array([[0xF000 | 100, 4095]], np.uint16)
    assert to_hounsfield(unsigned, bits_stored=12).tolist() == [[100, 3071]]
    signed = np.array([[0x0FFF, 0x0800, 5]], np.int16)  # 12-bit two's complement: -1, -2048, 5
    assert to_hounsfield(signed, bits_stored=12, clip_hu=(-3000, 3000),
                         padding_hu=-5000).tolist() == [[-1, -2048, 5]]


def test_per_slice_rescale_equals_slice_by_slice(rng):
    stored = rng.integers(0, 4096, (3, 4, 5)).astype(np.uint16)
    slopes, intercepts = [1.0, 0.5, 2.0], [-1024, -1000, -2048]
    whole = to_hounsfield(stored, slope=slopes, intercept=intercepts)
    for k in range(3):
        assert np.array_equal(whole[k], to_hounsfield(stored[k], slope=slopes[k], intercept=intercepts[k]))


@pytest.mark.parametrize("kwargs, match", [
    ({"slope": 0}, "must not be 0"),
    ({"slope": float("nan")}, "slope must be finite"),
    ({"slope": [1.0, 2.0, 3.0]}, "one per slice"),
    ({"photometric": "RGB"}, "photometric must be one of"),
    ({"clip_hu": (400, -1000)}, "clip_hu must be"),
    ({"clip_hu": (-40000, 0)}, "clip_hu must be"),
    ({"air_hu": -2000}, "air_hu=-2000 must lie within"),
    ({"bits_stored": 17}, "bits_stored must be 1..16"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_hounsfield(np.zeros((2, 3, 3), np.int16), **kwargs)


@pytest.mark.parametrize("bad", [np.zeros((3, 3), bool), np.zeros(5, np.int16), np.array([["a"]])])
def test_bad_array_type(bad):
    with pytest.raises(TypeError, match="stored must be a 2-D or 3-D integer or float array"):
        to_hounsfield(bad)
