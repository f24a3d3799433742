"""Patient log loss and ROC AUC with bootstrap intervals (lungscreen evaluate --patients)."""
import numpy as np
import pandas as pd
import pytest

from pipeline.__main__ import main
from pipeline.evaluate import patient_scores


def _tables(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(0.25 + 0.4 * y + rng.normal(0, 0.2, n), 0.01, 0.99)
    ids = [f"p{i:03d}" for i in range(n)]
    return pd.DataFrame({"id": ids, "cancer": y}), pd.DataFrame({"id": ids[::-1], "cancer": p[::-1]})


def test_scores_match_scikit_learn_and_intervals_hold_them():
    from sklearn.metrics import log_loss, roc_auc_score

    truth, pred = _tables()
    r = patient_scores(truth, pred, n_bootstrap=500, seed=3)
    p = pred.set_index("id").loc[truth["id"], "cancer"].to_numpy()
    assert r["log_loss"] == pytest.approx(log_loss(truth["cancer"], p))
    assert r["auc"] == pytest.approx(roc_auc_score(truth["cancer"], p))
    assert r["log_loss_ci95"][0] < r["log_loss"] < r["log_loss_ci95"][1]
    assert r["auc_ci95"][0] < r["auc"] <= r["auc_ci95"][1]
    assert r["n_patients"] == 40 and r["n_cancer"] == int(truth["cancer"].sum())
    assert patient_scores(truth, pred, n_bootstrap=500, seed=3) == r  # seeded
    assert patient_scores(truth, pred, n_bootstrap=500, seed=4)["auc_ci95"] != r["auc_ci95"]


def test_a_missing_patient_or_a_bad_probability_is_an_error():
    truth, pred = _tables(10)
    with pytest.raises(ValueError, match="no prediction"):
        patient_scores(truth, pred.iloc[1:])
    with pytest.raises(ValueError, match="probability"):
        patient_scores(truth, pred.assign(cancer=pred["cancer"] + 1))
    with pytest.raises(ValueError, match="missing column"):
        patient_scores(truth, pred.rename(columns={"cancer": "p"}))


def test_cli_scores_patients_and_keeps_the_froc_options(tmp_path, capsys):
    truth, pred = _tables()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    pred.to_csv(tmp_path / "patients.csv", index=False)
    assert main(["evaluate", "--patients", str(tmp_path / "truth.csv"), "--predictions",
                 str(tmp_path / "patients.csv"), "--n-bootstrap", "200", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "log loss" in out and "ROC AUC" in out and "95% CI" in out
    assert (tmp_path / "ev" / "patients.json").exists()
    assert main(["evaluate", "--patients", str(tmp_path / "truth.csv")]) == 2
    assert main(["evaluate", "--annotations", str(tmp_path / "truth.csv")]) == 2
