import logging
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from synth.data import DataUnavailable, pydicom_test_file
from synth.dicomio import write_dicom_series, write_localizer, write_rtstruct
from pipeline.io import write_volume
from stages.errors import ScanError
from stages.volume import AIR_HU
from stages.ingest import read_scan
from stages.volume import Volume


def _rot_z(deg):
    """Rotation about the patient z axis, as a (z, y, x) direction matrix."""
    t = np.radians(deg)
    return np.array([[1.0, 0, 0], [0, np.cos(t), np.sin(t)], [0, -np.sin(t), np.cos(t)]])


def _volume(rng, shape=(6, 12, 10), spacing=(2.5, 0.7, 0.8), direction=None, scan_id="phantom"):
    hu = rng.integers(-1024, 3072, shape).astype(np.int16)
    return Volume(hu, spacing_mm=spacing, origin_mm=(-150.25, 20.5, -33.125),
                  direction=np.eye(3) if direction is None else direction, scan_id=scan_id)


def _edit(path, **tags):
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _data_file(name):
    try:
        return pydicom_test_file(name)
    except DataUnavailable as exc:
        pytest.skip(str(exc))


def _same_world(a: Volume, b: Volume, atol=1e-4):
    corners = np.array([[0, 0, 0], [a.shape[0] - 1, a.shape[1] - 1, a.shape[2] - 1], [1, 2, 3]])
    return np.allclose(a.index_to_world(corners), b.index_to_world(corners), atol=atol)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("direction", [np.eye(3), _rot_z(12.0), np.diag([1.0, -1.0, -1.0]),
                                       np.diag([1.0, 1.0, -1.0]) @ _rot_z(-7.0)],
                         ids=["identity", "in-plane-rotated", "xy-flipped", "x-flipped-rotated"])
def test_dicom_round_trip_keeps_world_geometry(tmp_path, rng, direction):
    vol = _volume(rng, direction=direction)
    if np.linalg.det(direction) < 0:  # a left-handed grid comes back right-handed: z reversed
        expected = Volume(vol.array[::-1], vol.spacing_mm, vol.index_to_world([5, 0, 0]),
                          direction * np.array([-1.0, 1.0, 1.0]))
    else:
        expected = vol
    uid = "1.2.826.0.1.3680043.2.1125.1"
    write_dicom_series(vol, tmp_path, series_uid=uid)
    got = read_scan(tmp_path)
    assert got.array.dtype == np.int16 and np.array_equal(got.array, expected.array)
    assert np.allclose(got.spacing_mm, expected.spacing_mm, atol=1e-4)
    assert np.allclose(got.origin_mm, expected.origin_mm, atol=1e-4)
    assert np.allclose(got.direction, expected.direction, atol=1e-6)
    assert _same_world(got, expected)
    assert got.scan_id == uid and got.meta["number_of_slices"] == 6 and got.meta["skipped"] == []


def test_order_comes_from_positions_not_names_or_instance_numbers(tmp_path, rng):
    vol = _volume(rng)
    plain = read_scan(write_dicom_series(vol, tmp_path / "plain", shuffle_names=False)[0].parent)
    paths = write_dicom_series(vol, tmp_path / "nested" / "a", shuffle_names=True, seed=7)
    # scramble the instance numbers, and hide half the slices in a sub-folder
    for path, number in zip(paths, rng.permutation(len(paths))):
        _edit(path, InstanceNumber=int(number) + 1)
    (tmp_path / "nested" / "a" / "deeper").mkdir()
    for path in paths[::2]:
        path.rename(path.parent / "deeper" / path.name)
    shuffled = read_scan(tmp_path / "nested")
    assert np.array_equal(shuffled.array, vol.array) and np.array_equal(plain.array, vol.array)
    assert shuffled.same_geometry(plain, atol_mm=1e-6)


