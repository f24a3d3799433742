import numpy as np
import pandas as pd
import pytest
import torch

from nets.cnn3d import NoduleNet3D, normalize_hu, predict_tta, save_classifier
from stages.classify import classify_candidates
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


def test_merge_nearby_keeps_the_most_probable_mark_of_each_group():
    from stages.classify import merge_nearby

    marks = pd.DataFrame({"seriesuid": ["a", "a", "a", "a", "b"],
                          "coordX": [0.0, 5.0, 9.0, 30.0, 1.0], "coordY": [0.0, 0.0, 0.0, 0.0, 0.0],
                          "coordZ": [0.0, 0.0, 0.0, 0.0, 0.0], "probability": [0.9, 0.95, 0.2, 0.5, 0.1]})
    # 0.95 at x=5 takes x=0 (5 mm) and x=9 (4 mm); x=30 stays; scan b is never merged with a
    dropped = merge_nearby(marks, 8.0, demote=0.0)
    assert dropped[["seriesuid", "coordX", "n_merged"]].values.tolist() == [
        ["a", 5.0, 2], ["a", 30.0, 0], ["b", 1.0, 0]]
    assert not dropped["merged"].any()
    # by default the merged marks stay, demoted below every kept mark of their scan
    soft = merge_nearby(marks, 8.0, demote=0.01)
    assert soft[["seriesuid", "coordX", "merged"]].values.tolist() == [
        ["a", 5.0, False], ["a", 30.0, False], ["b", 1.0, False], ["a", 0.0, True], ["a", 9.0, True]]
    np.testing.assert_allclose(soft["probability"], [0.95, 0.5, 0.1, 0.009, 0.002])
    # greedy: x=9 is 9 mm from x=0, so with x=5 gone both stay
    assert merge_nearby(marks.iloc[[0, 2]], 8.0)["merged"].tolist() == [False, False]
    # a mark exactly merge_mm away stays; 0 keeps every mark as it is
    assert not merge_nearby(marks.iloc[[0, 1]], 5.0)["merged"].any()
    same = merge_nearby(marks, 0.0)
    assert len(same) == 5 and same["probability"].tolist() == [0.95, 0.9, 0.5, 0.2, 0.1]
    with pytest.raises(ValueError, match="merge_mm"):
        merge_nearby(marks, -1.0)
    with pytest.raises(ValueError, match="demote"):
        merge_nearby(marks, 8.0, demote=1.0)
    with pytest.raises(ValueError, match="'score'"):
        merge_nearby(marks, 8.0, by="score")


def test_classify_merges_nearby_marks_when_asked(tmp_path, ct):
    torch.manual_seed(0)
    weights = save_classifier(NoduleNet3D(widths=(4, 8)), tmp_path / "w.pt", size_mm=16.0)
    cands = _cands(ct)
    near = cands.iloc[[0]].assign(coordX=cands["coordX"].iloc[0] + 2.0, score=0.8)
    cands = pd.concat([cands, near], ignore_index=True)
    full = classify_candidates(ct, cands, weights=weights, device="cpu", tta=1, merge_mm=0.0)
    merged = classify_candidates(ct, cands, weights=weights, device="cpu", tta=1, merge_mm=8.0)
    assert len(full) == 4 and len(merged) == 4 and merged["n_merged"].sum() == 1
    assert merged["merged"].tolist() == [False, False, False, True]  # demoted to the bottom
    pair = full[full["score"].isin([0.9, 0.8])]["probability"]
    assert pair.max() in merged["probability"].tolist()
    assert np.isclose(merged["probability"].iloc[-1], pair.min() * 0.01)
    with pytest.raises(ValueError, match="merge_mm"):
        classify_candidates(ct, cands, weights=weights, device="cpu", tta=1, merge_mm=-2.0)


