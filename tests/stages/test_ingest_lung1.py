"""read_scan on the real lung1 chest CT (512x512x48, 0.57x0.57x5 mm), in every format we accept."""
import numpy as np
import pytest
import SimpleITK as sitk

from synth.dicomio import write_dicom_series
from pipeline.io import write_volume
from stages.ingest import read_scan
from stages.volume import Volume

# a few voxels spread over the scan, including corners and the nodule's neighbourhood
PROBES = np.array([[0, 0, 0], [47, 511, 511], [24, 256, 256], [10, 300, 100], [33, 90, 420]])


@pytest.fixture(scope="module")
def lung1_ct(lung1):
    return read_scan(lung1[0])


@pytest.fixture(scope="module")
def lung1_dicom(lung1_ct, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lung1_dicom")
    write_dicom_series(lung1_ct, folder, shuffle_names=True, seed=11, series_uid="1.2.826.0.1.3680043.2.1125.48")
    return folder


def _geometry_close(a: Volume, b: Volume, atol=1e-4):
    return (a.shape == b.shape and np.allclose(a.spacing_mm, b.spacing_mm, atol=atol)
            and np.allclose(a.origin_mm, b.origin_mm, atol=atol) and np.allclose(a.direction, b.direction, atol=1e-6))


def test_lung1_nrrd_matches_simpleitk(lung1, lung1_ct):
    img = sitk.ReadImage(str(lung1[0]))
    assert lung1_ct.scan_id == "lung1_image" and lung1_ct.shape == (48, 512, 512)
    assert np.array_equal(lung1_ct.array, sitk.GetArrayFromImage(img))  # already HU in [-1024, 3071]
    for ours, theirs in zip(lung1_ct.sitk_geometry(), (img.GetSpacing(), img.GetOrigin(), img.GetDirection())):
        assert ours == pytest.approx(theirs)


def test_lung1_as_shuffled_dicom_reads_back_bit_identical(lung1_ct, lung1_dicom):
    got = read_scan(lung1_dicom)
    assert got.scan_id == "1.2.826.0.1.3680043.2.1125.48"
    assert got.array.dtype == np.int16 and np.array_equal(got.array, lung1_ct.array)
    assert _geometry_close(got, lung1_ct) and not got.meta["z_resampled"] and got.meta["skipped"] == []


@pytest.mark.parametrize("name", ["lung1.mhd", "lung1.nii.gz", "lung1.nrrd"])
def test_lung1_in_every_format_has_the_same_voxels_in_the_same_place(lung1_ct, lung1_dicom, tmp_path, name):
    write_volume(lung1_ct, tmp_path / name)
    got = read_scan(tmp_path / name)
    dicom = read_scan(lung1_dicom)
    assert got.scan_id == "lung1"
    for other in (lung1_ct, dicom):
        assert np.array_equal(got.array, other.array)
        assert np.allclose(got.index_to_world(PROBES), other.index_to_world(PROBES), atol=1e-4)
    assert np.array_equal(got.array[tuple(PROBES.T)], lung1_ct.array[tuple(PROBES.T)])


def test_lung1_dicom_resampled_to_1mm_matches_simpleitk(lung1, lung1_dicom):
    from stages.resample import resample

    ct = read_scan(lung1_dicom)
    ours = resample(ct, spacing_mm=(1.0, 1.0, 1.0), order=1, device="cpu")

    img = sitk.ReadImage(str(lung1[0]))
    spacing, origin, direction = ours.sitk_geometry()
    ref = sitk.Image(ours.shape[::-1], sitk.sitkUInt8)
    ref.SetSpacing(spacing), ref.SetOrigin(origin), ref.SetDirection(direction)
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, sitk.Transform(),
                                                  sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
    assert ours.array.dtype == np.int16 and ours.shape == theirs.shape
    assert np.abs(ours.array - theirs).mean() < 1.0

    # the nodule: label resampled with nearest keeps its world centroid
    label_img = sitk.ReadImage(str(lung1[1]))
    label = Volume.from_sitk_geometry((sitk.GetArrayFromImage(label_img) > 0).astype(np.uint8),
                                      label_img.GetSpacing(), label_img.GetOrigin(), label_img.GetDirection())
    label_1mm = resample(label, spacing_mm=(1.0, 1.0, 1.0), order=0, device="cpu")
    assert label_1mm.array.sum() > 100

    def world_centroid(v):
        return v.index_to_world(np.argwhere(v.array > 0).mean(axis=0))

    assert np.linalg.norm(world_centroid(label_1mm) - world_centroid(label)) < 0.5
