"""``make train``: train the 3D CNN false-positive classifier on a LUNA16-like tree.

``lungscreen train --data DIR [--config configs/train.yaml] [--out models/] [--epochs N] [--device auto|cpu|cuda]``
(or ``python -m pipeline.training ...``).  The settings are :func:`train_classifier`'s keyword
arguments: its defaults, then ``--config``'s (``configs/train.yaml``: what ``make train``
changes), then the flags given.

The tree (LUNA16 as distributed, or :mod:`synth.benchmark_data`'s benchmark)::

    DIR/subset0..subset9/<seriesuid>.mhd   or   DIR/train|val|test/<seriesuid>.mhd
    DIR/annotations.csv                    seriesuid,coordX,coordY,coordZ,diameter_mm
    DIR/candidates_V2.csv  (optional)      seriesuid,coordX,coordY,coordZ,class
    DIR/annotations_excluded.csv (optional) findings < 3 mm: never used as negatives

(each table may instead sit in the scan folders, ``DIR/<split>/annotations.csv``, as the
benchmark writes them).

Steps: find scans and split them (``train``/``val`` folders; else the last ``subset*`` is
validation; else a fixed 80/20 split of the uids); take the candidates (``candidates_V2.csv``,
else :func:`stages.candidates.find_candidates` labelled by distance to the annotations, else
the annotations plus random points away from them); keep every positive and at most
``max_neg_per_scan`` negatives per scan; cut ``size_mm`` cubes at 1 mm around each
(:func:`stages.patches.extract_patches`, exactly as :mod:`stages.classify` does) and cache them in HDF5 so later runs and epochs never
re-read scans; train :class:`nets.cnn3d.NoduleNet3D` with :class:`nets.train.Learner`
(one-cycle, a fixed fraction of positives per batch, flips/rotations/zoom, checkpoint every
epoch, CSV log); write the weights, a model card and the log to ``--out``.

LUNA16 10-fold cross-validation (``--fold K``, ``--folds all``; :func:`train_folds`): the
tree is preprocessed once into one cache entry per scan (:mod:`pipeline.luna16_cache`,
``--prep-workers`` processes, resumable after ``kill -9``); fold K trains on the entries of
the subsets but K and (K+1) mod 10 (validation), never opening a file of subset K, then
scores every candidate of subset K (``--negatives``: ``candidates_V2.csv`` or the
detector's) into ``OUT/fold_K/predictions.csv``, and writes ``fold.json`` last.  A rerun
skips done folds and resumes an interrupted one from its checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import atomic_path, write_csv, write_json
from pipeline.evaluate import FOLD_JSON, PREDICTIONS_CSV, SUBMISSION_COLUMNS

log = logging.getLogger(__name__)

__all__ = ["train_classifier", "train_folds", "fold_subsets", "predict_fold", "find_scans", "split_scans", "label_candidates",
           "build_cube_cache", "add_arguments", "run_from_args", "main", "WEIGHTS_NAME",
           "TRAIN_CONFIG"]

WEIGHTS_NAME = "nodule_cnn3d.pt"
#: HDF5 filters of the cached cubes: lossless, about half the size (a cache travels to a
#: GPU machine more easily), one cube per chunk so reads stay random-access.
CACHE_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
#: Bumped whenever the cube cutting changes, so stale caches are not reused.
CUBE_FORMAT = "extract_patches-v1"
#: Fraction of the uids held out for validation when the tree has no split folders.
VAL_FRACTION = 0.2
#: Training batches swept by the LR finder when ``lr`` is None (``--lr auto``).
LR_FIND_ITERS = 100
#: Voxel size (mm) the candidate detector runs at.
DETECT_SPACING_MM = 1.0
#: Candidates per scan asked of the detector for training (None: its default, what the screen
#: sees; more gives more hard negatives).
DETECT_MAX_CANDIDATES = None
#: Random plain-lung points per scan added as negatives next to the detector's candidates.
LUNG_NEG_PER_SCAN = 8
#: Fallback negatives are drawn first from voxels at least this dense (HU): soft tissue, vessels.
NEG_MIN_HU = -500.0
#: Random negatives keep at least this far (mm) beyond an annotation's radius (fallback only).
NEG_MARGIN_MM = 10.0


# ---------------------------------------------------------------------- scans and candidates
def find_scans(root) -> pd.DataFrame:
    """``seriesuid, path, subset`` of every ``subset*/*.mhd`` or ``<split>/*.mhd`` under ``root``."""
    from pipeline.luna16 import find_luna_scans

    root = Path(root)
    scans = find_luna_scans(root)
    if scans.empty:
        rows = [(p.stem, str(p), p.parent.name) for p in sorted(root.glob("*/*.mhd"))]
        scans = pd.DataFrame(rows, columns=["seriesuid", "path", "subset"])
    if scans.empty:
        raise FileNotFoundError(f"no .mhd scans under {root}/subset*/ or {root}/<split>/; "
                                "pass the LUNA16 root (or the benchmark folder) as --data")
    return scans


def split_scans(scans: pd.DataFrame, *, val_fraction: float = VAL_FRACTION) -> pd.Series:
    """``"train"`` or ``"val"`` for each scan (index aligned with ``scans``).

    ``train``/``val`` folders are used as they are (``test`` is never used); with several
    ``subset*`` folders the last is validation; otherwise a fixed hash of the uid decides.
    """
    subsets = sorted(set(scans["subset"]))
    if "train" in subsets:
        split = scans["subset"].map({"train": "train", "val": "val"})
        if "val" not in subsets:
            split = _hash_split(scans["seriesuid"], val_fraction).where(split == "train")
        return split
    if len(subsets) > 1:
        return scans["subset"].map(lambda s: "val" if s == subsets[-1] else "train")
    return _hash_split(scans["seriesuid"], val_fraction)


def _hash_split(uids: pd.Series, val_fraction: float) -> pd.Series:
    h = uids.map(lambda u: int(hashlib.sha1(u.encode()).hexdigest()[:8], 16) / 16**8)
    split = pd.Series(np.where(h < val_fraction, "val", "train"), index=uids.index)
    if (split == "val").sum() == 0 and len(split) > 1:  # tiny trees: hold out the lowest hash
        split[h.idxmin()] = "val"
    return split


