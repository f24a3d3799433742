"""Batch throughput benchmark: scans per hour and peak memory per worker.

``python -m bench.batch [--out bench] [--scans 6] [--workers 2] [--big]`` writes
``bench/batch.json``.  ``--big`` adds one 512x512x300 phantom (0.7 x 0.7 x 1 mm) to measure
the peak memory of a full-size scan against the 4 GB per worker goal.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench import record

__all__ = ["run"]

SMALL = dict(shape_zyx=(100, 256, 256), spacing_mm=(2.5, 1.4, 1.4), n_nodules=4)
BIG = dict(shape_zyx=(300, 512, 512), spacing_mm=(1.0, 0.7, 0.7), n_nodules=6)


def run(out_dir="bench", *, scans: int = 6, workers: int = 2, big: bool = True) -> dict:
    from pipeline.batch import discover_scans, run_many
    from pipeline.config import load_config
    from synth.phantom import write_phantom_scan

    config = load_config()
    config["stages"] = [s for s in config["stages"] if s != "classify"] + (
        ["classify"] if "classify" in config["stages"] else [])
    result = {"config_stages": config["stages"], "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        for i in range(scans):
            write_phantom_scan(tree / f"p{i:02d}", fmt="dicom", seed=100 + i, **SMALL)
        found = discover_scans(tree)
        t0 = time.perf_counter()
        res = run_many(found, Path(tmp) / "out", config, workers=workers, pictures=1, progress="quiet")
        secs = time.perf_counter() - t0
        result["small"] = {"scan_shape_zyx": SMALL["shape_zyx"], "spacing_mm": SMALL["spacing_mm"],
                           "scans": len(found), "workers": workers, "seconds": round(secs, 2),
                           "scans_per_hour": round(3600 * len(found) / secs, 1),
                           "failed": sum(r.status == "failed" for r in res),
                           "peak_rss_mb_per_worker": max(r.seconds.get("peak_rss_mb", 0) for r in res),
                           "stage_seconds_mean": _mean_stage_seconds(res)}
        if big:
            write_phantom_scan(Path(tmp) / "big" / "p", fmt="dicom", seed=7, **BIG)
            t0 = time.perf_counter()
            res = run_many(discover_scans(Path(tmp) / "big"), Path(tmp) / "out_big", config, workers=1,
                           pictures=1, progress="quiet")
            result["big"] = {"scan_shape_zyx": BIG["shape_zyx"], "spacing_mm": BIG["spacing_mm"],
                             "seconds": round(time.perf_counter() - t0, 2),
                             "peak_rss_mb": res[0].seconds.get("peak_rss_mb"),
                             "status": res[0].status, "error": res[0].error,
                             "stage_seconds": {k: v for k, v in res[0].seconds.items() if k != "peak_rss_mb"}}
    import torch

    record(Path(out_dir) / "batch.json", "cuda" if torch.cuda.is_available() else "cpu", result)
    return result


def _mean_stage_seconds(results) -> dict:
    keys = {k for r in results for k in r.seconds if k != "peak_rss_mb"}
    return {k: round(sum(r.seconds.get(k, 0) for r in results) / max(len(results), 1), 3) for k in sorted(keys)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench")
    p.add_argument("--scans", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-big", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(run(a.out, scans=a.scans, workers=a.workers, big=not a.no_big), indent=2))


if __name__ == "__main__":
    main()
