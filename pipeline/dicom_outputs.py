"""DICOM outputs of a DICOM input: the lung mask as a DICOM SEG and the findings as a DICOM SR.

For a scan read from a DICOM series (``ct.meta["format"] == "dicom"``) the scan's output
folder also gets, written with highdicom:

* ``lung_mask.seg.dcm``: a Segmentation (binary, two segments: 1 right lung, 2 left lung,
  SNOMED CT "Anatomical structure" / "Right lung" 3341006 / "Left lung" 44029006) on the
  source series' own grid, one frame per source slice that holds lung, each frame referencing
  its source image;
* ``findings.sr.dcm``: a Comprehensive 3D SR holding a TID 1500 Measurement Report: one TID
  1410 measurement group per candidate whose probability is at least ``sr_min_probability``
  (section ``outputs:`` of the config), with the candidate's centre as a 3-D POINT in the
  source series' frame of reference (LPS mm: ``coordX, coordY, coordZ`` of
  ``candidates.csv``), its diameter (SNOMED CT "Diameter", mm) and its probability (DCM
  122157 "Probability", unit ``1``), the finding type (SNOMED CT "Nodule" or "Mass") and
  the tracking identifier ``candidate N`` (its row in ``candidates.csv``, 1 = first).

Both reference the source series (the SEG per frame, the SR in its evidence sequence) and
belong to its study.  What they copy from the source images is only what lets them join
that study: see :data:`COPIED_FROM_SOURCE`; :data:`EMPTIED` are written present but empty
(the IODs make them type 2), and nothing else about the patient, the site or its staff
(institution, operators, physicians, station, the scanner's own equipment) is copied.
Manufacturer and software are lungscreen and its version.

The SEG needs every voxel slice of the screened volume to be one source image.  A series
that ingest had to change (slices interpolated onto a regular grid, unreadable slices
replaced) or whose images cannot be matched to the volume's slices cannot be used: then
neither file is written and the scan is flagged with the reason (:class:`SourceUnusable`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path
from pipeline.steps import split_source
from stages.lungmask import LEFT_LUNG, RIGHT_LUNG

__all__ = ["write_dicom_outputs", "write_dicom_seg", "write_dicom_sr", "source_headers",
           "SourceUnusable", "SEG_FILE", "SR_FILE", "SR_COLUMNS", "COPIED_FROM_SOURCE", "EMPTIED"]

log = logging.getLogger(__name__)

SEG_FILE = "lung_mask.seg.dcm"
SR_FILE = "findings.sr.dcm"
#: The candidates' columns the SR reports (``probability`` comes from the classify stage).
SR_COLUMNS = ("coordX", "coordY", "coordZ", "diameter_mm", "probability")
#: Series numbers of the two output series (the source series keeps its own).
SEG_SERIES_NUMBER = 901
SR_SERIES_NUMBER = 902
#: What the outputs copy from the source images: the identity of the study they join (its
#: patient's name and ID, the study's UID, ID, date, time and accession number, the text's
#: character set) and, for the SEG's frames, the source grid and the references to the
#: source images.  Nothing else of the source headers reaches the outputs.
COPIED_FROM_SOURCE = (
    "SpecificCharacterSet", "PatientName", "PatientID", "StudyInstanceUID", "StudyID",
    "StudyDate", "StudyTime", "AccessionNumber",
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
    "Rows", "Columns", "PixelSpacing", "SliceThickness", "ImageOrientationPatient",
    "ImagePositionPatient",
)
#: Type 2 attributes of the Patient and General Study modules written empty.
EMPTIED = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName")
#: Type 2 attributes of the study's identity: written empty where the source lacks them.
STUDY_IDENTITY_TYPE2 = ("PatientName", "PatientID", "StudyID", "StudyDate", "StudyTime", "AccessionNumber")
#: A source slice may lie this far from the screened volume's slice it is matched to, as a
#: fraction of the slice distance (ingest accepts a 1 % spread of slice distances).
SLICE_MATCH_TOLERANCE = 0.1
#: Image Orientation (Patient) cosines equal within this.
ORIENTATION_TOLERANCE = 1e-3

RIGHT_LUNG_CODE = ("3341006", "SCT", "Right lung")
LEFT_LUNG_CODE = ("44029006", "SCT", "Left lung")


class SourceUnusable(ValueError):
    """The source series cannot carry a DICOM SEG of the screened volume (reason in the message)."""


def write_dicom_outputs(scan_dir, values: dict, *, sr_min_probability: float = 0.5) -> list[str]:
    """Write ``lung_mask.seg.dcm`` and ``findings.sr.dcm`` for a scan read from DICOM.

    This function's keyword defaults are the settings of the config's ``outputs:`` section.

    Parameters
    ----------
    scan_dir : str or Path
        The scan's output folder.
    values : dict
        What :func:`pipeline.run.screen` made: ``path`` (the source, maybe
        ``FOLDER#series=UID``), ``ct`` (the screened Volume), and when their stages ran,
        ``lung_mask`` (uint8 labels on the 1 mm grid) and ``candidates`` (DataFrame).
    sr_min_probability : float
        Candidates whose ``probability`` is at least this, in [0, 1], are findings of the SR.

    Returns
    -------
    list of str
        Flags for the scan's outputs: empty, or one line saying why neither file was written.
        A non-DICOM input, or a run without what an output needs (``lungmask``'s mask, or
        candidates with :data:`SR_COLUMNS`: ``classify`` gives the probability), writes
        nothing and no flag.
        An older run's files that are not written again are removed.

    Raises
    ------
    ValueError
        ``sr_min_probability`` is not a number in [0, 1].
    """
    if not 0.0 <= float(sr_min_probability) <= 1.0:
        raise ValueError(f"outputs: sr_min_probability must be in [0, 1], got {sr_min_probability}")
    scan_dir = Path(scan_dir)
    ct, mask, cands = values["ct"], values.get("lung_mask"), values.get("candidates")
    want_seg = ct.meta.get("format") == "dicom" and mask is not None
    want_sr = (ct.meta.get("format") == "dicom" and cands is not None
               and set(SR_COLUMNS) <= set(getattr(cands, "columns", ())))
    flags = []
    if want_seg or want_sr:
        try:
            sources = source_headers(values["path"], ct)
        except SourceUnusable as why:
            flags = [f"no DICOM SEG or SR written: {why}"]
            log.warning("%s: %s", ct.scan_id, flags[0])
            want_seg = want_sr = False
    if want_seg:
        write_dicom_seg(mask, ct, sources, scan_dir / SEG_FILE)
    if want_sr:
        write_dicom_sr(cands, sources, scan_dir / SR_FILE, min_probability=float(sr_min_probability))
    for name, written in ((SEG_FILE, want_seg), (SR_FILE, want_sr)):
        if not written and (scan_dir / name).exists():  # an earlier run's
            os.unlink(scan_dir / name)
    return flags


def source_headers(path, ct) -> list:
    """The headers of the source images of the screened volume ``ct``, one per voxel slice.

    Parameters
    ----------
    path : str or Path
        The scan as given to ingest: a DICOM folder, one file, or ``FOLDER#series=UID``.
    ct : stages.volume.Volume
        What ingest read from it (``scan_id`` is the Series Instance UID).

    Returns
    -------
    list of pydicom.Dataset
        In the order of ``ct``'s z axis, each holding only :data:`COPIED_FROM_SOURCE` (those
        the source has) and :data:`EMPTIED` (empty).

    Raises
    ------
    SourceUnusable
        Ingest changed the slices (interpolated onto a regular grid, or replaced unreadable
        ones), the series is one multi-frame image, or its images do not match the volume's
        slices one to one (count, orientation, size or positions).
    """
    from pydicom.dataset import Dataset

    from stages.ingest import DUPLICATE_TOLERANCE_MM

    if ct.meta.get("z_resampled"):
        raise SourceUnusable("ingest interpolated the series onto a regular slice grid (uneven "
                             "or missing slices), so the mask's slices are not the source images")
    if ct.meta.get("repaired_slices"):
        raise SourceUnusable(f"{len(ct.meta['repaired_slices'])} slice(s) were replaced by "
                             "interpolation; a SEG must not reference their unreadable images")
    folder, _ = split_source(path)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    row_xyz, col_xyz = ct.direction[::-1, 2], ct.direction[::-1, 1]
    normal_xyz = ct.direction[::-1, 0]
    found = []
    for f in files:
        ds = _read_header(f)
        if ds is None or str(ds.get("SeriesInstanceUID", "")) != ct.scan_id or "Rows" not in ds:
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SourceUnusable(f"{f.name} is a multi-frame image; DICOM SEG output is written "
                                 "for series of single-frame images only")
        try:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        except (AttributeError, TypeError, ValueError):
            continue
        if (iop.shape != (6,) or ipp.shape != (3,)
                or not np.allclose(iop, np.r_[row_xyz, col_xyz], atol=ORIENTATION_TOLERANCE)
                or (int(ds.Rows), int(ds.Columns)) != ct.shape[1:]):
            continue  # ingest skipped it too: another orientation or size than the volume's
        found.append((float(ipp @ normal_xyz), str(f), ds))
    found.sort(key=lambda item: item[:2])
    kept = []
    for pos, name, ds in found:  # ingest's rule: of two slices at one position, the first by name
        if kept and pos - kept[-1][0] < DUPLICATE_TOLERANCE_MM:
            continue
        kept.append((pos, name, ds))
    if len(kept) != ct.shape[0]:
        raise SourceUnusable(f"{len(kept)} source images of series {ct.scan_id} match the "
                             f"screened volume's {ct.shape[0]} slices")
    grid_mm = np.array([float(ct.index_to_world([k, 0, 0])[::-1] @ normal_xyz) for k in range(ct.shape[0])])
    off_mm = np.abs(np.array([pos for pos, _, _ in kept]) - grid_mm)
    if off_mm.max() > SLICE_MATCH_TOLERANCE * ct.spacing_mm[0]:
        k = int(off_mm.argmax())
        raise SourceUnusable(f"source image {Path(kept[k][1]).name} lies {off_mm[k]:.3f} mm from the "
                             f"screened volume's slice {k}")
    out = []
    for _, _, ds in kept:
        header = Dataset()
        for keyword in COPIED_FROM_SOURCE:
            if keyword in ds:
                header.add(ds[keyword])
        for keyword in (*EMPTIED, *(k for k in STUDY_IDENTITY_TYPE2 if k not in header)):
            setattr(header, keyword, "")
        out.append(header)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID"):
        if keyword not in out[0]:
            raise SourceUnusable(f"the source images have no {keyword}")
    return out


def _read_header(path: Path):
    """The header of a DICOM file without its pixel data, or None if it is not one."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            ds.get("SeriesInstanceUID")  # parsed lazily: a damaged element fails here
            return ds
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a source image
        return None


