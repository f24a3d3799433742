"""The accelerations of the grid mean-shift engine: ball-shaped neighbour stencils, path
merging (spatial discretisation), binned points and fast bin seeding."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from stages import cluster
from stages.cluster import mean_shift


def tubes_and_blobs(rng, n_tubes=4, n_per=200, n_blobs=3):
    parts = []
    for _ in range(n_tubes):
        a, b = rng.uniform(0, 25, 3), rng.uniform(0, 25, 3)
        t = rng.uniform(0, 1, (n_per, 1))
        xyz = a + t * (b - a) + rng.normal(0, 0.3, (n_per, 3))
        parts.append(np.column_stack([xyz, rng.normal(1.5, 0.3, n_per), rng.normal(3.0, 0.2, n_per)]))
    for _ in range(n_blobs):
        c = rng.uniform(0, 25, 3)
        xyz = c + rng.normal(0, 0.6, (n_per // 2, 3))
        parts.append(np.column_stack([xyz, rng.normal(3.0, 0.3, n_per // 2),
                                      rng.normal(4.0, 0.2, n_per // 2)]))
    return np.concatenate(parts)


@pytest.mark.parametrize("per_reach", [1, 2, 3])
def test_grid_stencil_holds_every_neighbour_within_reach(rng, per_reach):
    pts = torch.as_tensor(tubes_and_blobs(rng))
    reach = 2.5
    grid = cluster._Grid(pts, reach, cluster._choose_grid_dims(pts, reach / per_reach), per_reach)
    queries = pts[::5] + torch.as_tensor(rng.normal(0, 0.5, (len(pts[::5]), 5)))
    start, end = grid.ranges(queries)
    qi, pj = cluster._expand_pairs(start, end)
    found = set(zip(qi.tolist(), grid.order[pj].tolist()))
    d2 = ((queries[:, None, :] - pts[None]) ** 2).sum(2)
    qn, pn = torch.nonzero(d2 <= reach * reach, as_tuple=True)
    within = set(zip(qn.tolist(), pn.tolist()))
    assert within and within <= found
    if per_reach > 1:  # finer cells, ball stencil: fewer candidates than 3^k cells of side reach
        coarse = cluster._Grid(pts, reach, grid.dims, 1)
        s1, e1 = coarse.ranges(queries)
        assert len(found) < int((e1 - s1).clamp(min=0).sum())


def test_shift_with_finer_cells_equals_brute_force(rng):
    pts = torch.as_tensor(tubes_and_blobs(rng, n_tubes=3, n_per=150))
    grid = cluster._Grid(pts, 2.0, cluster._choose_grid_dims(pts, 1.0), 2)
    seeds = pts[::6] + 0.2
    num, den = cluster._shift_grid(grid, seeds, "gaussian", 4.0, 4000, 4, 16)
    d2 = ((seeds[:, None, :] - pts[None]) ** 2).sum(2)
    w = torch.exp(-0.5 * d2) * (d2 <= 4.0)
    torch.testing.assert_close(den, w.sum(1))
    torch.testing.assert_close(num, w @ pts)


def test_insert_sorted_matches_a_sort(rng):
    keys = torch.as_tensor(np.sort(rng.choice(1000, 40, replace=False)))
    vals = torch.arange(40)
    pool = np.setdiff1d(np.arange(1000), keys.numpy())
    new = torch.as_tensor(np.sort(rng.choice(pool, 15, replace=False)))
    k, v = cluster._insert_sorted(keys, vals, new, torch.arange(100, 115))
    ref_k = torch.cat([keys, new])
    order = torch.argsort(ref_k)
    torch.testing.assert_close(k, ref_k[order])
    torch.testing.assert_close(v, torch.cat([vals, torch.arange(100, 115)])[order])


def test_path_merger_follow_rules():
    pts = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    merger = cluster._PathMerger(cluster._snapper(pts, 1.0 * np.sqrt(2)), 4, pts.device)
    ids = torch.arange(4)
    # seeds 0 and 2 share a cell: 2 follows 0; 1 and 3 own their cells
    owns = merger.claim(torch.tensor([[0.2, 0.2], [3.5, 3.5], [0.4, 0.3], [6.5, 6.5]]), ids)
    assert owns.tolist() == [True, True, False, True]
    # next iteration: 3 moves into 1's cell and follows 1; 1 revisits its own cell and goes on
    owns = merger.claim(torch.tensor([[3.6, 3.6], [3.3, 3.2]]), torch.tensor([1, 3]))
    assert owns.tolist() == [True, False]
    # then 1 enters 0's cell: 3 -> 1 -> 0, so every seed ends with 0 or itself
    merger.claim(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
    assert merger.roots().tolist() == [0, 0, 0, 0]


def test_path_merging_keeps_the_modes_and_labels(rng):
    pts = tubes_and_blobs(rng)
    plain = mean_shift(pts, 1.0, mode="grid", cutoff=6.0, bin_seeding=False, path_cell=0.0,
                       device="cpu")
    merged = mean_shift(pts, 1.0, mode="grid", cutoff=6.0, bin_seeding=False, path_cell=0.05,
                        device="cpu")
    assert adjusted_rand_score(plain.labels, merged.labels) >= 0.99
    assert len(merged.centres) == len(plain.centres)
    for c in plain.centres:
        assert np.min(np.linalg.norm(merged.centres - c, axis=1)) < 0.1


def test_path_merging_default_on_for_grid_only(rng):
    pts = tubes_and_blobs(rng, n_tubes=2, n_per=60, n_blobs=1)
    calls = []
    real = cluster._PathMerger

    class Spy(real):
        def __init__(self, *a, **k):
            calls.append(1)
            super().__init__(*a, **k)

    cluster._PathMerger = Spy
    try:
        mean_shift(pts, 1.0, mode="exact", device="cpu")
        assert not calls
        mean_shift(pts, 1.0, mode="grid", device="cpu")
        assert calls
    finally:
        cluster._PathMerger = real


def test_bin_points_keep_mass_and_first_moment(rng):
    pts = torch.as_tensor(rng.normal(0, 2.0, (3000, 5)))
    means, mass = cluster._bin_points(pts, 1.0)
    assert len(means) < len(pts)
    assert float(mass.sum()) == 3000.0
    torch.testing.assert_close((means * mass[:, None]).sum(0), pts.sum(0))
    # one mean per occupied bin, and each mean lies in its own bin (a cube is convex)
    occupied = torch.unique(torch.floor(pts), dim=0)
    assert len(means) == len(occupied)
    assert torch.equal(torch.unique(torch.floor(means), dim=0), occupied)


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


def test_tile_shape_follows_the_seeds_per_cell():
    few = cluster._tile_shape(torch.tensor([1, 2, 3]), torch.tensor([1000, 900, 800]))
    many = cluster._tile_shape(torch.tensor([100, 90]), torch.tensor([10, 12]))
    assert few == (4, 128) and many == (32, 16)
    assert few in cluster.TILE_SHAPES["cpu"] and many in cluster.TILE_SHAPES["cpu"]
