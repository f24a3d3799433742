"""Pictures people would rather look at than read: three orthogonal slices of a scan with the
lung mask outlined and candidates circled (matplotlib, Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import atomic_path
from stages.volume import Volume, xyz_to_zyx

__all__ = ["save_preview", "save_candidate_pictures", "WINDOW_HU", "MAX_MARKS"]

#: Display window (lung window: level -600, width 1500).
WINDOW_HU = (-1350.0, 150.0)
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
        score = row.get("probability", row.get("score", float("nan")))
        title = (f"{ct.scan_id} candidate {i + 1}: ({row['coordX']:.1f}, {row['coordY']:.1f}, "
                 f"{row['coordZ']:.1f}) mm, score {score:.3f}")
        out.append(save_preview(ct, Path(folder) / f"candidate_{i + 1:02d}.png", mask=mask,
                                candidates=candidates.iloc[[i]], centre_zyx_mm=centre, title=title))
    return out