def test_per_slice_rescale_is_applied_per_slice(tmp_path, rng):
    vol = _volume(rng)
    paths = write_dicom_series(vol, tmp_path, per_slice_rescale=True)
    assert len({float(pydicom.dcmread(p).RescaleSlope) for p in paths}) == 3
    assert np.array_equal(read_scan(tmp_path).array, vol.array)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_series(tmp_path, rng, syntax):
    vol = _volume(rng, shape=(3, 64, 48))
    write_dicom_series(vol, tmp_path, transfer_syntax=syntax)
    got = read_scan(tmp_path)
    assert np.array_equal(got.array, vol.array) and got.meta["transfer_syntax"] == syntax.name


def test_padding_below_threshold_reads_as_air(tmp_path, rng):
    vol = _volume(rng)
    hu = vol.array.copy()
    hu[:, 0, :] = -2048  # a scanner's outside-the-circle value
    write_dicom_series(vol.with_array(hu), tmp_path, intercept=0.0)
    got = read_scan(tmp_path)
    assert (got.array[:, 0, :] == AIR_HU).all() and np.array_equal(got.array[:, 1:], hu[:, 1:])


def test_hounsfield_options_are_passed_on(tmp_path, rng):
    vol = _volume(rng)
    write_dicom_series(vol, tmp_path)
    got = read_scan(tmp_path, clip_hu=(-1000, 400))
    assert np.array_equal(got.array, np.clip(vol.array, -1000, 400))


# ----------------------------------------------------------------------------- mixed folders
@pytest.fixture
def mixed_folder(tmp_path, rng):
    """Two CT series (8 and 5 slices), a localizer, an RTSTRUCT, a zero-byte and a text file."""
    big = _volume(rng, shape=(8, 12, 10))
    small = _volume(rng, shape=(5, 12, 10), spacing=(1.25, 0.7, 0.8))
    write_dicom_series(big, tmp_path, series_uid="1.2.3.8", study_uid="1.2.3", seed=1)
    write_dicom_series(small, tmp_path / "sub", series_uid="1.2.3.5", study_uid="1.2.3", seed=2)
    write_localizer(tmp_path, study_uid="1.2.3", name="scout")
    write_rtstruct(tmp_path, study_uid="1.2.3", name="structures")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "README.txt").write_text("exported by a PACS\n" * 20)
    return tmp_path, big, small


def test_mixed_folder_picks_the_biggest_ct_series_and_reports_odd_files(mixed_folder, caplog):
    folder, big, _ = mixed_folder
    with caplog.at_level(logging.INFO, logger="stages.ingest"):
        got = read_scan(folder)
    assert got.scan_id == "1.2.3.8" and np.array_equal(got.array, big.array)
    skipped = dict(s.split(": ", 1) for s in got.meta["skipped"])
    assert skipped == {"scout": "localizer (ImageType LOCALIZER)",
                       "structures": "not an image (RTSTRUCT, RT Structure Set Storage)",
                       "empty.dcm": "zero-byte file",
                       "README.txt": "not a DICOM file"}
    assert got.meta["other_series"] == ["1.2.3.5: 5 slices"]
    assert "chose series 1.2.3.8 (8 slices) among 2 CT series" in caplog.text
    assert "skipped 4 file(s)" in caplog.text


def test_series_uid_picks_the_other_series(mixed_folder):
    folder, _, small = mixed_folder
    got = read_scan(folder, series_uid="1.2.3.5")
    assert got.scan_id == "1.2.3.5" and np.array_equal(got.array, small.array)
    assert got.spacing_mm == pytest.approx(small.spacing_mm)
    with pytest.raises(ScanError, match=r"series 9\.9 not found; CT series here: 1\.2\.3\.8: 8 slices; "
                                        r"1\.2\.3\.5: 5 slices"):
        read_scan(folder, series_uid="9.9")


def test_single_image_in_another_orientation_is_a_scout(tmp_path, rng):
    vol = _volume(rng)
    write_dicom_series(vol, tmp_path, series_uid="1.2.3.1")
    scout = write_localizer(tmp_path, name="topogram")
    _edit(scout, ImageType=["ORIGINAL", "PRIMARY", "OTHER"])  # not flagged as LOCALIZER
    got = read_scan(tmp_path)
    assert np.array_equal(got.array, vol.array)
    assert got.meta["skipped"] == ["topogram: scout: single image in another orientation"]


