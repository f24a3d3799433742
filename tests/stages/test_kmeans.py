"""k-means (:func:`stages.cluster.kmeans`, :mod:`stages._kmeans`): scikit-learn's results
with less work, exact sums, determinism, and the benchmark's k-means-only run."""
import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from stages import _kmeans
from stages.cluster import kmeans


def cloud(rng, n=3000):
    """5-D points like the lung tissue cloud: tubes and blobs in z, y, x plus two features."""
    parts = []
    for _ in range(6):
        a, b = rng.uniform(0, 20, 3), rng.uniform(0, 20, 3)
        t = rng.uniform(0, 1, (n // 8, 1))
        parts.append(np.column_stack([a + t * (b - a) + rng.normal(0, 0.5, (n // 8, 3)),
                                      rng.normal(1.0, 0.4, (n // 8, 2))]))
    rest = n - sum(len(p) for p in parts)
    parts.append(np.column_stack([rng.uniform(0, 20, (rest, 3)), rng.normal(0, 1, (rest, 2))]))
    return np.concatenate(parts)


def first_centres(pts, k, init, seed, dtype=torch.float64):
    """The first centres of ``kmeans(pts, k, init=init, seed=seed)`` (input units)."""
    centred = torch.as_tensor(pts - pts.mean(0), dtype=dtype)
    return pts[_kmeans.init_centres(centred, k, init, np.random.default_rng(seed)).numpy()]


@pytest.mark.parametrize("init", ["farthest", "k-means++"])
@pytest.mark.parametrize("tol", [1e-4, 1e-12])  # centre-shift stop; strict (no label changed)
def test_equals_sklearn_lloyd_from_the_same_start(init, tol):
    pts = cloud(np.random.default_rng(3))
    res = kmeans(pts, 16, init=init, tol=tol, seed=2, device="cpu", dtype="float64")
    sk = KMeans(16, init=first_centres(pts, 16, init, 2), n_init=1, tol=tol,
                max_iter=100, algorithm="lloyd").fit(pts)
    np.testing.assert_array_equal(res.labels, sk.labels_)
    assert res.n_iter == sk.n_iter_
    np.testing.assert_allclose(res.centres, sk.cluster_centers_, rtol=0, atol=1e-9)
    assert res.inertia == pytest.approx(sk.inertia_, rel=1e-12)


def test_relocates_an_empty_cluster_as_sklearn_does():
    pts = np.array([[0.0], [1.0], [2.2], [3.0], [10.0], [11.0]])
    start = np.array([[1.0], [10.5], [100.0]])  # the third centre wins no point
    fixed = _kmeans._Fixed(torch.as_tensor(pts - pts.mean(0)))
    centres, labels, n_iter = _kmeans.lloyd(torch.as_tensor(pts - pts.mean(0)), fixed,
                                            torch.as_tensor(start - pts.mean(0)), 100, 0.0,
                                            1 << 20)
    sk = KMeans(3, init=start, n_init=1, tol=1e-12, algorithm="lloyd").fit(pts)
    np.testing.assert_array_equal(labels.numpy(), sk.labels_)
    np.testing.assert_allclose(centres.numpy() + pts.mean(0), sk.cluster_centers_, atol=1e-12)
    assert len(set(labels.tolist())) == 3  # the empty cluster was given a point


def test_bounds_skip_most_distance_work(monkeypatch):
    pts = cloud(np.random.default_rng(4), n=4000)
    rows = []
    real = _kmeans._nearest

    def counting(x, *args):
        rows.append(len(x))
        return real(x, *args)

    monkeypatch.setattr(_kmeans, "_nearest", counting)
    res = kmeans(pts, 32, init="k-means++", seed=0, device="cpu", dtype="float64")
    assert rows[0] == len(pts)  # the first assignment examines every point
    assert res.n_iter > 10
    # plain Lloyd would compute all distances of every point at every iteration
    assert sum(rows[1:]) < 0.25 * len(pts) * (res.n_iter - 1)


def test_fixed_point_sums_are_exact_and_order_free():
    rng = np.random.default_rng(5)
    pts = rng.normal(0, 30, (5000, 5)) * np.array([1, 1, 1, 1e-3, 1e3])
    fixed = _kmeans._Fixed(torch.as_tensor(pts))
    labels = torch.as_tensor(rng.integers(0, 7, len(pts)))
    sums = torch.zeros((7, 5), dtype=torch.long).index_add_(0, labels, fixed.q)
    perm = torch.as_tensor(rng.permutation(len(pts)))
    again = torch.zeros((7, 5), dtype=torch.long).index_add_(0, labels[perm], fixed.q[perm])
    torch.testing.assert_close(sums, again, rtol=0, atol=0)
    exact = np.stack([[np.sum(pts[labels.numpy() == c, d], dtype=np.longdouble)
                       for d in range(5)] for c in range(7)])
    np.testing.assert_allclose(sums.double().numpy() * fixed.unit, exact.astype(float),
                               rtol=1e-12, atol=1e-9 * np.abs(pts).max())
    assert int(fixed.q.abs().sum()) < 2 ** 62  # no partial sum can overflow


@pytest.mark.parametrize("init", ["farthest", "k-means++"])
def test_same_seed_same_labels(init):
    pts = cloud(np.random.default_rng(6))
    a = kmeans(pts, 24, init=init, seed=7, device="cpu")
    b = kmeans(pts, 24, init=init, seed=7, device="cpu")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centres, b.centres)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    c = kmeans(pts, 24, init=init, seed=8, device="cpu")
    assert not np.array_equal(a.centres, c.centres)  # the seed is used


def test_kmeanspp_start_is_as_good_as_sklearns():
    # greedy k-means++ (best of 2 + log(k) draws per centre) as scikit-learn's; one draw per
    # centre starts about 30 % worse on this cloud
    from sklearn.cluster import kmeans_plusplus

    pts = cloud(np.random.default_rng(9))

    def sse(c):
        return ((pts[:, None, :] - c[None]) ** 2).sum(2).min(1).sum()

    ours = np.mean([sse(first_centres(pts, 16, "k-means++", s)) for s in range(10)])
    theirs = np.mean([sse(kmeans_plusplus(pts, 16, random_state=s)[0]) for s in range(10)])
    assert ours < 1.1 * theirs


def test_cpu_threads_capped_then_restored(monkeypatch):
    from stages import _kmeans

    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(_kmeans, "CPU_THREADS", 1)
    real_run = _kmeans._run
    monkeypatch.setattr(_kmeans, "_run", lambda *a, **kw: seen.append(torch.get_num_threads())
                        or real_run(*a, **kw))
    capped = kmeans(cloud(np.random.default_rng(10), n=400), 4, device="cpu")
    assert seen == [1] and torch.get_num_threads() == before
    monkeypatch.setattr(_kmeans, "CPU_THREADS", None)  # the default: torch's own setting
    free = kmeans(cloud(np.random.default_rng(10), n=400), 4, device="cpu")
    assert seen == [1, before] and torch.get_num_threads() == before
    np.testing.assert_array_equal(capped.labels, free.labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu_and_is_deterministic():
    pts = cloud(np.random.default_rng(11), n=20000)
    for init in ("farthest", "k-means++"):
        cpu = kmeans(pts, 32, init=init, seed=3, device="cpu")
        gpu = kmeans(pts, 32, init=init, seed=3, device="cuda")
        again = kmeans(pts, 32, init=init, seed=3, device="cuda")
        np.testing.assert_array_equal(gpu.labels, again.labels)
        assert adjusted_rand_score(cpu.labels, gpu.labels) >= 0.99  # float32 rounding only
        assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)


def test_bench_kmeans_only_keeps_the_mean_shift_entries(tmp_path):
    from bench.cluster import BANDWIDTH, main

    pts = cloud(np.random.default_rng(12), n=600) * np.asarray(BANDWIDTH)
    np.save(tmp_path / "pts.npy", pts)
    old = {"cuda": {"kept": True},
           "cpu": {"device": "cpu", "torch_threads": 2,
                   "runs": {"300": {"n_points": 300, "accurate": {"seconds": 1.0},
                                    "kmeans_farthest": {"seconds": 9.0}}}}}
    (tmp_path / "cluster.json").write_text(json.dumps(old))
    argv = ["--device", "cpu", "--points", str(tmp_path / "pts.npy"), "--out", str(tmp_path),
            "--sizes", "300", "--kmeans-only"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "cluster.json").read_text())
    assert data["cuda"] == {"kept": True}
    cpu = data["cpu"]
    assert cpu["torch_threads"] == 2 and "date_utc" in cpu["kmeans_run"]
    small, whole = cpu["runs"]["300"], cpu["runs"]["whole_lung"]
    assert small["accurate"] == {"seconds": 1.0}  # mean shift's, kept
    assert "kmeans_farthest" not in small  # the older k-means entry, replaced
    for r, n in ((small, 300), (whole, len(pts))):
        km = r["kmeans"]
        assert r["n_points"] == n and km["k"] == 64 and km["tol"] == 1e-4
        assert len(km["ours_k-means++"]["seconds_each"]) == km["repeats"]
        assert km["sklearn"]["seconds"] > 0 and km["ours_farthest"]["speedup_vs_sklearn"] > 0
        assert 0.5 < km["inertia_ratio_vs_sklearn"] < 2.0
