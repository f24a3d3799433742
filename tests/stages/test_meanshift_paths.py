"""Path merging's cell book-keeping (``PathMerger``) against a dictionary."""
import numpy as np
import torch

from stages._meanshift_paths import PathMerger, make_snapper


def test_path_merger_matches_a_dictionary_over_many_iterations(rng):
    """Forty rounds of claims (so the sorted runs of keys merge many times): a seed follows
    the owner of an owned cell it stops in; seeds new to a cell in one round follow the
    lowest-numbered of them; the roots follow chains of owners.  Seeds stop in a cell of
    their own, in a cell a lower-numbered seed owns, or in a new cell shared that round
    (so the owners graph has no cycles, as climbing paths)."""
    n_seeds, rounds = 200, 40
    box = torch.tensor([[0.0, 0.0, 0.0], [n_seeds + rounds + 2.0, 4.0, 4.0]])
    merger = PathMerger(make_snapper(box, np.sqrt(3.0)), n_seeds, torch.device("cpu"))
    lo = merger.h.lo.numpy()
    owner, parent, claimed = {}, list(range(n_seeds)), []
    active = np.arange(n_seeds)
    for r in range(rounds):
        x = np.empty((active.size, 3))
        for i, seed in enumerate(active):
            u = rng.uniform()
            older = [c for c in claimed if c[1] < seed]
            if u < 0.04 and older:                   # a lower-numbered seed's cell
                cell = older[rng.integers(len(older))][0]
            elif u < 0.08:                           # a new cell several seeds share
                cell = (n_seeds + r, rng.integers(2), 0)
            else:                                    # a cell of its own
                cell = (seed, rng.integers(4), rng.integers(4))
            x[i] = lo + np.array(cell) + rng.uniform(0.05, 0.95, 3)
        expect = np.ones(active.size, dtype=bool)
        for i, seed in enumerate(active):
            key = tuple(np.floor(x[i] - lo).astype(int))
            if key not in owner:
                owner[key] = seed
                claimed.append((key, seed))
            elif owner[key] != seed:
                parent[seed] = owner[key]
                expect[i] = False
        got = merger.claim(torch.as_tensor(x), torch.as_tensor(active)).numpy()
        np.testing.assert_array_equal(got, expect)
        active = active[expect]
    assert 1 < len(merger.runs) < 12 and len(claimed) > 500
    roots = np.array(parent)
    while not np.array_equal(roots[roots], roots):
        roots = roots[roots]
    assert (roots != np.arange(n_seeds)).sum() > 50
    np.testing.assert_array_equal(merger.roots().numpy(), roots)
