"""Lung segmentation by thresholds and connected components: right lung 1, left lung 2.

How :func:`segment_lungs` works (all on the whole volume with :mod:`scipy.ndimage`)
---------------------------------------------------------------------------------
1. **Air**: voxels below ``air_threshold_hu``.
2. **Outside air**: in every axial slice, air components touching the slice border are
   outside the patient.  Only *air* touching the border is dropped, so a body (or an arm)
   touching the image edge does not matter.  A lung cut by the field of view touches the
   border too: the border-touching air is grouped in 3-D and a group counts as outside
   only when at least ``outside_air_fraction`` of it is below ``outside_air_hu`` (air
   outside the patient is -1000 HU give or take the noise; lung parenchyma, vessels and
   septa included, hardly ever is).  The *body* of a slice is its largest
   non-outside component (this drops the table and pockets between arms and trunk); the
   interior air is air inside it.
3. **Airways**: the trachea is searched in the top (most superior) slices as a round air
   component near the body's mid-line, and tracked down slice by slice, through the
   carina into both main bronchi, while each 2-D component stays smaller than
   ``airway_max_area_mm2``.  Where a bronchus enters the lung its slice component becomes
   big and tracking stops there.
4. **Lungs**: 3-D components of the remaining interior air bigger than ``min_lung_ml``.
   Two lungs are two components of comparable size on either side of the body's
   mid-line; a single component holding both lungs (joined at the anterior junction
   line) is split by eroding it (distance transform) until it falls in two, then giving
   every voxel the label of the nearest core.  If nothing splits, the scan holds one lung.
   Labels go by world x (LPS: +x is the patient's left): the lung at lower x is the right.
5. **Holes**: vessels, airway walls and nodules inside the lung are filled slice by slice,
   up to ``max_hole_area_mm2`` (the dome of the diaphragm, ringed by lung, is no hole).
6. **Border**: a closing with a ball of ``closing_radius_mm`` (on a coarse grid of
   ``work_spacing_mm``, through distance transforms) fills dents in the lung surface;
   of what it adds, only connected pieces smaller than ``max_fill_ml`` are kept, so a
   juxta-pleural nodule (a small dent) joins its lung while the mediastinum and hilum
   (big dents) stay out.
7. **Lesions**: soft tissue that fills part of a lung (a tumour against the chest wall, a
   hilar mass) dents the lung as the heart and the mediastinum do, so no rule on the mask's
   shape keeps the one and not the others.  The lesion net (:mod:`nets.lesionnet`, weights
   ``lesions``; trained on real chest CTs with their tumours and inserted masses) gives
   each voxel's probability of being lesion; the voxels above ``lesion_threshold`` that
   are not bone and lie in the lung's axial convex hull (over ``LESION_HULL_SLICES`` slices
   up and down), in a piece touching a lung of at least ``min_lesion_ml``, join that lung.

Scans cut at the apex or base, a single lung and bodies touching the image border are
handled; a scan with no lung gives an all-zero mask (and a log line).
"""
from __future__ import annotations

import functools
import logging

import numpy as np
from scipy import ndimage as ndi

from stages.volume import Volume, block_mask, check_volume, unblock

log = logging.getLogger(__name__)

__all__ = ["segment_lungs", "lung_volume_ml", "RIGHT_LUNG", "LEFT_LUNG",
           "AIR_THRESHOLD_HU"]