def test_cascade_flips_only_the_first_pass_best_and_cuts_by_it(tmp_path, ct):
    torch.manual_seed(1)
    model = NoduleNet3D(widths=(4, 8))
    weights = save_classifier(model, tmp_path / "w.pt", size_mm=16.0)
    cands = _cands(ct)
    cubes = torch.from_numpy(normalize_hu(extract_patches(
        ct, centres_xyz_mm=cands[["coordX", "coordY", "coordZ"]].to_numpy(), size_mm=16.0)))
    model.eval()
    one = predict_tta(model, cubes, n=1).numpy()
    eight = predict_tta(model, cubes, n=8).numpy()
    assert not np.allclose(one, eight, atol=1e-4)  # the flips change the numbers, so the test can tell
    best = int(np.argmax(one))
    seen = []
    out = classify_candidates(ct, cands, weights=weights, device="cpu", tta=8, tta_top=1,
                              progress=lambda done, total: seen.append((done, total)))
    by_score = out.set_index("score")
    for i, score in enumerate(cands["score"]):
        expect = eight[i] if i == best else one[i]
        assert by_score.loc[score, "probability"] == pytest.approx(expect, abs=1e-5)
        assert bool(by_score.loc[score, "tta"]) == (i == best)
    # 3 first-pass cubes + 7 more flips of one cube, reported as they are scored, ending at the total
    assert seen[-1] == (10, 10) and all(t == 10 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # tta_top=None flips every cube: the pre-cascade screen
    full = classify_candidates(ct, cands, weights=weights, device="cpu", tta=8, tta_top=None)
    assert full["tta"].all()
    np.testing.assert_allclose(full.set_index("score").loc[cands["score"], "probability"], eight, atol=1e-5)
    # max_candidates keeps the first pass's best
    cut = classify_candidates(ct, cands, weights=weights, device="cpu", tta=1, max_candidates=2)
    assert sorted(cut["score"]) == sorted(cands["score"].to_numpy()[np.argsort(-one)[:2]])
    with pytest.raises(ValueError, match="max_candidates"):
        classify_candidates(ct, cands, weights=weights, device="cpu", max_candidates=0)


def test_a_mass_is_seen_whole_in_a_coarser_cube(tmp_path, ct):
    torch.manual_seed(0)
    model = NoduleNet3D(widths=(4, 8))
    weights = save_classifier(model, tmp_path / "w.pt", size_mm=16.0)
    cands = _cands(ct)
    cands["finding"] = ["mass", "nodule", "nodule"]
    cands.loc[0, "diameter_mm"] = 48.0  # spans 24 samples of 2 mm: the cube is 32 mm at 2 mm
    out = classify_candidates(ct, cands, weights=weights, device="cpu", tta=1, merge_mm=0)
    model.eval()
    xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy()
    coarse = extract_patches(ct, centres_xyz_mm=xyz[:1], size_mm=32.0, spacing_mm=2.0)
    fine = extract_patches(ct, centres_xyz_mm=xyz[1:], size_mm=16.0)
    expect = predict_tta(model, torch.from_numpy(normalize_hu(np.concatenate([coarse, fine]))), n=1).numpy()
    got = out.set_index("score").loc[cands["score"], "probability"].to_numpy()
    np.testing.assert_allclose(got, expect, atol=1e-5)
    as_nodule = classify_candidates(ct, cands.assign(finding="nodule"), weights=weights, device="cpu", tta=1,
                                    merge_mm=0)
    assert as_nodule.set_index("score").loc[0.9, "probability"] != pytest.approx(got[0], abs=1e-6)


def test_a_mass_takes_the_best_probability_of_the_marks_inside_it(tmp_path, ct):
    torch.manual_seed(0)
    weights = save_classifier(NoduleNet3D(widths=(4, 8)), tmp_path / "w.pt", size_mm=16.0)
    cands = _cands(ct)
    cands["finding"] = ["nodule", "mass", "nodule"]
    cands["mass_id"] = [1, 1, 0]  # the first mark lies inside the mass of the second row
    cands.loc[1, "diameter_mm"] = 40.0
    plain = classify_candidates(ct, cands.drop(columns="mass_id"), weights=weights, device="cpu", tta=1,
                                merge_mm=0).set_index("score")["probability"]
    out = classify_candidates(ct, cands, weights=weights, device="cpu", tta=1, merge_mm=0)
    assert sorted(out["score"]) == [0.1, 0.5]  # the member is folded into its mass
    got = out.set_index("score")["probability"]
    assert got[0.5] == pytest.approx(max(plain[0.9], plain[0.5]))
    assert got[0.1] == pytest.approx(plain[0.1])