def test_slice_in_a_minority_orientation_is_skipped(tmp_path, rng):
    vol = _volume(rng)
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False)
    _edit(paths[5], ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    got = read_scan(tmp_path)
    assert got.meta["skipped"] == ["slice_0005.dcm: orientation or image size differs from the rest of its series"]
    assert np.array_equal(got.array, vol.array[:5])


def test_palette_colour_image_is_skipped(tmp_path, rng):
    paths = write_dicom_series(_volume(rng), tmp_path)
    _edit(paths[0], PhotometricInterpretation="PALETTE COLOR")
    assert read_scan(tmp_path).meta["skipped"] == [
        f"{paths[0].name}: photometric interpretation PALETTE COLOR is not monochrome"]


def test_duplicate_slice_is_dropped(tmp_path, rng):
    vol = _volume(rng)
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False)
    shutil.copy(paths[2], tmp_path / "zz_copy")
    _edit(tmp_path / "zz_copy", SOPInstanceUID=pydicom.uid.generate_uid())
    got = read_scan(tmp_path)
    assert np.array_equal(got.array, vol.array)
    assert got.meta["skipped"] == ["zz_copy: duplicate slice position -145.250 mm"]  # slice 2: -150.25 + 2 * 2.5


def test_missing_slice_is_interpolated(tmp_path, rng, caplog):
    vol = _volume(rng, shape=(7, 12, 10))
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False)
    paths[3].unlink()
    with caplog.at_level(logging.WARNING, logger="stages.ingest"):
        got = read_scan(tmp_path)
    assert got.meta["z_resampled"] and got.shape == vol.shape and got.spacing_mm == vol.spacing_mm
    keep = [0, 1, 2, 4, 5, 6]
    assert np.array_equal(got.array[keep], vol.array[keep])
    mean = np.rint((vol.array[2].astype(float) + vol.array[4]) / 2)
    assert np.array_equal(got.array[3], mean)
    assert "uneven slice spacing" in caplog.text


def test_truncated_slice_in_a_folder_is_repaired_and_flagged(tmp_path, rng):
    vol = _volume(rng, shape=(5, 12, 10))
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-50])
    got = read_scan(tmp_path)
    assert got.meta["repaired_slices"] == ["slice_0002.dcm: truncated file: pixel data has 190 of 240 bytes"]
    assert got.shape == vol.shape and got.meta["z_resampled"]


def test_uneven_spacing_is_resampled_linearly_at_true_positions(tmp_path):
    # HU rise 4 per mm along z, so linear interpolation at the regular positions is exact
    positions = np.array([0.0, 2.0, 4.1, 6.0, 8.0, 9.9, 12.0])
    n = len(positions)
    vol = Volume(np.zeros((n, 4, 4), np.int16), spacing_mm=(2.0, 1.0, 1.0))
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False, intercept=-2048)
    for path, z in zip(paths, positions):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0, 0, z]
        ds.PixelData = np.full((4, 4), round(4 * z) + 2048, np.uint16).tobytes()  # HU = rint(4 z)
        ds.save_as(path)
    got = read_scan(tmp_path)
    assert got.meta["z_resampled"] and got.shape[0] == 7 and got.spacing_mm[0] == pytest.approx(2.0)
    expected = np.rint([np.interp(2.0 * k, positions, np.rint(4 * positions)) for k in range(7)])
    assert np.array_equal(got.array[:, 0, 0], expected)


def test_gantry_tilt_is_refused(tmp_path, rng):
    vol = _volume(rng)
    for k, path in enumerate(write_dicom_series(vol, tmp_path, shuffle_names=False)):
        # slices advance 2.5 mm along z and drift along y: a 15 degree tilt
        x, y, z = vol.index_to_world([k, 0, 0])[::-1]
        _edit(path, ImagePositionPatient=[x, y + k * 2.5 * np.tan(np.radians(15)), z])
    with pytest.raises(ScanError, match=r"gantry tilt of 15\.0 degrees is not supported"):
        read_scan(tmp_path)