#: Label of the patient's right lung (lower world x in LPS).
RIGHT_LUNG = 1
#: Label of the patient's left lung (higher world x in LPS).
LEFT_LUNG = 2
#: Voxels below this many HU are air or lung parenchyma (lung is about -850 HU,
#: soft tissue above -100 HU); -320 HU is the usual lung/soft-tissue cut.
AIR_THRESHOLD_HU = -320
#: 3-D air components smaller than this (mL) are never a lung (bowel gas, pockets).
MIN_LUNG_ML = 20.0
#: A second lung must hold at least this fraction of the first one's volume.
SECOND_LUNG_RATIO = 0.1
#: Trachea and main bronchi: 2-D air components at most this big (mm^2, about a 28 mm disc).
AIRWAY_MAX_AREA_MM2 = 600.0
#: Smallest trachea cross-section (mm^2, about an 8 mm disc).
AIRWAY_MIN_AREA_MM2 = 50.0
#: The trachea seed lies within this distance (mm) of the body's mid-line (x).
AIRWAY_MAX_OFFSET_MM = 35.0
#: The trachea seed is looked for within this distance (mm) of the top of the interior air.
AIRWAY_SEARCH_MM = 30.0
#: Holes in a lung's slice bigger than this (mm^2, a 40 mm disc) are not filled: near the
#: base the lung rings the dome of the diaphragm, which is no hole.
MAX_HOLE_AREA_MM2 = 1250.0
#: Largest erosion (mm) tried when splitting two joined lungs.
MAX_SPLIT_EROSION_MM = 12.0
#: Radius of the rolling ball (mm) used to close dents in the lung surface.
CLOSING_RADIUS_MM = 15.0
#: Pieces added by the closing bigger than this (mL) are left out (mediastinum, hilum);
#: a 30 mm sphere is 14 mL.
MAX_FILL_ML = 20.0
#: Air outside the patient is about -1000 HU: a voxel below this counts as "pure air".
OUTSIDE_AIR_HU = -975
#: A 3-D group of border-touching air is outside the patient when at least this fraction
#: of it is pure air.  Measured: outside air 0.25-0.96 of the group (lung1, phantoms, the
#: pycerr chests, whose outside air mixes with the table), lung cut by the field of view
#: 0.00-0.01 (pycerr pat_1..4).
OUTSIDE_AIR_FRACTION = 0.1
#: The lesion net's weights: "default" is the file lungscreen ships (models/lesion_net.pt);
#: None turns step 7 off (the classical mask).
LESIONS = "default"
#: Voxels whose lesion probability is above this join the lung (step 7).
LESION_THRESHOLD = 0.5
#: Smallest lesion piece (mL) added; smaller ones are the net's noise (and the closing's job).
MIN_LESION_ML = 0.5
#: A lesion voxel lies within the convex hull (axial) of its lung over this many slices above
#: and below: the net's answer is used where a lesion can fill a lung, not below the
#: diaphragm's dome or beside the apex (on the leave-one-patient-out models: false additions
#: on an unseen phantom 145 -> 21 mL, pat_1 646 -> 99 mL, its tumour kept 0.92 -> 0.90).
LESION_HULL_SLICES = 3
#: Voxels denser than this (HU) are bone: never lesion.
BONE_HU = 300.0
#: Grid spacing (mm) of the coarse grid used for distance transforms.
WORK_SPACING_MM = 2.0

_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndi.generate_binary_structure(2, 1)


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Label ids present on the y/x border of any slice (not the z faces)."""
    edge = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                           labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    ids = np.unique(edge)
    return ids[ids > 0]


def _fill_holes_2d(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill holes slice by slice (axial): background not reaching the slice border and
    at most ``max_area_px`` pixels (so the dome of the diaphragm, ringed by lung near the
    base, stays out)."""
    lab, n = ndi.label(~mask, structure=_INPLANE)
    if n == 0:
        return mask.copy()
    keep_bg = np.bincount(lab.ravel(), minlength=n + 1) > max_area_px
    keep_bg[_border_labels(lab)] = True
    return mask | ~keep_bg[lab]


def _outside_by_hu(border_air: np.ndarray, arr: np.ndarray, pure_hu: float,
                   fraction: float) -> np.ndarray:
    """Keep the 3-D groups of border-touching air that are mostly pure air (outside the
    patient); groups that are not (a lung cut by the field of view) are handed back."""
    groups, n = ndi.label(border_air)
    if n == 0:
        return border_air
    total = np.bincount(groups.ravel(), minlength=n + 1)
    pure = np.bincount(groups.ravel(), weights=(arr < pure_hu).ravel(), minlength=n + 1)
    keep = pure >= fraction * np.maximum(total, 1)
    keep[0] = False
    return keep[groups]


