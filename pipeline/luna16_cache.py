"""Preprocess a LUNA16 tree once for every fold: one cache file per scan.

:func:`preprocess_luna16` reads each ``subset*/<seriesuid>.mhd`` once and writes
``CACHE/subset<k>/<seriesuid>.<key>.h5`` holding

* ``ct``: the scan resampled to 1 mm (int16 HU, ``(z, y, x)``, gzip), the screen's
  ``ct_1mm`` (:func:`stages.resample.resample`) cut to the box holding the lungs and every
  candidate's cube (:func:`crop_box`: a cube cut from it equals one cut from the whole
  ``ct_1mm``), with its geometry as attributes (``spacing_mm``, ``origin_mm`` of the box,
  ``direction``); the entry's ``ct_1mm_shape`` and ``crop_start_zyx`` place it in the
  whole;
* ``lung_mask``: :func:`stages.lungmask.segment_lungs` of the whole ``ct_1mm`` (uint8,
  1 right, 2 left), cut to the same box;
* ``test/``: every candidate of the scan from the chosen source (``centre_xyz_mm``,
  ``class``; from the detector also ``diameter_mm``, ``score``, ``finding``), what a fold
  scores when the scan is in its test subset;
* ``train/``: the training examples (``cubes``: ``size_mm`` cubes at ``spacing_mm``, int16
  HU, cut by :func:`stages.patches.extract_patches` from ``ct`` as the classify stage cuts
  them, one gzip chunk per cube; ``labels``; ``centre_xyz_mm``): every positive, at most
  ``max_neg_per_scan`` negatives (a seeded per-scan choice), none near an excluded finding.

Test cubes are not cached: a scan is a test scan in one fold only, and its candidates' cubes
are cut from ``ct`` then (LUNA16's ``candidates_V2.csv`` has ~850 a scan: as many bytes
as the CT itself, for one use).

The negatives (``negatives``): ``"candidates"`` LUNA16's ``candidates_V2.csv``;
``"detector"`` lungscreen's own candidates (:func:`stages.candidates.find_candidates` on
``ct`` and ``lung_mask``; for training the annotations are added as positives and
``lung_neg_per_scan`` random lung points as easy negatives); ``"auto"`` the first when the
tree has the file, else the second.

``<key>`` hashes the settings, the scan file's size and time and the scan's rows of the
tables, so a changed setting or table gives new entries and an existing entry is never
opened to decide whether it is current.  Each entry is written under a temporary name and
renamed (:func:`pipeline.io.atomic_path`): after ``kill -9`` a rerun skips every scan
whose entry exists and computes only the others, and the cache is the one an uninterrupted
run writes.  ``CACHE/preprocess.log`` gets one line per scan computed (``done <subset>
<seriesuid> <seconds> <bytes>``).  Every read of an entry goes through :func:`open_entry`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["preprocess_luna16", "preprocess_scan", "open_entry", "read_test_scan", "crop_box",
           "EntryCubes", "resolve_negatives", "NEGATIVES", "LOG_NAME"]

#: Sources of the negatives; ``"auto"``: ``candidates_V2.csv`` when the tree has it.
NEGATIVES = ("auto", "candidates", "detector")
#: Bumped whenever an entry's content changes, so older entries are not reused.
ENTRY_FORMAT = "luna16-cache-v2"
#: The per-scan work log in the cache folder.
LOG_NAME = "preprocess.log"
#: Voxel size (mm) of the cached CT: the screen's ``ct_1mm``.
CT_SPACING_MM = (1.0, 1.0, 1.0)
#: HDF5 filters of the cached volumes and cubes: lossless.
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
#: Entries kept open at once by one :class:`EntryCubes` (per process): a fold's training
#: entries all (~700 for LUNA16), since the sampler draws cubes from any of them; with 32 open
#: nearly every cube read reopened a file (0.46 ms a cube against 0.31 ms with files kept
#: open, warm local disk).  Opened without a chunk cache, so the open files cost no memory.
MAX_OPEN = 1024


def resolve_negatives(data, negatives: str) -> str:
    """``"candidates"`` or ``"detector"`` for ``negatives`` on the tree ``data``.

    Raises
    ------
    ValueError
        ``negatives`` is not one of :data:`NEGATIVES`.
    FileNotFoundError
        ``"candidates"`` and the tree has no ``candidates_V2.csv``.
    """
    from pipeline.luna16 import CANDIDATE_FILES, find_candidates_file

    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}; got {negatives!r}")
    if negatives == "detector":
        return negatives
    try:  # whether the file is there; preprocess_luna16 reads it (once)
        find_candidates_file(data)
    except FileNotFoundError:
        if negatives == "candidates":
            raise FileNotFoundError(f"{data}: no candidates_V2.csv (looked for "
                                    f"{', '.join(CANDIDATE_FILES)}); use --negatives detector") from None
        return "detector"
    return "candidates"


def open_entry(path, **h5_options):
    """Open a cache entry read-only (``h5py.File``, with ``h5_options``): the one place
    entries are read."""
    import h5py

    return h5py.File(path, "r", **h5_options)


def _scan_key(row, settings: dict, rows: dict) -> str:
    """The entry's name tag: settings, the scan's files (size, time) and its table ``rows``."""
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for p in (Path(row.path), _data_file(Path(row.path))):
        st = os.stat(p)
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for name, part in sorted(rows.items()):
        h.update(name.encode())
        h.update(part.to_csv(index=False).encode())
    return h.hexdigest()[:12]


def _data_file(mhd: Path) -> Path:
    for line in mhd.read_text(errors="replace").splitlines() if mhd.suffix.lower() == ".mhd" else []:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ElementDataFile" and value.strip().upper() != "LOCAL":
            return mhd.parent / value.strip()
    return mhd


def _write_log(cache_dir: Path, text: str) -> None:
    fd = os.open(cache_dir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, text.encode())  # one small O_APPEND write: whole lines from any worker
    finally:
        os.close(fd)


def _training_rows(test: pd.DataFrame, ann: pd.DataFrame, excl: pd.DataFrame, *, negatives: str,
                   uid: str, mask, max_neg_per_scan: int, lung_neg_per_scan: int, seed: int):
    """The scan's training examples: ``(centres (N, 3) xyz mm, labels (N,))``."""
    from pipeline.training import _lung_points, label_candidates

    rng = np.random.default_rng([seed, zlib.crc32(uid.encode())])
    pts = test[["coordX", "coordY", "coordZ"]]
    if negatives == "detector":
        extra = [ann[["coordX", "coordY", "coordZ"]]]
        if lung_neg_per_scan and len(test):
            extra.append(_lung_points(mask, ann, rng, lung_neg_per_scan))
        pts = pd.concat([pts, *extra], ignore_index=True)
        labels = label_candidates(pts.assign(seriesuid=uid), ann)
    else:
        labels = test["class"].to_numpy(np.int64)
    if len(excl):  # findings LUNA16 ignores (< 3 mm): neither nodule nor non-nodule examples
        near = label_candidates(pts.assign(seriesuid=uid), excl).astype(bool)
        keep = ~(near & (labels == 0))
        pts, labels = pts[keep].reset_index(drop=True), labels[keep]
    neg = np.flatnonzero(labels == 0)
    if len(neg) > max_neg_per_scan:
        neg = np.sort(rng.choice(neg, size=max_neg_per_scan, replace=False))
    rows = np.sort(np.concatenate([np.flatnonzero(labels == 1), neg]))
    return pts.to_numpy(float)[rows], labels[rows].astype(np.uint8)


