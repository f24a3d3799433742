"""The coarse-to-fine grid mean shift (``coarse_cutoff``, opt-in): the seeds climb with
the Gaussian cut short, and only their distinct end points climb on with the full cutoff.
Checked against the exact engine, which stays the reference.  Coarse-to-fine is the
opt-in way to the modes of a longer cut (``FINE``) than the default ``GRID_CUTOFF``."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from stages import _meanshift
from stages.cluster import COARSE_CUTOFF, mean_shift
from synth.clouds import tubes_and_blobs

#: The full cut and the seeds the coarse-to-fine tests climb with: every point.
FINE = dict(cutoff=6.0, seed_cell=0)


def tissue_like(rng, n_tubes=5, n_per=200):
    """Tubes with a wider intensity and shape-index spread than the default: many weak
    modes along the vessels."""
    return tubes_and_blobs(rng, n_tubes, n_per, tube_hu_sd=0.5, tube_si_sd=0.4)


def test_default_grid_agrees_with_exact_engine(rng):
    pts = tissue_like(rng)
    exact = mean_shift(pts, 1.0, mode="exact", device="cpu")
    grid = mean_shift(pts, 1.0, mode="grid", coarse_cutoff=COARSE_CUTOFF, device="cpu", **FINE)
    assert adjusted_rand_score(exact.labels, grid.labels) >= 0.99
    assert abs(len(grid.centres) - len(exact.centres)) <= max(1, len(exact.centres) // 50)
    near = np.linalg.norm(exact.centres[:, None] - grid.centres[None], axis=2).min(1)
    assert np.mean(near < 0.1) >= 0.95
    assert grid.n_seeds == len(pts)


def test_coarse_stage_hands_on_few_candidates_that_reach_every_mode(rng):
    pts = tissue_like(rng)
    opts = _meanshift.Options(kernel="gaussian", engine="grid", max_iter=50, tol=1e-3, cutoff=6.0,
                              bin_seeding=False, min_bin_freq=1, merge_radius=1.0, grid_dims=None,
                              path_cell=0.02, bin_size=None, cells_per_reach=2, budget=1 << 21,
                              coarse_cutoff=COARSE_CUTOFF)
    x = torch.as_tensor(pts - pts.mean(0))
    cand, n_iter = _meanshift.coarse_candidates(x, None, x, opts)
    assert cand.dtype == x.dtype and 1 <= n_iter <= opts.max_iter
    assert len(cand) < len(pts) / 5                      # the saving: few fine climbs
    # from the candidates, the full kernel reaches the exact engine's modes
    exact = mean_shift(pts, 1.0, mode="exact", device="cpu").centres - pts.mean(0)
    fine = mean_shift(pts - pts.mean(0), 1.0, mode="grid", seeds=cand.numpy(), coarse_cutoff=None,
                      cutoff=6.0, device="cpu").centres
    assert np.linalg.norm(exact[:, None] - fine[None], axis=2).min(1).max() < 0.1


def test_coarse_to_fine_is_deterministic(rng):
    pts = tissue_like(rng, n_tubes=3)
    a = mean_shift(pts, 1.0, mode="grid", coarse_cutoff=COARSE_CUTOFF, device="cpu", **FINE)
    b = mean_shift(pts, 1.0, mode="grid", coarse_cutoff=COARSE_CUTOFF, device="cpu", **FINE)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centres, b.centres)


@pytest.mark.parametrize("settings", [dict(coarse_cutoff=6.0), dict(coarse_cutoff=3.0, cutoff=2.0),
                                      dict(kernel="flat", coarse_cutoff=COARSE_CUTOFF)])
def test_no_coarse_stage_where_it_cannot_save(rng, settings):
    """Not below the cutoff, or the flat kernel: one climb, as with ``coarse_cutoff=None``."""
    pts = tissue_like(rng, n_tubes=2, n_per=150)
    a = mean_shift(pts, 1.0, mode="grid", device="cpu", **settings)
    b = mean_shift(pts, 1.0, mode="grid", device="cpu", **dict(settings, coarse_cutoff=None))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centres, b.centres)
    assert a.n_iter == b.n_iter


@pytest.mark.parametrize("value, error", [(0.0, ValueError), (-1.0, ValueError), ("four", TypeError)])
def test_coarse_cutoff_is_checked(value, error):
    with pytest.raises(error, match="coarse_cutoff"):
        mean_shift(np.zeros((3, 2)), 1.0, coarse_cutoff=value, device="cpu")