def _per_slice_largest(labels: np.ndarray, n: int) -> np.ndarray:
    """Boolean lookup (n + 1,) selecting, in every slice, its largest 2-D component."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    objs = ndi.find_objects(labels)
    z_of = np.array([o[0].start if o is not None else -1 for o in objs])
    keep = np.zeros(n + 1, bool)
    order = np.lexsort((-sizes[1:], z_of))  # by slice, biggest first
    z_sorted = z_of[order]
    first = np.ones(len(order), bool)
    first[1:] = z_sorted[1:] != z_sorted[:-1]
    keep[order[first] + 1] = True
    return keep


def _bbox(mask: np.ndarray, pad) -> tuple[slice, slice, slice]:
    """Bounding box of a non-empty mask, grown by ``pad`` voxels per axis and clipped."""
    out = []
    for ax, p in enumerate(pad):
        other = tuple(a for a in range(3) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, int(hit[0]) - p), min(mask.shape[ax], int(hit[-1]) + p + 1)))
    return tuple(out)


def _find_airways(interior: np.ndarray, lab2: np.ndarray, n2: int, vol: Volume,
                  mid_x_index: float, max_area_mm2: float, min_area_mm2: float,
                  max_offset_mm: float, search_mm: float) -> np.ndarray:
    """Boolean (n2 + 1,) lookup of the 2-D air components forming trachea and main bronchi."""
    airway = np.zeros(n2 + 1, bool)
    if n2 == 0:
        return airway
    dz, dy, dx = vol.spacing_mm
    px_area = dy * dx
    area = np.bincount(lab2.ravel(), minlength=n2 + 1) * px_area
    # superior = direction of +world z along the array's z axis
    up = vol.direction[0, 0] >= 0  # higher index is higher world z
    zs = np.flatnonzero(interior.any(axis=(1, 2)))
    if zs.size == 0:
        return airway
    order = zs[::-1] if up else zs
    objs = ndi.find_objects(lab2)
    n_search = max(1, int(round(search_mm / dz)))
    seed = None
    for z in order[:n_search]:
        ids = np.unique(lab2[z][interior[z]])
        best = None
        for i in ids:
            if i == 0 or not (min_area_mm2 <= area[i] <= max_area_mm2):
                continue
            sl = objs[i - 1]
            ys, xs = np.nonzero(lab2[z, sl[1], sl[2]] == i)
            cx = xs.mean() + sl[2].start
            off = abs(cx - mid_x_index) * dx
            h, w = (ys.max() - ys.min() + 1) * dy, (xs.max() - xs.min() + 1) * dx
            round_enough = min(h, w) / max(h, w) > 0.4
            if off <= max_offset_mm and round_enough and (best is None or off < best[0]):
                best = (off, i)
        if best is not None:
            seed = (z, best[1])
            break
    if seed is None:
        return airway
    z0, i0 = seed
    airway[i0] = True
    current = lab2[z0] == i0
    step = -1 if up else 1
    z = z0 + step
    while 0 <= z < lab2.shape[0] and current.any():
        ids = np.unique(lab2[z][current])
        ids = ids[ids > 0]
        nxt = np.zeros_like(current)
        for i in ids:
            if area[i] <= max_area_mm2:
                airway[i] = True
                nxt |= lab2[z] == i
        current = nxt
        z += step
    return airway


def _split_two(comp: np.ndarray, spacing_mm, f, max_erosion_mm: float, ratio: float):
    """Split one boolean component into two by erosion; return int8 labels 1/2 (0 elsewhere) or None."""
    coarse = block_mask(comp, f)
    if coarse.sum() == 0:
        return None
    sp = tuple(s * k for s, k in zip(spacing_mm, f))
    dist = ndi.distance_transform_edt(coarse, sampling=sp)
    for t in np.arange(min(sp), max_erosion_mm + 1e-6, min(sp) / 2):
        cores, n = ndi.label(dist > t)
        if n < 2:
            if n == 0:
                return None
            continue
        sizes = np.bincount(cores.ravel())[1:]
        big = np.argsort(sizes)[::-1][:2]
        if sizes[big[1]] < ratio * sizes[big[0]]:
            continue
        seeds = np.zeros(coarse.shape, np.int8)
        seeds[cores == big[0] + 1] = 1
        seeds[cores == big[1] + 1] = 2
        _, idx = ndi.distance_transform_edt(seeds == 0, sampling=sp, return_indices=True)
        near = seeds[tuple(idx)]
        out = unblock(near, f, comp.shape)
        return np.where(comp, out, 0).astype(np.int8)
    return None


def _close_dents(lungs: np.ndarray, candidates: np.ndarray, spacing_mm, f, radius_mm: float,
                 max_fill_ml: float) -> np.ndarray:
    """Add to each lung the small pieces a ball closing of ``radius_mm`` fills (in ``candidates``)."""
    out = lungs.copy()
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    sp = tuple(s * k for s, k in zip(spacing_mm, f))
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        m = lungs == lab
        if not m.any():
            continue
        pad_vox = [int(np.ceil(radius_mm / s)) + 2 * k for s, k in zip(spacing_mm, f)]
        box = _bbox(m, pad_vox)
        mb = m[box]
        coarse = np.pad(block_mask(mb, f), 1)  # a margin so the ball can roll off the box edge
        dil = ndi.distance_transform_edt(~coarse, sampling=sp) <= radius_mm
        closed = ndi.distance_transform_edt(dil, sampling=sp) > radius_mm
        closed = unblock(closed[1:-1, 1:-1, 1:-1], f, mb.shape)
        added = closed & ~mb & candidates[box] & (out[box] == 0)
        if not added.any():
            continue
        pieces, n = ndi.label(added)
        sizes = np.bincount(pieces.ravel(), minlength=n + 1) * voxel_ml
        small = sizes <= max_fill_ml
        small[0] = False
        sub = out[box]
        sub[small[pieces]] = lab
    return out


@functools.lru_cache(maxsize=2)
def _lesion_net(path: str, mtime_ns: int):
    from nets.lesionnet import load_lesion_net

    return load_lesion_net(path)


def _lesion_probability(vol: Volume, box, sub: np.ndarray, model) -> np.ndarray:
    """The lesion net's probability on ``vol[box]``, computed on 1 mm voxels (its training
    grid) and brought back to ``vol``'s grid when that is not 1 mm."""
    from nets.lesionnet import predict_lesions
    from stages.resample import resample, resample_like

    part = Volume(vol.array[box], spacing_mm=vol.spacing_mm)
    if np.allclose(vol.spacing_mm, 1.0, atol=0.05):
        return predict_lesions(part.array, sub, model)
    one = resample(part, (1.0, 1.0, 1.0), device="cpu")
    lung_one = resample_like(part.with_array(sub), one, order=0, device="cpu")
    prob = predict_lesions(one.array, lung_one.array, model)
    return resample_like(one.with_array(prob), part, order=1, device="cpu").array


