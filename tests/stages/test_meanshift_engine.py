"""The grid engine's kernel sums (``shift_grid``) against a brute-force reference: every
(seed, point) pair, the kernel cut at the reach, in float64 numpy."""
import numpy as np
import pytest
import torch

import stages._meanshift_grid as engine
from stages._meanshift_grid import Grid, choose_grid_dims, shift_grid

REACH = {"gaussian": 3.0, "flat": 1.0}   # the engine's reach of each kernel (bandwidths)
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}


@pytest.fixture(params=["seed-major", "point-major"])
def layout(request, monkeypatch):
    """Force one of the engine's two block layouts (it picks the cheaper per call)."""
    cost = {"seed-major": float("inf"), "point-major": 0.0}[request.param]
    monkeypatch.setitem(engine.POINT_MAJOR_COST, "cpu", cost)
    return request.param


def cloud(rng, n_clusters=6, n_per=500, d=5):
    """Normal clusters in ``d`` dimensions (bandwidths), a few stragglers far out."""
    centres = rng.normal(0.0, 4.0, (n_clusters, d))
    pts = [c + rng.normal(0.0, rng.uniform(0.5, 2.0), (n_per, d)) for c in centres]
    pts.append(rng.uniform(-25.0, 25.0, (40, d)))
    return np.concatenate(pts)


def seeds_for(rng, pts):
    """Seeds near points, anywhere in the points' box (many in empty cells) and outside it."""
    lo, hi = pts.min(0), pts.max(0)
    near = pts[rng.choice(len(pts), 300, replace=False)] + rng.normal(0.0, 1.0, (300, pts.shape[1]))
    box = rng.uniform(lo, hi, (150, pts.shape[1]))
    out = rng.uniform(lo - 6.0, hi + 6.0, (150, pts.shape[1]))
    edge = pts[rng.choice(len(pts), 50)] + np.sign(rng.normal(size=(50, pts.shape[1]))) * 2.0
    return np.concatenate([near, box, out, edge, pts[:20]])


def brute(pts, seeds, kernel, reach2, mass):
    """(num, den) over all pairs, and each numerator's scale ``sum_j w_ij |x_j|``."""
    d2 = ((seeds[:, None, :] - pts[None, :, :]) ** 2).sum(2)
    if kernel == "flat":
        w = (d2 <= 1.0).astype(float)
    else:
        w = np.where(d2 <= reach2, np.exp(-0.5 * d2), 0.0)
    if mass is not None:
        w = w * mass[None, :]
    return w @ pts, w.sum(1), w @ np.abs(pts)


def check(grid, pts, seeds, kernel, mass, dtype, budget=1 << 16):
    reach2 = REACH[kernel] ** 2
    num, den = shift_grid(grid, torch.as_tensor(seeds, dtype=dtype), kernel=kernel,
                          reach2=reach2, budget=budget)
    assert num.dtype == dtype and num.shape == seeds.shape and den.shape == (len(seeds),)
    ref_num, ref_den, scale = brute(pts, seeds, kernel, reach2, mass)
    assert (ref_den == 0).any() and (ref_den > 0).sum() > len(seeds) // 10  # both kinds
    tol = RTOL[dtype]
    den, num = den.double().numpy(), num.double().numpy()
    np.testing.assert_allclose(den, ref_den, rtol=tol, atol=1e-300)
    assert np.all(np.abs(num - ref_num) <= tol * scale + 1e-300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_reach", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kernel", ["gaussian", "flat"])
def test_sums_equal_brute_force(rng, kernel, weighted, per_reach, dtype, layout):
    pts = cloud(rng)
    mass = rng.uniform(0.5, 3.0, len(pts)) if weighted else None
    reach = REACH[kernel]
    x = torch.as_tensor(pts, dtype=dtype)
    grid = Grid(x, reach, choose_grid_dims(x, reach / per_reach), per_reach,
                mass=None if mass is None else torch.as_tensor(mass, dtype=dtype))
    # the grid is reused with other seeds (its point tiles are built once)
    check(grid, pts, seeds_for(rng, pts), kernel, mass, dtype)
    check(grid, pts, seeds_for(rng, pts)[::3], kernel, mass, dtype, budget=1 << 30)


@pytest.mark.parametrize("dims", [(0,), (1, 3), (0, 1, 2, 3, 4)])
def test_sums_equal_brute_force_on_any_hashed_dims(rng, dims, layout):
    """One hashed dimension (a single row), two, all five; long sparse rows included."""
    pts = cloud(rng, n_clusters=3, n_per=400)
    x = torch.as_tensor(pts)
    grid = Grid(x, 3.0, torch.tensor(dims), 2)
    check(grid, pts, seeds_for(rng, pts), "gaussian", None, torch.float64)


def test_no_seeds_and_seeds_far_away(rng, layout):
    pts = cloud(rng, n_clusters=2, n_per=200)
    x = torch.as_tensor(pts)
    grid = Grid(x, 3.0, choose_grid_dims(x, 1.5), 2)
    num, den = shift_grid(grid, x[:0], kernel="gaussian", reach2=9.0, budget=1 << 16)
    assert num.shape == (0, 5) and den.shape == (0,)
    far = torch.full((3, 5), 1e3, dtype=x.dtype)
    num, den = shift_grid(grid, far, kernel="gaussian", reach2=9.0, budget=1 << 16)
    assert torch.all(num == 0) and torch.all(den == 0)


def test_the_layout_follows_the_seeds_density(rng, monkeypatch):
    """A dense cloud (voxels of a quarter bandwidth, as a CT's at 1 mm with 4 mm
    bandwidths) with every point a seed: seed-major (the seed tiles are full); a few seeds
    spread out: point-major (a seed tile would be mostly padding)."""
    axis = np.arange(24) * 0.25
    vox = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    x = torch.as_tensor(np.concatenate([vox, rng.normal(0.0, 0.5, (len(vox), 2))], 1))
    grid = Grid(x, 3.0, choose_grid_dims(x, 1.5), 2)
    used = []
    for name in ("_shift_seed_major", "_shift_point_major"):
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name,
                            lambda *a, _real=real, _n=name, **k: used.append(_n) or _real(*a, **k))
    shift_grid(grid, x, kernel="gaussian", reach2=9.0, budget=1 << 20)
    shift_grid(grid, x[::200], kernel="gaussian", reach2=9.0, budget=1 << 20)
    assert used == ["_shift_seed_major", "_shift_point_major"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reach", [3.0, 4.0, 5.0, 6.0])
def test_the_gaussian_is_cut_exactly_at_the_reach(reach, dtype, layout):
    """Points just inside the reach of a seed weigh exp(-d^2/2), points just beyond it 0."""
    d = np.array([reach - 1e-3, reach + 1e-3, reach + 0.05, 0.5 * reach])
    direction = np.array([0.6, 0.0, 0.8, 0.0, 0.0])
    pts = d[:, None] * direction[None, :]
    x = torch.as_tensor(pts, dtype=dtype)
    grid = Grid(x, reach, torch.tensor([0, 2]), 2)
    num, den = shift_grid(grid, torch.zeros(1, 5, dtype=dtype), kernel="gaussian",
                          reach2=reach * reach, budget=1 << 16)
    inside = d[[0, 3]]
    np.testing.assert_allclose(den.double().numpy(), [np.exp(-0.5 * inside ** 2).sum()],
                               rtol=RTOL[dtype])
