"""Write a :class:`~stages.volume.Volume` as a CT DICOM series (and a few odd DICOM objects).

Used by tests and benchmarks to build DICOM folders from data we may share (lung1,
synthetic phantoms); nothing written here holds patient-identifying values.

Geometry (LPS mm) goes to the tags exactly:

* (0020,0037) *Image Orientation (Patient)*: the world direction of a row (increasing
  column index, array axis ``x``) then of a column (increasing row index, axis ``y``),
  each in ``(x, y, z)`` components;
* (0020,0032) *Image Position (Patient)*: world ``(x, y, z)`` of the first voxel of each slice;
* (0028,0030) *Pixel Spacing*: ``[row spacing (y), column spacing (x)]`` in mm;
* (0018,0050) *Slice Thickness* and (0018,0088) *Spacing Between Slices*: ``spacing_mm[0]``.

Stored values are ``(hu - intercept) / slope``, which must come out whole numbers;
they are written as uint16 (Pixel Representation 0) when all are >= 0, else int16.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path

__all__ = ["write_dicom_series", "write_localizer", "write_rtstruct"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}


def _base_dataset(sop_class_uid: str, modality: str, *, study_uid: str, series_uid: str,
                  frame_of_reference_uid: str | None):
    """A file dataset with anonymous patient/study modules filled in."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientName = "ANON"
    ds.PatientID = "ANON"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = "20000101"
    ds.StudyTime = ds.SeriesTime = "000000"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if frame_of_reference_uid:
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "lungscreen"
    return ds


