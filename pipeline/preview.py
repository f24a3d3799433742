"""Pictures people would rather look at than read (matplotlib, Agg backend, no display needed):

* :func:`save_preview`: three orthogonal slices of a scan, the lung mask outlined and
  candidates circled (``preview.png``, ``candidate_NN.png``);
* :func:`save_finding_pictures`: per finding, a zoomed crop (:data:`CROP_FIELD_MM` square at
  :data:`CROP_PX_PER_MM`) beside the whole slice it lies on, both from the scan as read (its
  own slices and pixels, not the 1 mm grid), with the source slice number and the finding's
  facts in ``findings.json`` (what ``report.html`` shows).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import atomic_path, write_json
from stages.volume import Volume, xyz_to_zyx

__all__ = ["save_preview", "save_candidate_pictures", "save_finding_pictures", "source_slice",
           "WINDOW_HU", "WINDOW_LABEL", "MAX_MARKS", "CROP_FIELD_MM", "CROP_PX_PER_MM",
           "FINDINGS_JSON", "FINDING_PICTURE", "FINDING_PANEL_PX"]

#: Display window (lung window: level -600, width 1500).
WINDOW_HU = (-1350.0, 150.0)
#: How the window is named on the pictures and in the report.
WINDOW_LABEL = "lung window W1500 / L-600 HU"
#: Marks circled on the overview: the screen classifies every candidate (hundreds on real CT).
MAX_MARKS = 20


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _candidate_index(ct: Volume, candidates) -> np.ndarray:
    if candidates is None or len(candidates) == 0:
        return np.zeros((0, 3))
    xyz = candidates[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
    return ct.world_to_index(xyz_to_zyx(xyz))


def save_preview(ct: Volume, path, *, mask: Volume | None = None, candidates=None,
                 centre_zyx_mm=None, title: str | None = None, radius_col: str = "diameter_mm",
                 max_marks: int = MAX_MARKS) -> Path:
    """Write a PNG of the axial, coronal and sagittal slices through ``centre_zyx_mm``.

    Parameters
    ----------
    ct : Volume
        HU volume (any spacing; slices are drawn with their true aspect ratio).
    path : str or Path
        PNG to write (atomically).
    mask : Volume, optional
        Label volume on ``ct``'s grid, outlined in colour.
    candidates : DataFrame, optional
        LUNA16-style rows (coordX, coordY, coordZ in world mm, optional diameter_mm);
        the first ``max_marks`` rows (the most probable, as the screen sorts them) are
        circled where they lie within 10 mm of a drawn slice, the first in red.
    centre_zyx_mm : array_like, optional
        World point (z, y, x) the slices pass through; default: the first candidate, or
        the centre of the lung mask, or the centre of the volume.
    """
    plt = _figure()
    arr = np.asarray(ct.array, dtype=np.float32)
    if candidates is not None:
        candidates = candidates.head(max_marks)
    cand_idx = _candidate_index(ct, candidates)
    if centre_zyx_mm is not None:
        centre = np.round(ct.world_to_index(centre_zyx_mm)).astype(int)
    elif len(cand_idx):
        centre = np.round(cand_idx[0]).astype(int)
    elif mask is not None and np.any(mask.array):
        centre = np.round(np.argwhere(mask.array > 0).mean(axis=0)).astype(int)
    else:
        centre = np.array(arr.shape) // 2
    centre = np.clip(centre, 0, np.array(arr.shape) - 1)
    sz, sy, sx = ct.spacing_mm
    diam = (candidates[radius_col].to_numpy(dtype=float)
            if candidates is not None and radius_col in getattr(candidates, "columns", []) and len(candidates)
            else np.full(len(cand_idx), 10.0))
    views = [  # (name, image, aspect, axis kept, (row axis, col axis))
        ("axial", arr[centre[0]], sy / sx, 0, (1, 2)),
        ("coronal", arr[::-1, centre[1], :], sz / sx, 1, (0, 2)),
        ("sagittal", arr[::-1, :, centre[2]], sz / sy, 2, (0, 1)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), dpi=80)
    for ax, (name, img, aspect, axis, (ra, ca)) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
                  interpolation="nearest")
        if mask is not None:
            m = mask.array.take(centre[axis], axis=axis)
            if axis != 0:
                m = m[::-1]
            if np.any(m):
                ax.contour(m > 0, levels=[0.5], colors="lime", linewidths=0.8)
        for i, (idx, d) in enumerate(zip(cand_idx, diam)):
            if abs(idx[axis] - centre[axis]) * ct.spacing_mm[axis] > 10:
                continue
            r = idx[ra] if axis == 0 else arr.shape[0] - 1 - idx[ra]
            radius_px = max(d, 6.0) / ct.spacing_mm[ca]
            ax.add_patch(plt.Circle((idx[ca], r), radius_px, fill=False,
                                    color="red" if i == 0 else "yellow", linewidth=1.2))
        ax.set_title(f"{name} {centre[axis]}")
        ax.axis("off")
    fig.suptitle(title or ct.scan_id, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def save_candidate_pictures(ct: Volume, candidates, folder, *, mask: Volume | None = None) -> list[Path]:
    """One ``candidate_NN.png`` per row of ``candidates`` (slices through its centre)."""
    out = []
    for i, (_, row) in enumerate(candidates.reset_index(drop=True).iterrows()):
        centre = xyz_to_zyx([row["coordX"], row["coordY"], row["coordZ"]])
        value = (f"probability {row['probability']:.3f}" if "probability" in row
                 else f"detector score {row.get('score', float('nan')):.3f}")
        title = (f"{ct.scan_id} candidate {i + 1}: ({row['coordX']:.1f}, {row['coordY']:.1f}, "
                 f"{row['coordZ']:.1f}) mm, {value}")
        out.append(save_preview(ct, Path(folder) / f"candidate_{i + 1:02d}.png", mask=mask,
                                candidates=candidates.iloc[[i]], centre_zyx_mm=centre, title=title))
    return out


#: Side of the zoomed field around a finding, mm (a 30 mm mass still shows its margin).
CROP_FIELD_MM = 60.0
#: Drawing scale of the zoomed field, pixels per mm (a 5 mm nodule is 35 pixels across).
CROP_PX_PER_MM = 7.0
#: Each panel of a finding picture (zoomed crop, whole slice) is this many pixels square.
FINDING_PANEL_PX = int(round(CROP_FIELD_MM * CROP_PX_PER_MM))
#: Margin around and between the panels, and the title band above them, pixels.
_PAD_PX, _TITLE_PX = 10, 40
#: ``finding_NN.jpg``: one picture per finding (rank NN in its scan).
FINDING_PICTURE = "finding_{rank:02d}.jpg"
#: The facts of the pictured findings, beside their pictures (read by the report).
FINDINGS_JSON = "findings.json"
#: JPEG quality of the finding pictures: 870x480 pixels of CT in about 65 kB (PNG: 4x that).
JPEG_QUALITY = 88
#: Ring drawn around a finding: this far outside its measured diameter, mm, so that it
#: does not hide the finding's edge.
RING_MARGIN_MM = 3.0


def source_slice(ct: Volume, world_zyx) -> dict:
    """Where a world point lies in the scan as it was read: the slice a viewer shows.

    Parameters
    ----------
    ct : Volume
        The scan as read (:func:`stages.ingest.read_scan`); a DICOM series' ``meta`` carries
        ``slice_positions_mm`` (each slice's position along the slice normal, mm, in slice
        order) and ``instance_numbers``.
    world_zyx : array_like, shape (3,)
        World point (LPS, mm), ``(z, y, x)``.

    Returns
    -------
    dict
        ``slice`` (1-based index of the nearest slice of the series, or of ``ct``'s first
        array axis for other formats), ``n_slices``, ``instance_number`` (DICOM (0020,0013);
        None when absent or not DICOM) and ``distance_mm`` (from the point to that slice's
        plane along the slice normal).

    Examples
    --------
    >>> ct = Volume(np.zeros((5, 4, 4), np.int16), spacing_mm=(2.5, 1, 1), origin_mm=(-10, 0, 0))
    >>> source_slice(ct, (-4.0, 1.0, 1.0))
    {'slice': 3, 'n_slices': 5, 'instance_number': None, 'distance_mm': 1.0}
    """
    world_zyx = np.asarray(world_zyx, dtype=np.float64)
    positions = ct.meta.get("slice_positions_mm")
    if positions:
        along_normal_mm = float(world_zyx @ ct.direction[:, 0])
        positions = np.asarray(positions, dtype=np.float64)
        j = int(np.argmin(np.abs(positions - along_normal_mm)))
        numbers = list(ct.meta.get("instance_numbers") or [])
        number = numbers[j] if j < len(numbers) else None
        return {"slice": j + 1, "n_slices": len(positions),
                "instance_number": None if number is None else int(number),
                "distance_mm": round(abs(float(positions[j]) - along_normal_mm), 2)}
    k_float = float(ct.world_to_index(world_zyx)[0])
    k = int(np.clip(np.round(k_float), 0, ct.shape[0] - 1))
    return {"slice": k + 1, "n_slices": ct.shape[0], "instance_number": None,
            "distance_mm": round(abs(k_float - k) * ct.spacing_mm[0], 2)}


def _display_axes(ct: Volume) -> tuple[str, bool, bool, bool]:
    """How to show ``ct``'s slices (its first array axis) the way radiologists read them.

    Returns ``(plane, transpose, flip_rows, flip_cols)``: an axial scan (slice normal within
    45 degrees of world z) is turned so that columns run to the patient's left (+x: the
    patient's right on the viewer's left) and rows to posterior (+y), whatever order its
    pixels were stored in; another plane is shown as stored.
    """
    d = ct.direction  # column j: array axis j's world direction, (z, y, x) components
    plane = ("axial", "coronal", "sagittal")[int(np.argmax(np.abs(d[:, 0])))]
    if plane != "axial":
        return plane, False, False, False
    transpose = abs(d[2, 1]) > abs(d[2, 2])  # array axis 1 (rows) runs along x: swap
    row_axis, col_axis = (2, 1) if transpose else (1, 2)
    return plane, transpose, bool(d[1, row_axis] < 0), bool(d[2, col_axis] < 0)


def _slice_image(arr: np.ndarray, k: int, transpose: bool, flip_rows: bool, flip_cols: bool) -> np.ndarray:
    img = arr[k].T if transpose else arr[k]
    return img[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def _mask_on_slice(ct: Volume, k: int, mask: Volume) -> np.ndarray:
    """``mask`` (any grid) sampled at the pixel centres of ``ct``'s slice ``k`` (nearest voxel;
    0 outside it), shape ``ct.shape[1:]``; a mask on ``ct``'s own grid is read as it is."""
    if mask.same_geometry(ct):
        return (mask.array[k] > 0).astype(np.uint8)
    rows, cols = np.meshgrid(np.arange(ct.shape[1]), np.arange(ct.shape[2]), indexing="ij")
    index = np.stack([np.full(rows.shape, k), rows, cols], axis=-1).reshape(-1, 3)
    at = np.round(mask.world_to_index(ct.index_to_world(index))).astype(np.int64)
    inside = np.all((at >= 0) & (at < np.asarray(mask.shape)), axis=1)
    out = np.zeros(len(at), dtype=np.uint8)
    out[inside] = mask.array[tuple(at[inside].T)] > 0
    return out.reshape(ct.shape[1:])


