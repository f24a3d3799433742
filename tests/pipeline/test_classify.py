import numpy as np
import pandas as pd
import pytest
import torch

from nets.cnn3d import NoduleNet3D, normalize_hu, predict_tta, save_classifier
from pipeline.classify import classify_candidates
from stages.patches import extract_patches
from stages.volume import Volume


@pytest.fixture
def ct():
    rng = np.random.default_rng(0)
    arr = rng.normal(-800, 30, size=(40, 48, 48)).astype(np.int16)
    arr[18:23, 20:25, 20:25] = 40  # a bright blob
    return Volume(arr, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(-20.0, 5.0, -7.0), scan_id="1.2.3")


def _cands(ct):
    centres_zyx = ct.index_to_world([[20, 22, 22], [5, 5, 5], [30, 40, 10]])
    return pd.DataFrame({"seriesuid": ct.scan_id, "coordX": centres_zyx[:, 2], "coordY": centres_zyx[:, 1],
                         "coordZ": centres_zyx[:, 0], "diameter_mm": 5.0, "score": [0.9, 0.5, 0.1]})


def test_probabilities_match_the_model_on_the_same_cubes(tmp_path, ct):
    torch.manual_seed(0)
    model = NoduleNet3D(widths=(4, 8))
    weights = save_classifier(model, tmp_path / "w.pt", size_mm=16.0)
    cands = _cands(ct)
    out = classify_candidates(ct, cands, weights=weights, device="cpu", tta=2)
    assert len(out) == 3 and set(cands.columns) < set(out.columns)
    assert out["probability"].between(0, 1).all()
    assert out["probability"].is_monotonic_decreasing
    cubes = extract_patches(ct, centres_xyz_mm=cands[["coordX", "coordY", "coordZ"]].to_numpy(), size_mm=16.0)
    model.eval()
    expect = predict_tta(model, torch.from_numpy(normalize_hu(cubes)), n=2).numpy()
    got = out.set_index("score").loc[cands["score"], "probability"].to_numpy()
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_empty_candidates_and_missing_weights(tmp_path, ct):
    weights = save_classifier(NoduleNet3D(widths=(4, 8)), tmp_path / "w.pt", size_mm=16.0)
    empty = _cands(ct).iloc[:0]
    assert "probability" in classify_candidates(ct, empty, weights=weights, device="cpu").columns
    with pytest.raises(FileNotFoundError, match="make train"):
        classify_candidates(ct, _cands(ct), weights=tmp_path / "nope.pt")