def _slab_hulls(labels: np.ndarray, where: np.ndarray, half: int) -> np.ndarray:
    """Per axial slice (only those where ``where`` has voxels), the union over both lungs of the
    convex hull of the lung within ``half`` slices: where a lesion may fill a lung."""
    from skimage.morphology import convex_hull_image

    out = np.zeros(labels.shape, bool)
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        m = labels == lab
        if not m.any():
            continue
        slab = ndi.maximum_filter1d(m.view(np.uint8), 2 * half + 1, axis=0) > 0
        for z in np.flatnonzero(slab.any(axis=(1, 2)) & where.any(axis=(1, 2))):
            out[z] |= convex_hull_image(slab[z])
    return out


def _add_lesions(labels: np.ndarray, vol: Volume, body: np.ndarray, weights: str,
                 threshold: float, min_voxels: int) -> np.ndarray:
    """Step 7: lesion-net pieces touching a lung join it (the lung most of their rim touches)."""
    from pathlib import Path

    from nets.lesionnet import DEFAULT_WEIGHTS

    if not labels.any():
        return labels
    path = DEFAULT_WEIGHTS if weights == "default" else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lesion net weights not found (lungmask: lesions: null "
                                "turns the lesion step off)")
    box = _bbox(labels > 0, (8, 40, 40))  # lesions lie next to the lungs
    sub = labels[box]
    prob = _lesion_probability(vol, box, sub, _lesion_net(str(path), path.stat().st_mtime_ns))
    add = (prob > threshold) & body[box] & (vol.array[box] < BONE_HU) & (sub == 0)
    add &= _slab_hulls(sub, add, LESION_HULL_SLICES)
    pieces, n = ndi.label(add)
    if n == 0:
        return labels
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    around = _bbox(add, (1, 1, 1))  # the pieces and their rim: no need to dilate the whole box
    rim = ndi.binary_dilation(add[around]) & (sub[around] > 0)
    near = np.zeros((n + 1, 3), np.int64)  # per piece: rim voxels of each lung label
    rim_piece = ndi.grey_dilation(pieces[around], size=(3, 3, 3))[rim]
    np.add.at(near, (rim_piece, sub[around][rim].astype(np.int64)), 1)
    out = labels.copy()
    view = out[box]
    lung_of = np.where(near[:, RIGHT_LUNG] >= near[:, LEFT_LUNG], RIGHT_LUNG, LEFT_LUNG).astype(np.uint8)
    keep = (sizes >= min_voxels) & (near[:, 1:].sum(axis=1) > 0)
    keep[0] = False
    view[keep[pieces]] = lung_of[pieces][keep[pieces]]
    return out


