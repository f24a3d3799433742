"""The lesion net's training data and loop (pipeline.lesion_training), on a small phantom."""
import numpy as np
import pytest
import torch

from nets.lesionnet import LesionNet, load_lesion_net, predict_lesions, slice_inputs
from pipeline import lesion_training as lt


@pytest.fixture(scope="module")
def small_chest():
    from stages.resample import resample
    from synth.phantom import make_phantom

    ct = resample(make_phantom((60, 100, 100), (1.5, 1.6, 1.6), seed=2, n_nodules=0)[0])
    return ct, np.zeros(ct.shape, bool)


def test_examples_hold_the_inserted_masses(small_chest):
    ct, les = small_chest
    xs, ys = lt.examples_of(ct, les, variants=2, seed=1, max_negative=5)
    assert len(xs) == len(ys) == 3  # the scan itself and two copies with masses
    for x, y in zip(xs, ys):
        assert x.dtype == np.float16 and x.shape[1] == 4 and x.shape[2] % 8 == 0 and x.shape[3] % 8 == 0
        assert y.shape == (x.shape[0],) + x.shape[2:] and y.dtype == bool
        assert 0 <= float(x[:, :3].min()) and float(x[:, :3].max()) <= 1  # HU scaled
        assert 0 <= float(x[:, 3].min()) and float(x[:, 3].max()) == 1  # lung fraction of a 2 mm pixel
    assert not ys[0].any() and ys[1].any() and ys[2].any()


def test_one_short_fit_saves_weights_that_load_safely(small_chest, tmp_path, one_thread):
    ct, les = small_chest
    examples = {"chest": lt.examples_of(ct, les, variants=1, seed=0, max_negative=4)}
    model = lt.train(examples, ["chest"], epochs=1, batch=4, crop_mm=64, progress=False)
    assert isinstance(model, LesionNet) and not model.training
    path = tmp_path / "lesion.pt"
    lt.save(model, path, {"trained_on": ["chest"]})
    assert torch.load(path, weights_only=True)["meta"]["trained_on"] == ["chest"]
    again = load_lesion_net(path)
    x = torch.from_numpy(slice_inputs(ct.array, np.zeros(ct.shape, np.uint8), [10, 20]))
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))
    prob = predict_lesions(ct.array, np.zeros(ct.shape, np.uint8), again)
    assert prob.shape == ct.shape and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
