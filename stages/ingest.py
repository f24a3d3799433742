"""Read a CT scan from disk into a :class:`~stages.volume.Volume` of int16 Hounsfield units.

Accepted inputs
---------------
* a DICOM folder: any file names, any order, nested folders, several series;
* a single DICOM file (one slice, or a multi-frame / Enhanced CT file);
* MetaImage ``.mhd``/``.mha`` (LUNA16), NRRD ``.nrrd``/``.nhdr``, NIfTI ``.nii``/``.nii.gz``
  (read with SimpleITK; NIfTI's RAS is turned into LPS by SimpleITK).

DICOM quirks handled, by tag
----------------------------
(0020,000E) *Series Instance UID*
    Files are grouped by series.  Unless ``series_uid`` is given, the axial CT series with
    the most slices is chosen (logged); the others are listed in ``meta["other_series"]``.
(0008,0060) *Modality*, (0008,0016) *SOP Class UID*
    Non-image objects (RTSTRUCT, SR, SEG, presentation states, DICOMDIR: no (0028,0010)
    *Rows*) and images of other modalities (``"modality MR is not CT"``) are skipped.
(0008,0008) *Image Type*
    ``LOCALIZER`` images (scouts, topograms) are skipped; so is a single-image series in an
    orientation other than the chosen series'.
(0020,0037) *Image Orientation (Patient)*, (0020,0032) *Image Position (Patient)*
    Slices are ordered by the projection of their position on the slice normal
    (row x column direction), never by file name or (0020,0013) *Instance Number*.
    Slices of a series in a minority orientation are skipped.  Two slices at the same
    position (within ``DUPLICATE_TOLERANCE_MM``): the first (by file name) is kept.
    The returned grid is right-handed: its z axis is the slice normal.
Slice gaps
    A gap above ``GAP_FACTOR`` times the median slice distance (a missing slice) or a spread
    of distances above ``SPACING_SPREAD`` (1 %) is logged and the volume is linearly
    interpolated along z onto a regular grid at the median distance, using the true
    positions; ``meta["z_resampled"]`` is then True.
Gantry tilt
    Slice positions that do not advance along the slice normal (angle above
    ``GANTRY_TILT_TOLERANCE_DEG``) are refused: ``ScanError(path, "gantry tilt of X degrees
    is not supported")``.  Chest screening CT is acquired without tilt; resampling a sheared
    grid silently would move nodules.
(0028,0030) *Pixel Spacing*
    ``[row spacing, column spacing]``: spacing along y then x.
(0028,1052/1053) *Rescale Intercept/Slope*, (0028,0120) *Pixel Padding Value*
    Applied per slice by :func:`stages.hounsfield.to_hounsfield`; absent rescale tags mean
    slope 1, intercept 0.
Transfer syntaxes
    Compressed data (JPEG lossless, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom with
    the pylibjpeg plugins.  Native data shorter than Rows x Columns x bytes is a truncated
    file.
Corrupt slices
    Pixel data that cannot be decoded (a decoder error, even a Rust panic), is truncated, or
    decodes without error to garbage (a compressed slice unlike both its neighbours, see
    ``GARBLED_FACTOR``) makes its slice unusable.  A few unusable slices inside a series
    (at most ``REPAIR_MAX_FRACTION`` of it, none next to another) are replaced by linear
    interpolation from their neighbours and listed in ``meta["repaired_slices"]``
    (``"file name: reason"``), which the run's ``scan.json``, ``run.json`` and report flag;
    more, or two in a row, and the scan is refused.  What decoders print is kept off the
    console: the reason is given once, in our words.

Errors
------
Bad input raises :class:`stages.errors.ScanError` with a one-line reason: missing path,
zero-byte file, non-DICOM file, truncated file, non-CT modality, no CT image series, gantry
tilt, header dimensions above ``max_voxels`` (checked from headers before any pixel is
read).  In a folder, bad files are skipped and listed in ``meta["skipped"]`` as
``"file name: reason"`` (names only: folder names may identify patients); the folder fails
only when no CT series remains.

``meta`` holds modality, manufacturer, kernel, slice thickness, series description, number
of slices and the skipped list (DICOM: each slice's position along the slice normal, mm, and
(0020,0013) *Instance Number*, in slice order); never patient name, ID, birth date or
accession number.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.errors import ScanError
from stages.hounsfield import CLIP_HU, to_hounsfield
from stages.volume import AIR_HU, MAX_VOXELS, Volume

__all__ = ["read_scan", "MAX_VOXELS"]

log = logging.getLogger(__name__)

#: Slices closer than this along the normal are duplicates, mm.
DUPLICATE_TOLERANCE_MM = 0.01
#: A slice distance above this multiple of the median marks missing slices.
GAP_FACTOR = 1.5
#: (largest - smallest slice distance) / median above this is uneven spacing.
SPACING_SPREAD = 0.01
#: Angle between the slice normal and the line through the slice positions above which the
#: series counts as acquired with gantry tilt, degrees.
GANTRY_TILT_TOLERANCE_DEG = 0.1
#: A series is axial when its slice normal is within 45 degrees of the patient's z axis.
AXIAL_MIN_COS = math.cos(math.radians(45.0))
#: Row and column directions whose dot product exceeds this are not orthogonal.
ORTHOGONAL_TOLERANCE = 1e-3

#: Slices of the chosen series whose pixel data cannot be read (corrupt or truncated
#: compressed data) are replaced by interpolation from their neighbours when they are few:
#: at most this fraction of the series (at least one slice), never two next to each other.
#: More, or two in a row, and the scan is refused.  Repaired slices are listed in
#: ``meta["repaired_slices"]``, which the run's outputs and report flag.
REPAIR_MAX_FRACTION = 0.02

SITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "SEG", "PR", "KO",
                        "REG", "FID", "DOC", "PLAN"}


class _Skip(Exception):
    """Internal: this file (or frame) is not part of a CT volume, for the given reason."""


@dataclass
class _Slice:
    """One image plane: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    series_uid: str
    modality: str
    row_xyz: np.ndarray
    col_xyz: np.ndarray
    ipp_xyz: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    padding_value: int | None
    photometric: str
    bits_stored: int | None
    header: object  # the pydicom Dataset without pixel data (shared by a file's frames)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_xyz, self.col_xyz)

    @property
    def orientation_key(self) -> tuple:
        return tuple(np.round(np.concatenate([self.row_xyz, self.col_xyz]), 3)) + (self.rows, self.cols)


