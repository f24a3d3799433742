"""Stage 2 of the screen: give every candidate a nodule probability with the 3D CNN.

Weights come only from an explicit path (``classify: weights:`` in the config); they are read
with ``torch.load(..., weights_only=True)``.  Cubes are cut around each candidate's world
centre with :func:`stages.patches.extract_patches` exactly as in training, normalised with
the HU window stored in the weights file, and scored with test-time augmentation.

Then :func:`merge_nearby` keeps one confident mark per nodule: a mark within ``merge_mm``
of a more probable one is demoted (its probability times ``DEMOTE``, as in soft non-maximum
suppression) and flagged ``merged``.  A large or lobulated nodule, or one touching a vessel,
gives several detector marks; the 32 mm cubes around them all hold the nodule, so they all
score high, and every one outside the nodule's radius is a false positive in LUNA16's FROC.
Demoted rather than dropped, the marks still count for the detector's recall, and a nodule
whose only mark sat next to a more probable false positive is found at low thresholds.

A mass (``finding == "mass"``, over 30 mm) does not fit the 32 mm cube, so its cube is
sampled coarser: the same number of samples, spaced so that the mass spans
``MASS_SPAN_SAMPLES`` of them (an 88 mm mass: 3.7 mm samples).  The net sees the whole
lesion with some context, at the size of the nodules it learnt from, and ranks it with
them by one probability.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["classify_candidates", "embed_candidates", "EMBED_TOP", "merge_nearby", "DEFAULT_WEIGHTS", "MERGE_MM", "DEMOTE", "TTA_TOP"]

#: The weights `make train` writes and the repository ships (see models/nodule_cnn3d.md).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "nodule_cnn3d.pt"
#: Marks closer than this (mm) to a more probable mark are merged into it.  Chosen on the
#: benchmark's validation scans, never on its test scans: with the shipped model, CPM on
#: ``data/bench96/val`` (14 scans, 35 nodules) 0.751 unmerged, 0.755 at 8 mm, 0.784 at 10
#: and 12 mm; on ``data/bench48/val`` (7 scans, 20 nodules) 0.921 unmerged, at 8 and 10 mm,
#: 0.929 at 12 mm.  Dropping the merged marks instead gives the same CPM there but loses a
#: nodule's only mark (p = 0.03, 7 mm from a 0.06 false positive) from the recall.
MERGE_MM = 10.0
#: A merged mark's probability is multiplied by this (0 drops it).
DEMOTE = 0.01
#: Candidates, best first by the CNN's first pass, that get test-time augmentation
#: (LUNA16's FROC reads a scan's 100 most probable marks).
TTA_TOP = 100
#: Candidates, the most probable first, whose CNN embedding :func:`embed_candidates` keeps
#: (what the patient RNN reads: :data:`nets.rnn.MAX_CANDIDATES`).
EMBED_TOP = 32
#: A mass's cube is sampled so that its diameter spans this many of the cube's samples.
MASS_SPAN_SAMPLES = 24.0


def merge_nearby(candidates: pd.DataFrame, merge_mm: float = MERGE_MM, *,
                 by: str = "probability", demote: float = DEMOTE) -> pd.DataFrame:
    """Keep the most probable mark of each group of nearby marks confident (greedy, per scan).

    Marks are visited by decreasing ``by`` (ties keep the table's order).  A mark closer
    than ``merge_mm`` (world mm, Euclidean) to one already kept on the same ``seriesuid`` is
    merged into the most probable such mark: its ``by`` is multiplied by ``demote`` and its
    ``merged`` flag set (``demote=0`` drops it instead); the kept mark's ``n_merged``
    counts the marks merged into it.

    Parameters
    ----------
    candidates : DataFrame
        ``coordX, coordY, coordZ`` (world mm) and ``by``; ``seriesuid`` when several scans.
    merge_mm : float
        Merge distance in mm; 0 keeps every mark as it is.
    by : str
        Column ranking the marks (highest first).
    demote : float
        Factor in [0, 1) applied to a merged mark's ``by``; 0 drops merged marks.

    Returns
    -------
    DataFrame
        The rows sorted by ``by`` (highest first, after demotion), index reset, plus
        ``merged`` (bool) and ``n_merged`` (int).

    Examples
    --------
    >>> marks = pd.DataFrame({"coordX": [0.0, 5.0, 20.0], "coordY": 0.0, "coordZ": 0.0,
    ...                       "probability": [0.9, 0.95, 0.5]})
    >>> merge_nearby(marks, 8.0).round(3)[["coordX", "probability", "merged", "n_merged"]].values.tolist()
    [[5.0, 0.95, False, 1], [20.0, 0.5, False, 0], [0.0, 0.009, True, 0]]
    >>> merge_nearby(marks, 8.0, demote=0.0)["coordX"].tolist()
    [5.0, 20.0]
    """
    if not np.isfinite(merge_mm) or merge_mm < 0:
        raise ValueError(f"merge_mm must be a finite number >= 0, got {merge_mm!r}")
    if not 0 <= demote < 1:
        raise ValueError(f"demote must be in [0, 1), got {demote!r}")
    if by not in candidates.columns:
        raise ValueError(f"candidates have no {by!r} column to rank the marks by")
    order = candidates.sort_values(by, ascending=False, kind="stable").reset_index(drop=True)
    xyz = order[["coordX", "coordY", "coordZ"]].to_numpy(float)
    scans = order["seriesuid"].to_numpy() if "seriesuid" in order.columns else np.zeros(len(order))
    keep = np.ones(len(order), bool)
    absorbed = np.zeros(len(order), np.int64)
    if merge_mm > 0:  # scan by scan (a run-level table holds every scan's marks)
        _, scan_of = np.unique(scans, return_inverse=True)
        by_scan = np.argsort(scan_of, kind="stable")  # each scan's rows, most probable first
        for rows in np.split(by_scan, np.cumsum(np.bincount(scan_of))[:-1]):
            kept: list[int] = []
            for i in rows:
                if kept:
                    near = np.flatnonzero(np.linalg.norm(xyz[kept] - xyz[i], axis=1) < merge_mm)
                    if near.size:  # merged into the most probable kept mark in reach
                        keep[i] = False
                        absorbed[kept[near[0]]] += 1
                        continue
                kept.append(i)
    order["merged"] = ~keep
    order["n_merged"] = absorbed
    if demote == 0:
        return order[keep].reset_index(drop=True)
    order[by] = np.where(keep, order[by].to_numpy(float), order[by].to_numpy(float) * demote)
    return order.sort_values(by, ascending=False, kind="stable").reset_index(drop=True)


def _one_finding_per_mass(out: pd.DataFrame) -> pd.DataFrame:
    """A mass takes the best probability of the marks inside it (its members, same
    ``mass_id``), which are then dropped: one lesion, one finding, scored by its best view
    (the coarse cube of the whole mass, or a 32 mm cube on part of it)."""
    ids = out["mass_id"].to_numpy()
    if not (ids > 0).any():
        return out
    is_mass = (out["finding"] == "mass").to_numpy() if "finding" in out.columns else np.zeros(len(out), bool)
    prob = out["probability"].to_numpy().copy()
    best = pd.Series(prob).groupby(ids).max()
    for k in np.unique(ids[is_mass & (ids > 0)]):
        prob[is_mass & (ids == k)] = best[k]
    out = out.assign(probability=prob)
    member = (ids > 0) & ~is_mass & np.isin(ids, ids[is_mass])
    return out[~member]


def _load_weights(weights, device):
    """The classifier in ``weights`` (default :data:`DEFAULT_WEIGHTS`; a relative path not
    found from here is taken from the repository root), loaded once per file version."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.is_absolute() and not path.exists():
        path = DEFAULT_WEIGHTS.parent.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier weights not found; train them with `make train` "
                                "or remove 'classify' from the config's stages")
    return _model(str(path), path.stat().st_mtime_ns, device)