#: Behind the labels drawn on an image: legible on lung and on bone alike.
_LABEL_BOX = {"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2}


def _scale_bar(ax, plt, x0_mm: float, y_mm: float, length_mm: float) -> None:
    """A white bar ``length_mm`` long (outlined in black) starting at ``(x0_mm, y_mm)``, labelled."""
    ax.add_patch(plt.Rectangle((x0_mm, y_mm), length_mm, length_mm / 25, facecolor="white",
                               edgecolor="black", linewidth=0.8))
    ax.text(x0_mm + length_mm / 2, y_mm - length_mm / 20, f"{length_mm:g} mm", color="white",
            ha="center", va="bottom", fontsize=10, bbox=_LABEL_BOX)


def save_finding_pictures(ct: Volume, candidates, folder, *, mask: Volume | None = None) -> list[dict]:
    """One ``finding_NN.jpg`` per row of ``candidates`` and their facts in ``findings.json``.

    Each picture holds, from the scan as read (``ct``'s own slices and pixels), on the slice
    nearest the finding: left, a zoomed crop (:data:`CROP_FIELD_MM` mm square, drawn at
    :data:`CROP_PX_PER_MM` pixels per mm with bilinear interpolation) with the finding ringed
    in red, the other rows' findings on that slice in dashed yellow with their rank, the
    window named and a 10 mm scale bar; right, the whole slice with the crop's field as a
    cyan square, the lung mask's outline in green and a 50 mm scale bar.  Both use
    :data:`WINDOW_HU`.  (A series the ingest put on a regular z grid, ``meta["z_resampled"]``,
    is drawn from that grid's slice nearest the finding; the title still names the source
    slice.)  Earlier ``finding_*.jpg`` files in ``folder`` are removed first.

    Parameters
    ----------
    ct : Volume
        The scan as read (int16 HU; :func:`source_slice` finds the source slice in its meta).
    candidates : DataFrame or None
        The findings to draw, most probable first (the row order is the rank): LUNA16
        ``coordX, coordY, coordZ`` (world LPS mm), ``diameter_mm``, and where present
        ``probability``, ``score``, ``finding`` (nodule or mass).  None or empty: no
        pictures, an empty ``findings.json``.
    folder : str or Path
        The scan's output folder.
    mask : Volume, optional
        Lung labels on any grid (the 1 mm one): outlined on the whole slice.

    Returns
    -------
    list of dict
        What ``findings.json`` holds, one dict per finding: ``rank`` (1-based, in the
        scan), ``picture`` (file name), ``probability`` and ``score`` (None when the
        column is absent), ``diameter_mm``, ``finding``, ``coordX``, ``coordY``,
        ``coordZ`` (world LPS mm), ``source_slice``, ``n_source_slices``,
        ``instance_number`` (see :func:`source_slice`), ``plane`` and ``crop_px_per_mm``.
    """
    folder = Path(folder)
    for old in folder.glob("finding_*.jpg"):
        old.unlink()
    rows = [] if candidates is None else list(candidates.reset_index(drop=True).iterrows())
    plane, transpose, flip_rows, flip_cols = _display_axes(ct)
    row_axis, col_axis = (2, 1) if transpose else (1, 2)
    row_mm, col_mm = ct.spacing_mm[row_axis], ct.spacing_mm[col_axis]
    n_rows, n_cols = ct.shape[row_axis], ct.shape[col_axis]
    arr = ct.array

    def display_mm(index_zyx: np.ndarray) -> tuple[float, float]:
        """A continuous (z, y, x) index of ``ct`` -> (horizontal, vertical) mm on the picture."""
        r, c = (index_zyx[2], index_zyx[1]) if transpose else (index_zyx[1], index_zyx[2])
        r = n_rows - 1 - r if flip_rows else r
        c = n_cols - 1 - c if flip_cols else c
        return c * col_mm, r * row_mm

    extent = (-col_mm / 2, (n_cols - 0.5) * col_mm, (n_rows - 0.5) * row_mm, -row_mm / 2)
    centres = [ct.world_to_index(xyz_to_zyx([row["coordX"], row["coordY"], row["coordZ"]]))
               for _, row in rows]
    diameters = [float(row.get("diameter_mm", 6.0)) for _, row in rows]
    plt = _figure()
    facts = []
    for i, (_, row) in enumerate(rows):
        rank = i + 1
        k = int(np.clip(np.round(centres[i][0]), 0, ct.shape[0] - 1))
        where = source_slice(ct, xyz_to_zyx([row["coordX"], row["coordY"], row["coordZ"]]))
        img = _slice_image(arr, k, transpose, flip_rows, flip_cols)
        h_mm, v_mm = display_mm(centres[i])
        width_px = 3 * _PAD_PX + 2 * FINDING_PANEL_PX
        height_px = 2 * _PAD_PX + _TITLE_PX + FINDING_PANEL_PX
        fig = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor="black")
        panel_w, panel_h = FINDING_PANEL_PX / width_px, FINDING_PANEL_PX / height_px
        crop = fig.add_axes((_PAD_PX / width_px, _PAD_PX / height_px, panel_w, panel_h))
        whole = fig.add_axes(((2 * _PAD_PX + FINDING_PANEL_PX) / width_px, _PAD_PX / height_px,
                              panel_w, panel_h))
        for ax in (crop, whole):
            ax.set_facecolor("black")
            ax.imshow(img, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], extent=extent,
                      origin="upper", interpolation="bilinear" if ax is crop else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
        half = CROP_FIELD_MM / 2
        crop.set_xlim(h_mm - half, h_mm + half)
        crop.set_ylim(v_mm + half, v_mm - half)
        for j, (centre, d) in enumerate(zip(centres, diameters)):
            if j != i and abs(centre[0] - k) * ct.spacing_mm[0] <= max(d / 2, ct.spacing_mm[0] / 2):
                oh, ov = display_mm(centre)
                crop.add_patch(plt.Circle((oh, ov), d / 2 + RING_MARGIN_MM, fill=False, color="yellow",
                                          linestyle="--", linewidth=1.2))
                crop.text(oh + d / 2 + RING_MARGIN_MM, ov, f" {j + 1}", color="yellow", fontsize=10,
                          clip_on=True)
        crop.add_patch(plt.Circle((h_mm, v_mm), diameters[i] / 2 + RING_MARGIN_MM, fill=False,
                                  color="red", linewidth=1.5))
        _scale_bar(crop, plt, h_mm + half - 15, v_mm + half - 4, 10.0)
        crop.text(h_mm - half + 1.5, v_mm - half + 1.5, f"rank {rank} in this scan\n{WINDOW_LABEL}",
                  color="white", va="top", fontsize=10, bbox=_LABEL_BOX)
        if mask is not None:
            m = _slice_image(_mask_on_slice(ct, k, mask)[None], 0, transpose, flip_rows, flip_cols)
            if np.any(m):
                whole.contour(m, levels=[0.5], colors="lime", linewidths=0.8, extent=extent,
                              origin="upper")
        whole.add_patch(plt.Rectangle((h_mm - half, v_mm - half), CROP_FIELD_MM, CROP_FIELD_MM,
                                      fill=False, color="cyan", linewidth=1.2))
        whole.add_patch(plt.Circle((h_mm, v_mm), diameters[i] / 2 + RING_MARGIN_MM, fill=False,
                                   color="red", linewidth=1.2))
        size_mm = max(n_cols * col_mm, n_rows * row_mm)
        whole.set_xlim(extent[0], extent[0] + size_mm)
        whole.set_ylim(extent[3] + size_mm, extent[3])
        _scale_bar(whole, plt, extent[0] + size_mm - 60, extent[3] + size_mm * 0.97, 50.0)
        if plane == "axial":  # radiological convention: the patient's right on the viewer's left
            for x, side in ((0.01, "R"), (0.99, "L")):
                whole.text(x, 0.5, side, transform=whole.transAxes, color="white", fontsize=12,
                           ha="left" if side == "R" else "right", va="center")
        number = "" if where["instance_number"] is None else f", InstanceNumber {where['instance_number']}"
        fig.text(0.5, 1 - 0.5 * _TITLE_PX / height_px,
                 f"{plane} slice {where['slice']} of {where['n_slices']}{number}: zoomed "
                 f"{CROP_FIELD_MM:g} mm field (left), whole slice (right)",
                 color="white", ha="center", va="center", fontsize=11)
        name = FINDING_PICTURE.format(rank=rank)
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="jpeg", dpi=100, facecolor="black",
                        pil_kwargs={"quality": JPEG_QUALITY})
        plt.close(fig)
        facts.append({
            "rank": rank, "picture": name,
            "probability": _value(row.get("probability")), "score": _value(row.get("score")),
            "diameter_mm": round(diameters[i], 2), "finding": str(row.get("finding", "nodule")),
            "coordX": round(float(row["coordX"]), 2), "coordY": round(float(row["coordY"]), 2),
            "coordZ": round(float(row["coordZ"]), 2),
            "source_slice": where["slice"], "n_source_slices": where["n_slices"],
            "instance_number": where["instance_number"], "plane": plane,
            "crop_px_per_mm": CROP_PX_PER_MM,
        })
    write_json({"scan_id": ct.scan_id, "window": WINDOW_LABEL, "findings": facts}, folder / FINDINGS_JSON)
    return facts


def _value(value) -> float | None:
    """A number of a candidates row as a float; None for an absent column or NaN."""
    return None if value is None or not np.isfinite(float(value)) else float(value)