# ---------------------------------------------------------------------------- public API
def read_scan(path, series_uid: str | None = None, *, max_voxels: int = MAX_VOXELS,
              clip_hu=CLIP_HU, air_hu: int = AIR_HU) -> Volume:
    """Read a CT scan (DICOM folder or file, MetaImage, NRRD, NIfTI) as int16 HU.

    Parameters
    ----------
    path : str or Path
        A folder of DICOM files (searched recursively), one DICOM file, or a
        ``.mhd/.mha/.nrrd/.nhdr/.nii/.nii.gz`` file.
    series_uid : str, optional
        (0020,000E) *Series Instance UID* to read from a folder holding several series;
        by default the axial CT series with the most slices.
    max_voxels : int
        Largest number of voxels accepted, judged from the headers before pixels are read.
    clip_hu : (int, int)
        HU range kept, passed to :func:`stages.hounsfield.to_hounsfield`.
    air_hu : int
        HU for outside-field-of-view padding, passed to :func:`stages.hounsfield.to_hounsfield`.

    Returns
    -------
    Volume
        ``array`` int16 HU (z, y, x) on a regular right-handed grid; ``scan_id`` the
        SeriesInstanceUID (DICOM) or the file stem (``x.nii.gz`` -> ``x``); ``meta`` with
        ``format``, ``modality``, ``manufacturer``, ``kernel``, ``slice_thickness_mm``,
        ``series_description``, ``number_of_slices``, ``skipped`` (list of
        ``"file name: reason"``), ``other_series``, ``z_resampled``.

    Raises
    ------
    ScanError
        For any input that cannot give a CT volume (reason in the message).
    ValueError
        If ``max_voxels`` is not positive.

    Examples
    --------
    >>> read_scan("/no/such/scan.mhd")
    Traceback (most recent call last):
    ...
    stages.errors.ScanError: /no/such/scan.mhd: no such file or folder
    """
    if int(max_voxels) <= 0:
        raise ValueError(f"max_voxels must be a positive number of voxels, got {max_voxels}")
    hu_opts = {"clip_hu": tuple(clip_hu), "air_hu": int(air_hu)}
    to_hounsfield(np.zeros((1, 1), np.int16), **hu_opts)  # check the HU options up front
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as exc:  # a name the file system refuses (too long)
        raise ScanError(path, f"no such file or folder ({(exc.strerror or 'bad name').lower()})") from None
    if not exists:
        raise ScanError(path, "no such file or folder")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: str(p))
        return _read_dicom(path, files, series_uid, int(max_voxels), hu_opts, strict=False)
    if path.stat().st_size == 0:
        raise ScanError(path, "zero-byte file")
    if path.name.lower().endswith(SITK_SUFFIXES):
        if series_uid is not None:
            raise ValueError(f"series_uid applies to DICOM input only, got {series_uid!r} for {path.name}")
        return _read_sitk(path, int(max_voxels), hu_opts)
    return _read_dicom(path, [path], series_uid, int(max_voxels), hu_opts, strict=True)


