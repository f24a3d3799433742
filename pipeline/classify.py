"""Stage 2 of the screen: give every candidate a nodule probability with the 3D CNN.

Weights come only from an explicit path (``classify: weights:`` in the config); they are read
with ``torch.load(..., weights_only=True)``.  Cubes are cut around each candidate's world
centre with :func:`stages.patches.extract_patches` exactly as in training, normalised with
the HU window stored in the weights file, and scored with test-time augmentation.

Then :func:`merge_nearby` keeps one mark per nodule: a mark within ``merge_mm`` of a more
probable one is dropped.  A large or lobulated nodule, or one touching a vessel, gives
several detector marks; the 32 mm cubes around them all hold the nodule, so they all score
high, and every one outside the nodule's radius is a false positive in LUNA16's FROC.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["classify_candidates", "merge_nearby", "DEFAULT_WEIGHTS", "MERGE_MM"]

#: The weights `make train` writes and the repository ships (see models/nodule_cnn3d.md).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "nodule_cnn3d.pt"
#: Marks closer than this (mm) to a more probable mark are merged into it.  Chosen on the
#: benchmark's validation scans (``data/bench48/val``: CPM 0.893 unmerged, 0.907 at 8 and
#: 10 mm, 0.900 at 12 and 15 mm with a nodule lost; 5 mm changed nothing) and checked on its
#: training scans (no nodule lost up to 12 mm).
MERGE_MM = 8.0


def merge_nearby(candidates: pd.DataFrame, merge_mm: float = MERGE_MM, *,
                 by: str = "probability") -> pd.DataFrame:
    """Keep the most probable mark of each group of nearby marks (greedy, per scan).

    Marks are visited by decreasing ``by`` (ties keep the table's order); a mark closer than
    ``merge_mm`` (world mm, Euclidean) to one already kept on the same ``seriesuid`` is
    dropped, and the kept mark's ``n_merged`` counts the marks it absorbed.

    Parameters
    ----------
    candidates : DataFrame
        ``coordX, coordY, coordZ`` (world mm) and ``by``; ``seriesuid`` when several scans.
    merge_mm : float
        Merge distance in mm; 0 keeps every mark.
    by : str
        Column ranking the marks (highest first).

    Returns
    -------
    DataFrame
        The kept rows sorted by ``by`` (highest first), index reset, plus ``n_merged``.

    Examples
    --------
    >>> marks = pd.DataFrame({"coordX": [0.0, 5.0, 20.0], "coordY": 0.0, "coordZ": 0.0,
    ...                       "probability": [0.9, 0.95, 0.5]})
    >>> merge_nearby(marks, 8.0)[["coordX", "n_merged"]].values.tolist()
    [[5.0, 1.0], [20.0, 0.0]]
    """
    if not np.isfinite(merge_mm) or merge_mm < 0:
        raise ValueError(f"merge_mm must be a finite number >= 0, got {merge_mm!r}")
    if by not in candidates.columns:
        raise ValueError(f"candidates have no {by!r} column to rank the marks by")
    order = candidates.sort_values(by, ascending=False, kind="stable")
    xyz = order[["coordX", "coordY", "coordZ"]].to_numpy(float)
    scans = order["seriesuid"].to_numpy() if "seriesuid" in order.columns else np.zeros(len(order))
    keep = np.zeros(len(order), bool)
    absorbed = np.zeros(len(order), np.int64)
    for i in range(len(order)):
        kept = np.flatnonzero(keep & (scans == scans[i]))
        if merge_mm > 0 and kept.size:
            d = np.linalg.norm(xyz[kept] - xyz[i], axis=1)
            if d.min() < merge_mm:
                absorbed[kept[np.argmax(d < merge_mm)]] += 1  # the most probable one in reach
                continue
        keep[i] = True
    out = order[keep].reset_index(drop=True)
    out["n_merged"] = absorbed[keep]
    return out


@lru_cache(maxsize=4)
def _model(path: str, mtime_ns: int, device):
    from nets.cnn3d import load_classifier

    return load_classifier(path, device=device)


def classify_candidates(ct, candidates: pd.DataFrame, *, weights=None, device=None, tta: int = 8,
                        batch_size: int = 64, merge_mm: float = 0.0) -> pd.DataFrame:
    """Add a ``probability`` column to ``candidates`` and sort by it (highest first).

    Parameters
    ----------
    ct : Volume
        The HU volume the candidates were found on (any spacing; cubes are resampled).
    candidates : DataFrame
        LUNA16 columns ``coordX, coordY, coordZ`` (world mm) plus anything else (kept).
    weights : str or Path, optional
        Classifier file written by ``make train``; relative paths are taken from the
        repository root; ``None``: :data:`DEFAULT_WEIGHTS`.
    device : str, optional
        ``None``: CUDA if available, else the CPU.
    tta : int
        Flip combinations averaged (1 = none, 8 = all).
    batch_size : int
        Cubes per forward pass.
    merge_mm : float
        Then merge marks closer than this (mm) into the more probable one
        (:func:`merge_nearby`; adds ``n_merged``); 0 keeps every mark.  The screen's
        config sets :data:`MERGE_MM`.

    Raises
    ------
    FileNotFoundError
        The weights file does not exist (train one with ``make train``).
    """
    import torch

    from nets.cnn3d import normalize_hu, predict_tta
    from stages.patches import extract_patches

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.is_absolute() and not path.exists():
        path = DEFAULT_WEIGHTS.parent.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier weights not found; train them with `make train` "
                                "or remove 'classify' from the config's stages")
    model = _model(str(path), path.stat().st_mtime_ns, device)
    out = candidates.copy()
    if len(out) == 0:
        out["probability"] = pd.Series(dtype=float)
        return out
    pre = model.preprocessing
    cubes = extract_patches(ct, centres_xyz_mm=out[["coordX", "coordY", "coordZ"]].to_numpy(float),
                            size_mm=pre["size_mm"], spacing_mm=pre["spacing_mm"])
    x = torch.from_numpy(normalize_hu(cubes, tuple(pre["clip_hu"])))
    prob = predict_tta(model, x, n=tta, batch_size=batch_size).numpy().astype(np.float64)
    where = out.columns.get_loc("score") + 1 if "score" in out.columns else len(out.columns)
    out.insert(where, "probability", np.round(prob, 6))  # LUNA16 columns, score, probability, features
    out = out.sort_values(["probability", "score"], ascending=False, kind="stable").reset_index(drop=True)
    return merge_nearby(out, merge_mm) if merge_mm != 0 else out
