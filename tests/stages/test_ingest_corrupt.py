"""Corrupt compressed pixel data (#18 f): a decoder that fails (even by a Rust panic) or
decodes garbage without an error never gives an "ok" scan with a garbled slice; a few bad
slices are repaired by interpolation and flagged, more are refused; nothing the decoders
print reaches the console."""
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from stages.errors import ScanError
from stages.ingest import GARBLED_FACTOR, REPAIR_MAX_FRACTION, _garbled_slices, read_scan
from stages.volume import Volume
from synth.data import DataUnavailable, pydicom_test_file
from synth.dicomio import write_dicom_series


def _smooth_volume(n_slices=60, shape=(32, 32)):
    """Slowly varying anatomy-like HU (neighbouring slices alike), 2 mm slices."""
    z, y, x = np.meshgrid(np.arange(n_slices), np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    hu = (-600 + 300 * np.sin(z / 7.0) * np.cos(y / 5.0) + 4 * x).astype(np.int16)
    return Volume(hu, spacing_mm=(2.0, 0.8, 0.8), origin_mm=(-100.0, -12.0, -12.0), scan_id="corrupt")


def _break_rle(path):
    """Damage the tail of an RLE frame so that pylibjpeg-rle's decoder panics."""
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 900, len(raw) - 300, 5):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _interpolated(vol, k):
    return np.rint((vol.array[k - 1].astype(float) + vol.array[k + 1]) / 2)


def test_an_rle_slice_that_panics_the_decoder_is_repaired_flagged_and_silent(tmp_path, capfd):
    vol = _smooth_volume()
    paths = write_dicom_series(vol, tmp_path, transfer_syntax=RLELossless, shuffle_names=False)
    _break_rle(paths[30])
    got = read_scan(tmp_path)
    out, err = capfd.readouterr()
    assert "panicked" not in out + err and "Traceback" not in out + err and "lib.rs" not in err
    assert got.shape == vol.shape and got.same_geometry(vol, atol_mm=1e-6)
    assert len(got.meta["repaired_slices"]) == 1
    assert got.meta["repaired_slices"][0].startswith("slice_0030.dcm: corrupt RLE Lossless pixel data")
    assert np.array_equal(got.array[30], _interpolated(vol, 30))
    keep = [k for k in range(vol.shape[0]) if k != 30]
    assert np.array_equal(got.array[keep], vol.array[keep])


def test_a_corrupt_compressed_file_read_alone_is_one_clean_line(tmp_path, capfd):
    paths = write_dicom_series(_smooth_volume(n_slices=3), tmp_path, transfer_syntax=RLELossless,
                               shuffle_names=False)
    _break_rle(paths[1])
    with pytest.raises(ScanError) as err:
        read_scan(paths[1])
    msg = str(err.value)
    assert msg.startswith(str(paths[1])) and "corrupt RLE Lossless pixel data" in msg and "\n" not in msg
    assert "Traceback" not in "".join(capfd.readouterr())


@pytest.mark.parametrize("damaged, reason", [([20, 21], "next to each other"),
                                             ([10, 30, 50], "more than the 1 that")])
def test_too_many_or_neighbouring_bad_slices_are_refused(tmp_path, damaged, reason):
    vol = _smooth_volume()
    assert int(REPAIR_MAX_FRACTION * vol.shape[0]) == 1
    paths = write_dicom_series(vol, tmp_path, transfer_syntax=RLELossless, shuffle_names=False)
    for k in damaged:
        _break_rle(paths[k])
    with pytest.raises(ScanError, match=reason) as err:
        read_scan(tmp_path)
    assert f"slice_{damaged[0]:04d}.dcm: corrupt RLE Lossless" in str(err.value)
    assert "\n" not in str(err.value)


def _jpeg_lossless_series(folder, n_slices):
    """``n_slices`` copies of a real JPEG Lossless CT image (pydicom's test data), 2 mm apart."""
    try:
        source = pydicom_test_file("bad_sequence.dcm")
    except DataUnavailable as exc:
        pytest.skip(str(exc))
    paths = []
    for k in range(n_slices):
        ds = pydicom.dcmread(source)
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3.4.5", generate_uid()
        paths.append(folder / f"s{k:02d}.dcm")
        ds.save_as(paths[-1])
    return paths


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the test file's own UIDs
def test_a_jpeg_lossless_slice_that_decodes_to_garbage_is_caught(tmp_path, capfd):
    paths = _jpeg_lossless_series(tmp_path, 9)
    clean = read_scan(tmp_path)
    raw = bytearray(paths[4].read_bytes())
    middle = len(raw) - len(pydicom.dcmread(paths[4]).PixelData) // 2
    raw[middle:middle + 40] = bytes(range(40))  # no decoder error: garbage from here on
    paths[4].write_bytes(bytes(raw))
    got = read_scan(tmp_path)
    assert "Traceback" not in "".join(capfd.readouterr())
    assert len(got.meta["repaired_slices"]) == 1
    assert got.meta["repaired_slices"][0].startswith("s04.dcm: corrupt compressed pixel data: the decoded "
                                                     "slice differs from its neighbours")
    assert np.array_equal(got.array, clean.array)  # identical neighbours: the repair is exact


def test_real_chest_ct_is_never_called_garbled(pycerr, lung1):
    """Each real slice checked against its neighbours stays well under the threshold."""
    for vol in [read_scan(p) for p in [*pycerr.values(), lung1[0]]]:
        hu = vol.array
        assert _garbled_slices(hu, list(range(hu.shape[0])), {}) == {}
        # margin: even half the factor and no HU margin would pass
        d1 = np.abs(np.diff(hu.astype(np.float32), axis=0)).mean(axis=(1, 2))
        d2 = np.abs(hu[2:].astype(np.float32) - hu[:-2]).mean(axis=(1, 2))
        assert (np.minimum(d1[:-1], d1[1:]) / d2).max() < GARBLED_FACTOR / 2
