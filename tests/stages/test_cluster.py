import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import MeanShift
from sklearn.metrics import adjusted_rand_score

from stages import cluster
from stages.cluster import kmeans, mean_shift

CENTRES = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 7.0, 1.0], [5.0, 6.0, 8.0]])


def blobs(rng, centres=CENTRES, n=150, sd=0.4):
    pts = np.concatenate([c + rng.normal(0.0, sd, (n, len(c))) for c in centres])
    truth = np.repeat(np.arange(len(centres)), n)
    return pts, truth


def vessel_like(rng, n_tubes=6, n_per=350, n_blobs=3):
    """5-D cloud like lung tissue: tubes (vessels) and blobs (nodules) in z, y, x, with
    an intensity and a shape-index feature; already in bandwidth units."""
    parts = []
    for _ in range(n_tubes):
        a, b = rng.uniform(0, 30, 3), rng.uniform(0, 30, 3)
        t = rng.uniform(0, 1, (n_per, 1))
        xyz = a + t * (b - a) + rng.normal(0, 0.3, (n_per, 3))
        feat = np.column_stack([rng.normal(1.5, 0.3, n_per), rng.normal(3.0, 0.2, n_per)])
        parts.append(np.column_stack([xyz, feat]))
    for _ in range(n_blobs):
        c = rng.uniform(0, 30, 3)
        xyz = c + rng.normal(0, 0.6, (n_per // 2, 3))
        feat = np.column_stack([rng.normal(3.0, 0.3, n_per // 2), rng.normal(4.0, 0.2, n_per // 2)])
        parts.append(np.column_stack([xyz, feat]))
    return np.concatenate(parts)


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_mean_shift_recovers_blob_centres(rng, mode):
    pts, truth = blobs(rng)
    res = mean_shift(pts, 1.5, mode=mode, device="cpu")
    assert res.mode == mode and res.device == "cpu"
    assert len(res.centres) == 4
    for c in CENTRES:
        assert np.min(np.linalg.norm(res.centres - c, axis=1)) < 0.15
    assert adjusted_rand_score(truth, res.labels) == 1.0
    assert res.cluster_sizes.tolist() == [150] * 4
    assert res.centres.dtype == np.float64 and res.labels.dtype == np.int64


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_labels_are_nearest_mode_and_sorted_by_size(rng, mode):
    pts = np.concatenate([rng.normal(0, 0.3, (200, 2)), rng.normal(5, 0.3, (50, 2)),
                          rng.normal([0, 6], 0.3, (120, 2))])
    res = mean_shift(pts, 1.0, mode=mode, device="cpu")
    d = np.linalg.norm(pts[:, None, :] - res.centres[None], axis=2)
    np.testing.assert_array_equal(res.labels, d.argmin(1))
    assert res.cluster_sizes.tolist() == [200, 120, 50]
    np.testing.assert_array_equal(np.bincount(res.labels), res.cluster_sizes)


@pytest.mark.parametrize("bin_seeding", [False, True])
def test_flat_kernel_matches_sklearn(rng, bin_seeding):
    pts, _ = blobs(rng, centres=CENTRES[:, :2] * 1.2, n=60, sd=0.5)
    sk = MeanShift(bandwidth=1.8, bin_seeding=bin_seeding).fit(pts)
    ours = mean_shift(pts, 1.8, kernel="flat", mode="exact", bin_seeding=bin_seeding,
                      max_iter=300, device="cpu")
    assert len(ours.centres) == len(sk.cluster_centers_)
    for c in sk.cluster_centers_:
        assert np.min(np.linalg.norm(ours.centres - c, axis=1)) < 1e-6
    assert adjusted_rand_score(sk.labels_, ours.labels) == 1.0


def test_grid_agrees_with_exact_on_5d_clusters():
    rng = np.random.default_rng(5)
    centres = rng.uniform(0, 25, (10, 5))
    sizes = rng.integers(80, 300, 10)
    pts = np.concatenate([c + rng.normal(0, 0.5, (s, 5)) for c, s in zip(centres, sizes)])
    exact = mean_shift(pts, 1.0, mode="exact", device="cpu")
    grid = mean_shift(pts, 1.0, mode="grid", device="cpu")
    assert grid.n_seeds == exact.n_seeds  # every point seeds by default
    binned = mean_shift(pts, 1.0, mode="grid", bin_seeding=True, cutoff=3.0, device="cpu")
    assert binned.n_seeds < exact.n_seeds / 2
    assert adjusted_rand_score(exact.labels, binned.labels) >= 0.99
    assert len(grid.centres) == len(exact.centres) == 10
    assert adjusted_rand_score(exact.labels, grid.labels) >= 0.99
    for c in exact.centres:
        assert np.min(np.linalg.norm(grid.centres - c, axis=1)) < 0.1


def test_grid_with_long_cutoff_and_point_seeds_matches_exact(rng):
    pts = vessel_like(rng, n_tubes=3, n_per=100)
    exact = mean_shift(pts, 1.0, mode="exact", device="cpu")
    grid = mean_shift(pts, 1.0, mode="grid", cutoff=6.0, seed_cell=0, device="cpu")
    assert grid.n_seeds == exact.n_seeds
    assert adjusted_rand_score(exact.labels, grid.labels) == 1.0
    np.testing.assert_allclose(grid.centres, exact.centres, atol=0.05)


def one_step_means(pts, seeds, kernel, cutoff=None):
    """Brute-force kernel means of ``pts`` around each seed (bandwidth 1): one mean-shift step,
    the Gaussian cut at ``cutoff`` bandwidths when given."""
    d2 = cdist(seeds, pts, "sqeuclidean")
    if kernel == "flat":
        w = (d2 <= 1.0).astype(float)
    else:
        w = np.exp(-0.5 * d2) * (d2 <= cutoff ** 2 if cutoff is not None else 1.0)
    return (w @ pts) / w.sum(1)[:, None]


def assert_modes_are(centres, expected, merge_radius):
    """Every centre is one of ``expected`` (to rounding); every expected mean is within
    ``merge_radius`` of a centre (closer ones are merged into one)."""
    d = np.linalg.norm(centres[:, None, :] - expected[None], axis=2)
    assert d.min(1).max() < 1e-9
    assert d.min(0).max() < merge_radius


# One iteration with a huge tol: every seed stops after one shift and is a mode, so the
# centres are the one-step kernel means.  The dense cloud with every point a seed is larger
# than one batch of (seed, point) pairs on the CPU; seeds every 7th point leave few a cell.
@pytest.mark.parametrize("cloud", ["vessels", "dense"])
@pytest.mark.parametrize("seed_every", [1, 7])
@pytest.mark.parametrize("kernel", ["gaussian", "flat"])
@pytest.mark.parametrize("mode, cells_per_reach", [("grid", 1), ("grid", 2), ("grid", 3),
                                                   ("exact", 2)])
def test_one_step_equals_brute_force_kernel_mean(rng, cloud, seed_every, kernel, mode,
                                                 cells_per_reach):
    pts = vessel_like(rng, n_tubes=3, n_per=200) if cloud == "vessels" else rng.normal(0, 2, (3000, 3))
    seeds = pts[::seed_every] + 0.3  # each seed has its own point within reach
    res = mean_shift(pts, 1.0, seeds=seeds, mode=mode, kernel=kernel, cutoff=3.0,
                     cells_per_reach=cells_per_reach, max_iter=1, tol=1e9, merge_radius=0.01,
                     path_cell=0.0, device="cpu", dtype="float64")
    assert res.n_iter == 1 and res.n_seeds == len(seeds)
    expected = one_step_means(pts, seeds, kernel, cutoff=3.0 if mode == "grid" else None)
    assert_modes_are(res.centres, expected, 0.01)


def test_hashed_dimensions_do_not_change_result(rng):
    pts = vessel_like(rng, n_tubes=3, n_per=100)
    a = mean_shift(pts, 1.0, mode="grid", device="cpu", dtype="float64")
    b = mean_shift(pts, 1.0, mode="grid", grid_dims=[0, 1, 2, 3, 4], device="cpu", dtype="float64")
    c = mean_shift(pts, 1.0, mode="grid", grid_dims=[1], device="cpu", dtype="float64")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.labels, c.labels)
    np.testing.assert_allclose(a.centres, c.centres, atol=1e-9)


def test_lung1_point_cloud(lung1):
    from bench.cluster import BANDWIDTH, lung_points_and_timings

    pts, scan = lung_points_and_timings(lung1[0], device="cpu")
    assert pts.shape[1] == len(BANDWIDTH) == 5 and len(pts) > 100_000
    assert scan["n_tissue_points"] == len(pts)
    for stage in ("read_s", "resample_s", "segmentation_s", "features_s", "candidates_s"):
        assert scan[stage] > 0
    assert 2000 < scan["lung_ml"] < 8000 and scan["n_candidates"] >= 1
    assert pts[:, 3].min() > -600.0  # tissue only
    assert 0.0 <= pts[:, 4].min() and pts[:, 4].max() <= 1.0  # shape index
    sub = pts[np.random.default_rng(0).choice(len(pts), 800, replace=False)]
    res = mean_shift(sub, BANDWIDTH, mode="grid", device="cpu")
    assert res.labels.shape == (800,) and res.cluster_sizes.sum() == 800


def test_auto_mode_switches_on_size(rng):
    pts, _ = blobs(rng, n=20)
    assert mean_shift(pts, 1.5, device="cpu").mode == "exact"
    big = np.tile(pts, (80, 1)) + rng.normal(0, 0.05, (80 * len(pts), 3))
    assert len(big) > cluster.AUTO_EXACT_MAX_POINTS
    assert mean_shift(big, 1.5, device="cpu").mode == "grid"


def test_bandwidth_per_dimension(rng):
    pts, truth = blobs(rng)
    scale = np.array([1.0, 100.0, 0.01])
    ref = mean_shift(pts, 1.5, mode="grid", device="cpu")
    res = mean_shift(pts * scale, 1.5 * scale, mode="grid", device="cpu")
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.centres, ref.centres * scale, rtol=1e-9, atol=1e-9)


def test_merge_radius(rng):
    pts = np.concatenate([rng.normal(0, 0.2, (100, 2)), rng.normal([1.6, 0], 0.2, (100, 2))])
    assert len(mean_shift(pts, 0.5, mode="exact", device="cpu").centres) == 2
    assert len(mean_shift(pts, 0.5, mode="exact", merge_radius=4.0, device="cpu").centres) == 1


def test_explicit_seeds(rng):
    pts, _ = blobs(rng)
    res = mean_shift(pts, 1.5, seeds=CENTRES[:2] + 0.5, device="cpu")
    assert res.n_seeds == 2 and len(res.centres) == 2


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_float32_agrees_with_float64(rng, mode):
    pts = vessel_like(rng, n_tubes=3, n_per=100)
    a = mean_shift(pts, 1.0, mode=mode, device="cpu")
    b = mean_shift(pts, 1.0, mode=mode, device="cpu", dtype="float32")
    assert adjusted_rand_score(a.labels, b.labels) >= 0.99
    assert len(a.centres) == len(b.centres)
    for c in a.centres:
        assert np.min(np.linalg.norm(b.centres - c, axis=1)) < 0.05


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_deterministic(rng, mode):
    pts = vessel_like(rng, n_tubes=3, n_per=100)
    a = mean_shift(pts, 1.0, mode=mode, device="cpu")
    b = mean_shift(pts, 1.0, mode=mode, device="cpu")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centres, b.centres)


@pytest.mark.parametrize("init", ["farthest", "k-means++"])
def test_kmeans_recovers_centres(rng, init):
    pts, truth = blobs(rng)
    res = kmeans(pts, 4, init=init, seed=1, device="cpu")
    assert adjusted_rand_score(truth, res.labels) == 1.0
    for c in CENTRES:
        assert np.min(np.linalg.norm(res.centres - c, axis=1)) < 0.15
    d2 = ((pts - res.centres[res.labels]) ** 2).sum()
    assert res.inertia == pytest.approx(d2)
    again = kmeans(pts, 4, init=init, seed=1, device="cpu")
    np.testing.assert_array_equal(again.labels, res.labels)
    np.testing.assert_array_equal(again.centres, res.centres)


def test_kmeans_float32_agrees_with_float64(rng):
    pts, _ = blobs(rng)
    a = kmeans(pts, 4, device="cpu", dtype="float64")
    b = kmeans(pts, 4, device="cpu")  # float32 by default
    assert adjusted_rand_score(a.labels, b.labels) == 1.0
    np.testing.assert_allclose(a.centres, b.centres, atol=1e-4)


def test_kmeans_reseeds_empty_clusters():
    pts = np.array([[0.0, 0.0]] * 10 + [[5.0, 5.0]] * 3 + [[9.0, 0.0]])
    res = kmeans(pts, 4, init="farthest", device="cpu")
    assert np.all(np.isfinite(res.centres))
    assert set(res.labels.tolist()) <= set(range(4))
    assert res.inertia == pytest.approx(0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree(rng):
    pts = vessel_like(rng)
    for kw in ({"mode": "exact"}, {"mode": "grid"},
               {"mode": "grid", "cutoff": 3.0, "bin_seeding": True, "bin_size": 1.0}):
        a = mean_shift(pts, 1.0, device="cpu", **kw)
        b = mean_shift(pts, 1.0, device="cuda", **kw)
        assert adjusted_rand_score(a.labels, b.labels) >= 0.99, kw
    a, b = kmeans(pts, 8, device="cpu"), kmeans(pts, 8, device="cuda")
    assert adjusted_rand_score(a.labels, b.labels) >= 0.99


def test_cuda_refused_without_gpu(rng):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        mean_shift(np.zeros((3, 2)), 1.0, device="cuda")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(points=np.zeros(5)), ValueError, "2-D array"),
    (dict(points=np.zeros((0, 3))), ValueError, "non-empty"),
    (dict(points=np.array([[0.0, np.nan]])), ValueError, "finite"),
    (dict(points=np.array([["a", "b"]])), TypeError, "numeric"),
    (dict(bandwidth=0.0), ValueError, "bandwidth must be finite and > 0"),
    (dict(bandwidth=[1.0, 2.0, 3.0]), ValueError, "3 values but the points have 2"),
    (dict(kernel="epanechnikov"), ValueError, "kernel must be one of"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(max_iter=0), ValueError, "max_iter must be >= 1"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an int"),
    (dict(tol=-1.0), ValueError, "tol must be a finite number > 0"),
    (dict(cutoff=float("inf")), ValueError, "cutoff must be a finite number > 0"),
    (dict(seeds=np.zeros((2, 3))), ValueError, "seeds have 3 features"),
    (dict(min_bin_freq=100, bin_seeding=True), ValueError, "no bin holds min_bin_freq=100"),
    (dict(grid_dims=[0, 5]), ValueError, "grid_dims must be distinct"),
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(dtype="float16"), ValueError, "dtype must be"),
    (dict(seed=-1), TypeError, "seed must be a non-negative int"),
])
def test_mean_shift_input_errors(kwargs, exc, match):
    args = dict(points=np.random.default_rng(0).normal(size=(20, 2)), bandwidth=1.0, device="cpu")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        mean_shift(args.pop("points"), args.pop("bandwidth"), **args)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=50), ValueError, "larger than the number of points"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(init="random"), ValueError, "init must be"),
    (dict(tol=0.0), ValueError, "tol must be"),
    (dict(seed="a"), TypeError, "seed must be"),
])
def test_kmeans_input_errors(kwargs, exc, match):
    args = dict(k=3, device="cpu")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kmeans(np.random.default_rng(0).normal(size=(20, 2)), args.pop("k"), **args)