def preprocess_scan(path, entry, *, seriesuid: str, subset: str, candidates, annotations,
                    excluded, negatives: str, size_mm: float, spacing_mm: float,
                    max_neg_per_scan: int, lung_neg_per_scan: int, detect_max_candidates,
                    seed: int, device=None, log_dir=None) -> dict:
    """Read one scan and write its cache entry ``entry`` (module docstring).

    Parameters
    ----------
    path : str or Path
        The scan's ``.mhd``.
    entry : str or Path
        The entry to write (through a temporary name, then renamed).
    candidates : DataFrame or None
        The scan's rows of ``candidates_V2.csv`` (``negatives="candidates"``); None for the
        detector.
    annotations, excluded : DataFrame
        The scan's rows of ``annotations.csv`` and ``annotations_excluded.csv``.
    negatives : {"candidates", "detector"}
    size_mm, spacing_mm : float
        Training cubes: edge and voxel size, mm.
    max_neg_per_scan, lung_neg_per_scan : int
        Negatives kept; random lung points added (detector only).
    detect_max_candidates : int or None
        Candidates asked of the detector (None: its default, the screen's).
    seed : int
        With the uid, seeds the choice of negatives and lung points.
    device : str, optional
        For resampling and the detector.
    log_dir : Path, optional
        Folder of :data:`LOG_NAME`, which gets the line ``done <subset> <uid> <s> <bytes>``.

    Returns
    -------
    dict
        ``seriesuid, seconds, bytes, n_test, n_train``.
    """
    import h5py

    from pipeline.io import atomic_path
    from pipeline.luna16 import read_luna_scan
    from pipeline.training import label_candidates
    from stages.lungmask import segment_lungs
    from stages.patches import extract_patches
    from stages.resample import resample

    t0 = time.perf_counter()
    ct = resample(read_luna_scan(path), spacing_mm=CT_SPACING_MM, device=device)
    mask = segment_lungs(ct)
    if negatives == "detector":
        from stages.candidates import find_candidates

        kw = {} if detect_max_candidates is None else {"max_candidates": int(detect_max_candidates)}
        found = find_candidates(ct, mask, device=device, **kw)
        test = found[["coordX", "coordY", "coordZ", "diameter_mm", "score", "finding"]].copy()
        test["class"] = label_candidates(found.assign(seriesuid=seriesuid), annotations)
    else:
        test = candidates[["coordX", "coordY", "coordZ", "class"]].reset_index(drop=True)
    centres, labels = _training_rows(test, annotations, excluded, negatives=negatives,
                                     uid=seriesuid, mask=mask, max_neg_per_scan=max_neg_per_scan,
                                     lung_neg_per_scan=lung_neg_per_scan, seed=seed)
    cubes = extract_patches(ct, centres_xyz_mm=centres, size_mm=size_mm, spacing_mm=spacing_mm)
    cubes = np.clip(np.rint(cubes), -32768, 32767).astype(np.int16)
    box = crop_box(ct, mask, np.concatenate([test[["coordX", "coordY", "coordZ"]].to_numpy(float),
                                             centres]).reshape(-1, 3),
                   np.concatenate([_reach_mm(test, size_mm, spacing_mm),
                                   np.full(len(centres), size_mm / 2)]))
    full_shape = ct.shape
    ct, mask = _crop(ct, box), _crop(mask, box)
    entry = Path(entry)
    with atomic_path(entry) as tmp:
        with h5py.File(tmp, "w", track_order=True) as h5:
            h5.attrs.update({"format": ENTRY_FORMAT, "seriesuid": seriesuid, "subset": subset,
                             "negatives": negatives, "size_mm": float(size_mm),
                             "spacing_mm": float(spacing_mm), "ct_1mm_shape": full_shape,
                             "crop_start_zyx": [b.start for b in box]})
            d = h5.create_dataset("ct", data=ct.array.astype(np.int16), chunks=True, **COMPRESSION)
            d.attrs.update({"spacing_mm": ct.spacing_mm, "origin_mm": ct.origin_mm,
                            "direction": np.asarray(ct.direction)})
            h5.create_dataset("lung_mask", data=np.asarray(mask.array, np.uint8), chunks=True,
                              **COMPRESSION)
            g = h5.create_group("test")
            g.create_dataset("centre_xyz_mm", data=test[["coordX", "coordY", "coordZ"]].to_numpy(float))
            g.create_dataset("class", data=test["class"].to_numpy(np.uint8))
            if negatives == "detector":
                g.create_dataset("diameter_mm", data=test["diameter_mm"].to_numpy(float))
                g.create_dataset("score", data=test["score"].to_numpy(float))
                g.create_dataset("finding", data=test["finding"].astype(str).to_numpy().astype("S"))
            g = h5.create_group("train")
            n = cubes.shape[1]
            g.create_dataset("cubes", data=cubes, chunks=(1, n, n, n) if len(cubes) else None,
                             **(COMPRESSION if len(cubes) else {}))
            g.create_dataset("labels", data=labels)
            g.create_dataset("centre_xyz_mm", data=centres)
    seconds = time.perf_counter() - t0
    size = entry.stat().st_size
    if log_dir is not None:
        _write_log(Path(log_dir), f"done {subset} {seriesuid} {seconds:.2f} {size}\n")
    return {"seriesuid": seriesuid, "seconds": seconds, "bytes": size, "n_test": len(test),
            "n_train": len(labels)}


