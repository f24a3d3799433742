"""Screen benchmark: the whole screen on the demo scan (lung1) and on a 512x512x300 phantom,
stage by stage, beside the screen's quality on the development sets.

``python -m bench.screen [--out bench] [--threads 2] [--dev DIR ...]`` writes
``bench/screen.json`` under a key naming the device (``cpu-2-threads``, ``cuda-<name>``):

* per scan: seconds per stage and in all, cold (a fresh process: imports, model load) and warm
  (the same scan again in that process), peak resident memory, candidates kept and how many
  had test-time augmentation, megabytes left on disk with the default settings, and for lung1
  the rank of its real nodule;
* per development set (default ``data/bench48/val`` and ``data/bench96/val`` when present,
  built by ``make benchmark-data``): LUNA16 CPM, candidate recall, candidates per scan and
  seconds per scan with the default config.

Each scan runs in its own process, so its peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import device_key, record
from pipeline.io import write_json

__all__ = ["run"]

#: The full-size phantom: 512x512 slices of 0.7 mm, 300 slices of 1 mm.
BIG = dict(shape_zyx=(300, 512, 512), spacing_mm=(1.0, 0.7, 0.7), n_nodules=6, seed=7)
#: Development sets screened when present (never a test split).
DEV_SETS = ("data/bench48/val", "data/bench96/val")


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 2)


def lung1_nodule():
    """World centre ``(x, y, z)`` mm and diameter mm (equal-volume sphere) of lung1's marked nodule."""
    import numpy as np
    import SimpleITK as sitk

    from synth.data import lung1_paths

    label = sitk.ReadImage(str(lung1_paths()[1]))
    idx = np.argwhere(sitk.GetArrayFromImage(label) > 0)  # (z, y, x)
    centre = label.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx.mean(0)[::-1]])
    volume_mm3 = len(idx) * float(np.prod(label.GetSpacing()))
    return np.asarray(centre), float((6 * volume_mm3 / np.pi) ** (1 / 3))


def _nodule_rank(cands, centre_xyz, diameter_mm):
    import numpy as np

    d = np.linalg.norm(cands[["coordX", "coordY", "coordZ"]].to_numpy(float) - centre_xyz, axis=1)
    hits = np.flatnonzero(d < diameter_mm / 2)
    return int(hits[0]) + 1 if hits.size else None


def one_scan(source, threads: int) -> dict:
    """Screen ``source`` twice in this process (cold, then warm) with the default config."""
    import pandas as pd
    import torch

    from pipeline.config import load_config
    from pipeline.run import process_scan

    torch.set_num_threads(threads)
    config = load_config()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in ("cold", "warm"):
            t0 = time.perf_counter()
            res = process_scan(source, Path(tmp) / "out", config, force=True, pictures=5)
            runs.append({"run": attempt, "seconds_total": round(time.perf_counter() - t0, 2),
                         "stage_seconds": dict(res.seconds)})
        scan_dir = Path(res.out_dir)
        cands = pd.read_csv(scan_dir / "candidates.csv")
        out = {"source": str(source), "stages": config["stages"], "runs": runs,
               "n_candidates": len(cands),
               "n_tta": int(cands["tta"].sum()) if "tta" in cands else None,
               "disk_mb": _folder_mb(scan_dir),
               "disk_mb_per_file": {p.name: _folder_mb_file(p) for p in sorted(scan_dir.iterdir())},
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if "lung1" in str(source):
            centre, diameter = lung1_nodule()
            out["lung1_nodule_rank"] = _nodule_rank(cands, centre, diameter)
    return out


def _folder_mb_file(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3) if path.is_file() else _folder_mb(path)


def _in_child(source, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "bench.screen", "--one", str(source),
                        "--threads", str(threads), "--json", f.name], check=True)
        return json.loads(Path(f.name).read_text())


def dev_set(folder, threads: int) -> dict:
    """Screen one development set with the default config and score it (LUNA16 FROC)."""
    import pandas as pd
    import torch

    from pipeline.batch import discover_scans, run_many
    from pipeline.config import load_config
    from pipeline.evaluate import froc, read_seriesuids

    torch.set_num_threads(threads)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        scans = discover_scans(folder)
        t0 = time.perf_counter()
        results = run_many(scans, tmp, load_config(), pictures=0, progress="quiet")
        secs = time.perf_counter() - t0
        cands = pd.read_csv(Path(tmp) / "candidates.csv", dtype={"seriesuid": str})
    res = froc(pd.read_csv(folder / "annotations.csv", dtype={"seriesuid": str}), cands,
               excluded=pd.read_csv(folder / "annotations_excluded.csv", dtype={"seriesuid": str}),
               seriesuids=read_seriesuids(folder / "seriesuids.csv"), n_bootstrap=0)
    per_scan = cands.groupby("seriesuid").size()
    return {"scans": len(scans), "failed": sum(r.status == "failed" for r in results),
            "nodules": res.n_nodules, "cpm": round(res.cpm, 4),
            "sensitivity_at": {k: round(v, 4) for k, v in res.summary()["sensitivity_at"].items()},
            "candidate_recall": round(res.candidate_recall, 4),
            "candidates_per_scan_mean": round(float(per_scan.mean()), 1),
            "candidates_per_scan_max": int(per_scan.max()),
            "seconds_per_scan": round(secs / max(len(scans), 1), 2)}


def run(out_dir="bench", *, threads: int = 2, dev=DEV_SETS, big: bool = True) -> dict:
    from synth.demo import demo_scan
    from synth.phantom import write_phantom_scan

    result = {"cpu_count": os.cpu_count(), "torch_threads": threads, "date": time.strftime("%Y-%m-%d")}
    print("bench screen: demo scan (lung1)", flush=True)
    result["demo_lung1"] = _in_child(demo_scan(), threads)
    if big:
        with tempfile.TemporaryDirectory() as tmp:
            folder, _ = write_phantom_scan(Path(tmp) / "big", fmt="dicom", **BIG)
            print("bench screen: 512x512x300 phantom", flush=True)
            result["phantom_512x512x300"] = {**_in_child(folder, threads), "phantom": BIG}
    result["dev_sets"] = {}
    for folder in dev:
        if (Path(folder) / "annotations.csv").exists():
            print(f"bench screen: development set {folder}", flush=True)
            result["dev_sets"][str(folder)] = dev_set(folder, threads)
        else:
            result["dev_sets"][str(folder)] = "not present (make benchmark-data, see README)"
    record(Path(out_dir) / "screen.json", device_key(threads), result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--dev", nargs="*", default=list(DEV_SETS), help="development sets to score")
    p.add_argument("--no-big", action="store_true", help="skip the 512x512x300 phantom")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one scan
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        write_json(one_scan(a.one, a.threads), a.json)
        return 0
    print(json.dumps(run(a.out, threads=a.threads, dev=a.dev, big=not a.no_big), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
