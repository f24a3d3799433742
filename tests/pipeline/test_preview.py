import numpy as np
import pandas as pd

from pipeline import preview
from stages.volume import Volume


def _circles(monkeypatch):
    import matplotlib.pyplot as plt

    drawn = []
    real = plt.Circle

    def circle(*args, **kwargs):
        drawn.append(kwargs.get("color"))
        return real(*args, **kwargs)

    monkeypatch.setattr(plt, "Circle", circle)
    return drawn


def test_preview_circles_the_most_probable_marks_only(tmp_path, monkeypatch):
    ct = Volume(np.full((20, 24, 24), -850, np.int16), spacing_mm=(1, 1, 1), scan_id="s")
    cands = pd.DataFrame({"coordX": np.full(50, 12.0), "coordY": 12.0, "coordZ": 10.0,
                          "diameter_mm": 6.0})
    drawn = _circles(monkeypatch)
    path = preview.save_preview(ct, tmp_path / "p.png", candidates=cands, max_marks=7)
    assert path.stat().st_size > 0
    assert len(drawn) == 7 * 3 and drawn.count("red") == 3   # 3 views, the first mark in red
    drawn.clear()
    preview.save_preview(ct, tmp_path / "q.png", candidates=cands)
    assert len(drawn) == min(len(cands), preview.MAX_MARKS) * 3