def _reach_mm(test: pd.DataFrame, size_mm: float, spacing_mm: float) -> np.ndarray:
    """Half the world extent (mm) of the cube the classify stage cuts around each candidate:
    ``size_mm / 2``, more for a mass (sampled coarser, :data:`stages.classify.MASS_SPAN_SAMPLES`)."""
    from stages.classify import MASS_SPAN_SAMPLES

    reach = np.full(len(test), size_mm / 2)
    if "finding" in test:
        n_side = round(size_mm / spacing_mm)
        mass = (test["finding"] == "mass").to_numpy()
        step = np.maximum(spacing_mm, test["diameter_mm"].to_numpy(float) / MASS_SPAN_SAMPLES)
        reach[mass] = n_side * step[mass] / 2
    return reach


def crop_box(ct, mask, centres_xyz_mm, reach_mm, *, margin_voxels: int = 2) -> tuple[slice, ...]:
    """The part of ``ct`` an entry keeps: the lung mask's bounding box and every cube around
    ``centres_xyz_mm`` (half edge ``reach_mm``, world mm), ``margin_voxels`` more for the
    interpolation, within the scan.  Cubes cut from the crop equal those cut from ``ct``.

    Returns
    -------
    tuple of slice
        ``(z, y, x)`` index slices; the whole scan when there is neither lung nor candidate.

    Examples
    --------
    >>> from stages.volume import Volume
    >>> ct = Volume(np.zeros((50, 60, 70), np.int16), spacing_mm=(1.0, 1.0, 1.0))
    >>> mask = ct.with_array(np.zeros(ct.shape, np.uint8))
    >>> crop_box(ct, mask, [[30.0, 20.0, 10.0]], [4.0])
    (slice(4, 17, None), slice(14, 27, None), slice(24, 37, None))
    """
    from scipy import ndimage as ndi

    shape = np.array(ct.shape)
    lo, hi = [], []
    found = ndi.find_objects((np.asarray(mask.array) > 0).astype(np.uint8))
    if found and found[0] is not None:
        lo.append([s.start for s in found[0]])
        hi.append([s.stop for s in found[0]])
    centres = np.asarray(centres_xyz_mm, float).reshape(-1, 3)
    if len(centres):
        idx = ct.world_to_index(centres[:, ::-1])
        # an axis-aligned world cube spans |direction^T| * reach / spacing voxels on each index axis
        span = (np.abs(np.asarray(ct.direction)).T.sum(axis=1) / np.asarray(ct.spacing_mm))[None] \
            * np.asarray(reach_mm, float).reshape(-1, 1)
        lo.append(np.floor(idx - span).min(axis=0) - margin_voxels)
        hi.append(np.ceil(idx + span).max(axis=0) + margin_voxels + 1)
    if not lo:
        return tuple(slice(0, n) for n in shape)
    start = np.clip(np.min(lo, axis=0), 0, shape).astype(int)
    stop = np.clip(np.max(hi, axis=0), 0, shape).astype(int)
    if (stop <= start).any():  # every candidate outside the scan and no lung: keep it all
        start, stop = np.zeros(3, int), shape
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _crop(vol, box):
    """``vol`` cut to ``box`` (index slices), its origin moved to the box's first voxel."""
    start = [b.start for b in box]
    return vol.with_array(np.ascontiguousarray(vol.array[box]),
                          origin_mm=tuple(vol.index_to_world(start)))