def test_bench_cli_writes_and_merges_json(tmp_path):
    import json

    from bench import cluster as bench_cluster
    from bench.cluster import BANDWIDTH, main

    pts = vessel_like(np.random.default_rng(1), n_tubes=2, n_per=80) * np.asarray(BANDWIDTH)
    np.save(tmp_path / "pts.npy", pts)
    (tmp_path / "cluster.json").write_text(json.dumps({"cuda": {"kept": True}}))
    argv = ["--device", "cpu", "--points", str(tmp_path / "pts.npy"), "--out", str(tmp_path),
            "--sizes", "150", "--skip-sklearn"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "cluster.json").read_text())
    assert data["cuda"] == {"kept": True}
    runs = data["cpu"]["runs"]
    assert set(runs) == {"150", "whole_lung"}
    assert runs["whole_lung"]["n_points"] == len(pts)
    for preset in ("default", "previous_default", "thinned", "fast"):
        assert 0.0 <= runs["150"][preset]["ari_vs_exact"] <= 1.0
        assert runs["150"][preset]["n_clusters"] >= 1
        assert runs["150"][preset]["settings"] == bench_cluster.PRESETS[preset]
    assert runs["150"]["previous_default"]["n_seeds"] == runs["150"]["default"]["n_seeds"] == 150
    assert runs["150"]["thinned"]["n_seeds"] < 150  # one seed per seed cell
    assert runs["150"]["fast"]["n_seeds"] < 150  # bin seeding
    assert runs["150"]["default"]["speedup_vs_previous_default"] > 0
    default = runs["150"]["default"]
    assert len(default["seconds_each"]) == bench_cluster.DEFAULT_REPEATS == 3
    assert default["seconds"] == pytest.approx(float(np.median(default["seconds_each"])), abs=1e-4)
    assert default["same_labels_each_run"] is True
    assert "scan" not in data["cpu"]  # no scan timings for a given cloud


def test_bench_skips_a_preset_whose_extrapolated_time_is_too_long(tmp_path, monkeypatch):
    import json

    from bench import cluster as bench_cluster

    pts = vessel_like(np.random.default_rng(2), n_tubes=2, n_per=60) * np.asarray(bench_cluster.BANDWIDTH)
    np.save(tmp_path / "pts.npy", pts)
    monkeypatch.setattr(bench_cluster, "MAX_PRESET_S", -1.0)  # any estimate is too long
    argv = ["--device", "cpu", "--points", str(tmp_path / "pts.npy"), "--out", str(tmp_path),
            "--sizes", "100", "--skip-sklearn"]
    assert bench_cluster.main(argv) == 0
    runs = json.loads((tmp_path / "cluster.json").read_text())["cpu"]["runs"]
    for preset in bench_cluster.PRESETS:
        ran, skipped = runs["100"][preset], runs["whole_lung"][preset]
        assert ran["seconds"] > 0 and "ari_vs_exact" in ran
        assert "skipped" in skipped and "seconds" not in skipped
        quadratic = ran["seconds"] * (len(pts) / 100) ** 2
        assert skipped["estimated_seconds"] == pytest.approx(quadratic, abs=0.06)
