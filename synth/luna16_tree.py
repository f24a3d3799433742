"""Write a benchmark (:mod:`synth.benchmark_data`) in LUNA16's exact layout.

The tree is the one LUNA16's archives unzip to (:mod:`pipeline.luna16` reads it)::

    OUT/subset0/<seriesuid>.mhd (+ .raw) ... OUT/subset9/...
    OUT/annotations.csv                                  seriesuid,coordX,coordY,coordZ,diameter_mm
    OUT/candidates_V2/candidates_V2.csv                  seriesuid,coordX,coordY,coordZ,class
    OUT/evaluationScript/annotations/annotations.csv     (the same file, as LUNA16 ships it)
    OUT/evaluationScript/annotations/annotations_excluded.csv
    OUT/evaluationScript/annotations/seriesuids.csv      one uid a line, no header

Every scan of every split (``BENCH/<split>/*.mhd``, or ``BENCH/*.mhd``) goes to exactly one
subset: the uids, sorted, are shuffled by ``seed`` and dealt round-robin, so each of the
``n_subsets`` folders gets ``floor(N / n_subsets)`` or one more scan.  The ``.mhd``/``.raw``
pairs are hard-linked (copied where linking fails, e.g. across file systems); a header
whose ``ElementDataFile`` is not ``<seriesuid>.<ext>`` is rewritten to that name.

The annotation rows (``annotations.csv``, ``annotations_excluded.csv`` of every split) are
kept as written, text for text, in LUNA16's five columns.  ``candidates_V2.csv`` holds,
per scan in ``seriesuids.csv`` order, every annotation as class 1, then
``negatives_per_scan`` class-0 points drawn uniformly inside the scan's extent (continuous
voxel index, mapped to world mm by the header's geometry) and at least
``radius + NEGATIVE_MARGIN_MM`` from every annotated and excluded finding; each scan's
draws are seeded by ``(seed, crc32(seriesuid))``, so they do not depend on the other scans.
Unlike LUNA16's candidates (a detector's output, mostly on lung structures) these
negatives are anywhere in the scan, most of them outside the lungs: easy negatives.
"""
from __future__ import annotations

import argparse
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["write_luna16_tree", "assign_subsets", "ANNOTATION_COLUMNS", "CANDIDATE_COLUMNS",
           "NEGATIVE_MARGIN_MM", "add_arguments", "run_from_args"]

ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "class"]
#: Least distance (mm) of a class-0 candidate from a finding's edge.
NEGATIVE_MARGIN_MM = 10.0
_EVAL = Path("evaluationScript") / "annotations"


def assign_subsets(uids, n_subsets: int = 10, *, seed: int = 0) -> dict[str, int]:
    """``{uid: subset}``: the sorted uids shuffled by ``seed``, dealt round-robin.

    Examples
    --------
    >>> np.bincount(list(assign_subsets([f"s{i}" for i in range(23)]).values())).tolist()
    [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    """
    uids = sorted(uids)
    order = np.random.default_rng(seed).permutation(len(uids))
    return {uids[k]: i % n_subsets for i, k in enumerate(order)}


def _scan_folders(bench: Path) -> list[Path]:
    return [f for f in [bench, *sorted(p for p in bench.iterdir() if p.is_dir())] if any(f.glob("*.mhd"))]


def _read_rows(folders, name: str) -> pd.DataFrame:
    tables = []
    for path in (f / name for f in folders):
        if path.is_file():
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
            if missing:
                raise ValueError(f"{path} lacks column(s) {missing}")
            tables.append(table)
    if not tables:
        return pd.DataFrame(columns=ANNOTATION_COLUMNS)
    return pd.concat([t[ANNOTATION_COLUMNS] for t in tables], ignore_index=True)