def _read_table(root: Path, reader, name: str, scans: pd.DataFrame) -> pd.DataFrame:
    """``reader(root)``, else the concatenation of ``reader(root/<folder>)`` over scan folders
    (the benchmark keeps one ``annotations.csv`` per split)."""
    try:
        return reader(root)
    except FileNotFoundError:
        frames = [reader(root / sub) for sub in sorted(set(scans["subset"]))
                  if (root / sub / name).is_file()]
        if not frames:
            raise
        return pd.concat(frames, ignore_index=True)


def label_candidates(cands: pd.DataFrame, annotations: pd.DataFrame) -> np.ndarray:
    """1 where a candidate lies within an annotation's radius (``diameter_mm / 2``) of its scan."""
    labels = np.zeros(len(cands), dtype=np.int64)
    for uid, ann in annotations.groupby("seriesuid"):
        idx = np.flatnonzero(cands["seriesuid"].to_numpy() == uid)
        if not len(idx):
            continue
        pts = cands.iloc[idx][["coordX", "coordY", "coordZ"]].to_numpy(float)
        centres = ann[["coordX", "coordY", "coordZ"]].to_numpy(float)
        dist = np.linalg.norm(pts[:, None, :] - centres[None], axis=2)
        labels[idx] = (dist <= ann["diameter_mm"].to_numpy(float)[None] / 2).any(axis=1)
    return labels


def _read_scan(path):
    from stages.ingest import read_scan

    return read_scan(path)


def _detected_candidates(scans, annotations, rng, n_random: int, device=None,
                         max_candidates: int | None = None, n_lung: int = 0) -> pd.DataFrame:
    """Candidates when the tree has no candidate list: lungscreen's own detector
    (resample to 1 mm, :func:`stages.lungmask.segment_lungs`,
    :func:`stages.candidates.find_candidates`); random points where it finds nothing.
    Every annotated nodule is added as a positive.  ``max_candidates``: passed to the
    detector (``None``: its default, what the screen sees).  ``n_lung``: that many random
    points of the lung mask, away from the annotations, are added as easy negatives, so the
    classifier also learns what plain lung looks like."""
    try:
        from stages.candidates import find_candidates
        from stages.lungmask import segment_lungs
        from stages.resample import resample
    except ImportError:
        find_candidates = None
        log.warning("no candidates_V2.csv and no stages.candidates: using the annotations as "
                    "positives and random points away from them (dense tissue first) as negatives")
    frames = []
    for row in scans.itertuples():
        vol = _read_scan(row.path)
        ann = annotations[annotations["seriesuid"] == row.seriesuid]
        c = None
        if find_candidates is not None:
            vol1 = (vol if np.allclose(vol.spacing_mm, DETECT_SPACING_MM, atol=0.01)
                    else resample(vol, DETECT_SPACING_MM, device=device))
            kw = {} if max_candidates is None else {"max_candidates": int(max_candidates)}
            mask = segment_lungs(vol1)
            found = find_candidates(vol1, mask, device=device, **kw)
            if len(found):
                c = found[["coordX", "coordY", "coordZ"]].copy()
            lung = _lung_points(mask, ann, rng, n_lung) if n_lung and c is not None else None
            if lung is not None and len(lung):
                c = pd.concat([c, lung], ignore_index=True)
            else:
                log.info("%s: the detector found no candidate; random negatives instead",
                         row.seriesuid)
        if c is None:
            c = _random_points(vol, ann, rng, n_random)
        c.insert(0, "seriesuid", row.seriesuid)
        frames.append(c)
        frames.append(ann[["seriesuid", "coordX", "coordY", "coordZ"]])
    cands = pd.concat(frames, ignore_index=True)
    cands["class"] = label_candidates(cands, annotations)
    return cands


def _lung_points(mask, ann, rng, n: int) -> pd.DataFrame:
    """Up to ``n`` random voxel centres inside ``mask`` (a Volume, non-zero = lung), each more
    than ``NEG_MARGIN_MM`` beyond every annotation's radius; LUNA16 ``coordX/Y/Z`` columns."""
    idx = np.flatnonzero(np.asarray(mask.array).reshape(-1))
    picks = rng.choice(idx, size=min(4 * n, len(idx)), replace=False) if len(idx) else []
    pts = (mask.index_to_world(np.stack(np.unravel_index(picks, mask.shape), -1))[:, ::-1]
           if len(picks) else np.zeros((0, 3)))
    if len(ann) and len(pts):
        centres = ann[["coordX", "coordY", "coordZ"]].to_numpy(float)
        dist = np.linalg.norm(pts[:, None] - centres[None], axis=2)
        pts = pts[(dist > ann["diameter_mm"].to_numpy(float)[None] / 2 + NEG_MARGIN_MM).all(axis=1)]
    return pd.DataFrame(pts[:n], columns=["coordX", "coordY", "coordZ"])


def _random_points(vol, ann, rng, n: int) -> pd.DataFrame:
    """Up to ``n`` points away from the nodules: tissue-dense voxels first (harder negatives:
    vessels, chest wall), then anywhere in the scan."""
    dense = np.flatnonzero(vol.array.reshape(-1) >= NEG_MIN_HU)
    picks = rng.choice(dense, size=min(4 * n, len(dense)), replace=True) if len(dense) else []
    tissue = vol.index_to_world(np.stack(np.unravel_index(picks, vol.shape), -1)) if len(picks) \
        else np.zeros((0, 3))
    lo, hi = vol.bounds_mm()
    pts = np.concatenate([tissue, rng.uniform(lo, hi, size=(4 * n, 3))])[:, ::-1]  # -> (x, y, z)
    if len(ann):
        centres = ann[["coordX", "coordY", "coordZ"]].to_numpy(float)
        dist = np.linalg.norm(pts[:, None] - centres[None], axis=2)
        far = (dist > ann["diameter_mm"].to_numpy(float)[None] / 2 + NEG_MARGIN_MM).all(axis=1)
        pts = pts[far]
    pts = pts[:n]
    return pd.DataFrame(pts, columns=["coordX", "coordY", "coordZ"])


