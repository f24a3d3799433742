"""Outputs for viewers: the findings as 3D Slicer markups, the lung mask as a Slicer
segmentation, the mask on the input scan's own grid, and the choice of volume format.

==========================  ==========================================================
``candidates.mrk.json``     :func:`write_markups`: one Slicer "Fiducial" control point per
                            row of ``candidates.csv``, in rank order, LPS mm
``lung_mask.seg.nrrd``      :func:`write_segmentation`: the 1 mm lung mask with Slicer's
                            segment fields (names, colours, label values, terminology)
``lung_mask_native.*``      :func:`mask_on_native_grid`: the same labels on the input
                            scan's grid (nearest neighbour), so a viewer overlays it on the
                            original series voxel for voxel
==========================  ==========================================================

Volumes (``lung_mask``, ``lung_mask_native``, ``ct_1mm``) are written as NRRD or NIfTI
(:data:`VOLUME_FORMATS`, :func:`volume_file`); :func:`pipeline.io.write_volume` writes either
(NIfTI through nibabel, with a scanner-based qform and sform in RAS).  The markups and the
``.seg.nrrd`` are written whatever the volume format: they are Slicer's own formats.

All world coordinates are LPS millimetres (:mod:`stages.volume`); Slicer reads the LPS
``coordinateSystem`` of markups and the ``space: left-posterior-superior`` of NRRD as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path
from stages.lungmask import LEFT_LUNG, RIGHT_LUNG
from stages.volume import Volume, check_volume

__all__ = ["write_markups", "write_segmentation", "mask_on_native_grid", "volume_file",
           "VOLUME_FORMATS", "DEFAULT_VOLUME_FORMAT", "LUNG_SEGMENTS", "LUNG_RGB", "CSV_DECIMALS",
           "MARKUPS_SCHEMA"]

#: ``--format`` choices and the suffix each gives the volumes.
VOLUME_FORMATS = {"nrrd": ".nrrd", "nifti": ".nii.gz"}
#: The volume format of ``lungscreen run``, :func:`pipeline.run.process_scan` and
#: :func:`pipeline.batch.run_many` (the one place it is set).
DEFAULT_VOLUME_FORMAT = "nrrd"
#: Decimals of the floats in ``candidates.csv``; markups positions are rounded the same way,
#: so they equal the CSV's ``coordX, coordY, coordZ``.
CSV_DECIMALS = 4
#: The JSON schema Slicer's markups files declare (Slicer 5 reads it and the later ones).
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                  "Markups/Resources/Schema/markups-schema-v1.0.3.json#")
#: Slicer's orientation of a control point with no rotation, written in LPS (identity in RAS).
_LPS_IDENTITY = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]
#: Slicer's terminology context for anatomy; the lung is SNOMED CT 39607008, sides 24028007
#: (right) and 7771000 (left).
_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
#: Slicer's recommended display colour of the lung (its General Anatomy terminology gives
#: both lungs this colour), RGB 197, 165, 145 out of 255.
LUNG_RGB = (197 / 255, 165 / 255, 145 / 255)
#: The lung mask's segments: ``(label value, segment id, name, RGB 0..1, SNOMED CT side)``;
#: the labels are :mod:`stages.lungmask`'s (1 right lung, 2 left lung).
LUNG_SEGMENTS = (
    (RIGHT_LUNG, "right_lung", "right lung", LUNG_RGB, ("24028007", "Right")),
    (LEFT_LUNG, "left_lung", "left lung", LUNG_RGB, ("7771000", "Left")),
)


def volume_file(stem: str, volume_format: str) -> str:
    """The file name of a volume output: ``stem`` plus the format's suffix.

    Raises
    ------
    ValueError
        ``volume_format`` is not one of :data:`VOLUME_FORMATS`.

    Examples
    --------
    >>> volume_file("lung_mask", "nifti")
    'lung_mask.nii.gz'
    """
    if volume_format not in VOLUME_FORMATS:
        raise ValueError(f"volume format must be one of {', '.join(VOLUME_FORMATS)}, "
                         f"got {volume_format!r}")
    return stem + VOLUME_FORMATS[volume_format]


def write_markups(candidates, path, *, name: str = "lungscreen findings") -> Path:
    """Write the findings as a 3D Slicer markups file (``.mrk.json``, a "Fiducial" list).

    One control point per row of ``candidates``, in their order (rank 1 first): id = the
    rank, label ``F01``, ``F02``... (zero-padded to the number of rows), description
    ``"rank 1: nodule, probability 0.934, diameter 8.2 mm"`` (the detector's ``score`` where
    there is no ``probability``), position ``[coordX, coordY, coordZ]`` in LPS mm rounded as
    ``candidates.csv`` (:data:`CSV_DECIMALS`), so the two files hold the same numbers.  The
    points are locked (they are results, not edits).

    Parameters
    ----------
    candidates : pandas.DataFrame
        ``coordX, coordY, coordZ`` (world LPS mm), ``diameter_mm``, and ``probability`` or
        ``score``; ``finding`` (nodule or mass) when present.  Zero rows give an empty list.
    path : str or Path
        Where to write (through a temporary file).
    name : str
        The list's name in Slicer.

    Returns
    -------
    Path
        ``path``.
    """
    n = len(candidates)
    width = max(2, len(str(n)))
    xyz_mm = candidates[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    diameter_mm = candidates["diameter_mm"].to_numpy(np.float64)
    kind = "probability" if "probability" in candidates.columns else "score"
    value = candidates[kind].to_numpy(np.float64)
    finding = (candidates["finding"].astype(str).to_numpy() if "finding" in candidates.columns
               else np.full(n, "finding"))
    points = []
    for i in range(n):
        rank = i + 1
        points.append({
            "id": str(rank),
            "label": f"F{rank:0{width}d}",
            "description": f"rank {rank}: {finding[i]}, {kind} {value[i]:.3f}, "
                           f"diameter {diameter_mm[i]:.1f} mm",
            "associatedNodeID": "",
            "position": [round(float(v), CSV_DECIMALS) for v in xyz_mm[i]],  # as the CSV's "%.4f"
            "orientation": list(_LPS_IDENTITY),
            "selected": True,
            "locked": True,
            "visibility": True,
            "positionStatus": "defined",
        })
    doc = {"@schema": MARKUPS_SCHEMA, "markups": [{
        "type": "Fiducial", "name": name, "coordinateSystem": "LPS", "coordinateUnits": "mm",
        "locked": True, "fixedNumberOfControlPoints": False, "labelFormat": "F%d",
        "lastUsedControlPointNumber": n, "controlPoints": [], "measurements": [],
        "display": {"visibility": True, "opacity": 1.0, "color": [1.0, 1.0, 0.0],
                    "selectedColor": [1.0, 0.2, 0.2], "propertiesLabelVisibility": False,
                    "pointLabelsVisibility": True, "textScale": 3.0, "glyphType": "Sphere3D",
                    "glyphScale": 3.0, "glyphSize": 5.0, "useGlyphScale": True,
                    "sliceProjection": False},
    }]}
    # pretty, but one line per point: 1000 findings make 0.2 MB, not 0.6
    text = json.dumps(doc, indent=2).replace('"controlPoints": []', '"controlPoints": [' + ",".join(
        "\n        " + json.dumps(p) for p in points) + ("\n      ]" if points else "]"), 1)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def write_segmentation(mask: Volume, path, *, segments=LUNG_SEGMENTS) -> Path:
    """Write a label volume as a 3D Slicer segmentation (``.seg.nrrd``).

    A plain 3-D uint8 NRRD (LPS geometry, gzip) on ``mask``'s grid whose header carries
    Slicer's segmentation fields, read by Slicer (and slicerio) as named, coloured segments:
    per segment ``SegmentN_ID``, ``_Name``, ``_NameAutoGenerated``, ``_Color`` (RGB 0..1),
    ``_ColorAutoGenerated``, ``_LabelValue``, ``_Layer`` (0: segments do not overlap),
    ``_Extent`` (the segment's voxel bounding box ``x0 x1 y0 y1 z0 z1``; ``0 -1 0 -1 0 -1``
    for an empty one) and ``_Tags`` (Slicer's anatomy terminology: lung, with its side); and
    ``Segmentation_MasterRepresentation`` / ``_SourceRepresentation`` (both: older and newer
    Slicer), ``Segmentation_ContainedRepresentationNames``,
    ``Segmentation_ReferenceImageExtentOffset`` (``0 0 0``: the file is the whole grid).

    The lung mask already tells the lungs apart (:mod:`stages.lungmask`: 1 right lung, the
    lower world x in LPS; 2 left), so each label is one segment as it is.  A label absent
    from ``mask`` (a scan with one lung) still gets its segment, empty.

    Parameters
    ----------
    mask : Volume
        Integer labels; values not in ``segments`` are written as they are, unnamed.
    path : str or Path
        Should end in ``.seg.nrrd`` (Slicer opens it as a segmentation by that suffix).
    segments : sequence of (int, str, str, (float, float, float), (str, str))
        ``(label value, id, name, RGB 0..1, (SNOMED CT code, meaning) of the side)``;
        default :data:`LUNG_SEGMENTS`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TypeError
        ``mask`` is not a Volume of integers.
    ValueError
        A label value does not fit uint8 (1..255), or ``mask`` holds a value over 255.
    """
    import SimpleITK as sitk

    check_volume(mask, "mask")
    if mask.array.dtype.kind not in "biu":
        raise TypeError(f"mask must hold integer labels, got dtype {mask.array.dtype}")
    labels = np.asarray(mask.array)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"mask labels must lie in 0..255 for a .seg.nrrd, "
                         f"got {labels.min()}..{labels.max()}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8))
    spacing, origin, direction = mask.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    extents = _label_extents_xyz(labels, [s[0] for s in segments])
    for i, (value, seg_id, name, rgb, (side_code, side)) in enumerate(segments):
        if not 1 <= int(value) <= 255:
            raise ValueError(f"segment {name!r}: label value must be 1..255, got {value!r}")
        key = f"Segment{i}_"
        img.SetMetaData(key + "ID", seg_id)
        img.SetMetaData(key + "Name", name)
        img.SetMetaData(key + "NameAutoGenerated", "0")
        img.SetMetaData(key + "Color", " ".join(f"{c:.6g}" for c in rgb))
        img.SetMetaData(key + "ColorAutoGenerated", "0")
        img.SetMetaData(key + "LabelValue", str(int(value)))
        img.SetMetaData(key + "Layer", "0")
        img.SetMetaData(key + "Extent", " ".join(str(v) for v in extents[int(value)]))
        img.SetMetaData(key + "Tags", f"TerminologyEntry:{_ANATOMY}~SCT^123037004^Anatomical Structure"
                                      f"~SCT^39607008^Lung~SCT^{side_code}^{side}"
                                      "~Anatomic codes - DICOM master list~^^~^^|")
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_SourceRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return Path(path)


def _label_extents_xyz(labels: np.ndarray, values) -> dict[int, tuple[int, ...]]:
    """Each value's voxel bounding box ``(x0, x1, y0, y1, z0, z1)`` (inclusive), Slicer's
    extent order; ``(0, -1, 0, -1, 0, -1)`` where the value is absent."""
    out = {}
    for value in values:
        hit = labels == value
        if not hit.any():
            out[int(value)] = (0, -1, 0, -1, 0, -1)
            continue
        box = []
        for axis in (2, 1, 0):  # x, y, z
            others = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(hit.any(axis=others))
            box += [int(idx[0]), int(idx[-1])]
        out[int(value)] = tuple(box)
    return out


def mask_on_native_grid(mask: Volume, ct: Volume) -> Volume:
    """The label volume ``mask`` (the 1 mm grid) on the input scan's own grid.

    Nearest neighbour in world coordinates (:func:`stages.resample.resample_like`, on the
    CPU), so no new label values appear: every voxel of ``ct`` takes the label of the mask
    voxel nearest to its centre.  The 1 mm grid starts at the scan's first voxel and ends up
    to 1 mm before its last ones (:func:`stages.resample.resample` keeps whole steps), so the
    mask is first extended by its edge voxels, one voxel each side: the scan's last
    slices, rows and columns get their nearest 1 mm voxel's label rather than background.

    Parameters
    ----------
    mask : Volume
        Labels (``lung_mask``).
    ct : Volume
        The scan as read (``ct``); only its geometry is used.

    Returns
    -------
    Volume
        ``mask``'s dtype on ``ct``'s exact grid (shape, spacing, origin, direction); 0 where
        a voxel of ``ct`` lies more than a mask voxel beyond the mask's grid.
    """
    from stages.resample import resample_like

    check_volume(mask, "mask")
    check_volume(ct, "ct")
    padded = Volume(np.pad(mask.array, 1, mode="edge"), spacing_mm=mask.spacing_mm,
                    origin_mm=mask.index_to_world([-1.0, -1.0, -1.0]), direction=mask.direction,
                    scan_id=mask.scan_id, meta=dict(mask.meta))
    return resample_like(padded, ct, order=0, device="cpu")