@lru_cache(maxsize=4)
def _model(path: str, mtime_ns: int, device):
    from nets.cnn3d import load_classifier

    return load_classifier(path, device=device)


def classify_candidates(ct, candidates: pd.DataFrame, *, weights=None, device=None, tta: int = 8,
                        tta_top: int | None = TTA_TOP, max_candidates: int | None = None,
                        batch_size: int = 64, merge_mm: float = MERGE_MM, progress=None) -> pd.DataFrame:
    """Add a ``probability`` column to ``candidates`` and sort by it (highest first).

    A cascade: one pass of the CNN over every candidate (no flips), then test-time
    augmentation (``tta`` flip combinations, the first pass's one included) only for the
    ``tta_top`` candidates the first pass ranks highest, the ones LUNA16's FROC reads.  The
    others keep their first-pass probability.  ``max_candidates`` keeps only the first
    pass's best, so the list a scan leaves is short.

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
        Flip combinations averaged for the best candidates (1 = none, 8 = all).
    tta_top : int, optional
        How many candidates, best first by the first pass, get ``tta``; ``None``: all of
        them (every candidate scored ``tta`` times, as before the cascade).
    max_candidates : int, optional
        Keep at most this many candidates, the best by the first pass; ``None``: all.
    batch_size : int
        Cubes per forward pass.
    merge_mm : float
        Then merge marks closer than this (mm) into the more probable one
        (:func:`merge_nearby`, which demotes them; adds ``merged`` and ``n_merged``); 0
        keeps every mark as it is.
    progress : callable, optional
        ``progress(done, total)`` as cubes are scored (forward passes of one cube, both
        passes counted; ``total`` is known from the start).

    Returns
    -------
    DataFrame
        ``candidates`` with ``probability`` after ``score`` and ``tta`` (bool: the
        probability is a ``tta``-flip average), most probable first.

    Raises
    ------
    FileNotFoundError
        The weights file does not exist (train one with ``make train``).
    """
    import torch

    from nets.cnn3d import FLIP_AXES, normalize_hu, predict_tta
    from stages.patches import extract_patches

    if tta_top is not None and tta_top < 0:
        raise ValueError(f"tta_top must be >= 0 or None, got {tta_top!r}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1 or None, got {max_candidates!r}")
    model = _load_weights(weights, device)
    out = candidates.copy()
    if len(out) == 0:
        out["probability"] = pd.Series(dtype=float)
        out["tta"] = pd.Series(dtype=bool)
        return out
    pre = model.preprocessing
    centres = out[["coordX", "coordY", "coordZ"]].to_numpy(float)
    cubes = extract_patches(ct, centres_xyz_mm=centres, size_mm=pre["size_mm"], spacing_mm=pre["spacing_mm"])
    if "finding" in out.columns:  # masses: the whole lesion, in coarser samples
        n_side = cubes.shape[1]
        for i in np.flatnonzero((out["finding"] == "mass").to_numpy()):
            step = max(float(pre["spacing_mm"]), float(out["diameter_mm"].iloc[i]) / MASS_SPAN_SAMPLES)
            cubes[i] = extract_patches(ct, centres_xyz_mm=centres[i:i + 1], size_mm=n_side * step,
                                       spacing_mm=step)[0]
    x = torch.from_numpy(normalize_hu(cubes, tuple(pre["clip_hu"])))
    n_top = len(x) if tta_top is None else min(int(tta_top), len(x))
    n_more = (tta - 1) if tta > 1 else 0
    total = len(x) + n_top * n_more

    def counted_from(start):  # both passes report against one total
        return None if progress is None else (lambda done, _: progress(start + done, total))

    prob = predict_tta(model, x, n=1, batch_size=batch_size,
                       progress=counted_from(0)).numpy().astype(np.float64)
    # the first pass's ranking (ties: the detector's order) picks who gets the flips and who stays
    rank = np.argsort(-prob, kind="stable")
    top = rank[:n_top]
    if n_more and n_top:
        flipped = predict_tta(model, x[torch.from_numpy(top)], flips=FLIP_AXES[1:tta],
                              batch_size=batch_size, progress=counted_from(len(x))).numpy().astype(np.float64)
        prob[top] = (prob[top] + n_more * flipped) / tta
    augmented = np.zeros(len(x), bool)
    augmented[top] = n_more > 0
    where = out.columns.get_loc("score") + 1 if "score" in out.columns else len(out.columns)
    out.insert(where, "probability", np.round(prob, 6))  # LUNA16 columns, score, probability, features
    out.insert(where + 1, "tta", augmented)
    if max_candidates is not None:
        out = out.iloc[np.sort(rank[:max_candidates])]
    if "mass_id" in out.columns:
        out = _one_finding_per_mass(out)
    out = out.sort_values(["probability", "score"], ascending=False, kind="stable").reset_index(drop=True)
    return merge_nearby(out, merge_mm) if merge_mm != 0 else out