# ---------------------------------------------------------------------- cube cache
def _cache_key(scans, cands, size_mm, spacing_mm) -> str:
    h = hashlib.sha1()
    for row in scans.itertuples():
        st = os.stat(row.path)
        h.update(f"{row.seriesuid}|{row.path}|{st.st_size}|{st.st_mtime_ns}|{row.split}\n".encode())
    h.update(pd.util.hash_pandas_object(cands, index=False).to_numpy().tobytes())
    h.update(f"{size_mm}|{spacing_mm}|{CUBE_FORMAT}".encode())
    return h.hexdigest()[:16]


def build_cube_cache(path, scans: pd.DataFrame, cands: pd.DataFrame, *, size_mm: float = 32.0,
                     spacing_mm: float = 1.0, progress: bool | None = None) -> Path:
    """Cut every candidate's cube once and store it in HDF5 (``<split>/cubes``, ``labels`` ...).

    ``scans`` needs ``seriesuid, path, split``; ``cands`` needs ``seriesuid, coordX/Y/Z, class``.
    Each scan is read once; cubes are cut with :func:`stages.patches.extract_patches`, the
    call :func:`stages.classify.classify_candidates` makes at inference, and stored as int16
    HU (rounded).  The file is written under a temporary name and renamed.
    """
    import h5py
    from tqdm.auto import tqdm

    from stages.patches import extract_patches

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(size_mm / spacing_mm))
    split_of = dict(zip(scans["seriesuid"], scans["split"]))
    cands = cands[cands["seriesuid"].map(split_of).isin(["train", "val"])].reset_index(drop=True)
    cands["split"] = cands["seriesuid"].map(split_of)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update({"size_mm": size_mm, "spacing_mm": spacing_mm})
            dsets = {}
            for split in ("train", "val"):
                m = int((cands["split"] == split).sum())
                g = h5.create_group(split)
                dsets[split] = g.create_dataset("cubes", (m, n, n, n), dtype="int16",
                                                chunks=(1, n, n, n) if m else None,
                                                **(CACHE_COMPRESSION if m else {}))
                part = cands[cands["split"] == split]
                g.create_dataset("labels", data=part["class"].to_numpy(np.uint8))
                g.create_dataset("seriesuid", data=part["seriesuid"].to_numpy().astype("S"))
                g.create_dataset("centre_xyz_mm", data=part[["coordX", "coordY", "coordZ"]].to_numpy(float))
            pos_in_split = cands.groupby("split").cumcount().to_numpy()
            todo = scans[scans["seriesuid"].isin(cands["seriesuid"])]
            for row in tqdm(list(todo.itertuples()), desc="cutting cubes", disable=not progress if
                            progress is not None else None):
                vol = _read_scan(row.path)
                rows = np.flatnonzero(cands["seriesuid"].to_numpy() == row.seriesuid)
                # the call stages.classify makes at inference: the same cubes, float32 HU
                cubes = extract_patches(vol, centres_xyz_mm=cands.loc[rows, ["coordX", "coordY",
                                                                               "coordZ"]].to_numpy(float),
                                        size_mm=size_mm, spacing_mm=spacing_mm)
                cubes = np.clip(np.rint(cubes), -32768, 32767).astype(np.int16)
                for r, cube in zip(rows, cubes):
                    dsets[row.split][pos_in_split[r]] = cube
    return path


class H5Cubes:
    """Array-like view of ``<split>/cubes`` that opens the file lazily in each process."""

    def __init__(self, path, split: str):
        self.path, self.split, self._h5, self._pid = str(path), split, None, None
        import h5py

        with h5py.File(self.path, "r") as h5:
            self.shape = h5[split]["cubes"].shape

    def _dset(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5[self.split]["cubes"]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        return self._dset()[i]

    def __getstate__(self):
        return {**self.__dict__, "_h5": None, "_pid": None}


# ---------------------------------------------------------------------- training
def _prepare_cache(data: Path, out: Path, *, seed, max_neg_per_scan, size_mm, spacing_mm, device,
                   cache_dir, progress, detect_max_candidates, lung_neg_per_scan=0,
                   negatives="auto"):
    """Scans, candidates and labels of ``data``'s train/val splits, cut into a cube cache
    (built unless it exists); returns ``(cache path, candidate source, scans per split)``."""
    from pipeline.luna16 import read_annotations, read_candidates, read_excluded

    dev = device
    rng = np.random.default_rng(seed)
    scans = find_scans(data)
    scans["split"] = split_scans(scans)
    scans = scans[scans["split"].isin(["train", "val"])].reset_index(drop=True)
    annotations = _read_table(data, read_annotations, "annotations.csv", scans)
    from pipeline.luna16_cache import NEGATIVES

    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}; got {negatives!r}")
    cands = None
    if negatives != "detector":
        try:
            cands = _read_table(data, read_candidates, "candidates_V2.csv", scans)
            cand_source = "candidates_V2.csv"
        except FileNotFoundError:
            if negatives == "candidates":
                raise
    if cands is None:
        cands = _detected_candidates(scans, annotations, rng, max_neg_per_scan, device=str(dev),
                                     max_candidates=detect_max_candidates, n_lung=lung_neg_per_scan)
        cand_source = "detected" + (" (no candidates_V2.csv)" if negatives == "auto" else "")
    cands = cands[cands["seriesuid"].isin(scans["seriesuid"])]
    try:  # findings LUNA16 ignores (< 3 mm): neither nodule nor non-nodule examples
        excluded = _read_table(data, read_excluded, "annotations_excluded.csv", scans)
    except FileNotFoundError:
        excluded = None
    if excluded is not None:
        near_excluded = label_candidates(cands, excluded).astype(bool)
        cands = cands[~(near_excluded & (cands["class"].to_numpy() == 0))]
    neg = cands[cands["class"] == 0].sample(frac=1.0, random_state=seed)
    neg = neg[neg.groupby("seriesuid").cumcount().to_numpy() < max_neg_per_scan]
    cands = pd.concat([cands[cands["class"] == 1], neg]).sort_index().reset_index(drop=True)
    cands = cands[["seriesuid", "coordX", "coordY", "coordZ", "class"]]

    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    cache = cache_dir / f"cubes-{_cache_key(scans, cands, size_mm, spacing_mm)}.h5"
    if not cache.exists():
        build_cube_cache(cache, scans, cands, size_mm=size_mm, spacing_mm=spacing_mm,
                         progress=progress)
    return cache, cand_source, {s: int((scans["split"] == s).sum()) for s in ("train", "val")}


