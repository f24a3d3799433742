"""read_rtstruct: RTSTRUCT polygons to masks on the scan's grid."""
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from stages.contours import read_rtstruct
from stages.errors import ScanError
from stages.volume import Volume


def _rtstruct(path, rois, modality="RTSTRUCT"):
    """Write a minimal RTSTRUCT: ``rois`` is ``{name: [contour xyz points (n, 3), ...]}``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = modality
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = Sequence()
        for pts in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.4f}" for v in np.asarray(pts, float).ravel()]
            item.ContourSequence.append(c)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def _square(x0, x1, y0, y1, z):
    return [(x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z)]


@pytest.fixture
def ct():
    # 2 x 1 x 1 mm voxels; world (x, y, z) of voxel (k, j, i) = (10 + i, -5 + j, 100 + 2 k)
    return Volume(np.zeros((6, 40, 50), np.int16), spacing_mm=(2.0, 1.0, 1.0), origin_mm=(100.0, -5.0, 10.0))


def test_square_with_a_hole_lands_on_its_slice(ct, tmp_path):
    outer, inner = _square(19.5, 39.5, 4.5, 24.5, 104.0), _square(24.5, 29.5, 9.5, 14.5, 104.0)
    path = _rtstruct(tmp_path / "rs.dcm", {"GTV-1": [outer, inner], "Lung": [_square(9.5, 12.5, -5.5, -2.5, 110.0)]})
    masks = read_rtstruct(path, ct)
    assert set(masks) == {"GTV-1", "Lung"}
    gtv = masks["GTV-1"]
    assert gtv.same_geometry(ct) and gtv.array.dtype == np.uint8
    assert np.flatnonzero(gtv.array.any(axis=(1, 2))).tolist() == [2]  # z = 104 mm is slice 2
    # pixel centres strictly inside: x 20..39 (index 10..29), y 5..24 (index 10..29), minus the hole
    expected = np.zeros((40, 50), np.uint8)
    expected[10:30, 10:30] = 1
    expected[15:20, 15:20] = 0
    assert np.array_equal(gtv.array[2], expected)
    assert masks["Lung"].array[5].sum() == 9  # 3 x 3 pixels on the last slice
    assert list(read_rtstruct(path, ct, names=["Lung"])) == ["Lung"]


def test_errors_name_the_file_and_reason(ct, tmp_path):
    off = _rtstruct(tmp_path / "off.dcm", {"GTV-1": [_square(20, 30, 5, 15, 103.0)]})  # between slices 1 and 2
    with pytest.raises(ScanError, match=r"off\.dcm: ROI GTV-1: a contour at z=103\.00 mm lies on no slice"):
        read_rtstruct(off, ct)
    with pytest.raises(ScanError, match=r"no ROI named GTV-2 \(has GTV-1\)"):
        read_rtstruct(off, ct, names=["GTV-2"])
    image = _rtstruct(tmp_path / "ct.dcm", {}, modality="CT")
    with pytest.raises(ScanError, match=r"ct\.dcm: not an RTSTRUCT \(modality CT\)"):
        read_rtstruct(image, ct)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ScanError, match=r"junk\.dcm: not"):
        read_rtstruct(junk, ct)


def test_pycerr_tumours_have_their_published_sizes(pycerr):
    """The four GTVs' equivalent-sphere diameters (mm), as measured by pycerr's own tools."""
    from stages.ingest import read_scan

    expected = {"pat_1": 88.2, "pat_2": 23.1, "pat_3": 28.1, "pat_4": 61.8}
    for name, folder in pycerr.items():
        ct = read_scan(folder)
        (rs,) = sorted(folder.glob("DCM_RS_*.dcm"))
        gtv = read_rtstruct(rs, ct, names=["GTV-1"])["GTV-1"]
        ml = gtv.array.sum() * np.prod(ct.spacing_mm) / 1000
        assert (6 * ml * 1000 / np.pi) ** (1 / 3) == pytest.approx(expected[name], abs=0.5)
