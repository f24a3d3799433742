"""Finding types from the HU profile, on spheres of known density in a lung of -850 HU."""
import numpy as np
import pandas as pd

from stages.nodule_type import nodule_types
from stages.volume import Volume

N = 48


def _ball(radius_mm, hu, core_mm=0.0, core_hu=None, lung_hu=-850.0):
    z, y, x = np.ogrid[:N, :N, :N]
    r = np.sqrt((z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2)
    arr = np.full((N, N, N), lung_hu, np.float32)
    arr[r <= radius_mm] = hu
    if core_hu is not None:
        arr[r <= core_mm] = core_hu
    return Volume(arr.astype(np.int16), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0))


def _typed(vol, diameter_mm, probability=0.9):
    cands = pd.DataFrame({"coordX": [24.0], "coordY": [24.0], "coordZ": [24.0],
                          "diameter_mm": [diameter_mm], "probability": [probability]})
    return nodule_types(vol, cands)


def test_types_of_solid_ground_glass_part_solid_and_calcified_balls():
    solid = _typed(_ball(6, 20.0), 12.0)
    assert solid["nodule_type"].tolist() == ["solid"]
    assert abs(solid["solid_diameter_mm"].iloc[0] - 12.0) < 1.0  # equivalent diameter of the ball
    ggo = _typed(_ball(8, -550.0), 16.0)
    assert ggo["nodule_type"].tolist() == ["ground_glass"] and ggo["solid_diameter_mm"].iloc[0] == 0
    part = _typed(_ball(10, -550.0, core_mm=5, core_hu=10.0), 20.0)
    assert part["nodule_type"].tolist() == ["part_solid"]
    assert 8.0 < part["solid_diameter_mm"].iloc[0] < 12.0  # the 10 mm core
    assert _typed(_ball(5, 500.0), 10.0)["nodule_type"].tolist() == ["calcified"]


def test_every_candidate_is_typed_and_rows_keep_their_order():
    vol = _ball(6, 20.0)
    cands = pd.DataFrame({"coordX": [24.0, 24.0, 5.0], "coordY": 24.0, "coordZ": [24.0, 24.0, 5.0],
                          "diameter_mm": [12.0, 4.0, 6.0], "tag": ["a", "b", "c"]})
    out = nodule_types(vol, cands)
    assert out["tag"].tolist() == ["a", "b", "c"]
    assert out["nodule_type"].tolist() == ["solid", "solid", "ground_glass"]  # c: plain lung
    empty = nodule_types(vol, cands.iloc[:0])
    assert list(empty.columns)[-2:] == ["nodule_type", "solid_diameter_mm"] and len(empty) == 0
