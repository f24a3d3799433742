"""Read RTSTRUCT contours into masks in a scan's geometry.

Radiotherapy structure sets (DICOM RTSTRUCT) hold each region of interest (ROI) as closed
planar polygons in world millimetres (LPS), one or more per slice.  :func:`read_rtstruct`
rasterises them onto a :class:`~stages.volume.Volume`: every polygon is mapped into the
volume's voxel indices, the pixel centres inside it are set on the slice it lies on, and
polygons on the same slice are combined by exclusive or, so an inner contour cuts a hole
(the even-odd rule that RTSTRUCT writers such as Eclipse and CERR rely on for holes).

Written here rather than taken from rt-utils: rt-utils needs OpenCV for polygon filling and
reads only single-frame series it loads itself; what lungscreen needs is ~80 lines on top of
pydicom and scikit-image, which are already dependencies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ScanError
from .volume import Volume, check_volume, xyz_to_zyx

__all__ = ["read_rtstruct", "SLICE_TOLERANCE"]

#: How far (in slices) a contour's plane may lie from the nearest slice centre before the
#: contour is refused: contours are drawn on the image slices (pycerr's lie within 1e-4
#: slice), so a quarter slice off means another series or another frame of reference.
SLICE_TOLERANCE = 0.25


def read_rtstruct(path, ct: Volume, *, names=None) -> dict[str, Volume]:
    """Rasterise the ROIs of an RTSTRUCT file onto ``ct``'s voxel grid.

    Parameters
    ----------
    path : str or Path
        The RTSTRUCT file (DICOM, modality ``RTSTRUCT``).
    ct : Volume
        The scan the contours were drawn on, in its original geometry (as
        :func:`stages.ingest.read_scan` returns it): each contour must lie on one of its
        slices.  Resample the masks afterwards (nearest neighbour) for other grids.
    names : iterable of str, optional
        ROI names to read (exactly as in the file); default every ROI with a contour.

    Returns
    -------
    dict of str to Volume
        ``{roi_name: mask}``, each a uint8 (0/1) Volume with ``ct``'s geometry.

    Raises
    ------
    ScanError
        When the file is not an RTSTRUCT, a named ROI is missing, or a contour lies off
        ``ct``'s slices or outside its field of view (naming the file and the ROI).
    """
    import pydicom
    from skimage.draw import polygon

    check_volume(ct, "ct")
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types
        raise ScanError(path, f"not a readable DICOM file ({exc})") from exc
    if getattr(ds, "Modality", None) != "RTSTRUCT":
        raise ScanError(path, f"not an RTSTRUCT (modality {getattr(ds, 'Modality', 'missing')})")
    roi_names = {int(r.ROINumber): str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])}
    wanted = None if names is None else set(names)
    if wanted is not None and not wanted <= set(roi_names.values()):
        missing = sorted(wanted - set(roi_names.values()))
        raise ScanError(path, f"no ROI named {', '.join(missing)} (has {', '.join(sorted(roi_names.values()))})")

    masks: dict[str, Volume] = {}
    nz, ny, nx = ct.shape
    for roi in getattr(ds, "ROIContourSequence", []):
        name = roi_names.get(int(roi.ReferencedROINumber), f"ROI-{roi.ReferencedROINumber}")
        if (wanted is not None and name not in wanted) or not hasattr(roi, "ContourSequence"):
            continue
        mask = np.zeros(ct.shape, np.uint8)
        for contour in roi.ContourSequence:
            if getattr(contour, "ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue  # points and open polylines enclose nothing
            xyz = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            idx = ct.world_to_index(xyz_to_zyx(xyz))
            k = int(np.rint(np.median(idx[:, 0])))
            if np.abs(idx[:, 0] - k).max() > SLICE_TOLERANCE or not 0 <= k < nz:
                raise ScanError(path, f"ROI {name}: a contour at z={xyz[0, 2]:.2f} mm lies on no "
                                f"slice of the scan (index {idx[:, 0].mean():.2f} of 0..{nz - 1})")
            rr, cc = polygon(idx[:, 1], idx[:, 2], shape=(ny, nx))
            filled = np.zeros((ny, nx), np.uint8)
            filled[rr, cc] = 1
            mask[k] ^= filled
        masks[name] = ct.with_array(mask)
    return masks