# ----------------------------------------------------------------------------- real DICOM files
def test_pydicom_ct_small_single_file():
    path = _data_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    got = read_scan(path)
    expected = np.clip(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), -1024, 3071)
    assert got.shape == (1, 128, 128) and np.array_equal(got.array[0], expected)
    assert got.scan_id == ds.SeriesInstanceUID
    assert got.spacing_mm[1:] == tuple(float(v) for v in ds.PixelSpacing)
    assert got.origin_mm == tuple(float(v) for v in ds.ImagePositionPatient)[::-1]
    assert got.meta["modality"] == "CT" and got.meta["manufacturer"] == str(ds.Manufacturer)
    text = repr(dict(got.meta))
    for private in (str(ds.PatientName), ds.PatientID, ds.get("PatientBirthDate", "")):
        assert not private or private not in text


def test_real_jpeg2000_lossless_ct_matches_its_uncompressed_twin():
    compressed, plain = read_scan(_data_file("693_J2KR.dcm")), read_scan(_data_file("693_UNCR.dcm"))
    assert compressed.meta["transfer_syntax"].startswith("JPEG 2000")
    assert np.array_equal(compressed.array, plain.array) and compressed.array.std() > 10


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the file's own odd UID
def test_real_jpeg_lossless_ct_decodes_like_pydicom():
    path = _data_file("bad_sequence.dcm")  # JPEG Lossless SV1, decoded by pylibjpeg-libjpeg
    ds = pydicom.dcmread(path)
    got = read_scan(path)
    expected = np.clip(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), -1024, 3071)
    assert got.meta["transfer_syntax"].startswith("JPEG Lossless") and np.array_equal(got.array[0], expected)


def test_folder_of_real_files_keeps_the_ct_and_reports_the_rest(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copy(_data_file(name), tmp_path / name)
    got = read_scan(tmp_path)
    assert got.shape == (1, 128, 128)
    assert got.meta["skipped"] == ["MR_small.dcm: modality MR is not CT",
                                   "rtplan.dcm: not an image (RTPLAN, RT Plan Storage)"]


def test_enhanced_ct_multiframe_geometry_from_functional_groups():
    path = _data_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    got = read_scan(path)
    # rows run along -x, so the slice normal is -z and the higher frame comes first
    assert got.shape == (2, 512, 512) and got.spacing_mm == pytest.approx((10.0, 0.388672, 0.388672))
    assert got.direction[:, 0] == pytest.approx([-1.0, 0.0, 0.0])
    for k, frame in [(0, 1), (1, 0)]:  # frame 0 lies at z = -159 mm, frame 1 at -149 mm
        groups = ds.PerFrameFunctionalGroupsSequence[frame]
        frame_z = float(groups.PlanePositionSequence[0].ImagePositionPatient[2])
        assert got.index_to_world([k, 0, 0])[0] == pytest.approx(frame_z)
        assert np.array_equal(got.array[k], np.clip(ds.pixel_array[frame].astype(int) - 1024, -1024, 3071))
    assert got.meta["slice_thickness_mm"] == pytest.approx(10.0)


def test_mr_file_is_not_ct():
    path = _data_file("MR_small.dcm")
    with pytest.raises(ScanError, match=r"MR_small\.dcm: modality MR is not CT$"):
        read_scan(path)


# ----------------------------------------------------------------------------- other formats
@pytest.mark.parametrize("name", ["scan42.mhd", "scan42.mha", "scan42.nrrd", "scan42.nii.gz", "scan42.nii"])
def test_sitk_formats_round_trip(tmp_path, rng, name):
    vol = _volume(rng, direction=np.diag([1.0, -1.0, 1.0]) @ _rot_z(30) @ np.diag([1.0, -1.0, 1.0]))
    write_volume(vol, tmp_path / name)
    got = read_scan(tmp_path / name)
    assert got.scan_id == "scan42" and np.array_equal(got.array, vol.array)
    assert got.same_geometry(vol, atol_mm=1e-4) and _same_world(got, vol)
    assert got.meta["format"] == name.split(".", 1)[1]


# ----------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(ScanError, match="nope: no such file or folder$"):
        read_scan(tmp_path / "nope")


@pytest.mark.parametrize("name", ["scan.dcm", "scan.mhd", "noext"])
def test_zero_byte_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ScanError, match=f"{name}: zero-byte file$"):
        read_scan(tmp_path / name)