def _uid(kind: str, series_uid: str, content: bytes) -> str:
    """A UID that depends on what it names only: the same output of the same series gets
    the same UID when written again; other content, another UID."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["lungscreen", kind, series_uid, hashlib.sha1(content).hexdigest()])


@contextlib.contextmanager
def _source_names_as_they_are():
    """highdicom warns about a source's single-component Patient's Name ("ANON"): it is the
    source's own value, copied as it is, so the warning is kept off the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        yield


def _software() -> tuple[str, str]:
    from pipeline.__main__ import version

    return "lungscreen", version()


def write_dicom_seg(lung_mask, ct, sources: list, path) -> Path:
    """Write the lung mask as a binary DICOM SEG on the source series' grid.

    Parameters
    ----------
    lung_mask : stages.volume.Volume
        uint8 labels (1 right lung, 2 left lung, 0 elsewhere) on ``ct``'s grid, or on any
        other grid (the 1 mm one): then put on ``ct``'s by
        :func:`pipeline.outputs.mask_on_native_grid` (nearest neighbour in world coordinates).
    ct : stages.volume.Volume
        The screened volume, whose slices are the source images.
    sources : list of pydicom.Dataset
        :func:`source_headers` of ``ct``: one per slice, in z order.
    path : str or Path
        The file, written under a temporary name and renamed.

    Returns
    -------
    Path
        ``path``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from pipeline.outputs import mask_on_native_grid

    native = lung_mask if lung_mask.same_geometry(ct) else mask_on_native_grid(lung_mask, ct)
    labels_zyx = np.ascontiguousarray(native.array, np.uint8)
    labels_zyx[(labels_zyx != RIGHT_LUNG) & (labels_zyx != LEFT_LUNG)] = 0
    name, version = _software()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=name, version=version, family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=Code(*code), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
        for number, label, code in ((RIGHT_LUNG, "right lung", RIGHT_LUNG_CODE),
                                    (LEFT_LUNG, "left lung", LEFT_LUNG_CODE))]
    with _source_names_as_they_are():
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=labels_zyx,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=_uid("seg series", ct.scan_id, labels_zyx.tobytes()),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=_uid("seg", ct.scan_id, labels_zyx.tobytes()), instance_number=1,
            manufacturer=name, manufacturer_model_name=name, software_versions=version,
            device_serial_number=version, content_label="LUNGS",
            content_description="lungscreen lung mask", series_description="lungscreen lung mask")
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return Path(path)


def write_dicom_sr(candidates, sources: list, path, *, min_probability: float) -> Path:
    """Write the candidates at or above ``min_probability`` as a TID 1500 Comprehensive 3D SR.

    Parameters
    ----------
    candidates : pandas.DataFrame
        ``candidates.csv``'s rows, in its order: ``coordX, coordY, coordZ`` (world LPS mm),
        ``diameter_mm`` (mm), ``probability`` (in [0, 1]) and ``finding`` (``nodule`` or
        ``mass``; nodule when the column is missing).
    sources : list of pydicom.Dataset
        :func:`source_headers`: the SR's evidence (the source series) and its study.
    path : str or Path
        The file, written under a temporary name and renamed.
    min_probability : float
        Findings are the candidates whose probability is at least this.

    Returns
    -------
    Path
        ``path``.  With no candidate at the threshold, the report holds no measurement group.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frame_uid, series_uid = str(sources[0].FrameOfReferenceUID), str(sources[0].SeriesInstanceUID)
    name, version = _software()
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    chosen = candidates.reset_index(drop=True)
    chosen = chosen[chosen["probability"] >= min_probability]
    findings = chosen["finding"] if "finding" in chosen else ["nodule"] * len(chosen)
    content_key = chosen[list(SR_COLUMNS)].to_numpy(np.float64)
    groups = []
    for row, (i, cand), finding in zip(range(len(chosen)), chosen.iterrows(), findings):
        centre_xyz_mm = np.array([[cand["coordX"], cand["coordY"], cand["coordZ"]]], np.float64)
        tracking = hd.sr.TrackingIdentifier(
            uid=_uid("finding", series_uid, content_key[row].tobytes()), identifier=f"candidate {i + 1}")
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                                  graphic_data=centre_xyz_mm,
                                                  frame_of_reference_uid=frame_uid),
            finding_type=codes.SCT.Mass if finding == "mass" else codes.SCT.Nodule,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Diameter, value=float(cand["diameter_mm"]),
                                  unit=codes.UCUM.Millimeter, algorithm_id=algorithm),
                hd.sr.Measurement(name=codes.DCM.Probability, value=float(cand["probability"]),
                                  unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
            ]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", name, version.encode()), name=name, manufacturer_name=name,
            model_name=name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups or None)
    content = content_key.tobytes() + str(min_probability).encode()
    with _source_names_as_they_are():
        sr = hd.sr.Comprehensive3DSR(
            evidence=sources, content=report[0],
            series_instance_uid=_uid("sr series", series_uid, content), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_uid("sr", series_uid, content), instance_number=1,
            manufacturer=name, manufacturer_model_name=name, software_versions=version,
            series_description="lungscreen findings")
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return Path(path)