def segment_lungs(vol: Volume, *, air_threshold_hu: float = AIR_THRESHOLD_HU,
                  min_lung_ml: float = MIN_LUNG_ML, second_lung_ratio: float = SECOND_LUNG_RATIO,
                  airway_max_area_mm2: float = AIRWAY_MAX_AREA_MM2,
                  airway_min_area_mm2: float = AIRWAY_MIN_AREA_MM2,
                  airway_max_offset_mm: float = AIRWAY_MAX_OFFSET_MM,
                  max_split_erosion_mm: float = MAX_SPLIT_EROSION_MM,
                  max_hole_area_mm2: float = MAX_HOLE_AREA_MM2,
                  closing_radius_mm: float = CLOSING_RADIUS_MM, max_fill_ml: float = MAX_FILL_ML,
                  outside_air_hu: float = OUTSIDE_AIR_HU,
                  outside_air_fraction: float = OUTSIDE_AIR_FRACTION,
                  lesions: str | None = LESIONS, lesion_threshold: float = LESION_THRESHOLD,
                  min_lesion_ml: float = MIN_LESION_ML,
                  work_spacing_mm: float = WORK_SPACING_MM) -> Volume:
    """Label the lungs of a CT volume in Hounsfield units: 0 outside, 1 right lung, 2 left lung.

    Parameters
    ----------
    vol : Volume
        CT in HU, axial, ideally resampled to about 1 mm (any spacing works; sizes are in mm).
    air_threshold_hu : float
        Voxels below this are air or lung parenchyma.
    min_lung_ml : float
        Smallest 3-D air component (mL) that may be a lung.
    second_lung_ratio : float
        A second lung (separate component, or half of a split one) holds at least this
        fraction of the first one's volume; smaller pieces are bowel gas.
    airway_max_area_mm2, airway_min_area_mm2 : float
        Cross-section range (mm^2) of the trachea; tracking down the airways stops where a
        slice component is bigger than ``airway_max_area_mm2`` (the bronchus entered a lung).
    airway_max_offset_mm : float
        The trachea seed lies within this distance (mm, along x) of the body's mid-line.
    max_split_erosion_mm : float
        Deepest erosion (mm) tried when splitting joined lungs.
    max_hole_area_mm2 : float
        Holes of a lung's axial slice up to this area (mm^2) are filled (vessels, nodules);
        bigger ones (the diaphragm's dome ringed by lung) are not.
    closing_radius_mm : float
        Radius (mm) of the ball closing dents of the lung surface (juxta-pleural nodules).
        0 turns the border refinement off.
    max_fill_ml : float
        Pieces added by the closing bigger than this (mL) are dropped.
    outside_air_hu, outside_air_fraction : float
        Border-touching air (grouped in 3-D) is outside the patient when at least
        ``outside_air_fraction`` of it is below ``outside_air_hu``; otherwise it is a lung
        cut by the field of view.  ``outside_air_fraction=0`` treats all border air as outside.
    lesions : str or None
        Weights of the lesion net (step 7): ``"default"`` (the shipped
        ``models/lesion_net.pt``) or a path; ``None`` keeps the classical mask.
    lesion_threshold : float
        Lesion probability (0..1) above which a voxel may join a lung.
    min_lesion_ml : float
        Smallest piece of lesion (mL) that joins a lung.
    work_spacing_mm : float
        Spacing (mm) of the coarse grid used for splitting and closing.

    Returns
    -------
    Volume
        uint8 labels on ``vol``'s grid: 0 background, 1 right lung, 2 left lung.

    Raises
    ------
    TypeError
        If ``vol`` is not a :class:`Volume`.
    ValueError
        If a size setting is negative or the ratio is outside [0, 1].

    Examples
    --------
    >>> body = np.full((40, 60, 80), 40, np.int16)            # soft tissue filling the image
    >>> body[5:35, 15:45, 10:35] = -850                      # patient's right lung (low x)
    >>> body[5:35, 15:45, 45:70] = -850                      # left lung (high x)
    >>> mask = segment_lungs(Volume(body, spacing_mm=(2.0, 2.0, 2.0)))
    >>> sorted(np.unique(mask.array).tolist()), int(mask.array[20, 30, 20]), int(mask.array[20, 30, 60])
    ([0, 1, 2], 1, 2)
    """
    check_volume(vol)
    for name, value in (("min_lung_ml", min_lung_ml), ("airway_max_area_mm2", airway_max_area_mm2),
                        ("airway_min_area_mm2", airway_min_area_mm2),
                        ("airway_max_offset_mm", airway_max_offset_mm),
                        ("max_split_erosion_mm", max_split_erosion_mm),
                        ("max_hole_area_mm2", max_hole_area_mm2),
                        ("closing_radius_mm", closing_radius_mm), ("max_fill_ml", max_fill_ml),
                        ("min_lesion_ml", min_lesion_ml)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not 0 <= lesion_threshold <= 1:
        raise ValueError(f"lesion_threshold must be in [0, 1], got {lesion_threshold!r}")
    if not 0 <= outside_air_fraction <= 1:
        raise ValueError(f"outside_air_fraction must be in [0, 1], got {outside_air_fraction!r}")
    if not 0 <= second_lung_ratio <= 1:
        raise ValueError(f"second_lung_ratio must be in [0, 1], got {second_lung_ratio!r}")
    if not np.isfinite(work_spacing_mm) or work_spacing_mm <= 0:
        raise ValueError(f"work_spacing_mm must be > 0, got {work_spacing_mm!r}")
    if not np.issubdtype(vol.array.dtype, np.number) or np.issubdtype(vol.array.dtype, np.bool_):
        raise TypeError(f"vol.array must hold numbers (HU), got dtype {vol.array.dtype}")

    arr = vol.array
    spacing = np.asarray(vol.spacing_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    f = tuple(max(1, int(round(work_spacing_mm / s))) for s in spacing)
    air = arr < air_threshold_hu

    # 2. outside air and the body, slice by slice
    lab_air, n_air = ndi.label(air, structure=_INPLANE)
    outside_ids = np.zeros(n_air + 1, bool)
    outside_ids[_border_labels(lab_air)] = True
    outside = outside_ids[lab_air]
    del lab_air
    outside = _outside_by_hu(outside, arr, outside_air_hu, outside_air_fraction)
    lab_body, n_body = ndi.label(~outside, structure=_INPLANE)
    body = _per_slice_largest(lab_body, n_body)[lab_body] if n_body else np.zeros(arr.shape, bool)
    del lab_body
    interior = air & body
    xs_body = np.nonzero(body.any(axis=(0, 1)))[0]
    if xs_body.size == 0:
        log.warning("segment_lungs: %s has no body (all air or all tissue); empty mask", vol.scan_id)
        return vol.with_array(np.zeros(arr.shape, np.uint8))
    body_x = body.sum(axis=(0, 1)).astype(np.float64)
    mid_x_index = float((body_x * np.arange(arr.shape[2])).sum() / body_x.sum())

    # 3. airways
    lab2, n2 = ndi.label(interior, structure=_INPLANE)
    airway = _find_airways(interior, lab2, n2, vol, mid_x_index, airway_max_area_mm2,
                           airway_min_area_mm2, airway_max_offset_mm, AIRWAY_SEARCH_MM)
    airway_mask = airway[lab2]
    del lab2
    lung_air = interior & ~airway_mask

    # 4. lungs
    lab3, n3 = ndi.label(lung_air)
    sizes = np.bincount(lab3.ravel(), minlength=n3 + 1) * voxel_ml
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    order = order[sizes[order] >= min_lung_ml]
    labels = np.zeros(arr.shape, np.uint8)
    if order.size == 0:
        log.warning("segment_lungs: %s has no air component of %.0f mL or more; empty mask",
                    vol.scan_id, min_lung_ml)
        return vol.with_array(labels)

    def centre_x_world(m):
        idx = np.array([a.mean() for a in np.nonzero(m)])
        return float(vol.index_to_world(idx)[2]), idx[2]

    first = lab3 == order[0]
    parts = None
    if order.size > 1 and sizes[order[1]] >= second_lung_ratio * sizes[order[0]]:
        second = lab3 == order[1]
        _, i1 = centre_x_world(first)
        _, i2 = centre_x_world(second)
        if (i1 - mid_x_index) * (i2 - mid_x_index) < 0:  # opposite sides of the mid-line
            parts = [first, second]
    del lab3
    if parts is None:
        split = _split_two(first, spacing, f, max_split_erosion_mm, second_lung_ratio)
        if split is not None:
            a, b = split == 1, split == 2
            _, ia = centre_x_world(a)
            _, ib = centre_x_world(b)
            if (ia - mid_x_index) * (ib - mid_x_index) < 0:
                parts = [a, b]
    if parts is None:  # one lung: its side is given by the body's mid-line
        x_lung, _ = centre_x_world(first)
        x_mid = float(vol.index_to_world([arr.shape[0] / 2, arr.shape[1] / 2, mid_x_index])[2])
        labels[first] = LEFT_LUNG if x_lung > x_mid else RIGHT_LUNG
    else:
        xa, _ = centre_x_world(parts[0])
        xb, _ = centre_x_world(parts[1])
        right, left = (parts[0], parts[1]) if xa < xb else (parts[1], parts[0])
        labels[right] = RIGHT_LUNG
        labels[left] = LEFT_LUNG

    # 5. holes (vessels, nodules), each lung on its own
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        m = labels == lab
        if m.any():
            filled = _fill_holes_2d(m, max_hole_area_mm2 / (spacing[1] * spacing[2]))
            labels[filled & (labels == 0)] = lab

    # 6. dents of the border (juxta-pleural nodules)
    if closing_radius_mm > 0:
        labels = _close_dents(labels, body & ~airway_mask, spacing, f, closing_radius_mm, max_fill_ml)

    # 7. lesions filling part of a lung (masses against the wall, hilar masses)
    if lesions is not None:
        labels = _add_lesions(labels, vol, body, lesions, lesion_threshold,
                              max(1, int(round(min_lesion_ml / voxel_ml))))
    return vol.with_array(labels)


def lung_volume_ml(mask: Volume) -> dict:
    """Volume of each lung of a :func:`segment_lungs` mask, in millilitres.

    Parameters
    ----------
    mask : Volume
        Labels 0 (background), 1 (right lung), 2 (left lung).

    Returns
    -------
    dict
        ``{"right_ml": float, "left_ml": float, "total_ml": float}``.

    Raises
    ------
    TypeError
        If ``mask`` is not a Volume of integer labels.

    Examples
    --------
    >>> m = np.zeros((10, 10, 10), np.uint8); m[:5] = 1; m[5:, :2] = 2
    >>> lung_volume_ml(Volume(m, spacing_mm=(2.0, 2.0, 2.0)))
    {'right_ml': 4.0, 'left_ml': 0.8, 'total_ml': 4.8}
    """
    check_volume(mask, "mask")
    if not (np.issubdtype(mask.array.dtype, np.integer) or mask.array.dtype == bool):
        raise TypeError(f"mask must hold integer labels (0, 1, 2), got dtype {mask.array.dtype}")
    voxel_ml = float(np.prod(mask.spacing_mm)) / 1000.0
    counts = np.bincount(mask.array.ravel().astype(np.int64), minlength=3)
    right, left = counts[RIGHT_LUNG] * voxel_ml, counts[LEFT_LUNG] * voxel_ml
    return {"right_ml": round(float(right), 3), "left_ml": round(float(left), 3),
            "total_ml": round(float(right + left), 3)}
