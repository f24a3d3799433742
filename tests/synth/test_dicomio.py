import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless

from synth.dicomio import write_dicom_series, write_localizer, write_rtstruct
from stages.volume import Volume


def _volume(rng, shape=(4, 6, 5), direction=None):
    hu = rng.integers(-1024, 3072, shape).astype(np.int16)
    return Volume(hu, spacing_mm=(2.5, 0.75, 0.6), origin_mm=(-120.0, 30.5, -40.25),
                  direction=np.eye(3) if direction is None else direction, scan_id="t",
                  meta={"kernel": "B30f", "series_description": "chest"})


def _by_instance(paths):
    return sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: int(ds.InstanceNumber))


def test_tags_carry_geometry_and_rescale(tmp_path, rng):
    th = np.radians(20)
    direction = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    vol = _volume(rng, direction=direction)
    paths = write_dicom_series(vol, tmp_path, shuffle_names=False)
    assert [p.name for p in paths] == [f"slice_{k:04d}.dcm" for k in range(4)]
    slices = _by_instance(paths)
    for k, ds in enumerate(slices):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
        assert str(ds.PatientName) == "ANON" and ds.PatientBirthDate == ""
        # rows along array x = direction column 2, columns along y = column 1, in (x, y, z)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient],
                           [*direction[::-1, 2], *direction[::-1, 1]], atol=1e-12)
        world_xyz = vol.index_to_world([k, 0, 0])[::-1]
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], world_xyz, atol=1e-9)
        assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.6]
        assert float(ds.SliceThickness) == 2.5 and ds.ConvolutionKernel == "B30f"
        assert ds.PixelRepresentation == 0 and ds.pixel_array.dtype == np.uint16
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, vol.array[k])
    assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    assert len({ds.SOPInstanceUID for ds in slices}) == 4


def test_simpleitk_reads_the_series_with_the_same_geometry(tmp_path, rng):
    vol = _volume(rng, direction=np.diag([1.0, -1.0, -1.0]))
    write_dicom_series(vol, tmp_path, series_uid="1.2.3.4", study_uid="1.2.3")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path), "1.2.3.4"))
    img = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(img), vol.array)
    spacing, origin, direction = vol.sitk_geometry()
    assert np.allclose(img.GetSpacing(), spacing) and np.allclose(img.GetOrigin(), origin)
    assert np.allclose(img.GetDirection(), direction)


def test_shuffled_names_are_random_but_seeded(tmp_path, rng):
    vol = _volume(rng)
    a = write_dicom_series(vol, tmp_path / "a", seed=3)
    b = write_dicom_series(vol, tmp_path / "b", seed=3)
    c = write_dicom_series(vol, tmp_path / "c", seed=4)
    assert [p.name for p in a] == [p.name for p in b] != [p.name for p in c]
    assert [p.name for p in a] != sorted(p.name for p in a)  # slice order is not name order
    assert all(len(p.name) == 16 and not p.name.startswith("slice") for p in a)
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == sorted(p.name for p in a)  # no temp files


def test_negative_stored_values_use_int16(tmp_path, rng):
    vol = _volume(rng)
    ds = pydicom.dcmread(write_dicom_series(vol, tmp_path, intercept=0.0)[0])
    assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
    assert np.array_equal(ds.pixel_array, vol.array[0])


def test_per_slice_rescale_differs_and_is_exact(tmp_path, rng):
    vol = _volume(rng, shape=(6, 4, 4))
    slices = _by_instance(write_dicom_series(vol, tmp_path, per_slice_rescale=True))
    assert len({(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in slices}) == 6
    for k, ds in enumerate(slices):
        assert np.array_equal(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                              vol.array[k])


def test_compressed_transfer_syntax(tmp_path, rng):
    vol = _volume(rng)
    ds = _by_instance(write_dicom_series(vol, tmp_path, transfer_syntax=RLELossless))[1]
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(ds.pixel_array.astype(int) - 1024, vol.array[1])


def test_bad_arguments(tmp_path, rng):
    vol = _volume(rng)
    with pytest.raises(ValueError, match="not a whole number"):
        write_dicom_series(vol, tmp_path, slope=3.0)
    with pytest.raises(ValueError, match="beyond 16 bits"):
        write_dicom_series(vol, tmp_path, slope=1 / 32)
    with pytest.raises(ValueError, match="modality must be one of"):
        write_dicom_series(vol, tmp_path, modality="PT")
    with pytest.raises(TypeError, match="must hold integer HU"):
        write_dicom_series(vol.with_array(vol.array.astype(np.float32)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_localizer_and_rtstruct(tmp_path):
    loc = pydicom.dcmread(write_localizer(tmp_path, study_uid="1.2.3"))
    assert "LOCALIZER" in loc.ImageType and [float(v) for v in loc.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert loc.pixel_array.shape == (64, 96) and loc.StudyInstanceUID == "1.2.3"
    rt = pydicom.dcmread(write_rtstruct(tmp_path))
    assert rt.Modality == "RTSTRUCT" and "PixelData" not in rt and "Rows" not in rt
    assert str(rt.PatientName) == "ANON"


def test_shuffled_names_do_not_depend_on_the_process_string_hash(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys, numpy as np; from stages.volume import Volume; "
            "from synth.dicomio import write_dicom_series; "
            "v = Volume(np.zeros((6, 4, 4), np.int16), spacing_mm=(1, 1, 1)); "
            "print(','.join(p.name for p in write_dicom_series(v, sys.argv[1], seed=3)))")
    names = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], env=env,
                             capture_output=True, text=True, check=True)
        names.append(out.stdout.strip().splitlines()[-1])
    assert names[0] == names[1] and len(names[0].split(",")) == 6
