"""Benchmark of :mod:`stages.cluster` on lung tissue voxels of the lung1 CT.

``python -m pipeline.bench_cluster [--device cpu|cuda] [--out bench] [--points pts.npy]``
writes ``<out>/cluster.json``; an existing file keeps the other devices' entries (one key per
device type), so CPU and GPU runs are both recorded.

The point cloud: lung1 resampled to 1 mm, a crude lung mask (air below ``LUNG_HU`` inside
the body, the large components not touching the in-plane border, holes filled, dilated by
``MASK_DILATE_MM``), and in it every voxel above ``TISSUE_HU`` (vessels, airway walls, the
nodule).  Each point is ``(z, y, x)`` in mm, HU and a Hessian shape index; the features
are divided by ``BANDWIDTH`` inside :func:`stages.cluster.mean_shift`.  ``--save-points``
writes the cloud as ``.npy`` so a machine without SimpleITK can run the benchmark on it.
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

log = logging.getLogger(__name__)

#: Air threshold of the crude lung mask (HU).
LUNG_HU = -400.0
#: Tissue voxels inside the lung mask: above this (HU).
TISSUE_HU = -600.0
#: Dilation of the lung mask to include the pleura and airway walls (mm).
MASK_DILATE_MM = 2.0
#: Gaussian scale of the Hessian for the shape index (mm).
HESSIAN_SIGMA_MM = 1.5
#: Mean-shift bandwidth per feature: z, y, x (mm), HU, shape index.
BANDWIDTH = (5.0, 5.0, 5.0, 150.0, 0.25)
#: Clusters for the k-means comparison.
KMEANS_K = 64
#: Exact runs and scikit-learn runs longer than this (s) are extrapolated, not run.
MAX_RUN_S = 60.0


def shape_index(image, sigma_vox):
    """Hessian shape index in [0, 1] (1 bright cap, 0.75 ridge, 0.5 saddle) per voxel.

    Principal curvatures of the bright structure are taken as ``k1 >= k2``, the negated two
    lowest Hessian eigenvalues; ``SI = 1/2 + arctan((k1 + k2) / (k1 - k2)) / pi``.
    """
    from scipy import ndimage

    img = image.astype(np.float32)
    comps = {}
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            comps[a, b] = ndimage.gaussian_filter(img, sigma_vox, order=order)
    return comps


def _si_from_hessian(comps, mask):
    h = np.empty((int(mask.sum()), 3, 3), np.float64)
    for (a, b), c in comps.items():
        h[:, a, b] = h[:, b, a] = c[mask]
    ev = np.linalg.eigvalsh(h)  # ascending
    k1, k2 = -ev[:, 0], -ev[:, 1]
    return 0.5 + np.arctan2(k1 + k2, k1 - k2) / np.pi


def build_lung_points(image_path=None) -> np.ndarray:
    """(N, 5) float32 ``z, y, x`` (mm), HU, shape index of the lung tissue voxels of lung1."""
    import SimpleITK as sitk
    from scipy import ndimage

    from pipeline.data import lung1_paths

    if image_path is None:
        image_path = lung1_paths()[0]
    img = sitk.ReadImage(str(image_path))
    spacing = (1.0, 1.0, 1.0)
    # stay inside the scanned extent: padding would join the lungs to the outside air
    size = [int((n - 1) * s / t) + 1 for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    res = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                        img.GetDirection(), -1024.0, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(res)  # (z, y, x), 1 mm
    air = hu < LUNG_HU
    lab, n = ndimage.label(air)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[border] = 0
    sizes[0] = 0
    keep = np.nonzero(sizes >= 0.2 * sizes.max())[0]
    lung = np.isin(lab, keep)
    lung = np.stack([ndimage.binary_fill_holes(s) for s in lung])
    lung = ndimage.binary_dilation(lung, iterations=int(round(MASK_DILATE_MM)))
    tissue = lung & (hu > TISSUE_HU)
    zz, yy, xx = np.nonzero(tissue)
    box = tuple(slice(max(0, v.min() - 8), v.max() + 9) for v in (zz, yy, xx))
    comps = shape_index(hu[box], HESSIAN_SIGMA_MM)
    si = _si_from_hessian(comps, tissue[box])
    pts = np.stack([zz, yy, xx, hu[tissue], si], 1).astype(np.float32)
    return pts


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
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


def run(points, device, *, sizes=(20_000, 100_000), skip_sklearn=False, cutoff=3.0) -> dict:
    """Run every comparison on ``points`` (N, 5) and return the record for one device."""
    import torch
    from sklearn.cluster import KMeans, MeanShift
    from sklearn.metrics import adjusted_rand_score

    from stages.cluster import kmeans, mean_shift, resolve_device

    dev = resolve_device(device)
    rng = np.random.default_rng(0)
    rec = {"device": str(dev), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "machine": platform.node(),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "bandwidth": list(BANDWIDTH), "cutoff": cutoff, "n_total_points": int(len(points)),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}
    mean_shift(points[:500], BANDWIDTH, device=dev)  # warm-up (CUDA context, kernels)
    mean_shift(points[:6000], BANDWIDTH, mode="grid", device=dev)
    targets = [(str(n), n) for n in sizes if n < len(points)] + [("whole_lung", len(points))]
    for name, n in targets:
        sub = points if n >= len(points) else points[np.sort(rng.choice(len(points), n, replace=False))]
        r = {"n_points": int(n)}
        log.info("%s: %d points", name, n)
        grid, sec = _timed(mean_shift, sub, BANDWIDTH, mode="grid", cutoff=cutoff, device=dev)
        r["grid"] = _ms_record(grid, sec, n)
        per_iter = _exact_per_iter(sub, dev)
        r["exact_per_iter_s"] = round(per_iter, 4)
        est = per_iter * 50  # upper bound: converged seeds drop out
        if est <= MAX_RUN_S or (n <= 20_000 and est <= 10 * MAX_RUN_S):  # the ARI reference
            exact, sec = _timed(mean_shift, sub, BANDWIDTH, mode="exact", device=dev)
            r["exact"] = _ms_record(exact, sec, n)
            r["ari_grid_vs_exact"] = round(float(adjusted_rand_score(exact.labels, grid.labels)), 5)
            r["speedup_grid_vs_exact"] = round(r["exact"]["seconds"] / r["grid"]["seconds"], 1)
        else:
            r["exact"] = {"skipped": f"estimated {per_iter:.2f} s per iteration x up to 50 "
                                     f"iterations > {MAX_RUN_S:.0f} s"}
        # scikit-learn's MeanShift is a flat kernel: compare with ours, flat, same bins
        scaled = sub / np.asarray(BANDWIDTH)
        flat, sec = _timed(mean_shift, scaled, 1.0, kernel="flat", mode="grid", device=dev)
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
        for init in ("farthest", "k-means++"):
            km, sec = _timed(kmeans, scaled, KMEANS_K, init=init, device=dev)
            r[f"kmeans_{init}"] = {"seconds": round(sec, 4), "n_iter": km.n_iter,
                                   "inertia": round(km.inertia, 2), "points_per_s": round(n / sec, 1)}
        if not skip_sklearn:
            skm, sec = _timed(KMeans(KMEANS_K, n_init=1, random_state=0).fit, scaled)
            r["sklearn_kmeans"] = {"seconds": round(sec, 4), "n_iter": int(skm.n_iter_),
                                   "inertia": round(float(skm.inertia_), 2),
                                   "points_per_s": round(n / sec, 1)}
        rec["runs"][name] = r
        log.info("%s", json.dumps(r))
    return rec


def main(argv=None) -> int:
    from pipeline.io import write_json

    p = argparse.ArgumentParser(prog="python -m pipeline.bench_cluster", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", default="bench", help="folder of cluster.json")
    p.add_argument("--points", default=None, help=".npy point cloud (N, 5); default: build from lung1")
    p.add_argument("--save-points", default=None, help="write the built point cloud here (.npy)")
    p.add_argument("--sizes", default="20000,100000", help="subsample sizes, comma-separated")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--cutoff", type=float, default=3.0, help="grid engine kernel cutoff (bandwidths)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    points = np.load(args.points) if args.points else build_lung_points()
    if args.save_points:
        Path(args.save_points).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_points, points)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    rec = run(points, args.device, sizes=sizes, skip_sklearn=args.skip_sklearn, cutoff=args.cutoff)
    out = Path(args.out) / "cluster.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data[rec["device"].split(":")[0]] = rec
    write_json(data, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