def _header(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            rows.append((key.strip(), value.strip()))
    return rows


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _place_scan(mhd: Path, dst_dir: Path, uid: str) -> Path:
    header = _header(mhd)
    data = dict(header).get("ElementDataFile", "")
    if not data or data.upper() == "LOCAL" or data.upper().startswith("LIST") or "%" in data:
        raise ValueError(f"{mhd}: ElementDataFile {data!r} is not one detached data file")
    src_data = (mhd.parent / data)
    ext = "".join(Path(data).suffixes) or ".raw"
    new_data = f"{uid}{ext}"
    dst = dst_dir / f"{uid}.mhd"
    _link(src_data, dst_dir / new_data)
    if data == new_data:
        _link(mhd, dst)
    else:
        from pipeline.io import write_text

        if dst.exists():
            dst.unlink()
        write_text("".join(f"{k} = {new_data if k == 'ElementDataFile' else v}\n" for k, v in header), dst)
    return dst


def _negatives(mhd: Path, uid: str, findings: pd.DataFrame, n: int, seed: int) -> list[tuple]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(mhd))
    reader.ReadImageInformation()
    size = np.array(reader.GetSize(), float)  # x, y, z
    origin, spacing = np.array(reader.GetOrigin()), np.array(reader.GetSpacing())
    direction = np.array(reader.GetDirection()).reshape(3, 3)
    centres = findings[["coordX", "coordY", "coordZ"]].to_numpy(float)
    reach = findings["diameter_mm"].to_numpy(float) / 2 + NEGATIVE_MARGIN_MM
    rng = np.random.default_rng([seed, zlib.crc32(uid.encode())])
    rows = []
    for _ in range(200 * max(n, 1)):
        if len(rows) == n:
            break
        world = origin + direction @ (rng.uniform(0, np.maximum(size - 1, 0)) * spacing)
        if len(centres) and np.any(np.linalg.norm(centres - world, axis=1) < reach):
            continue
        rows.append((uid, *(round(float(v), 4) for v in world), 0))
    return rows