# ---------------------------------------------------------------------------- SimpleITK formats
def _scan_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SITK_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_sitk(path: Path, max_voxels: int, hu_opts: dict) -> Volume:
    import SimpleITK as sitk

    fmt = path.name[len(_scan_stem(path)) + 1:].lower()  # "mhd", "nii.gz"...
    if fmt in ("mhd", "mha"):
        _check_metaimage_ndims(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ScanError(path, f"unreadable {fmt} file ({_sitk_reason(exc)})") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise ScanError(path, f"image has {len(size)} dimensions, a CT volume needs 3")
    if reader.GetNumberOfComponents() != 1:
        raise ScanError(path, f"image has {reader.GetNumberOfComponents()} components per voxel, CT has 1")
    n_voxels = math.prod(size)
    if n_voxels == 0:  # SimpleITK would spin on the other sizes, or return an empty array
        raise ScanError(path, f"header says {size[0]}x{size[1]}x{size[2]} voxels: an empty image")
    if n_voxels > max_voxels:
        raise ScanError(path, f"header says {size[0]}x{size[1]}x{size[2]} = {n_voxels} voxels, "
                              f"more than max_voxels={max_voxels}")
    if fmt == "mhd":
        _check_metaimage_data(path, n_voxels, reader.GetPixelID())
    if path.name.lower().endswith(".gz"):
        _check_gzip_stream(path)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ScanError(path, f"unreadable {fmt} file, truncated or missing data ({_sitk_reason(exc)})") from None
    stored = sitk.GetArrayFromImage(img)
    if stored.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(stored)))
        if bad:
            raise ScanError(path, f"{bad} voxels are NaN or infinite; a CT holds finite HU values")
    hu = np.empty(stored.shape, np.int16)
    for k in range(stored.shape[0]):  # slice by slice keeps the float64 copy small
        hu[k] = to_hounsfield(stored[k], **hu_opts)
    del stored
    meta = {"format": fmt, "number_of_slices": int(hu.shape[0]), "skipped": [], "z_resampled": False}
    try:
        return Volume.from_sitk_geometry(hu, img.GetSpacing(), img.GetOrigin(), img.GetDirection(),
                                         scan_id=_scan_stem(path), meta=meta)
    except ValueError as exc:
        raise ScanError(path, f"unusable geometry in header ({exc})") from None


def _sitk_reason(exc: BaseException) -> str:
    """SimpleITK's complaint in plain words: its messages name C++ source files and ITK
    classes, which say nothing to a user.  NRRD's last specific complaint is kept as is."""
    text = str(exc)
    nrrd = [line.split(": ", 1)[-1] for line in text.splitlines()
            if line.startswith("[nrrd]") and "trouble" not in line]
    if nrrd:
        return nrrd[-1].strip()[:160]
    for needle, reason in _SITK_REASONS:
        if needle in text:
            return reason
    return "the reader gave no reason"


#: SimpleITK message fragment -> the reason given to the user.
_SITK_REASONS = (("Unable to determine ImageIO reader", "header not recognised"),
                 ("not recognized as a NIFTI", "header not recognised"),
                 ("Unknown PixelType", "unknown voxel type"),
                 ("File cannot be read", "header cannot be parsed"))


def _check_metaimage_ndims(path: Path) -> None:
    """Refuse a MetaImage whose header's NDims is not 3 before SimpleITK reads it: its MetaIO
    parser corrupts memory (a crash, not an error) on NDims above 10 or below 1."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("latin-1")  # the header; an .mha's pixels follow it
    for line in head.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            break
        if key.strip() == "NDims" and _number(value.split()[0] if value.split() else None) != 3:
            raise ScanError(path, f"header says NDims = {value.strip()[:20]}, a CT volume has 3 dimensions")


def _check_metaimage_data(path: Path, n_voxels: int, pixel_id: int) -> None:
    """Refuse a MetaImage whose data file is missing or shorter than its header says."""
    import SimpleITK as sitk

    header = {}
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        header[key.strip()] = value.strip()
    name = header.get("ElementDataFile", "")
    if not name or name.upper() == "LOCAL" or name.upper().startswith("LIST") or "%" in name:
        return  # data in the header file, or a file list: SimpleITK checks those itself
    data = path.parent / name
    if not data.is_file():
        raise ScanError(path, f"its data file {name} (ElementDataFile) is missing")
    if header.get("CompressedData", "False").lower() == "true":
        return
    bytes_per_voxel = sitk.Image(1, 1, pixel_id).GetSizeOfPixelComponent() if pixel_id >= 0 else 0
    need, have = n_voxels * bytes_per_voxel, data.stat().st_size
    if bytes_per_voxel and have < need:
        raise ScanError(path, f"its data file {name} holds {have} bytes, the header needs {need} "
                              "(truncated)")


def _check_gzip_stream(path: Path) -> None:
    """Refuse a gzip file whose stream ends early (SimpleITK would zero-fill the rest)."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise ScanError(path, f"truncated or corrupt gzip data ({_first_line(exc)})") from None


