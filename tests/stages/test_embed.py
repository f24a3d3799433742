"""The embed stage: the CNN embeddings the patient RNN reads, as training computed them."""
import numpy as np
import pandas as pd
import pytest

from stages.classify import DEFAULT_WEIGHTS, embed_candidates
from stages.volume import Volume


def test_embeddings_of_the_most_probable_candidates_match_training(one_thread):
    from nets.cnn3d import load_classifier
    from pipeline.patient_training import _embeddings
    from stages.patches import extract_patches

    rng = np.random.default_rng(0)
    vol = Volume(rng.integers(-900, 100, (40, 48, 48)).astype(np.int16), spacing_mm=(1.0, 1.0, 1.0))
    cands = pd.DataFrame({"coordX": [10.0, 24.0, 30.0], "coordY": [20.0, 24.0, 12.0],
                          "coordZ": [20.0, 18.0, 25.0], "probability": [0.2, 0.9, 0.5]})
    out = embed_candidates(vol, cands, device="cpu", top=2)
    assert out["probability"].tolist() == [0.9, 0.5]  # the two most probable, best first
    assert list(out.columns[:4]) == ["coordX", "coordY", "coordZ", "probability"]
    emb = out.filter(like="emb_").to_numpy()
    assert emb.shape == (2, 128) and np.isfinite(emb).all()
    # the training cache's path: the same cubes, the same network
    cubes = extract_patches(vol, centres_xyz_mm=cands.iloc[[1, 2]][["coordX", "coordY", "coordZ"]].to_numpy())
    want = _embeddings(cubes, load_classifier(DEFAULT_WEIGHTS, device="cpu"))
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
    empty = embed_candidates(vol, cands.iloc[:0], device="cpu")
    assert len(empty) == 0 and empty.shape[1] == 4 + 128
    with pytest.raises(ValueError):
        embed_candidates(vol, cands, top=0)
