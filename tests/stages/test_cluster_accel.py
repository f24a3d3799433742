"""The accelerations of the grid mean-shift engine: path merging (spatial discretisation),
binned points and fast bin seeding, checked by their effect on the clusters."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from stages.cluster import PATH_CELL, mean_shift
from synth.clouds import tubes_and_blobs


def assert_same_clusters(a, b, ari=0.99, atol=0.1):
    assert adjusted_rand_score(a.labels, b.labels) >= ari
    assert len(a.centres) == len(b.centres)
    for c in a.centres:
        assert np.min(np.linalg.norm(b.centres - c, axis=1)) < atol


def test_path_merging_keeps_the_modes_and_labels(rng):
    pts = tubes_and_blobs(rng)
    plain = mean_shift(pts, 1.0, mode="grid", cutoff=6.0, bin_seeding=False, path_cell=0.0,
                       device="cpu")
    merged = mean_shift(pts, 1.0, mode="grid", cutoff=6.0, bin_seeding=False, path_cell=0.05,
                        device="cpu")
    assert_same_clusters(plain, merged)


@pytest.mark.parametrize("path_cell", [0.02, 0.3])
def test_path_merging_finds_the_exact_modes_of_separated_blobs(rng, path_cell):
    """Coarse path cells make long chains of followers (a seed follows one that follows
    another); each must still end at its blob's mode."""
    centres = rng.uniform(0, 30, (6, 3))
    pts = np.concatenate([c + rng.normal(0, 0.5, (250, 3)) for c in centres])
    truth = np.repeat(np.arange(6), 250)
    exact = mean_shift(pts, 1.0, mode="exact", path_cell=0.0, device="cpu")
    merged = mean_shift(pts, 1.0, mode="grid", path_cell=path_cell, device="cpu")
    assert adjusted_rand_score(truth, merged.labels) == 1.0
    assert_same_clusters(exact, merged, ari=1.0, atol=0.05)


def test_path_merging_default_on_for_grid_only(rng):
    pts = tubes_and_blobs(rng, n_tubes=2, n_per=60, n_blobs=1)
    for mode, default in (("exact", 0.0), ("grid", PATH_CELL)):
        res = mean_shift(pts, 1.0, mode=mode, device="cpu")
        on = mean_shift(pts, 1.0, mode=mode, path_cell=PATH_CELL, device="cpu")
        off = mean_shift(pts, 1.0, mode=mode, path_cell=0.0, device="cpu")
        explicit, other = (off, on) if default == 0.0 else (on, off)
        np.testing.assert_array_equal(res.centres, explicit.centres)
        np.testing.assert_array_equal(res.labels, explicit.labels)
        assert res.n_iter == explicit.n_iter
        # path merging changes the run (followers stop early), so the default is observable
        assert res.n_iter != other.n_iter or not np.array_equal(res.centres, other.centres)


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_binned_points_keep_mass_and_first_moment(rng, mode):
    """With every point within a flat kernel's reach, one step moves a seed to the mean of
    all points: binning must keep it (each bin weighted by its count)."""
    pts = rng.normal(0, 2.0, (3000, 3))
    bw = 100.0  # every point within one bandwidth of the seed
    res = mean_shift(pts, bw, kernel="flat", mode=mode, seeds=np.zeros((1, 3)), bin_size=0.01,
                     max_iter=1, device="cpu")
    plain = mean_shift(pts, bw, kernel="flat", mode=mode, seeds=np.zeros((1, 3)), max_iter=1,
                       device="cpu")
    np.testing.assert_allclose(res.centres[0], pts.mean(0), atol=1e-9)
    np.testing.assert_allclose(plain.centres[0], pts.mean(0), atol=1e-9)
    assert res.labels.shape == (3000,) and res.cluster_sizes.tolist() == [3000]


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_binned_points_weigh_each_bin_by_its_count(rng, mode):
    """Points in tight groups of 1 to 20, bins much wider than a group and much narrower than
    the bandwidth: the binned density is the density of the points, so one step from any
    seed goes where it goes without bins."""
    sites = rng.uniform(0, 20, (300, 3))
    counts = rng.integers(1, 21, 300)
    pts = np.repeat(sites, counts, axis=0) + rng.normal(0, 1e-5, (counts.sum(), 3))
    seeds = sites[::5] + 0.3
    kw = dict(seeds=seeds, mode=mode, cutoff=3.0, max_iter=1, tol=1e9, merge_radius=0.01,
              path_cell=0.0, device="cpu")
    binned = mean_shift(pts, 1.0, bin_size=0.01, **kw)
    plain = mean_shift(pts, 1.0, **kw)
    assert binned.n_seeds == plain.n_seeds == len(seeds)
    d = np.linalg.norm(binned.centres[:, None, :] - plain.centres[None], axis=2)
    assert d.min(1).max() < 1e-4 and d.min(0).max() < 1e-4


def test_binned_points_give_the_same_clusters_on_separated_blobs(rng):
    centres = rng.uniform(0, 30, (6, 5))
    pts = np.concatenate([c + rng.normal(0, 0.4, (300, 5)) for c in centres])
    truth = np.repeat(np.arange(6), 300)
    res = mean_shift(pts, 1.0, mode="grid", bin_size=0.5, device="cpu")
    assert adjusted_rand_score(truth, res.labels) == 1.0
    ex = mean_shift(pts, 1.0, mode="exact", bin_size=0.5, device="cpu")
    assert adjusted_rand_score(truth, ex.labels) == 1.0


def test_bin_seeds_are_the_occupied_rounded_cells(rng):
    pts = rng.normal(0, 3.0, (4000, 4))
    res = mean_shift(pts, 1.0, mode="grid", bin_seeding=True, min_bin_freq=2, max_iter=1,
                     device="cpu")
    cells, counts = np.unique(np.round(pts), axis=0, return_counts=True)
    assert res.n_seeds == int((counts >= 2).sum())


@pytest.mark.parametrize("name, value", [("path_cell", -0.1), ("bin_size", 0.0),
                                         ("cells_per_reach", 0), ("cells_per_reach", 1.5)])
def test_bad_acceleration_settings(name, value):
    pts = np.zeros((10, 2))
    with pytest.raises((ValueError, TypeError), match=name):
        mean_shift(pts, 1.0, device="cpu", **{name: value})