def embed_candidates(ct, candidates: pd.DataFrame, *, weights=None, device=None,
                     top: int = EMBED_TOP) -> pd.DataFrame:
    """The CNN's embedding (:meth:`nets.cnn3d.NoduleNet3D.embed`) of the ``top`` most probable
    candidates: what the patient RNN reads (:mod:`pipeline.patients`).

    One forward pass of ``top`` cubes (no flips), cut as the classify stage cuts them (the
    weights file's cube size and spacing; a 32 mm cube at 1 mm for the shipped classifier),
    about ``top / (N + 7 * TTA_TOP)`` of the classify stage's CNN work for ``N`` candidates.

    Parameters
    ----------
    ct : Volume
        The HU volume the candidates were found on.
    candidates : DataFrame
        Classified candidates (``coordX, coordY, coordZ``, ``probability``).
    weights, device
        As :func:`classify_candidates`.
    top : int
        How many candidates, by decreasing probability (ties: the table's order).

    Returns
    -------
    DataFrame
        One row per embedded candidate, most probable first: ``coordX, coordY, coordZ,
        probability``, then ``emb_000`` .. ``emb_{D-1}`` (float32 values).
    """
    import torch

    from nets.cnn3d import normalize_hu
    from stages.patches import extract_patches

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top!r}")
    model = _load_weights(weights, device)
    order = np.argsort(-candidates["probability"].to_numpy(float), kind="stable")[:top]
    best = candidates.iloc[order]
    cols = [f"emb_{i:03d}" for i in range(model.embed_dim)]
    out = best[["coordX", "coordY", "coordZ", "probability"]].reset_index(drop=True)
    if len(best) == 0:
        return pd.concat([out, pd.DataFrame(columns=cols, dtype=np.float32)], axis=1)
    pre = model.preprocessing
    cubes = extract_patches(ct, centres_xyz_mm=best[["coordX", "coordY", "coordZ"]].to_numpy(float),
                            size_mm=pre["size_mm"], spacing_mm=pre["spacing_mm"])
    return pd.concat([out, pd.DataFrame(embed_cubes(model, cubes), columns=cols)], axis=1)


def embed_cubes(model, cubes_hu: np.ndarray) -> np.ndarray:
    """``(N, D)`` float32 embeddings of ``(N, n, n, n)`` HU cubes cut as ``model.preprocessing``
    says (:func:`embed_candidates`'s forward pass; the patient model's training reads the
    same), in one batch on the model's device; ``(0, D)`` for no cubes."""
    import torch

    from nets.cnn3d import normalize_hu

    if len(cubes_hu) == 0:
        return np.zeros((0, model.embed_dim), np.float32)
    x = torch.from_numpy(normalize_hu(cubes_hu, tuple(model.preprocessing["clip_hu"])))[:, None]
    device_of = next(model.parameters()).device
    with torch.inference_mode():
        return model.embed(x.to(device_of).contiguous(memory_format=torch.channels_last_3d)).float().cpu().numpy()