def _task(kwargs: dict) -> dict:
    """Pool task: one scan; a bad scan gives ``{"error": ...}`` instead of stopping the others."""
    from stages.errors import ScanError

    try:
        return preprocess_scan(**kwargs)
    except (ScanError, OSError, ValueError, RuntimeError) as exc:
        return {"seriesuid": kwargs["seriesuid"], "error": f"{kwargs['path']}: {exc}"}


def preprocess_luna16(data, cache_dir, *, negatives: str, size_mm: float, spacing_mm: float,
                      max_neg_per_scan: int, lung_neg_per_scan: int, detect_max_candidates,
                      seed: int, workers: int = 1, device=None, progress: str = "auto") -> pd.DataFrame:
    """Make sure every scan of the LUNA16 tree ``data`` has its cache entry; return the list.

    Scans whose entry exists are skipped without being opened; the others are computed by
    :func:`preprocess_scan`, ``workers`` at a time in spawned processes (1: in this one).

    Parameters
    ----------
    data : str or Path
        The LUNA16 root (``subset*/*.mhd``, ``annotations.csv``, optionally
        ``candidates_V2.csv`` and ``annotations_excluded.csv``).
    cache_dir : str or Path
        The cache folder (created), shared by every fold.
    negatives : {"auto", "candidates", "detector"}
        See the module docstring.
    size_mm, spacing_mm, max_neg_per_scan, lung_neg_per_scan, detect_max_candidates, seed
        As :func:`preprocess_scan`.
    workers : int
        Processes computing scans at once.
    device : str, optional
        Resampling and detector device.
    progress : {"auto", "bar", "log", "quiet"}
        A bar of scans on a terminal, else a line per scan (:class:`pipeline.progress.Reporter`).

    Returns
    -------
    DataFrame
        ``seriesuid, path, subset, entry`` (every scan, sorted by subset then uid) with the
        attribute ``attrs["negatives"]`` (the source used) and ``attrs["computed"]`` (the
        :func:`preprocess_scan` results of this call).

    Raises
    ------
    FileNotFoundError
        No ``subset*/*.mhd`` under ``data``, or a table is missing.
    stages.errors.ScanError
        Some scans could not be preprocessed (each is named on stderr; the others are cached,
        and a rerun computes only the failed ones).
    """
    from pipeline.luna16 import find_luna_scans, read_annotations, read_candidates, read_excluded
    from pipeline.progress import Reporter
    from stages.errors import ScanError

    data, cache_dir = Path(data), Path(cache_dir)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    scans = find_luna_scans(data)
    if scans.empty:
        raise FileNotFoundError(f"no subset*/*.mhd under {data}; pass the LUNA16 root as --data")
    source = resolve_negatives(data, negatives)
    ann = read_annotations(data)
    try:
        excl = read_excluded(data)
    except FileNotFoundError:
        excl = ann.iloc[:0]
    cols = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    ann, excl = ann[cols], excl[cols]
    tables = {"annotations": ann, "excluded": excl}
    if source == "candidates":
        tables["candidates"] = read_candidates(data)[["seriesuid", "coordX", "coordY", "coordZ", "class"]]
    detector = source == "detector"  # the detector's settings do not change a candidates entry
    settings = {"format": ENTRY_FORMAT, "negatives": source, "size_mm": float(size_mm),
                "spacing_mm": float(spacing_mm), "max_neg_per_scan": int(max_neg_per_scan),
                "lung_neg_per_scan": int(lung_neg_per_scan) if detector else None, "seed": int(seed),
                "detect_max_candidates": detect_max_candidates if detector else None}
    by_uid = {name: dict(tuple(t.groupby("seriesuid"))) for name, t in tables.items()}
    entries, todo = [], []
    empty = {name: t.iloc[:0] for name, t in tables.items()}
    for row in scans.itertuples():
        pick = {name: by_uid[name].get(row.seriesuid, empty[name]) for name in tables}
        entry = cache_dir / row.subset / f"{row.seriesuid}.{_scan_key(row, settings, pick)}.h5"
        entries.append(str(entry))
        if entry.exists():
            continue
        for stale in entry.parent.glob(f".{row.seriesuid}.*.part*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        todo.append({"path": row.path, "entry": str(entry), "seriesuid": row.seriesuid,
                     "subset": row.subset, "candidates": pick.get("candidates"),
                     "annotations": pick["annotations"], "excluded": pick["excluded"],
                     "negatives": source, "size_mm": float(size_mm), "spacing_mm": float(spacing_mm),
                     "max_neg_per_scan": int(max_neg_per_scan),
                     "lung_neg_per_scan": int(lung_neg_per_scan),
                     "detect_max_candidates": detect_max_candidates, "seed": int(seed),
                     "device": None if device is None else str(device), "log_dir": str(cache_dir)})
    scans = scans.assign(entry=entries)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    if todo:
        rep = Reporter(progress)
        rep.line("preprocess", f"{len(todo)} of {len(scans)} scans to preprocess into {cache_dir} "
                               f"({len(scans) - len(todo)} cached; negatives: {source})")
        bar = rep.bar(len(todo), "preprocessing")
        for res in _run_tasks(todo, workers):
            bar.update(1)
            if "error" in res:
                errors.append(res["error"])
                if rep.mode == "bar":
                    bar.write(f"failed: {res['error']}", file=sys.stderr)
                rep.line(res["seriesuid"], f"failed: {res['error']}")
                continue
            results.append(res)
            rep.line(res["seriesuid"], f"preprocessed in {res['seconds']:.1f} s, "
                                       f"{res['bytes'] / 1e6:.1f} MB, {res['n_test']} candidates "
                                       f"[{len(results) + len(errors)}/{len(todo)} scans]")
        bar.close()
    if errors:
        raise ScanError(errors[0].split(": ", 1)[0],
                        f"{errors[0].split(': ', 1)[-1]} ({len(errors)} scan(s) failed preprocessing; "
                        "the others are cached, a rerun retries the failed ones)")
    scans.attrs["negatives"] = source
    scans.attrs["computed"] = results
    return scans


