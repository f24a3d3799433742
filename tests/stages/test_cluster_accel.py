"""The accelerations of the grid mean-shift engine: path merging (spatial discretisation),
binned points, fast bin seeding and seed thinning, checked by their effect on the clusters."""
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
                     max_iter=1, device="cpu", dtype="float64")
    plain = mean_shift(pts, bw, kernel="flat", mode=mode, seeds=np.zeros((1, 3)), max_iter=1,
                       device="cpu", dtype="float64")
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


def test_seed_thinning_takes_the_first_point_of_every_occupied_cell(rng):
    from stages._meanshift import thin_seeds

    pts = rng.normal(0, 3.0, (2000, 5))
    side = 1.5
    first = {}
    for i, row in enumerate(np.floor(pts / side).astype(int)):
        first.setdefault(tuple(row), i)
    np.testing.assert_array_equal(thin_seeds(pts, side), sorted(first.values()))


def test_seed_cell_thins_the_seeds_of_either_engine(rng):
    pts = rng.normal(0, 2.0, (3000, 3))
    cells = {tuple(c) for c in np.floor(pts / 2.0).astype(int)}
    for mode in ("grid", "exact"):
        thinned = mean_shift(pts, 1.0, mode=mode, seed_cell=2.0, device="cpu")
        assert thinned.n_seeds == len(cells) < len(pts) / 10
        assert mean_shift(pts, 1.0, mode=mode, device="cpu").n_seeds == len(pts)  # default
    given = pts[:7]
    assert mean_shift(pts, 1.0, mode="grid", seeds=given, seed_cell=2.0, device="cpu").n_seeds == 7
    binned = mean_shift(pts, 1.0, mode="grid", bin_seeding=True, seed_cell=2.0, device="cpu")
    assert binned.n_seeds == len({tuple(c) for c in np.round(pts).astype(int)})


def test_thinned_seeds_find_the_modes_of_every_point_seeding():
    """Seeds are data points: on vessel-like 5-D clouds the thinned seeds reach the modes
    every point reaches (a mode with a small basin may be missed), with far fewer climbs."""
    aris = []
    for draw in range(3):
        pts = tubes_and_blobs(np.random.default_rng(draw), 5, 200, tube_hu_sd=0.5, tube_si_sd=0.4)
        every = mean_shift(pts, 1.0, mode="grid", seed_cell=0, device="cpu", dtype="float64")
        thin = mean_shift(pts, 1.0, mode="grid", seed_cell=2.0, device="cpu", dtype="float64")
        assert thin.n_seeds < every.n_seeds / 4
        assert len(every.centres) - 2 <= len(thin.centres) <= len(every.centres)
        near = np.linalg.norm(thin.centres[:, None] - every.centres[None], axis=2).min(1)
        assert near.max() < 0.1  # every mode found is one every point seeding finds (to snapping)
        aris.append(adjusted_rand_score(every.labels, thin.labels))
    assert np.mean(aris) >= 0.98 and min(aris) >= 0.95


@pytest.mark.parametrize("value, error", [(-1.0, ValueError), (float("nan"), ValueError),
                                          ("two", TypeError)])
def test_seed_cell_is_checked(value, error):
    with pytest.raises(error, match="seed_cell"):
        mean_shift(np.zeros((3, 2)), 1.0, seed_cell=value, device="cpu")