def test_text_file_is_not_dicom(tmp_path):
    (tmp_path / "notes.dcm").write_text("not an image\n" * 30)
    with pytest.raises(ScanError, match=r"notes\.dcm: not a DICOM file$"):
        read_scan(tmp_path / "notes.dcm")


def test_truncated_single_file(tmp_path, rng):
    path = write_dicom_series(_volume(rng, shape=(1, 12, 10)), tmp_path)[0]
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ScanError, match=r"truncated file: pixel data has 140 of 240 bytes$"):
        read_scan(path)
    path.write_bytes(data[:400])  # cut inside the header
    with pytest.raises(ScanError, match=r"truncated file: header ends before the image attributes$"):
        read_scan(path)
    cut = data.index(b"\x08\x00\x3e\x10") + 3  # inside the tag of (0008,103E) Series Description
    path.write_bytes(data[:cut])
    with pytest.raises(ScanError, match=r"truncated file: header ends before the image attributes$"):
        read_scan(path)


def test_mr_series_folder_is_not_ct(tmp_path, rng):
    write_dicom_series(_volume(rng), tmp_path, modality="MR")
    with pytest.raises(ScanError, match=r"modality MR is not CT$"):
        read_scan(tmp_path)


def test_folder_without_image_series(tmp_path):
    write_rtstruct(tmp_path, name="rt")
    (tmp_path / "a.txt").write_text("x" * 300)
    with pytest.raises(ScanError, match=r"no CT image series found \(a\.txt: not a DICOM file; "
                                        r"rt: not an image \(RTSTRUCT, RT Structure Set Storage\)\)$"):
        read_scan(tmp_path)
    with pytest.raises(ScanError, match=r"no CT image series found \(empty folder\)$"):
        (tmp_path / "empty").mkdir()
        read_scan(tmp_path / "empty")


def test_localizer_alone_is_no_volume(tmp_path):
    with pytest.raises(ScanError, match=r"localizer \(ImageType LOCALIZER\)$"):
        read_scan(write_localizer(tmp_path))


def test_absurd_dicom_header_is_refused_before_pixels(tmp_path, rng):
    path = write_dicom_series(_volume(rng, shape=(1, 12, 10)), tmp_path)[0]
    _edit(path, Rows=60000, Columns=60000, NumberOfFrames=400)
    with pytest.raises(ScanError, match=r"header says 60000x60000x400 = 1440000000000 voxels, "
                                        r"more than max_voxels=1000000000$"):
        read_scan(path)


def test_max_voxels_applies_to_the_whole_series(tmp_path, rng):
    write_dicom_series(_volume(rng), tmp_path)
    with pytest.raises(ScanError, match=r"header says 10x12x6 = 720 voxels, more than max_voxels=500$"):
        read_scan(tmp_path, max_voxels=500)
    with pytest.raises(ValueError, match="max_voxels must be a positive"):
        read_scan(tmp_path, max_voxels=0)


def test_absurd_metaimage_header_is_refused_before_reading_data(tmp_path):
    # the .raw file does not even exist: only the header may be read
    (tmp_path / "huge.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_SHORT\n"
        "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")
    with pytest.raises(ScanError, match=r"header says 100000x100000x100000 = 1000000000000000 voxels"):
        read_scan(tmp_path / "huge.mhd")


