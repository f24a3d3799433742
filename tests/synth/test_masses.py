"""insert_mass: a lobulated tumour pressed into a lung's border, where it was asked for."""
import numpy as np
import pytest

from stages.lungmask import LEFT_LUNG, RIGHT_LUNG, segment_lungs
from synth.masses import insert_mass
from synth.phantom import make_phantom


@pytest.fixture(scope="module")
def chest():
    vol = make_phantom((100, 160, 160), (1.0, 1.6, 1.6), seed=5, n_nodules=0)[0]
    from stages.resample import resample

    ct = resample(vol)
    return ct, segment_lungs(ct, lesions=None)


@pytest.mark.parametrize("site", ["wall", "hilar", "any"])
def test_mass_sits_on_the_lung_border(chest, site):
    ct, lung = chest
    out, mass = insert_mass(ct, lung, diameter_mm=40.0, site=site, seed=2)
    assert out.same_geometry(ct) and out.array.dtype == ct.array.dtype
    ml = mass.sum() / 1000
    assert 0.6 * (np.pi / 6 * 40 ** 3 / 1000) < ml < 1.3 * (np.pi / 6 * 40 ** 3 / 1000)
    inside = lung.array[mass] > 0
    assert 0.3 < inside.mean() < 1.0  # presses into the lung, and past its border
    assert 0 < np.median(out.array[mass]) < 90  # solid tumour density
    bone = ct.array >= 250
    assert np.array_equal(out.array[bone], ct.array[bone])  # ribs and spine untouched
    from scipy import ndimage as ndi

    changed = out.array != ct.array
    assert changed[~mass].any()  # the edge is blended (partial volume) ...
    assert not changed[~ndi.binary_dilation(mass, np.ones((3, 3, 3), bool), iterations=3)].any()  # ... and only the edge
    again, mass2 = insert_mass(ct, lung, diameter_mm=40.0, site=site, seed=2)
    assert np.array_equal(again.array, out.array) and np.array_equal(mass, mass2)


def test_sites_are_lateral_or_medial(chest):
    ct, lung = chest
    labels = lung.array
    for seed in range(4):
        for site in ("wall", "hilar"):
            _, mass = insert_mass(ct, lung, diameter_mm=30.0, site=site, seed=seed)
            side = np.bincount(labels[mass], minlength=3)[1:].argmax() + 1
            lung_x = np.argwhere(labels == side)[:, 2].mean()
            mass_x = np.argwhere(mass)[:, 2].mean()
            medial = (mass_x - lung_x) * (1 if side == RIGHT_LUNG else -1)  # +x is the patient's left
            assert (medial > 0) == (site == "hilar"), (seed, site, medial)
    assert LEFT_LUNG in labels


def test_refuses_an_empty_lung_and_unknown_sites(chest):
    ct, lung = chest
    with pytest.raises(ValueError, match="site must be one of"):
        insert_mass(ct, lung, diameter_mm=30.0, site="pleura")
    with pytest.raises(ValueError, match="the lung mask is empty"):
        insert_mass(ct, lung.with_array(np.zeros(lung.shape, np.uint8)), diameter_mm=30.0)