def _save_atomic(ds, path: Path) -> Path:
    """``ds.save_as`` through :func:`pipeline.io.atomic_path` (a temporary name, then rename)."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) as exact as fits."""
    for digits in range(16, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def write_dicom_series(vol, folder, *, slope: float = 1.0, intercept: float = -1024.0,
                       shuffle_names: bool = True, series_uid: str | None = None,
                       study_uid: str | None = None, seed: int = 0, modality: str = "CT",
                       transfer_syntax=None, per_slice_rescale: bool = False) -> list[Path]:
    """Write ``vol`` (int16 HU) as one DICOM file per slice in ``folder``.

    Parameters
    ----------
    vol : Volume
        HU values in ``vol.array`` (integers), with its spacing/origin/direction (LPS).
    folder : str or Path
        Created if missing; existing files are kept (several series may share a folder).
    slope, intercept : float
        (0028,1053) *Rescale Slope* and (0028,1052) *Rescale Intercept* written; stored
        values are ``(hu - intercept) / slope`` and must be whole numbers.
    shuffle_names : bool
        Random 16-hex-digit file names without extension (drawn from ``seed``) instead of
        ``slice_0000.dcm`` ..., so a reader cannot rely on the name order.
    series_uid, study_uid : str, optional
        UIDs to use; new random ones by default.
    seed : int
        Seed for the shuffled names.
    modality : {"CT", "MR"}
        (0008,0060) *Modality*; "MR" exists to test readers' refusal.
    transfer_syntax : str or pydicom UID, optional
        Compress with this syntax (``pydicom.uid.RLELossless``, ``JPEG2000Lossless``...);
        Explicit VR Little Endian (uncompressed) by default.
    per_slice_rescale : bool
        Give slices different slopes (``slope``, ``slope/2``, ``slope/4``) and intercepts
        (``intercept - 16 * (k % 4)``), as some scanners do, to test per-slice rescaling.

    Returns
    -------
    list of Path
        The files, in slice order (index 0 first).

    Raises
    ------
    TypeError
        If ``vol.array`` does not hold integers.
    ValueError
        If the modality is unknown, or stored values are not whole or do not fit 16 bits.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from stages.volume import Volume
    >>> vol = Volume(np.full((2, 4, 4), -1000, np.int16), spacing_mm=(2.5, 0.7, 0.7))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     len(write_dicom_series(vol, tmp))
    2
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(vol.array)
    if hu.dtype.kind not in "iu":
        raise TypeError(f"vol.array must hold integer HU, got dtype {hu.dtype}; round it first")
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    if not np.isfinite(slope) or slope == 0:
        raise ValueError(f"slope must be finite and non-zero, got {slope}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = hu.shape
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()

    # rescale per slice, then one stored dtype for the whole series
    slopes = np.full(nz, float(slope))
    intercepts = np.full(nz, float(intercept))
    if per_slice_rescale:
        k = np.arange(nz)
        slopes = slope / 2.0 ** (k % 3)
        intercepts = intercept - 16.0 * (k % 4)
    def stored_slice(k: int) -> np.ndarray:
        return (hu[k].astype(np.float64) - intercepts[k]) / slopes[k]

    lo, hi = np.inf, -np.inf
    for k in range(nz):  # slice by slice: a 512x512x300 float64 copy would be 600 MB
        s = stored_slice(k)
        if not np.array_equal(s, np.rint(s)):
            raise ValueError(f"(hu - intercept) / slope is not a whole number for slope={slopes[k]}, "
                             f"intercept={intercepts[k]}; choose a slope that divides every HU step")
        lo, hi = min(lo, s.min()), max(hi, s.max())
    if lo >= 0 and hi <= 65535:
        stored_dtype, pixel_rep = np.uint16, 0
    elif lo >= -32768 and hi <= 32767:
        stored_dtype, pixel_rep = np.int16, 1
    else:
        raise ValueError(f"stored values span {lo}..{hi}, beyond 16 bits; "
                         f"change slope={slope} / intercept={intercept}")

    d = np.asarray(vol.direction)           # columns: world (z, y, x) of array axes z, y, x
    row_xyz = d[::-1, 2]                     # along a row: increasing column index (x)
    col_xyz = d[::-1, 1]                     # down a column: increasing row index (y)
    slice_xyz = d[::-1, 0] * vol.spacing_mm[0]
    origin_xyz = np.asarray(vol.origin_mm)[::-1]

    if shuffle_names:
        rng = np.random.default_rng(seed)
        names = []  # a list, not a set: a set's order follows the per-process string hash
        while len(names) < nz:
            name = "".join(f"{b:02x}" for b in rng.integers(0, 256, 8))
            if name not in names:
                names.append(name)
    else:
        names = [f"slice_{k:04d}.dcm" for k in range(nz)]

    meta = dict(vol.meta)
    paths = []
    for k in range(nz):
        ds = _base_dataset(_SOP_CLASS[modality], modality, study_uid=study_uid, series_uid=series_uid,
                           frame_of_reference_uid=for_uid)
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = str(meta.get("series_description", "lungscreen test series"))[:64]
        if meta.get("kernel"):
            ds.ConvolutionKernel = str(meta["kernel"])[:16]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_xyz, *col_xyz)]
        ds.ImagePositionPatient = [_ds(v) for v in origin_xyz + k * slice_xyz]
        ds.SliceLocation = _ds(float(np.dot(origin_xyz + k * slice_xyz, np.cross(row_xyz, col_xyz))))
        ds.PixelSpacing = [_ds(vol.spacing_mm[1]), _ds(vol.spacing_mm[2])]
        ds.SliceThickness = _ds(vol.spacing_mm[0])
        ds.SpacingBetweenSlices = _ds(vol.spacing_mm[0])
        ds.RescaleSlope = _ds(slopes[k])
        ds.RescaleIntercept = _ds(intercepts[k])
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        pixels = np.ascontiguousarray(stored_slice(k).astype(stored_dtype))
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels)
        paths.append(_save_atomic(ds, folder / names[k]))
    return paths


def write_localizer(folder, *, study_uid: str | None = None, name: str = "localizer",
                    shape=(64, 96), spacing_mm: float = 2.0) -> Path:
    """Write one coronal scout image (ImageType ``ORIGINAL\\PRIMARY\\LOCALIZER``) into ``folder``.

    Its own series, orientation ``[1, 0, 0, 0, 0, -1]`` (coronal), values a smooth ramp.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(CT_IMAGE_STORAGE, "CT", study_uid=study_uid or generate_uid(),
                       series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    rows, cols = shape
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = ["-100", "0", "100"]
    ds.PixelSpacing = [_ds(spacing_mm), _ds(spacing_mm)]
    ds.SliceThickness = "1"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ramp = (np.add.outer(np.arange(rows), np.arange(cols)) * 7 % 2000).astype(np.uint16)
    ds.PixelData = ramp.tobytes()
    return _save_atomic(ds, folder / name)


def write_rtstruct(folder, *, study_uid: str | None = None, name: str = "rtstruct") -> Path:
    """Write a minimal RT Structure Set (no Pixel Data, Modality ``RTSTRUCT``) into ``folder``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(RT_STRUCTURE_SET_STORAGE, "RTSTRUCT", study_uid=study_uid or generate_uid(),
                       series_uid=generate_uid(), frame_of_reference_uid=None)
    ds.SeriesNumber = 100
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "nodules"
    ds.StructureSetDate, ds.StructureSetTime = "20000101", "000000"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = "nodule"
    roi.ReferencedFrameOfReferenceUID = generate_uid()
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])
    return _save_atomic(ds, folder / name)