def write_luna16_tree(bench_dir, out_dir, *, n_subsets: int = 10, seed: int = 0,
                      negatives_per_scan: int = 20) -> dict:
    """Write the benchmark ``bench_dir`` into ``out_dir`` in LUNA16's layout (module docstring).

    Parameters
    ----------
    bench_dir : str or Path
        A benchmark (``<split>/*.mhd`` with ``annotations.csv`` and ``annotations_excluded.csv``
        per split), or one folder of ``.mhd`` scans with those files.
    out_dir : str or Path
        Created if missing.  Files of an earlier tree are replaced; a ``subset*/*.mhd`` that is
        not one of this benchmark's scans is refused (a different benchmark's tree).
    n_subsets : int
        Number of ``subset<k>`` folders (1..10; LUNA16 has 10).
    seed : int
        Seeds the dealing of scans to subsets and the class-0 candidates.
    negatives_per_scan : int
        Class-0 rows of ``candidates_V2.csv`` per scan (fewer when the scan has no room).

    Returns
    -------
    dict
        ``{"subsets": {"subset0": [uid, ...], ...}, "n_scans", "n_annotations", "n_excluded",
        "n_candidates"}``.

    Raises
    ------
    FileNotFoundError
        ``bench_dir`` is not a folder or holds no ``.mhd`` scan.
    ValueError
        Bad ``n_subsets``, a uid in two splits, an annotation of a scan that is not there,
        or a stale scan in ``out_dir``.
    """
    from pipeline.io import write_csv, write_text

    bench, out = Path(bench_dir), Path(out_dir)
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or not 1 <= n_subsets <= 10:
        raise ValueError(f"n_subsets must be an int in 1..10, got {n_subsets!r}")
    if not bench.is_dir():
        raise FileNotFoundError(f"benchmark {bench} is not a folder")
    folders = _scan_folders(bench)
    scans: dict[str, Path] = {}
    for folder in folders:
        for mhd in sorted(folder.glob("*.mhd")):
            if mhd.stem in scans:
                raise ValueError(f"seriesuid {mhd.stem} is in {scans[mhd.stem].parent} and {folder}")
            scans[mhd.stem] = mhd
    if not scans:
        raise FileNotFoundError(f"no .mhd scan in {bench} or its subfolders")
    ann, excl = _read_rows(folders, "annotations.csv"), _read_rows(folders, "annotations_excluded.csv")
    for name, table in (("annotations.csv", ann), ("annotations_excluded.csv", excl)):
        unknown = sorted(set(table["seriesuid"]) - set(scans))
        if unknown:
            raise ValueError(f"{name} names scan(s) not in {bench}: {unknown[:3]}")
    subset_of = assign_subsets(scans, n_subsets, seed=seed)
    stale = [p for p in out.glob("subset*/*.mhd") if p.stem not in scans] if out.is_dir() else []
    if stale:
        raise ValueError(f"{out} holds scan(s) of another tree ({stale[0]}); choose an empty folder")

    uids = sorted(scans, key=lambda u: (subset_of[u], u))
    subsets: dict[str, list[str]] = {f"subset{k}": [] for k in range(n_subsets)}
    for uid in uids:
        name = f"subset{subset_of[uid]}"
        (out / name).mkdir(parents=True, exist_ok=True)
        for old in (out / f"subset{k}" for k in range(n_subsets) if k != subset_of[uid]):
            for p in old.glob(f"{uid}.*"):  # the same scan dealt elsewhere by another seed
                p.unlink()
        _place_scan(scans[uid], out / name, uid)
        subsets[name].append(uid)

    findings = pd.concat([ann, excl], ignore_index=True)
    findings[ANNOTATION_COLUMNS[1:]] = findings[ANNOTATION_COLUMNS[1:]].astype(float)
    cand_rows = []
    for uid in uids:
        pos = ann[ann["seriesuid"] == uid]
        cand_rows += [(uid, r.coordX, r.coordY, r.coordZ, 1) for r in pos.itertuples()]
        cand_rows += _negatives(out / f"subset{subset_of[uid]}" / f"{uid}.mhd", uid,
                                findings[findings["seriesuid"] == uid], negatives_per_scan, seed)
    cands = pd.DataFrame(cand_rows, columns=CANDIDATE_COLUMNS)

    write_csv(ann, out / "annotations.csv")
    write_csv(ann, out / _EVAL / "annotations.csv")
    write_csv(excl, out / _EVAL / "annotations_excluded.csv")
    write_text("".join(f"{u}\n" for u in uids), out / _EVAL / "seriesuids.csv")
    write_csv(cands, out / "candidates_V2" / "candidates_V2.csv")
    return {"subsets": subsets, "n_scans": len(uids), "n_annotations": len(ann),
            "n_excluded": len(excl), "n_candidates": len(cands)}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``lungscreen luna16-tree`` (``make luna16-tree``); returns ``parser``."""
    parser.add_argument("--bench", required=True, help="the benchmark folder (e.g. data/bench48)")
    parser.add_argument("--out", required=True, help="the LUNA16-layout tree to write")
    parser.add_argument("--subsets", type=int, default=10, help="subset folders (default 10, as LUNA16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dealing and the negatives (default 0)")
    parser.add_argument("--negatives", type=int, default=20,
                        help="class-0 rows of candidates_V2.csv per scan (default 20)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Write the tree; 0 done, 2 bad input (one line on stderr)."""
    import sys

    try:
        info = write_luna16_tree(args.bench, args.out, n_subsets=args.subsets, seed=args.seed,
                                 negatives_per_scan=args.negatives)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = " ".join(str(len(v)) for v in info["subsets"].values())
    print(f"{info['n_scans']} scans in {len(info['subsets'])} subsets ({counts}), "
          f"{info['n_annotations']} annotations, {info['n_excluded']} excluded, "
          f"{info['n_candidates']} candidates -> {args.out}")
    return 0