# ---------------------------------------------------------------------------- DICOM headers
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _number(value, default=None):
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _vector(value, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise _Skip(f"unreadable {what}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise _Skip(f"{what} needs {n} finite numbers")
    return arr


def _group_attr(ds, frame: int | None, sequence: str, attr: str):
    """``attr`` of a frame: per-frame functional group, then shared group, then top level."""
    if frame is not None:
        for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
            seq = ds.get(groups)
            if seq is not None and len(seq) > idx:
                inner = seq[idx].get(sequence)
                if inner is not None and len(inner) and attr in inner[0]:
                    return inner[0].get(attr)
    return ds.get(attr)


def _image_types(ds, frame: int | None) -> list[str]:
    values = ds.get("ImageType") or []
    frame_type = _group_attr(ds, frame, "CTImageFrameTypeSequence", "FrameType") if frame is not None else None
    values = list(values if not isinstance(values, str) else [values])
    if frame_type:
        values += list(frame_type if not isinstance(frame_type, str) else [frame_type])
    return [str(v).strip().upper() for v in values]


def _slices_of_file(path: Path, max_voxels: int) -> list[_Slice]:
    """Header facts of every image plane in ``path``; raises ``_Skip(reason)`` if none."""
    try:
        return _parse_header(path, max_voxels)
    except _Skip:
        raise
    except Exception as exc:  # pydicom parses lazily: a damaged element fails on first access
        raise _Skip(f"damaged or truncated DICOM header ({_first_line(exc)})") from None


_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _library_noise_muted():
    """Keep what DICOM libraries print off the console while they parse or decode one file:
    pydicom's warnings and log lines, and what compiled decoders write to the process's
    stderr (a Rust decoder's panic message, a C library's complaint).  The reason reaches the
    user once, as our own one-line error or skip reason.  Holds a lock: fd 2 is per process."""
    with _QUIET_LOCK, open(os.devnull, "wb") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom_log = logging.getLogger("pydicom")
        level = pydicom_log.level
        pydicom_log.setLevel(logging.CRITICAL)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            pydicom_log.setLevel(level)


def _dcmread(path: Path, **kw):
    """``pydicom.dcmread``, also for files without the 128-byte preamble and ``DICM`` prefix
    (older archives, ACR-NEMA-style exports): such a file is read as a bare data set and kept
    when it holds an image's identity (SOP Class UID or Modality) and size (Rows, Columns);
    its transfer syntax is the encoding pydicom detected (implicit or explicit VR, little
    endian).  Anything else is still "not a DICOM file"."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with _library_noise_muted():
            return pydicom.dcmread(path, **kw)
    except InvalidDicomError:
        try:
            with _library_noise_muted():
                ds = pydicom.dcmread(path, force=True, **kw)
            looks_like_image = (("SOPClassUID" in ds or "Modality" in ds)
                                and "Rows" in ds and "Columns" in ds)
        except Exception:  # noqa: BLE001 - junk read by force fails in many ways
            looks_like_image = False
        if not looks_like_image:
            raise InvalidDicomError(f"{path}: no DICOM preamble and no image data set") from None
        implicit, little = ds.original_encoding
        if not little:
            raise InvalidDicomError(f"{path}: a bare big-endian data set") from None
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        return ds


def _parse_header(path: Path, max_voxels: int) -> list[_Slice]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if path.stat().st_size == 0:
            raise _Skip("zero-byte file")
        ds = _dcmread(path, stop_before_pixels=True)
    except _Skip:
        raise
    except InvalidDicomError:
        raise _Skip("not a DICOM file") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not pydicom's parser
            raise _Skip(f"cannot open ({_first_line(exc)})") from None
        raise _Skip(f"damaged or truncated DICOM header ({_first_line(exc)})") from None
    except Exception as exc:  # pydicom raises many types on a damaged header
        raise _Skip(f"damaged or truncated DICOM header ({_first_line(exc)})") from None

    modality = str(ds.get("Modality", "")).strip().upper()
    sop_class = ds.get("SOPClassUID")
    if sop_class is None and hasattr(ds, "file_meta"):
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID")
    sop_name = getattr(sop_class, "name", str(sop_class or "unknown SOP class"))
    if modality in NON_IMAGE_MODALITIES or "Rows" not in ds or "Columns" not in ds:
        if modality in NON_IMAGE_MODALITIES or sop_class == MEDIA_STORAGE_DIRECTORY:
            raise _Skip(f"not an image ({modality or 'DICOMDIR'}, {sop_name})")
        if "SOPClassUID" not in ds or not modality or "Image Storage" in sop_name:
            raise _Skip("truncated file: header ends before the image attributes")
        raise _Skip(f"not an image ({modality}, {sop_name})")
    if modality and modality != "CT":
        raise _Skip(f"modality {modality} is not CT")
    if not modality:
        raise _Skip(f"no modality (0008,0060) in an image ({sop_name})")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(_number(ds.get("NumberOfFrames"), 1) or 1)
    if rows <= 0 or cols <= 0 or n_frames <= 0:
        raise _Skip(f"header dimensions {rows}x{cols}x{n_frames} are not positive")
    if rows * cols * n_frames > max_voxels:
        raise _Skip(f"header says {cols}x{rows}x{n_frames} = {rows * cols * n_frames} voxels, "
                    f"more than max_voxels={max_voxels}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _Skip(f"{ds.SamplesPerPixel} samples per pixel (colour), CT has 1")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _Skip(f"photometric interpretation {photometric} is not monochrome")
    multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    frames = range(n_frames) if multi else [None]
    out = []
    for frame in frames:
        if "LOCALIZER" in _image_types(ds, frame):
            raise _Skip("localizer (ImageType LOCALIZER)")
        iop = _group_attr(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = _group_attr(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        spacing = _group_attr(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        if iop is None or ipp is None or spacing is None:
            raise _Skip("no Image Orientation/Position (Patient) or Pixel Spacing: not a volume slice")
        iop = _vector(iop, 6, "Image Orientation (Patient)")
        row, col = iop[:3], iop[3:]
        if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-6:
            raise _Skip("Image Orientation (Patient) has a zero vector")
        row = row / np.linalg.norm(row)
        col = col / np.linalg.norm(col)
        if abs(float(row @ col)) > ORTHOGONAL_TOLERANCE:
            raise _Skip("Image Orientation (Patient) rows and columns are not orthogonal")
        col = col - (row @ col) * row
        col = col / np.linalg.norm(col)
        spacing = _vector(spacing, 2, "Pixel Spacing")
        if spacing.min() <= 0:
            raise _Skip(f"Pixel Spacing {spacing.tolist()} is not positive")
        slope = _number(_group_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"), 1.0)
        intercept = _number(_group_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0)
        padding = ds.get("PixelPaddingValue")
        out.append(_Slice(
            path=path, frame=frame, series_uid=str(ds.get("SeriesInstanceUID", "") or f"no-uid:{path.parent}"),
            modality=modality, row_xyz=row, col_xyz=col,
            ipp_xyz=_vector(ipp, 3, "Image Position (Patient)"), rows=rows, cols=cols,
            pixel_spacing=(float(spacing[0]), float(spacing[1])), slope=slope or 1.0, intercept=intercept,
            padding_value=int(padding) if isinstance(padding, (int, np.integer)) else None,
            photometric=photometric,
            bits_stored=int(ds.BitsStored) if "BitsStored" in ds else None, header=ds))
    return out


# ---------------------------------------------------------------------------- DICOM pixels
class _PixelReader:
    """Read one plane's stored values, caching the last multi-frame file."""

    def __init__(self):
        self._path, self._frames = None, None

    def __call__(self, sl: _Slice) -> np.ndarray:
        import pydicom

        if sl.frame is not None and self._path == sl.path:
            return self._frames[sl.frame]
        try:
            ds = _dcmread(sl.path)
            ds.get("PixelData")  # parsed lazily: a damaged element (its VR, its length) fails here
        except Exception as exc:
            raise _Skip(f"unreadable file ({_first_line(exc)})") from None
        if not ds.get("PixelData"):  # absent, or present and empty
            raise _Skip("truncated file or no pixel data: no (7FE0,0010) Pixel Data")
        n_frames = int(_number(ds.get("NumberOfFrames"), 1) or 1)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None or not getattr(syntax, "is_transfer_syntax", False):  # or several values
            raise _Skip(f"unknown transfer syntax {syntax or '(none given)'}: the pixel data's "
                        "encoding is not one DICOM defines, so it cannot be decoded")
        bits_allocated = int(_number(ds.get("BitsAllocated"), 0))
        if bits_allocated <= 0:
            raise _Skip("no usable (0028,0100) Bits Allocated: the size of a pixel is unknown")
        if not syntax.is_compressed:
            expected = sl.rows * sl.cols * n_frames * bits_allocated // 8
            if len(ds.PixelData) < expected:
                raise _Skip(f"truncated file: pixel data has {len(ds.PixelData)} of {expected} bytes")
        try:
            with _library_noise_muted():
                arr = ds.pixel_array
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as exc:  # noqa: BLE001 - decoders fail in many ways; a Rust
            # decoder's panic (pyo3's PanicException) is a BaseException
            raise _Skip(f"corrupt {syntax.name} pixel data: it cannot be decoded "
                        f"({_first_line(exc)})") from None
        if sl.frame is None:
            return arr.reshape(sl.rows, sl.cols) if arr.ndim == 3 and arr.shape[0] == 1 else arr
        arr = arr.reshape(n_frames, sl.rows, sl.cols)
        self._path, self._frames = sl.path, arr
        return arr[sl.frame]


# ---------------------------------------------------------------------------- DICOM volume
def _describe(series: dict[str, list[_Slice]]) -> list[str]:
    return [f"{uid}: {len(sl)} slices" for uid, sl in series.items()]


def _choose_series(path: Path, series: dict[str, list[_Slice]], series_uid: str | None) -> str:
    if series_uid is not None:
        if series_uid not in series:
            raise ScanError(path, f"series {series_uid} not found; CT series here: "
                                  f"{'; '.join(_describe(series)) or 'none'}")
        return series_uid

    def rank(uid):
        sl = series[uid]
        axial = abs(sl[0].normal[2]) >= AXIAL_MIN_COS
        return (len(sl) > 1, axial, len(sl), uid)

    chosen = max(series, key=rank)
    if len(series) > 1:
        log.info("%s: chose series %s (%d slices) among %d CT series: %s", path, chosen,
                 len(series[chosen]), len(series), "; ".join(_describe(series)))
    return chosen


def _read_dicom(path: Path, files: list[Path], series_uid: str | None, max_voxels: int,
                hu_opts: dict, *, strict: bool) -> Volume:
    skipped: list[str] = []

    def skip(p: Path, reason: str, *, fatal: bool = False):
        """Record a skipped file; a single file given by the user fails instead (``fatal``)."""
        if strict and fatal:
            raise ScanError(path, reason)
        skipped.append(f"{p.name}: {reason}")

    # 1. headers only: group image planes by series, then by orientation and size
    series: dict[str, list[_Slice]] = defaultdict(list)
    for f in files:
        try:
            for sl in _slices_of_file(f, max_voxels):
                series[sl.series_uid].append(sl)
        except _Skip as why:
            skip(f, str(why), fatal=True)
    mixed_sizes: dict[str, str] = {}
    for uid in list(series):
        by_key = Counter(sl.orientation_key for sl in series[uid])
        if len(by_key) > 1:
            main = by_key.most_common(1)[0][0]
            sizes = Counter((sl.rows, sl.cols) for sl in series[uid] if sl.orientation_key[:6] == main[:6])
            if len(sizes) > 1:  # same orientation, another matrix: part of the anatomy, not a scout
                mixed_sizes[uid] = ", ".join(f"{n} slice{'s' * (n > 1)} of {c}x{r}"
                                             for (r, c), n in sizes.most_common())
            for sl in series[uid]:
                if sl.orientation_key != main:
                    skip(sl.path, "orientation or image size differs from the rest of its series")
            series[uid] = [sl for sl in series[uid] if sl.orientation_key == main]
    if not series:
        modalities = sorted({s.split("modality ", 1)[1].split(" ")[0] for s in skipped if "modality " in s
                             and s.endswith("is not CT")})
        if modalities:
            raise ScanError(path, f"modality {', '.join(modalities)} is not CT")
        detail = "; ".join(skipped[:5]) + (f"; ... ({len(skipped)} in all)" if len(skipped) > 5 else "")
        raise ScanError(path, f"no CT image series found ({detail or 'empty folder'})")

    uid = _choose_series(path, series, series_uid)
    if uid in mixed_sizes:
        raise ScanError(path, f"series {uid} mixes image sizes ({mixed_sizes[uid]}): its slices "
                              "cannot be stacked into one volume, and dropping some would lose anatomy")
    slices = series[uid]
    ref = slices[0]
    other = {}
    for other_uid, other_slices in series.items():
        if other_uid == uid:
            continue
        if len(other_slices) == 1 and other_slices[0].orientation_key != ref.orientation_key:
            skip(other_slices[0].path, "scout: single image in another orientation")
        else:
            other[other_uid] = other_slices

    # 2. order along the slice normal; drop duplicates; refuse gantry tilt and huge volumes
    normal = ref.normal
    slices.sort(key=lambda s: (float(s.ipp_xyz @ normal), str(s.path), s.frame or 0))
    kept = [slices[0]]
    for sl in slices[1:]:
        if float((sl.ipp_xyz - kept[-1].ipp_xyz) @ normal) < DUPLICATE_TOLERANCE_MM:
            skip(sl.path, f"duplicate slice position {float(sl.ipp_xyz @ normal):.3f} mm")
        else:
            kept.append(sl)
    slices = kept
    if len(slices) > 1:
        line = slices[-1].ipp_xyz - slices[0].ipp_xyz
        cos = float(line @ normal) / float(np.linalg.norm(line))
        tilt_deg = math.degrees(math.acos(min(1.0, abs(cos))))
        if tilt_deg > GANTRY_TILT_TOLERANCE_DEG:
            raise ScanError(path, f"gantry tilt of {tilt_deg:.1f} degrees is not supported")
    n_voxels = ref.rows * ref.cols * len(slices)
    if n_voxels > max_voxels:
        raise ScanError(path, f"header says {ref.cols}x{ref.rows}x{len(slices)} = {n_voxels} voxels, "
                              f"more than max_voxels={max_voxels}")

    # 3. pixels, slice by slice, each with its own rescale; a few unusable slices repaired
    hu = np.empty((len(slices), ref.rows, ref.cols), np.int16)
    read_pixels = _PixelReader()
    bad: dict[int, str] = {}  # index in slices -> why its pixels cannot be used
    for i, sl in enumerate(slices):
        try:
            stored = read_pixels(sl)
            hu[i] = to_hounsfield(stored, slope=sl.slope, intercept=sl.intercept,
                                  pixel_padding_value=sl.padding_value, photometric=sl.photometric,
                                  bits_stored=sl.bits_stored, **hu_opts)
        except _Skip as why:
            bad[i] = str(why)
        except ValueError as exc:  # header and pixels disagree (Bits Stored, frame count...)
            bad[i] = f"unusable pixel data ({_first_line(exc)})"
        if strict and i in bad:
            raise ScanError(path, bad[i])
    compressed = [i for i, sl in enumerate(slices) if _is_compressed(sl)]
    for i, why in _garbled_slices(hu, compressed, bad).items():
        if strict:
            raise ScanError(path, why)
        bad[i] = why
    if len(bad) == len(slices):
        raise ScanError(path, f"no readable slice in series {uid} ({bad[len(slices) - 1]})")
    repaired = []
    if bad:
        refusal = _unrepairable(sorted(bad), len(slices))
        named = [f"{slices[i].path.name}{'' if slices[i].frame is None else f' frame {slices[i].frame + 1}'}: "
                 f"{bad[i]}" for i in sorted(bad)]
        if refusal:
            raise ScanError(path, f"series {uid}: {refusal} ({named[0]}"
                                  f"{f'; and {len(named) - 1} more' if len(named) > 1 else ''})")
        log.warning("%s: %d slice(s) of series %s replaced by interpolation from their neighbours: %s",
                    path, len(bad), uid, "; ".join(named))
        repaired = named
        keep = [i for i in range(len(slices)) if i not in bad]
        hu, good = hu[keep], [slices[i] for i in keep]
    else:
        good = slices
    positions = np.array([float(s.ipp_xyz @ normal) for s in good])

    # 4. regular z grid
    z_resampled = False
    if len(good) == 1:
        hdr = good[0].header
        dz = _number(hdr.get("SpacingBetweenSlices")) or _number(hdr.get("SliceThickness")) or 1.0
    else:
        gaps = np.diff(positions)
        dz = float(np.median(gaps))
        if gaps.max() > GAP_FACTOR * dz or (gaps.max() - gaps.min()) / dz > SPACING_SPREAD:
            log.warning("%s: uneven slice spacing (%.3f to %.3f mm, median %.3f mm); interpolating "
                        "onto a regular %.3f mm grid", path, gaps.min(), gaps.max(), dz, dz)
            hu = _regular_z(hu, positions, dz)
            z_resampled = True
    if skipped:
        log.warning("%s: skipped %d file(s): %s", path, len(skipped), "; ".join(skipped))

    first = good[0]
    direction = np.column_stack([normal[::-1], first.col_xyz[::-1], first.row_xyz[::-1]])
    hdr = first.header
    kernel = hdr.get("ConvolutionKernel")
    if kernel is not None and not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    meta = {
        "format": "dicom",
        "modality": first.modality,
        "manufacturer": str(hdr.get("Manufacturer", "") or ""),
        "kernel": str(kernel or ""),
        "slice_thickness_mm": _number(_group_attr(hdr, first.frame, "PixelMeasuresSequence", "SliceThickness")),
        "series_description": str(hdr.get("SeriesDescription", "") or ""),
        "transfer_syntax": str(getattr(hdr.file_meta.get("TransferSyntaxUID"), "name", ""))
        if hasattr(hdr, "file_meta") else "",
        "number_of_slices": int(hu.shape[0]),
        "skipped": skipped,
        "repaired_slices": repaired,
        "other_series": _describe(other),
        "z_resampled": z_resampled,
        # every slice of the series in order (repaired ones too): where a finding lies in it
        "slice_positions_mm": [round(float(s.ipp_xyz @ normal), 4) for s in slices],
        "instance_numbers": [None if (n := _number(s.header.get("InstanceNumber"))) is None else int(n)
                             for s in slices],
    }
    return Volume(hu, spacing_mm=(dz, first.pixel_spacing[0], first.pixel_spacing[1]),
                  origin_mm=tuple(first.ipp_xyz[::-1]), direction=direction, scan_id=uid, meta=meta)


def _is_compressed(sl: _Slice) -> bool:
    meta = getattr(sl.header, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(getattr(syntax, "is_transfer_syntax", False) and syntax.is_compressed)


#: A decoded slice is garbled when its mean absolute difference to each of its neighbours
#: exceeds ``GARBLED_FACTOR`` times the neighbours' difference to each other plus
#: ``GARBLED_MARGIN_HU``.  Real chest CT stays below 0.75 times (lung1 and pycerr pat_1..4,
#: 3-5 mm slices); a JPEG Lossless stream corrupted mid-slice decodes to hundreds of HU of
#: noise from the damaged byte on, with no decoder error.
GARBLED_FACTOR = 2.0
GARBLED_MARGIN_HU = 50.0


def _garbled_slices(hu: np.ndarray, check: list[int], bad: dict[int, str]) -> dict[int, str]:
    """Slices among ``check`` whose decoded pixels are unlike both neighbours (corrupt
    compressed data that decodes without an error); neighbours are the nearest slices not in
    ``bad``.  Catches gross corruption only: a damaged JPEG 2000 code block that changes a
    few HU is not seen."""
    usable = [i for i in range(len(hu)) if i not in bad]
    if len(usable) < 3 or not check:
        return {}
    where = {i: j for j, i in enumerate(usable)}
    seen: dict[tuple[int, int], float] = {}  # each pair once: a slice's neighbour differences
    # are its neighbours' own (about 1 ms a 512x512 pair)

    def diff(a: int, b: int) -> float:
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen[key] = float(np.abs(hu[key[0]].astype(np.float32) - hu[key[1]]).mean())
        return seen[key]

    out = {}
    for i in check:
        if i not in where:
            continue
        j = where[i]
        # neighbours (an end slice: the next two), and their distance to each other
        n1, n2 = (usable[j - 1], usable[j + 1]) if 0 < j < len(usable) - 1 else \
            ((usable[1], usable[2]) if j == 0 else (usable[-2], usable[-3]))
        d_own = min(diff(i, n1), diff(i, n2)) if 0 < j < len(usable) - 1 else diff(i, n1)
        d_ref = diff(n1, n2)
        if d_own > GARBLED_FACTOR * d_ref + GARBLED_MARGIN_HU:
            out[i] = (f"corrupt compressed pixel data: the decoded slice differs from its "
                      f"neighbours by {d_own:.0f} HU on average, they differ by {d_ref:.0f} HU")
    return out


def _unrepairable(bad: list[int], n_slices: int) -> str | None:
    """Why the unusable slices ``bad`` (sorted indices) cannot be repaired, or None."""
    pairs = [(a, b) for a, b in zip(bad, bad[1:]) if b == a + 1]
    if pairs:
        return (f"slices {pairs[0][0] + 1} and {pairs[0][1] + 1} of {n_slices}, next to each other, "
                "cannot be used: too wide a gap to interpolate")
    limit = max(1, int(REPAIR_MAX_FRACTION * n_slices))
    if len(bad) > limit:
        return (f"{len(bad)} of {n_slices} slices cannot be used, more than the {limit} that "
                f"may be replaced by interpolation ({REPAIR_MAX_FRACTION:.0%})")
    return None


def _regular_z(hu: np.ndarray, positions: np.ndarray, dz: float) -> np.ndarray:
    """Linear interpolation along z from slices at ``positions`` (ascending, mm) onto
    ``positions[0] + k * dz``; returns int16 (rounded)."""
    n = int(round((positions[-1] - positions[0]) / dz)) + 1
    out = np.empty((n,) + hu.shape[1:], np.int16)
    for k in range(n):
        t = positions[0] + k * dz
        j = int(np.clip(np.searchsorted(positions, t, side="right") - 1, 0, len(positions) - 2))
        w = float(np.clip((t - positions[j]) / (positions[j + 1] - positions[j]), 0.0, 1.0))
        if w == 0.0:
            out[k] = hu[j]
        elif w == 1.0:
            out[k] = hu[j + 1]
        else:
            out[k] = np.rint((1.0 - w) * hu[j] + w * hu[j + 1].astype(np.float64))
    return out