def _run_tasks(todo: list[dict], workers: int):
    """Yield :func:`_task`'s result for each of ``todo`` as it finishes."""
    if workers == 1 or len(todo) == 1:
        for kwargs in todo:
            yield _task(kwargs)
        return
    import concurrent.futures as cf

    from pipeline.batch import _pool

    with _pool(min(workers, len(todo))) as pool:
        futures = [pool.submit(_task, kwargs) for kwargs in todo]
        for fut in cf.as_completed(futures):
            yield fut.result()


# ---------------------------------------------------------------------- reading entries
class EntryCubes:
    """The training cubes of several entries as one array-like ``(N, n, n, n)`` of int16 HU.

    Reads every entry's ``train/labels`` once (``labels``, ``seriesuid`` per cube); a cube
    is read when indexed, through :func:`open_entry`, with at most :data:`MAX_OPEN` entries
    open per process.  Picklable (DataLoader workers reopen the files).
    """

    def __init__(self, entries):
        self.entries = [str(e) for e in entries]
        labels, which, rows, shape = [], [], [], None
        for k, path in enumerate(self.entries):
            with open_entry(path) as h5:
                lab = h5["train/labels"][:]
                if len(lab):
                    shape = h5["train/cubes"].shape[1:]
            labels.append(lab)
            which.append(np.full(len(lab), k, np.int64))
            rows.append(np.arange(len(lab)))
        self.labels = np.concatenate(labels).astype(np.float32) if labels else np.zeros(0, np.float32)
        self._entry = np.concatenate(which) if which else np.zeros(0, np.int64)
        self._row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.shape = (len(self.labels), *(shape or (0, 0, 0)))
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def _file(self, k: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: the parent's handles are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        h5 = self._open.pop(k, None)
        if h5 is None:
            h5 = open_entry(self.entries[k], rdcc_nbytes=0)  # one cube a read: no chunk cache
            while len(self._open) >= MAX_OPEN:
                self._open.popitem(last=False)[1].close()
        self._open[k] = h5
        return h5

    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = range(*i.indices(len(self)))
            return np.stack([self[j] for j in idx]) if len(idx) else np.zeros((0, *self.shape[1:]), np.int16)
        return self._file(int(self._entry[i]))["train/cubes"][int(self._row[i])]

    def __getstate__(self):
        return {**self.__dict__, "_open": OrderedDict()}


def read_test_scan(entry):
    """``(ct, candidates)`` of an entry: the 1 mm CT as a :class:`stages.volume.Volume` and
    its candidates (``seriesuid, coordX, coordY, coordZ, class`` and, from the detector,
    ``diameter_mm, score, finding``) in the order cached."""
    from stages.volume import Volume

    with open_entry(entry) as h5:
        d = h5["ct"]
        uid = str(h5.attrs["seriesuid"])
        ct = Volume(d[:], spacing_mm=tuple(d.attrs["spacing_mm"]), origin_mm=tuple(d.attrs["origin_mm"]),
                    direction=d.attrs["direction"], scan_id=uid)
        g = h5["test"]
        xyz = g["centre_xyz_mm"][:].reshape(-1, 3)
        cands = pd.DataFrame({"seriesuid": uid, "coordX": xyz[:, 0], "coordY": xyz[:, 1],
                              "coordZ": xyz[:, 2], "class": g["class"][:].astype(int)})
        if "score" in g:
            cands["diameter_mm"] = g["diameter_mm"][:]
            cands["score"] = g["score"][:]
            cands["finding"] = g["finding"][:].astype(str)
    return ct, cands