def test_metaimage_with_a_missing_or_short_data_file_says_which(tmp_path, rng):
    vol = _volume(rng)
    write_volume(vol, tmp_path / "x.mhd")
    raw = (tmp_path / "x.raw").read_bytes()
    (tmp_path / "x.raw").write_bytes(raw[:-10])
    with pytest.raises(ScanError, match=rf"x\.mhd: its data file x\.raw holds {len(raw) - 10} bytes, "
                                        rf"the header needs {len(raw)} \(truncated\)$"):
        read_scan(tmp_path / "x.mhd")
    (tmp_path / "x.raw").unlink()
    with pytest.raises(ScanError, match=r"x\.mhd: its data file x\.raw \(ElementDataFile\) is missing$"):
        read_scan(tmp_path / "x.mhd")


def test_truncated_gzip_nifti_and_nan_voxels_are_refused(tmp_path, rng):
    write_volume(_volume(rng), tmp_path / "x.nii.gz")
    data = (tmp_path / "x.nii.gz").read_bytes()
    (tmp_path / "x.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError, match=r"x\.nii\.gz: truncated or corrupt gzip data"):
        read_scan(tmp_path / "x.nii.gz")
    arr = rng.normal(-500, 100, size=(6, 8, 8)).astype(np.float32)
    arr[2, 3, 4] = np.nan
    write_volume(Volume(arr, spacing_mm=(2.0, 1.0, 1.0)), tmp_path / "f.nrrd")
    with pytest.raises(ScanError, match=r"f\.nrrd: 1 voxels are NaN or infinite"):
        read_scan(tmp_path / "f.nrrd")


def test_nrrd_that_is_not_a_volume(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(ScanError, match=r"flat\.nrrd: image has 2 dimensions, a CT volume needs 3$"):
        read_scan(tmp_path / "flat.nrrd")
    (tmp_path / "junk.nrrd").write_text("this is not nrrd\n")
    with pytest.raises(ScanError, match=r"junk\.nrrd: unreadable nrrd file"):
        read_scan(tmp_path / "junk.nrrd")


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
def test_files_without_preamble_are_read(tmp_path, rng, implicit):
    """Older archives hold bare data sets: no 128-byte preamble, no 'DICM', no file meta."""
    from pydicom.dataset import FileMetaDataset

    vol = _volume(rng)
    files = write_dicom_series(vol, tmp_path / "full", series_uid="1.2.826.0.1.3680043.2.1125.77")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.preamble, ds.file_meta = None, FileMetaDataset()
        ds.save_as(bare / f.name, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
        assert (bare / f.name).read_bytes()[128:132] != b"DICM"
    got, expected = read_scan(bare), read_scan(tmp_path / "full")
    assert np.array_equal(got.array, expected.array) and _same_world(got, expected)
    assert got.scan_id == expected.scan_id and got.meta["skipped"] == []
    # junk without a preamble is still refused, with the reason
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"\x08\x00\x05\x00" + bytes(range(200)))
    with pytest.raises(ScanError, match="not a DICOM file"):
        read_scan(tmp_path / "junk")


def test_unknown_transfer_syntax_is_named_in_our_words(tmp_path, rng):
    vol = _volume(rng)
    files = write_dicom_series(vol, tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.1125.999"  # a private syntax
        ds.save_as(f)
    with pytest.raises(ScanError) as info:
        read_scan(tmp_path)
    msg = str(info.value)
    assert "unknown transfer syntax 1.2.826.0.1.3680043.2.1125.999" in msg
    assert "UID is not a transfer syntax" not in msg and "\n" not in msg


def test_a_series_mixing_image_sizes_is_refused(tmp_path, rng):
    vol = _volume(rng)
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False, series_uid="1.2.826.0.1.3680043.2.1125.5")
    for p in paths[2:4]:  # two slices stored at half the matrix (same orientation)
        ds = pydicom.dcmread(p)
        small = np.ascontiguousarray(ds.pixel_array[::2, ::2])
        ds.Rows, ds.Columns = small.shape
        ds.PixelData = small.tobytes()
        ds.save_as(p)
    rows, cols = vol.shape[1:]
    with pytest.raises(ScanError, match=rf"series 1\.2\.826\.0\.1\.3680043\.2\.1125\.5 mixes image sizes "
                                        rf"\(4 slices of {cols}x{rows}, 2 slices of {cols // 2}x{rows // 2}\)"):
        read_scan(tmp_path)