# ---------------------------------------------------------------------- LUNA16 folds
# A fold's record FOLD_JSON, written last ({"fold", "train_subsets", "val_subset", "test_subset",
# "test_seriesuids", "done": true, ...}), and its scores of its test subset PREDICTIONS_CSV
# (LUNA16's submission columns): the files `lungscreen evaluate --folds` reads, named there.
PREDICTION_COLUMNS = list(SUBMISSION_COLUMNS)


def fold_subsets(n_subsets: int, fold: int) -> dict:
    """The subsets of fold ``fold`` of ``n_subsets``: test ``fold``, validation
    ``(fold + 1) % n_subsets``, training the others.

    Raises
    ------
    ValueError
        ``n_subsets < 3`` or ``fold`` not in ``0 .. n_subsets - 1``.

    Examples
    --------
    >>> fold_subsets(10, 9)
    {'train': [1, 2, 3, 4, 5, 6, 7, 8], 'val': 0, 'test': 9}
    """
    if n_subsets < 3:
        raise ValueError(f"cross-validation needs at least 3 subsets, got {n_subsets}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_subsets:
        raise ValueError(f"fold must be an int in 0..{n_subsets - 1}, got {fold!r}")
    val = (int(fold) + 1) % n_subsets
    return {"train": [k for k in range(n_subsets) if k not in (fold, val)], "val": val,
            "test": int(fold)}


def _subset_numbers(subsets) -> list[int]:
    """``[0, 1, ...]`` of the folder names ``subset0, subset1, ...``, which must be all there."""
    nums = sorted(int(str(s)[len("subset"):]) for s in set(subsets)
                  if str(s).startswith("subset") and str(s)[len("subset"):].isdigit())
    if nums != list(range(len(nums))) or len(nums) != len(set(subsets)):
        raise ValueError(f"a LUNA16 tree has subset0..subset{len(nums) - 1} and no other scan "
                         f"folder; found {sorted(set(map(str, subsets)))}")
    return nums


def _fold_info(manifest: pd.DataFrame, fold: int, data: Path) -> dict:
    """``fold.json``'s split part, plus the entries of each part under ``_<part>_entries``."""
    n = len(_subset_numbers(manifest["subset"]))
    parts = fold_subsets(n, fold)
    number = manifest["subset"].str[len("subset"):].astype(int)
    rows = {"train": manifest[number.isin(parts["train"])], "val": manifest[number == parts["val"]],
            "test": manifest[number == parts["test"]]}
    return {"fold": int(fold), "train_subsets": parts["train"], "val_subset": parts["val"],
            "test_subset": parts["test"], "test_seriesuids": rows["test"]["seriesuid"].tolist(),
            "n_train_scans": len(rows["train"]), "n_val_scans": len(rows["val"]),
            "data": str(data), **{f"_{k}_entries": v["entry"].tolist() for k, v in rows.items()}}


def _fold_done(fold_out: Path) -> dict | None:
    """The fold's ``fold.json`` when it says done, else None."""
    try:
        info = json.loads((fold_out / FOLD_JSON).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return info if info.get("done") is True else None


def predict_fold(weights, entries, *, device=None) -> pd.DataFrame:
    """Score every cached candidate of ``entries`` with the classifier ``weights``.

    Each entry's candidates are scored on its cached 1 mm CT by
    :func:`stages.classify.classify_candidates` with the screen's defaults (cubes cut as in
    training, test-time flips for each scan's best 100, nearby marks demoted), so the
    probabilities are the ones the screen would give these candidates.  Candidates of
    ``candidates_V2.csv`` have no detector score: ties keep the file's order.

    Returns
    -------
    DataFrame
        :data:`PREDICTION_COLUMNS` (LUNA16's submission: world mm), every candidate once,
        scans in ``entries`` order, most probable first within a scan.
    """
    from pipeline.luna16_cache import read_test_scan
    from stages.classify import classify_candidates

    frames = []
    for entry in entries:
        ct, cands = read_test_scan(entry)
        if not len(cands):
            continue
        if "score" not in cands:
            cands["score"] = 0.0
        scored = classify_candidates(ct, cands, weights=weights, device=device)
        frames.append(scored[PREDICTION_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _reporter(progress):
    """The :class:`pipeline.progress.Reporter` of ``progress`` (None: auto, True: bars,
    False: quiet)."""
    from pipeline.progress import Reporter

    return Reporter({None: "auto", True: "bar", False: "quiet"}[progress])


def _say(reporter, who: str, text: str) -> None:
    """``who: text`` as a reporter line off a terminal, above the bars on one."""
    if reporter.mode == "bar":
        from tqdm.auto import tqdm

        tqdm.write(f"{who}: {text}", file=sys.stderr)
    else:
        reporter.line(who, text)


def _epoch_lines(reporter, name: str):
    """A callback writing one reporter line per epoch (log mode: off a terminal), e.g.
    ``fold 3: epoch 2/10 train_loss=0.31 valid_loss=0.28 roc_auc=0.91 (12.3 s)``.  Defined
    here, on first use: importing :mod:`nets.callbacks` imports torch."""
    from nets.callbacks.core import Callback

    class EpochLines(Callback):
        order = 65

        def after_epoch(self):
            row = self.learn.recorder.values[-1] if self.learn.recorder.values else {}
            vals = " ".join(f"{k}={v:.4g}" for k, v in row.items()
                            if k not in ("epoch", "time_s", "lr") and isinstance(v, float))
            reporter.line(name, f"epoch {self.learn.epoch + 1}/{self.learn.n_epoch} {vals} "
                                f"({row.get('time_s', 0.0):.1f} s)")

    return EpochLines()


def train_folds(data, out="models", folds="all", **settings) -> list[dict]:
    """LUNA16 cross-validation: :func:`train_classifier` with ``fold=K`` for each of ``folds``.

    Parameters
    ----------
    data : str or Path
        The LUNA16 root (``subset0..subset<n-1>``).
    out : str or Path
        Gets ``fold_K/`` per fold and ``cache/`` (the shared preprocessing) unless
        ``cache_dir`` says otherwise.
    folds : "all" or iterable of int
        ``"all"``: one fold per subset, in order.  Folds already done (``fold.json``) are
        skipped; an interrupted one resumes from its checkpoint.
    **settings
        :func:`train_classifier`'s keywords (``fold`` excepted).

    Returns
    -------
    list of dict
        :func:`train_classifier`'s result per fold (``{"skipped": True, ...}`` when done).
    """
    from pipeline.luna16 import find_luna_scans

    if "fold" in settings:
        raise ValueError("give fold or folds, not both")
    scans = find_luna_scans(data)
    if scans.empty:
        raise FileNotFoundError(f"no subset*/*.mhd under {data}; pass the LUNA16 root as --data")
    nums = _subset_numbers(scans["subset"])
    if isinstance(folds, str):
        if folds != "all":
            raise ValueError(f"folds must be 'all' or fold numbers, got {folds!r}")
        folds = nums
    folds = [int(k) for k in folds]
    for k in folds:
        fold_subsets(len(nums), k)  # checks every fold number before anything runs
    # under torchrun rank 0 reports (RANK: torchrun's; the process group starts in the first fold)
    reporter = _reporter(settings.get("progress") if os.environ.get("RANK", "0") == "0" else False)
    results = []
    for i, k in enumerate(folds):
        _say(reporter, f"fold {k}", f"fold {i + 1} of {len(folds)}")
        results.append(train_classifier(data, out, fold=k, **settings))
    return results


def train_classifier(data, out="models", *, epochs: int = 10, batch_size: int = 32,
                     lr: float = 3e-3, weight_decay: float = 1e-4, pos_fraction: float = 0.25,
                     max_neg_per_scan: int = 200, size_mm: float = 32.0, spacing_mm: float = 1.0,
                     widths=(16, 32, 64, 128), dropout: float = 0.2, patience: int = 0,
                     seed: int = 0, device=None, workers: int = 0, resume: bool = False,
                     cache_dir=None, progress: bool | None = None, command: str = "",
                     cache_file=None, detect_max_candidates: int | None = DETECT_MAX_CANDIDATES,
                     lung_neg_per_scan: int = LUNG_NEG_PER_SCAN, init_weights=None,
                     negatives: str = "auto", fold: int | None = None,
                     prep_workers: int = 1) -> dict:
    """Train the false-positive classifier; write weights, model card, log and checkpoint.

    Returns a dict with the written paths, the data counts and the last epoch's metrics.
    ``lr=None`` runs :meth:`nets.train.Learner.lr_find` first and trains at its suggestion.
    Parameters mirror the CLI flags (see ``python -m pipeline.training --help``); units are
    in the names.  ``patience=0`` turns early stopping off.  ``cache_file``: train from that
    cube cache (an ``OUT/cache/cubes-*.h5`` of an earlier run; ``data``, the candidate and cube
    settings are then taken from it), e.g. on a GPU machine that does not hold the scans.
    ``init_weights``: fine-tune, starting from the weights of an earlier classifier file
    (its architecture and cube settings must match; ``widths`` and ``dropout`` are taken
    from it) instead of a random initialisation.
    ``negatives``: ``"candidates"`` (``candidates_V2.csv``), ``"detector"`` (lungscreen's own
    candidates) or ``"auto"`` (the first when the tree has it).

    ``fold=K`` (LUNA16 10-fold cross-validation, ``data`` a ``subset0..9`` tree): the tree is
    preprocessed once into per-scan entries under ``cache_dir`` (default ``out/cache``,
    shared by the folds; :func:`pipeline.luna16_cache.preprocess_luna16`, ``prep_workers``
    processes), the model trains on the entries of every subset but K and (K+1) mod n
    (validation) and never opens subset K's files; then it scores every candidate of
    subset K.  Everything goes to ``out/fold_K/``: the weights, card, log, checkpoint (a
    rerun resumes from it), ``predictions.csv`` (``seriesuid,coordX,coordY,coordZ,
    probability``, world mm) and, last, ``fold.json`` (``"done": true``; a fold whose
    ``fold.json`` says done is skipped).  See :func:`train_folds`.
    """
    import torch

    from nets.callbacks import (Checkpoint, DistributedTrainer, EarlyStopping, MetricsLogger,
                                MixedPrecision, accuracy, roc_auc)
    from nets.cnn3d import NoduleNet3D, save_classifier
    from nets.data import CubeDataset, PositiveFractionSampler, augment_cube
    from nets.distributed import barrier, init_distributed, is_main_process, on_main_process
    from nets.train import DataLoaders, Learner, pick_device, set_seed

    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, or None to run the LR finder; got {lr}")
    if epochs < 1 or batch_size < 2 or max_neg_per_scan < 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 2, max_neg_per_scan >= 0; got "
                         f"{epochs}, {batch_size}, {max_neg_per_scan}")
    out = Path(out)
    ddp = init_distributed(device)  # under torchrun: this rank's place and device; else None
    dev = ddp.device if ddp else pick_device(device)
    if ddp and batch_size % ddp.world_size:
        raise ValueError(f"batch_size {batch_size} does not split over {ddp.world_size} processes; "
                         "make it a multiple of --nproc_per_node")
    fold_info = None
    reporter = _reporter(progress if is_main_process() else False)  # rank 0 reports
    if fold is not None:  # LUNA16 cross-validation: per-scan entries, one fold's subsets
        if cache_file is not None:
            raise ValueError("a fold reads the LUNA16 tree's cache; give --data, not --from-cache")
        if data is None:
            raise ValueError("a fold needs --data, the LUNA16 root (subset0..subset9)")
        data = Path(data)
        fold_out = out / f"fold_{int(fold)}"
        done = _fold_done(fold_out)
        if done is not None:
            _say(reporter, f"fold {fold}", f"done already ({fold_out / FOLD_JSON}); skipped")
            return {"fold": done, "skipped": True, "out": fold_out}
        from pipeline.luna16_cache import EntryCubes, preprocess_luna16

        manifest = on_main_process(  # rank 0 preprocesses what is not cached, the others wait
            preprocess_luna16, data, Path(cache_dir) if cache_dir is not None else out / "cache", negatives=negatives,
            size_mm=size_mm, spacing_mm=spacing_mm, max_neg_per_scan=max_neg_per_scan,
            lung_neg_per_scan=lung_neg_per_scan, detect_max_candidates=detect_max_candidates,
            seed=seed, workers=prep_workers, device=str(dev), progress=reporter.mode)
        fold_info = _fold_info(manifest, int(fold), data)
        cubes = {s: EntryCubes(fold_info.pop(f"_{s}_entries")) for s in ("train", "val")}
        labels = {s: cubes[s].labels for s in ("train", "val")}
        n_scans = {"train": fold_info["n_train_scans"], "val": fold_info["n_val_scans"]}
        cache = Path(manifest["entry"].iloc[0]).parent.parent
        source = {"candidates": "candidates_V2.csv", "detector": "lungscreen's detector"}
        cand_source = (f"{source[manifest.attrs['negatives']]} (LUNA16 fold {fold}: train subsets "
                       f"{','.join(map(str, fold_info['train_subsets']))}, validation subset "
                       f"{fold_info['val_subset']}; test subset {fold} never read in training)")
        out, resume = fold_out, True
        _say(reporter, f"fold {fold}", f"training on {n_scans['train']} scans "
                                      f"({len(labels['train'])} cubes), validating on "
                                      f"{n_scans['val']}; test subset{fold}: "
                                      f"{len(fold_info['test_seriesuids'])} scans")
    elif cache_file is not None:  # train straight from a cube cache (e.g. built on another machine)
        cache = Path(cache_file)
        if not cache.is_file():
            raise FileNotFoundError(f"{cache}: cube cache not found; build one with a run on --data")
        data, cand_source = cache, f"cube cache `{cache.name}`"
        import h5py

        with h5py.File(cache, "r") as h5:
            size_mm, spacing_mm = float(h5.attrs["size_mm"]), float(h5.attrs["spacing_mm"])
            n_scans = {s: len(set(h5[s]["seriesuid"][:])) for s in ("train", "val")}
    else:
        data = Path(data)
        cache, cand_source, n_scans = on_main_process(  # rank 0 cuts the cubes, the others wait
            _prepare_cache, data, out, seed=seed, max_neg_per_scan=max_neg_per_scan, size_mm=size_mm,
            spacing_mm=spacing_mm, device=dev, cache_dir=cache_dir, progress=progress,
            detect_max_candidates=detect_max_candidates, lung_neg_per_scan=lung_neg_per_scan,
            negatives=negatives)
    if fold is None:
        import h5py

        with h5py.File(cache, "r") as h5:
            labels = {s: h5[s]["labels"][:].astype(np.float32) for s in ("train", "val")}
        cubes = {s: H5Cubes(cache, s) for s in ("train", "val")}
    counts = {s: {"cubes": int(len(labels[s])), "positives": int(labels[s].sum()),
                  "scans": int(n_scans[s])} for s in ("train", "val")}
    if counts["train"]["positives"] == 0 or counts["train"]["positives"] == counts["train"]["cubes"]:
        raise ValueError(f"the training split needs nodules and non-nodules, got {counts['train']}; "
                         f"check annotations.csv and the candidates in {data}")

    set_seed(seed)
    aug = partial(augment_cube, scale_range=(0.9, 1.1))
    train_ds = CubeDataset(cubes["train"], labels["train"], augment=aug)
    sampler = PositiveFractionSampler(labels["train"], batch_size, pos_fraction)
    loader = partial(torch.utils.data.DataLoader, num_workers=workers,
                     pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
    train_dl = loader(train_ds, batch_sampler=sampler)
    valid_dl = (loader(CubeDataset(cubes["val"], labels["val"]), batch_size=2 * batch_size)
                if counts["val"]["cubes"] else None)
    if init_weights is not None:
        model = _init_model(init_weights, size_mm=size_mm, spacing_mm=spacing_mm)
    else:
        model = NoduleNet3D(widths, dropout=dropout)
    out.mkdir(parents=True, exist_ok=True)
    cbs = [Checkpoint(out / "checkpoint.pt", resume=resume), MetricsLogger(out / "train_log.csv"),
           MixedPrecision(), DistributedTrainer()]
    if patience and valid_dl is not None:
        cbs.append(EarlyStopping("valid_loss", patience=patience))
    if reporter.mode == "log":
        cbs.append(_epoch_lines(reporter, "training" if fold is None else f"fold {fold}"))
    learn = Learner(model, DataLoaders(train_dl, valid_dl),
                    lambda p, y: torch.nn.functional.binary_cross_entropy_with_logits(p.float(), y),
                    lr=lr or 1e-3, wd=weight_decay, cbs=cbs, metrics=[roc_auc, accuracy], device=dev,
                    progress=progress)
    lr_found = None
    if lr is None:  # "--lr auto": sweep first (weights and RNG are restored afterwards)
        lr_found = learn.lr_find(num_it=LR_FIND_ITERS)
        lr = lr_found.suggested
        log.info("lr_find suggests %.3g (steepest %.3g, min/10 %.3g)", lr, lr_found.steep,
                 lr_found.min_div10)
    t0 = time.perf_counter()
    learn.fit_one_cycle(epochs, lr)
    train_s = time.perf_counter() - t0
    history = learn.recorder.values
    final = history[-1] if history else {}
    info = {"data": str(data), "seed": int(seed), "epochs_run": len(history),
            "trained_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{k: float(v) for k, v in final.items() if k != "epoch"}}
    weights = (save_classifier(learn.model, out / WEIGHTS_NAME, size_mm=size_mm,
                               spacing_mm=spacing_mm, info=info) if is_main_process()
               else out / WEIGHTS_NAME)
    result = {"weights": weights, "log": out / "train_log.csv", "card": out / "nodule_cnn3d.md",
              "init_weights": None if init_weights is None else str(init_weights),
              "checkpoint": out / "checkpoint.pt", "cache": cache, "counts": counts,
              "final": final, "history": history, "device": str(dev), "train_s": train_s,
              "candidates": cand_source, "lr": float(lr),
              "lr_find": None if lr_found is None else {"suggested": lr_found.suggested,
                                                        "steep": lr_found.steep,
                                                        "min_div10": lr_found.min_div10}}
    if is_main_process():  # one writer under torchrun; the other ranks wait at the barrier
        _write_card(result, model=learn.model, data=data, command=command, seed=seed, epochs=epochs,
                    lr=lr, batch_size=batch_size, pos_fraction=pos_fraction, size_mm=size_mm,
                    max_neg_per_scan=max_neg_per_scan, weight_decay=weight_decay)
    if fold_info is not None and is_main_process():
        t0 = time.perf_counter()
        preds = predict_fold(weights, fold_info.pop("_test_entries"), device=dev)
        result["predictions"] = write_csv(preds, out / PREDICTIONS_CSV)
        fold_info.update({"done": True, "negatives": manifest.attrs["negatives"],
                          "n_predictions": len(preds), "weights": WEIGHTS_NAME,
                          "train_s": round(train_s, 2), "predict_s": round(time.perf_counter() - t0, 2),
                          "epochs_run": len(history), "seed": int(seed),
                          "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        write_json(fold_info, out / FOLD_JSON)
        _say(reporter, f"fold {fold}", f"done: {len(preds)} candidates of "
                                      f"{len(fold_info['test_seriesuids'])} test scans scored "
                                      f"-> {out / PREDICTIONS_CSV}")
    if fold_info is not None:
        fold_info.pop("_test_entries", None)
        result["fold"] = fold_info
    barrier()
    return result


def _init_model(path, *, size_mm: float, spacing_mm: float):
    """The classifier saved at ``path``, in training mode, checked against the cube settings."""
    from nets.cnn3d import load_classifier

    model = load_classifier(path, device="cpu")
    pre = model.preprocessing
    if not (np.isclose(pre["size_mm"], size_mm) and np.isclose(pre["spacing_mm"], spacing_mm)):
        raise ValueError(f"{path}: its cubes are {pre['size_mm']:g} mm at {pre['spacing_mm']:g} mm, "
                         f"the training cubes {size_mm:g} mm at {spacing_mm:g} mm; fine-tuning needs the same")
    return model.train()


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _write_card(res: dict, *, model, data, command, **settings) -> None:
    from pipeline.io import write_text

    hist = res["history"]
    keys = list(dict.fromkeys(k for row in hist for k in row))
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in hist]
    c = res["counts"]
    text = f"""# Model card: lungscreen 3D CNN false-positive classifier

- File: `{res['weights'].name}` (load with `nets.cnn3d.load_classifier(path)`;
  `torch.load(path, weights_only=True)` reads it)
- Architecture: `NoduleNet3D{tuple(model.arch['widths'])}`, {sum(p.numel() for p in model.parameters())} parameters,
  input {settings['size_mm']:g} mm cube at 1 mm, HU clipped to -1000..400 and scaled to 0..1
- Trained: {datetime.now(timezone.utc).isoformat(timespec='seconds')} on `{res['device']}` in {res['train_s']:.1f} s
- Command: `{command or '(API call)'}`
- Seed: {settings['seed']}

## Data
- Source: `{data}`; candidates: {res['candidates']}
- Train: {c['train']['scans']} scans, {c['train']['cubes']} cubes, {c['train']['positives']} nodules
- Validation: {c['val']['scans']} scans, {c['val']['cubes']} cubes, {c['val']['positives']} nodules
- At most {settings['max_neg_per_scan']} non-nodule candidates per scan; every nodule kept

## Training
- `Learner.fit_one_cycle({settings['epochs']}, lr_max={res['lr']:.3g})`, AdamW, weight decay {settings['weight_decay']:g}
- Start: {'random weights' if res['init_weights'] is None else 'fine-tuned from `%s`' % res['init_weights']}
- Learning rate: {'given' if res['lr_find'] is None else 'from learn.lr_find() (steepest descent %.3g, min/10 %.3g)' % (res['lr_find']['steep'], res['lr_find']['min_div10'])}
- Batches of {settings['batch_size']} with a fraction {settings['pos_fraction']:g} of nodules; random flips,
  axial 90-degree rotations and 0.9-1.1 zoom

## Metrics per epoch (validation: loss, ROC AUC, accuracy at 0.5)
{chr(10).join(table)}

## Limits
- Validation metrics are per candidate cube, not FROC; run `pipeline.evaluate` for LUNA16 FROC.
- Not a medical device.
"""
    write_text(text, res["card"])


# ---------------------------------------------------------------------- CLI
#: The settings ``make train`` / ``lungscreen train`` reads unless ``--config`` names another.
TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train.yaml"


def _config_keys() -> list[str]:
    """Keys a training config may set: :func:`train_classifier`'s parameters but ``command``
    (the CLI writes the command line itself)."""
    return [k for k in inspect.signature(train_classifier).parameters if k != "command"]


def _default(key: str) -> str:
    """``"(default: X)"``: ``key``'s default in :func:`train_classifier`, for ``--help``."""
    value = inspect.signature(train_classifier).parameters[key].default
    return f"(default: {','.join(map(str, value)) if isinstance(value, tuple) else value})"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` (``lungscreen train``, ``python -m pipeline.training``).

    Every setting flag's destination is the :func:`train_classifier` keyword it sets and its
    default is None, "not given": the value then comes from ``--config``, else from
    :func:`train_classifier`'s own default, which ``--help`` shows.

    Returns ``parser``, extended.
    """
    p = parser
    p.add_argument("--config", default=str(TRAIN_CONFIG),
                   help="YAML of train_classifier settings; flags override it (default: configs/train.yaml)")
    p.add_argument("--data", help="LUNA16-like root (subset*/ or train/val/ with .mhd)")
    p.add_argument("--out", help=f"output folder {_default('out')}")
    p.add_argument("--epochs", type=int, help=_default("epochs"))
    p.add_argument("--batch-size", type=int, help=_default("batch_size"))
    p.add_argument("--lr", help="peak learning rate of the one-cycle schedule, or 'auto' (LR finder) "
                                + _default("lr"))
    p.add_argument("--weight-decay", type=float, help=_default("weight_decay"))
    p.add_argument("--pos-fraction", type=float,
                   help=f"fraction of nodules per batch {_default('pos_fraction')}")
    p.add_argument("--max-neg-per-scan", type=int,
                   help=f"non-nodule candidates kept per scan at most {_default('max_neg_per_scan')}")
    p.add_argument("--size-mm", type=float, help=f"cube edge, mm {_default('size_mm')}")
    p.add_argument("--widths", help=f"channels per CNN stage, comma-separated {_default('widths')}")
    p.add_argument("--patience", type=int, help=f"early stopping patience, 0: off {_default('patience')}")
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--device", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--workers", type=int, help=f"DataLoader worker processes {_default('workers')}")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
    p.add_argument("--cache", dest="cache_dir", help="cube cache folder (default: OUT/cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    p.add_argument("--from-cache", dest="cache_file", metavar="H5",
                   help="train from this cube cache (OUT/cache/cubes-*.h5 of an earlier run) "
                        "instead of reading scans; --data is then not needed")
    p.add_argument("--lung-neg-per-scan", type=int,
                   help="random plain-lung negatives per scan next to the detector's candidates "
                        + _default("lung_neg_per_scan"))
    p.add_argument("--detect-max-candidates", type=int,
                   help="candidates per scan asked of the detector for training (default: "
                        "the detector's own, as in the screen); more = more hard negatives")
    p.add_argument("--init-weights", metavar="PT",
                   help="fine-tune from this classifier file (e.g. models/nodule_cnn3d.pt) "
                        "instead of random weights")
    p.add_argument("--negatives", choices=["auto", "candidates", "detector"],
                   help="the non-nodule examples and the scored candidates: LUNA16's "
                        "candidates_V2.csv, lungscreen's detector, or auto (the first when the "
                        "tree has it) " + _default("negatives"))
    p.add_argument("--fold", type=int, metavar="K",
                   help="LUNA16 cross-validation fold K: train on the subsets but K and K+1, "
                        "validate on subset (K+1) mod 10, score every candidate of subset K; "
                        "writes OUT/fold_K/ (predictions.csv, fold.json) and resumes it")
    p.add_argument("--folds", metavar="all|K,K,...",
                   help="run these folds one after another (all: the ten), skipping done ones")
    p.add_argument("--prep-workers", type=int,
                   help="processes preprocessing the LUNA16 tree for --fold/--folds (the cache "
                        f"OUT/cache, shared by the folds) {_default('prep_workers')}")
    return parser


def _settings(args: argparse.Namespace) -> dict:
    """:func:`train_classifier`'s keyword arguments: ``args.config``'s, then the given flags'.

    Text from YAML or the command line becomes what the function takes: ``lr: auto`` None,
    ``widths: 16,32`` a tuple, ``3e-3`` (which YAML reads as text) a float.
    """
    from pipeline.config import load_settings

    keys = _config_keys()
    settings = load_settings(args.config, keys)
    settings.update({k: v for k, v in vars(args).items() if k in keys and v is not None})
    defaults = {k: p.default for k, p in inspect.signature(train_classifier).parameters.items()}
    if settings.get("lr") == "auto":
        settings["lr"] = None
    if isinstance(settings.get("widths"), str):
        settings["widths"] = settings["widths"].split(",")
    if settings.get("widths") is not None:
        settings["widths"] = tuple(int(w) for w in settings["widths"])
    for key, value in settings.items():
        if isinstance(value, str) and (key == "lr" or isinstance(defaults.get(key), float)):
            try:
                settings[key] = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
    return settings


def run_from_args(args: argparse.Namespace) -> int:
    """Train with the settings of ``args.config`` overridden by the given flags; print a summary.

    Under torchrun, a rank that trained leaves the job (:func:`nets.distributed.leave_distributed`)
    before it returns 0.

    Parameters
    ----------
    args : argparse.Namespace
        Options added by :func:`add_arguments`; ``args.command_line`` (optional) is recorded in
        the model card.

    Returns
    -------
    int
        0 trained; 2 bad config or input (the reason is printed as ``error: ...``).
    """
    from nets.distributed import leave_distributed

    status = _train_from_args(args)
    if status == 0:
        leave_distributed()
    return status


def _train_from_args(args: argparse.Namespace) -> int:
    from stages.errors import ScanError

    try:
        settings = _settings(args)
        data = settings.pop("data", None)
        if data is None and settings.get("cache_file") is None:
            raise ValueError("give --data DIR (a LUNA16-like tree) or --from-cache H5")
        folds = getattr(args, "folds", None)
        if folds is not None:
            if settings.get("fold") is not None:
                raise ValueError("give --fold K or --folds, not both")
            settings.pop("fold", None)
            if folds != "all":
                try:
                    folds = [int(k) for k in folds.split(",")]
                except ValueError:
                    raise ValueError(f"--folds takes 'all' or fold numbers like 0,3,5; got {folds!r}") from None
            results = train_folds(data, command=getattr(args, "command_line", ""), folds=folds,
                                  **settings)
            print(json.dumps([{"fold": r["fold"]["fold"], "skipped": bool(r.get("skipped")),
                               "predictions": str(Path(r.get("out") or r["weights"].parent)
                                                  / PREDICTIONS_CSV)} for r in results], indent=1))
            return 0
        res = train_classifier(data, command=getattr(args, "command_line", ""), **settings)
    except (FileNotFoundError, ValueError, ScanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res.get("skipped"):
        print(json.dumps({"fold": res["fold"]["fold"], "skipped": True,
                          "predictions": str(res["out"] / PREDICTIONS_CSV)}))
        return 0
    print(json.dumps({"weights": str(res["weights"]), "card": str(res["card"]),
                      "log": str(res["log"]), "counts": res["counts"],
                      "final": {k: round(v, 4) if isinstance(v, float) else v
                                for k, v in res["final"].items()}}, indent=1))
    return 0


def main(argv=None) -> int:
    """``python -m pipeline.training [--config YAML] --data DIR [...]``; returns the exit status
    (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_arguments(argparse.ArgumentParser(prog="python -m pipeline.training",
                                                   description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    args.command_line = "python -m pipeline.training " + shlex.join(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
