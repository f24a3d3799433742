"""Benchmark of candidate clustering (:mod:`stages.cluster`) on the lung tissue of the lung1 CT.

``python -m bench.cluster [--device cpu|cuda] [--out bench] [--points pts.npy] [--kmeans-only]
[--exact-cache DIR] [--exact-max-s S]``
writes ``<out>/cluster.json``; an existing file keeps the other devices' entries (one key per
device type), so CPU and GPU runs are both recorded.  ``--kmeans-only`` runs the k-means
comparison alone (a few minutes instead of the mean-shift hour on 2 CPU cores) and puts its
entries into the device's record, keeping the mean-shift ones.

The point cloud is built by the pipeline's own stages: :func:`stages.ingest.read_scan`,
:func:`stages.resample.resample` to 1 mm, :func:`stages.lungmask.segment_lungs` and
:func:`stages.features.extract_features` with ``hu_floor=TISSUE_HU``: every lung voxel denser
than -600 HU (vessels, airway walls, the nodule), as ``(z, y, x)`` mm, HU and shape index,
clustered with the pipeline's feature scales (``stages.features.SCALE_*``) as the bandwidth.
The seconds of each of those stages are recorded (``scan``), and the candidates stage on the
same scan.  ``--save-points`` writes the cloud as ``.npy`` so a machine without SimpleITK can
run the benchmark on it.

Mean shift runs with four settings (:data:`PRESETS`): ``default``, the defaults of
:func:`stages.cluster.mean_shift` (every point a seed, Gaussian cut at ``GRID_CUTOFF``,
float32, path merging in cells of 0.02 bandwidths), ``previous_default``, the defaults of
4c91416 (cut at 6, float64), measured in the same run as the baseline, ``thinned`` (one
seed per occupied cell of one bandwidth) and ``fast`` (Gaussian cut at 3
bandwidths, bin seeding, points pooled in bins of one bandwidth, path cells of 0.05, cells of
one reach).  At each size the exact engine (every point a seed, no cut, float64) is the
reference (``ari_vs_exact``) where it fits ``--exact-max-s`` (default :data:`MAX_RUN_S`;
about 62 s an iteration at 100k points on 2 CPU cores, an hour in all) or where
``--exact-cache`` holds its labels for the very same sample (the file records the seconds,
date and load of the run that made it).  Where no exact labels exist, ``previous_default``
is the reference (``ari_vs_previous_default``), itself checked against exact at 20k points.
scikit-learn's ``MeanShift(bin_seeding=True)`` (flat kernel) and ``KMeans`` are the outside
references.
The ``default`` preset runs :data:`DEFAULT_REPEATS` times (median seconds, and each).
k-means (:func:`_run_kmeans`) runs ours and scikit-learn's interleaved,
:data:`KMEANS_REPEATS` seeds each, with the same k, tolerance and iteration limit, and
records the median seconds and the load average around them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from stages.features import SCALE_HU, SCALE_MM, SCALE_SI

log = logging.getLogger(__name__)

#: Clustered voxels: inside the lung mask and denser than this (HU).
TISSUE_HU = -600.0
#: Mean-shift settings compared at every size (keyword arguments of ``mean_shift``):
#: the defaults, the defaults of 4c91416 (the Gaussian cut at 6 bandwidths, float64 on the
#: CPU), seed thinning (one seed per cell of one bandwidth) and a fast, less exact preset.
PRESETS = {"default": {},
           "previous_default": {"cutoff": 6.0, "dtype": "float64"},
           "thinned": {"seed_cell": 1.0},
           "fast": {"cutoff": 3.0, "bin_seeding": True, "bin_size": 1.0, "path_cell": 0.05,
                    "cells_per_reach": 1, "dtype": "float32"}}
#: Clusters for the k-means comparison.
KMEANS_K = 64
#: k-means tolerance and most iterations, the same for ours and scikit-learn's (its defaults).
KMEANS_TOL = 1e-4
KMEANS_MAX_ITER = 300
#: Runs of each k-means (seeds 0, 1, ...): the shared machine's load varies from run to run.
KMEANS_REPEATS = 5
#: Runs of the ``default`` mean-shift preset at each size: the 2-core machine's speed varies
#: by +-10 % from run to run (whole lung, the same code: 26.6 to 33.4 s in one evening), so its
#: ``seconds`` are the median and ``seconds_each`` all of them.
DEFAULT_REPEATS = 3
#: Exact runs and scikit-learn runs longer than this (s) are extrapolated, not run.
MAX_RUN_S = 60.0
#: A preset whose time, extrapolated quadratically from the previous size, passes this (s)
#: is not run at the next size (the previous defaults on a whole lung on 2 CPU cores: about
#: 740 s).
MAX_PRESET_S = 600.0


#: Mean-shift bandwidth per feature: z, y, x (mm), HU, shape index (the pipeline's scales).
BANDWIDTH = (SCALE_MM, SCALE_MM, SCALE_MM, SCALE_HU, SCALE_SI)


def lung_points_and_timings(image_path=None, device=None):
    """The tissue cloud of lung1 and the seconds of the stages that made it.

    Returns
    -------
    points : (N, 5) float32 ndarray
        ``z, y, x`` (mm), HU, shape index of every lung voxel above ``TISSUE_HU``.
    scan : dict
        Seconds of ``read``, ``resample``, ``segmentation``, ``features`` (shape index of
        every tissue voxel) and ``candidates`` (:func:`stages.candidates.find_candidates`
        with its defaults), the lung volume (ml) and the candidates found.
    """
    from synth.data import lung1_paths
    from stages.candidates import find_candidates
    from stages.features import extract_features
    from stages.ingest import read_scan
    from stages.lungmask import segment_lungs
    from stages.resample import resample

    if image_path is None:
        image_path = lung1_paths()[0]
    t = {}
    t0 = time.perf_counter()
    vol = read_scan(image_path)
    t["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vol = resample(vol, (1.0, 1.0, 1.0), device=device)
    t["resample_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = segment_lungs(vol)
    t["segmentation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scaled, _ = extract_features(vol, mask, hu_floor=TISSUE_HU)
    t["features_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cands = find_candidates(vol, mask, device=device)
    t["candidates_s"] = time.perf_counter() - t0
    scan = {k: round(v, 3) for k, v in t.items()}
    scan.update(shape_zyx=list(vol.shape), lung_ml=round(float((mask.array != 0).sum()) / 1000.0, 1),
                n_tissue_points=int(len(scaled)), n_candidates=int(len(cands)))
    return (scaled * np.asarray(BANDWIDTH, np.float32)).astype(np.float32), scan


def build_lung_points(image_path=None) -> np.ndarray:
    """(N, 5) float32 ``z, y, x`` (mm), HU, shape index of the lung tissue voxels of lung1."""
    return lung_points_and_timings(image_path)[0]


def _timed(fn, *args, **kwargs):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t0


def _ms_record(res, seconds, n):
    return {"seconds": round(seconds, 4), "n_iter": res.n_iter, "n_seeds": res.n_seeds,
            "n_clusters": int(len(res.centres)), "largest_clusters": res.cluster_sizes[:5].tolist(),
            "points_per_s": round(n / seconds, 1)}


def _exact_per_iter(pts, device, n_probe=2000):
    """Seconds of one exact iteration over all points, from ``n_probe`` seeds."""
    from stages.cluster import mean_shift

    seeds = pts[np.linspace(0, len(pts) - 1, min(n_probe, len(pts))).astype(int)]
    _, sec = _timed(mean_shift, pts, BANDWIDTH, mode="exact", seeds=seeds, max_iter=1,
                    device=device)
    return sec * len(pts) / len(seeds)


def _exact_reference(sub, dev, r, per_iter, cache, max_s):
    """Labels of the exact engine on ``sub``, run or read from ``cache``; None where neither.

    The run is recorded in ``r["exact"]``.  A cached run is a ``.npz`` named by the number
    of points and a hash of the sample, holding the labels and the run's seconds, iterations,
    clusters, date, load and torch threads; it is used only for the identical sample.
    """
    import hashlib

    from stages.cluster import mean_shift

    n = len(sub)
    name = f"exact_{n}_{hashlib.sha1(np.ascontiguousarray(sub, np.float32).tobytes()).hexdigest()[:12]}.npz"
    path = Path(cache) / name if cache else None
    if path is not None and path.exists():
        z = np.load(path)
        r["exact"] = {k: (z[k].item() if z[k].dtype.kind in "fiu" else str(z[k]))
                      for k in z.files if k != "labels"}
        r["exact"]["from_cache"] = name
        return z["labels"]
    est = per_iter * 50  # upper bound: converged seeds drop out
    if not (est <= max_s or (n <= 20_000 and est <= 10 * max_s)):
        r["exact"] = {"skipped": f"estimated {per_iter:.2f} s per iteration x up to 50 "
                                 f"iterations > {max_s:.0f} s"}
        return None
    import torch

    load = os.getloadavg()[0]
    exact, sec = _timed(mean_shift, sub, BANDWIDTH, mode="exact", device=dev)
    r["exact"] = _ms_record(exact, sec, n)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, labels=exact.labels, seconds=round(sec, 2), n_iter=exact.n_iter,
                 n_clusters=len(exact.centres), torch_threads=torch.get_num_threads(),
                 load_avg_1min_start=round(load, 2), device=str(dev),
                 date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return exact.labels


def _run_size(sub, dev, presets, skip_sklearn, previous=None, exact_cache=None,
              exact_max_s=MAX_RUN_S):
    from sklearn.cluster import MeanShift
    from sklearn.metrics import adjusted_rand_score

    from stages.cluster import mean_shift

    n = len(sub)
    r = {"n_points": int(n)}
    for name, kw in list(presets.items()):
        prev = (previous or {}).get(name, {})
        if "seconds" in prev or "skipped" in prev:
            est = prev.get("estimated_seconds", prev.get("seconds", 0.0)) * (n / previous["n_points"]) ** 2
            if est > MAX_PRESET_S:
                r[name] = {"skipped": f"estimated {est:.0f} s > {MAX_PRESET_S:.0f} s (quadratic "
                                      f"from {previous['n_points']} points)",
                           "estimated_seconds": round(est, 1), "settings": kw}
                continue
        res, sec = _timed(mean_shift, sub, BANDWIDTH, mode="grid", device=dev, **kw)
        r[name] = dict(_ms_record(res, sec, n), settings=kw)
        r[name]["_labels"] = res.labels
        if name == "default" and DEFAULT_REPEATS > 1:
            each, same = [sec], True
            for _ in range(DEFAULT_REPEATS - 1):
                again, sec = _timed(mean_shift, sub, BANDWIDTH, mode="grid", device=dev, **kw)
                each.append(sec)
                same &= bool(np.array_equal(again.labels, res.labels))
            r[name].update(_ms_record(res, float(np.median(each)), n),
                           seconds_each=[round(x, 4) for x in each], same_labels_each_run=same)
    ran = [name for name in presets if "_labels" in r[name]]
    per_iter = _exact_per_iter(sub, dev)
    r["exact_per_iter_s"] = round(per_iter, 4)
    exact_labels = _exact_reference(sub, dev, r, per_iter, exact_cache, exact_max_s)
    if exact_labels is not None:
        for name in ran:
            r[name]["ari_vs_exact"] = round(float(adjusted_rand_score(exact_labels,
                                                                      r[name]["_labels"])), 5)
            if "from_cache" not in r["exact"]:  # speed-ups only from runs side by side
                r[name]["speedup_vs_exact"] = round(r["exact"]["seconds"] / r[name]["seconds"], 1)
    elif "previous_default" in ran:
        ref = r["previous_default"]["_labels"]  # the reference where exact does not fit
        for name in ran:
            if name != "previous_default":
                r[name]["ari_vs_previous_default"] = round(
                    float(adjusted_rand_score(ref, r[name]["_labels"])), 5)
    for name in ran:
        if name != "previous_default" and "seconds" in r.get("previous_default", {}):
            r[name]["speedup_vs_previous_default"] = round(
                r["previous_default"]["seconds"] / r[name]["seconds"], 1)
    for name in ran:
        del r[name]["_labels"]
    # scikit-learn's MeanShift is a flat kernel: compare with ours, flat, same bins
    scaled = sub / np.asarray(BANDWIDTH)
    flat, sec = _timed(mean_shift, scaled, 1.0, kernel="flat", mode="grid", bin_seeding=True,
                       device=dev)
    r["grid_flat"] = _ms_record(flat, sec, n)
    if not skip_sklearn:
        probe = scaled[np.linspace(0, n - 1, min(n, 2000)).astype(int)]
        _, sec_probe = _timed(MeanShift(bandwidth=1.0, bin_seeding=True, n_jobs=-1).fit, probe)
        est = sec_probe * (n / len(probe)) ** 2
        r["sklearn_probe"] = {"n_points": len(probe), "seconds": round(sec_probe, 3),
                              "extrapolated_seconds_at_n": round(est, 1)}
        if est <= MAX_RUN_S:
            sk, sec = _timed(MeanShift(bandwidth=1.0, bin_seeding=True, n_jobs=-1).fit, scaled)
            r["sklearn_meanshift"] = {"seconds": round(sec, 3),
                                      "n_clusters": int(len(sk.cluster_centers_)),
                                      "points_per_s": round(n / sec, 1)}
            r["ari_grid_flat_vs_sklearn"] = round(float(adjusted_rand_score(sk.labels_,
                                                                           flat.labels)), 5)
        else:
            r["sklearn_meanshift"] = {"skipped": f"extrapolated {est:.0f} s > {MAX_RUN_S:.0f} s "
                                                 f"(quadratic from {len(probe)} points)"}
    r["kmeans"] = _run_kmeans(scaled, dev, skip_sklearn)
    return r


def _run_kmeans(scaled, dev, skip_sklearn, repeats=None):
    """k-means of ``scaled`` (N, 5) points, ours and scikit-learn's side by side.

    ``repeats`` runs each (seeds 0, 1, ...; interleaved, so that both see the same load):
    ours with ``init="k-means++"`` (greedy, as scikit-learn's) and ``"farthest"``,
    scikit-learn's ``KMeans(n_init=1, random_state=seed)``, all with :data:`KMEANS_K`,
    :data:`KMEANS_TOL` and :data:`KMEANS_MAX_ITER`.  Seconds are the median over the seeds,
    inertias their mean; ``inertia_ratio_vs_sklearn`` is ours (k-means++) over scikit-learn's,
    averaged over the seeds.  The 1-minute load average is recorded before and after.
    """
    from sklearn.cluster import KMeans

    from stages.cluster import kmeans

    repeats = KMEANS_REPEATS if repeats is None else repeats
    n = len(scaled)
    runs = {"k-means++": [], "farthest": [], "sklearn": []}
    load_start = os.getloadavg()[0]
    for seed in range(repeats):
        for init in ("k-means++", "farthest"):
            km, sec = _timed(kmeans, scaled, KMEANS_K, init=init, tol=KMEANS_TOL,
                             max_iter=KMEANS_MAX_ITER, device=dev, seed=seed)
            runs[init].append((sec, km.n_iter, km.inertia))
        if not skip_sklearn:
            skm, sec = _timed(KMeans(KMEANS_K, n_init=1, random_state=seed, tol=KMEANS_TOL,
                                     max_iter=KMEANS_MAX_ITER).fit, scaled)
            runs["sklearn"].append((sec, int(skm.n_iter_), float(skm.inertia_)))

    def summary(rows):
        sec = [r[0] for r in rows]
        return {"seconds": round(float(np.median(sec)), 4), "seconds_each": [round(x, 4) for x in sec],
                "n_iter_each": [r[1] for r in rows],
                "inertia_mean": round(float(np.mean([r[2] for r in rows])), 2),
                "points_per_s": round(n / float(np.median(sec)), 1)}

    import torch
    from threadpoolctl import threadpool_info

    from stages import _kmeans

    threads = torch.get_num_threads()
    out = {"n_points": int(n), "k": KMEANS_K, "tol": KMEANS_TOL, "max_iter": KMEANS_MAX_ITER,
           "repeats": repeats,
           "ours_torch_threads": (min(threads, _kmeans.CPU_THREADS) if dev.type == "cpu" and _kmeans.CPU_THREADS else threads),
           "sklearn_openmp_threads": sorted({i["num_threads"] for i in threadpool_info()
                                             if i["user_api"] == "openmp"}),
           "load_avg_1min_start": round(load_start, 2)}
    out.update({f"ours_{init}": summary(runs[init]) for init in ("k-means++", "farthest")})
    if runs["sklearn"]:
        out["sklearn"] = summary(runs["sklearn"])
        for init in ("k-means++", "farthest"):
            out[f"ours_{init}"]["speedup_vs_sklearn"] = round(
                out["sklearn"]["seconds"] / out[f"ours_{init}"]["seconds"], 2)
        out["inertia_ratio_vs_sklearn"] = round(float(np.mean(
            [a[2] / b[2] for a, b in zip(runs["k-means++"], runs["sklearn"])])), 5)
    out["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    return out


def run(points, device, *, sizes=(20_000, 100_000), presets=None, skip_sklearn=False,
        scan=None, kmeans_only=False, exact_cache=None, exact_max_s=MAX_RUN_S) -> dict:
    """Run every comparison on ``points`` (N, 5) and return the record for one device
    (with ``kmeans_only``, the k-means comparison alone: each size's record holds only
    ``n_points`` and ``kmeans``)."""
    import torch

    from stages.cluster import kmeans, mean_shift
    from stages.device import pick_device

    presets = PRESETS if presets is None else presets
    dev = pick_device(device)
    rng = np.random.default_rng(0)
    rec = {"device": str(dev), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "machine": platform.node(),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "bandwidth": list(BANDWIDTH), "n_total_points": int(len(points)),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_avg_1min_start": round(os.getloadavg()[0], 2), "runs": {}}
    if scan is not None:
        rec["scan"] = scan
    kmeans(points[:6000] / np.asarray(BANDWIDTH), KMEANS_K, device=dev)  # warm-up (CUDA context)
    if not kmeans_only:
        mean_shift(points[:500], BANDWIDTH, device=dev)  # warm-up (kernels)
        mean_shift(points[:6000], BANDWIDTH, mode="grid", device=dev)
    targets = [(str(n), n) for n in sizes if n < len(points)] + [("whole_lung", len(points))]
    previous = None
    for name, n in targets:
        sub = points if n >= len(points) else points[np.sort(rng.choice(len(points), n, replace=False))]
        log.info("%s: %d points", name, n)
        if kmeans_only:
            rec["runs"][name] = {"n_points": int(n),
                                 "kmeans": _run_kmeans(sub / np.asarray(BANDWIDTH), dev, skip_sklearn)}
        else:
            rec["runs"][name] = previous = _run_size(sub, dev, presets, skip_sklearn, previous,
                                                     exact_cache, exact_max_s)
        log.info("%s", json.dumps(rec["runs"][name]))
    rec["load_avg_1min_end"] = round(os.getloadavg()[0], 2)  # > cpu_count: a shared machine
    if scan is not None and not kmeans_only:  # the whole-lung clustering, next to the other stages
        whole = rec["runs"]["whole_lung"]
        scan["clustering"] = {k: ({"seconds": whole[k]["seconds"], "n_points": whole["n_points"],
                                   "n_iter": whole[k]["n_iter"], "n_clusters": whole[k]["n_clusters"]}
                                  if "seconds" in whole[k] else whole[k]) for k in presets}
    return rec


#: Keys of a size's record written by k-means runs before ``kmeans`` held them all.
_OLD_KMEANS_KEYS = ("kmeans_farthest", "kmeans_k-means++", "sklearn_kmeans")


def merge_kmeans(old, rec):
    """A device's record ``old`` (or None) with the ``kmeans`` entries of the k-means-only
    record ``rec`` put in (older k-means keys dropped) and ``rec``'s settings, date and load
    kept under ``kmeans_run``; every other entry is kept."""
    merged = dict(old or {"device": rec["device"], "runs": {}})
    runs = merged.setdefault("runs", {})
    for name, r in rec["runs"].items():
        size = {k: v for k, v in runs.get(name, {}).items() if k not in _OLD_KMEANS_KEYS}
        size.setdefault("n_points", r["n_points"])  # mean shift's cloud, if it was another
        size["kmeans"] = r["kmeans"]
        runs[name] = size
    merged["kmeans_run"] = {k: v for k, v in rec.items() if k != "runs"}
    return merged


def main(argv=None) -> int:
    from pipeline.io import write_json

    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", default="bench", help="folder of cluster.json")
    p.add_argument("--points", default=None, help=".npy point cloud (N, 5); default: build from lung1")
    p.add_argument("--save-points", default=None, help="write the built point cloud here (.npy)")
    p.add_argument("--sizes", default="20000,100000", help="subsample sizes, comma-separated")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated: " + ",".join(PRESETS))
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--kmeans-only", action="store_true",
                   help="run only the k-means comparison; the file keeps the mean-shift entries")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--exact-cache", default=None,
                   help="folder of exact-engine labels: read for the same sample, written after a run")
    p.add_argument("--exact-max-s", type=float, default=MAX_RUN_S,
                   help=f"run the exact engine where its estimate is below this (s; default {MAX_RUN_S:.0f})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = set(args.presets.split(",")) - set(PRESETS)
    if unknown:
        p.error(f"unknown presets {sorted(unknown)}; choose from {', '.join(PRESETS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scan = None
    if args.points:
        points = np.load(args.points)
    else:
        points, scan = lung_points_and_timings(device=args.device)
    if args.save_points:
        Path(args.save_points).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_points, points)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    presets = {k: PRESETS[k] for k in args.presets.split(",")}
    rec = run(points, args.device, sizes=sizes, presets=presets, skip_sklearn=args.skip_sklearn,
              scan=scan, kmeans_only=args.kmeans_only, exact_cache=args.exact_cache,
              exact_max_s=args.exact_max_s)
    out = Path(args.out) / "cluster.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    key = rec["device"].split(":")[0]
    data[key] = merge_kmeans(data.get(key), rec) if args.kmeans_only else rec
    write_json(data, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
