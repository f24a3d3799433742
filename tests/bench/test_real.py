"""bench.real's scoring: lesion inside the mask, the rank of the first hit, false marks."""
import numpy as np
import pandas as pd
import pytest

from bench.real import score_scan
from stages.volume import Volume


def test_score_scan_counts_hits_ranks_and_false_marks():
    ct = Volume(np.zeros((40, 40, 40), np.int16), spacing_mm=(1, 1, 1), origin_mm=(0, 0, 0))
    lesion = np.zeros(ct.shape, np.uint8)
    lesion[10:20, 10:20, 10:20] = 1  # 1 mL cube, centre (14.5, 14.5, 14.5)
    lung = np.zeros(ct.shape, np.uint8)
    lung[:, :, :15] = 1  # holds half the lesion
    cands = pd.DataFrame({"coordX": [30.0, 21.0, 14.0, 35.0, 5.0],  # x, y, z world mm
                          "coordY": [30.0, 14.0, 14.0, 35.0, 5.0],
                          "coordZ": [30.0, 14.0, 14.0, 35.0, 5.0],
                          "probability": [0.9, 0.8, 0.7, 0.6, 0.4]})
    out = score_scan({"ct_1mm": ct, "lung_mask": ct.with_array(lung), "candidates": cands},
                     ct.with_array(lesion))
    assert out["lesion_ml"] == 1.0 and out["lesion_in_lung_mask"] == 0.5
    # x = 21 is 2 mm past the cube's last voxel (19): a hit with the 2 mm margin
    assert out["lesion_rank"] == 2 and out["lesion_probability"] == pytest.approx(0.8)
    assert out["findings_on_lesion"] == 2
    assert out["false_marks_p50"] == 2  # 0.9 and 0.6 miss; 0.4 is below 0.5
