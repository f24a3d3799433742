"""The patient model's decision rule and the screen cache's file format."""
import numpy as np
import pandas as pd
import pytest

from pipeline.patient_training import _records, choose, load_screened


def _val(rnn, noisy_or, size):
    return {"rnn": {"log_loss": rnn}, "noisy_or": {"log_loss": noisy_or}, "size": {"log_loss": size}}


@pytest.mark.parametrize("losses, chosen", [
    ((0.40, 0.45, 0.30), "rnn"),        # the RNN beats the noisy-OR: shipped, whatever the size rule
    ((0.45, 0.45, 0.50), "noisy_or"),   # a tie with the noisy-OR is not a win
    ((0.50, 0.45, 0.44), "size"),       # else the better baseline
    ((0.50, 0.45, 0.45), "noisy_or"),   # a tie between baselines: the noisy-OR
])
def test_decision_rule(losses, chosen):
    assert choose(_val(*losses)) == chosen


def test_cache_file_keeps_text_numbers_and_flags_without_pickle(tmp_path):
    cands = pd.DataFrame({"seriesuid": ["1.2.3", "1.2.3"], "probability": [0.9, 0.1],
                          "finding": ["nodule", "mass"], "merged": [False, True], "mass_id": [0, 2]})
    path = tmp_path / "x.npz"
    with open(path, "wb") as fh:
        np.savez_compressed(fh, candidates=_records(cands), cubes=np.zeros((2, 4, 4, 4), np.int16))
    back, cubes = load_screened(path)  # np.load(allow_pickle=False) inside
    pd.testing.assert_frame_equal(back, cands, check_dtype=False)
    assert cubes.shape == (2, 4, 4, 4)
