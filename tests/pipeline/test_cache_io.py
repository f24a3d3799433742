import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.cache import StageCache
from pipeline.io import atomic_path, write_csv, write_volume
from stages.volume import Volume


def _vol():
    return Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), spacing_mm=(2.0, 1.0, 0.5),
                  origin_mm=(-5.0, 3.0, 1.0), direction=np.diag([1.0, -1.0, 1.0]), scan_id="1.2.3",
                  meta={"modality": "CT"})


def test_cache_round_trips_volume_and_dataframe(tmp_path):
    cache = StageCache(tmp_path / "scan.h5")
    df = pd.DataFrame({"seriesuid": ["1.2.3", "1.2.3"], "coordX": [1.5, -2.0], "n": [3, 4]})
    cache.put("ct", "k1", _vol())
    cache.put("candidates", "k2", df)
    got = cache.get("ct", "k1")
    assert got.same_geometry(_vol()) and got.scan_id == "1.2.3" and got.meta["modality"] == "CT"
    np.testing.assert_array_equal(got.array, _vol().array)
    pd.testing.assert_frame_equal(cache.get("candidates", "k2"), df)
    assert cache.get("ct", "other") is None
    assert cache.keys() == {"ct": "k1", "candidates": "k2"}


def test_cache_replaces_a_result_and_keeps_the_others(tmp_path):
    cache = StageCache(tmp_path / "scan.h5")
    cache.put("ct", "k1", _vol())
    cache.put("mask", "m1", _vol())
    cache.put("mask", "m2", _vol().with_array(np.zeros((2, 3, 4), np.uint8)))
    assert cache.keys() == {"ct": "k1", "mask": "m2"}
    assert cache.get("mask", "m2").array.dtype == np.uint8


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_killed_writer_never_leaves_partial_file(tmp_path):
    """A process killed with SIGKILL mid-write leaves no file under the final name."""
    target = tmp_path / "big.csv"
    code = ("import time, pandas as pd, sys; from pipeline.io import atomic_path\n"
            f"with atomic_path(r'{target}') as tmp:\n"
            "    f = open(tmp, 'w'); f.write('x' * 1000); f.flush(); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()


@pytest.mark.parametrize("suffix", [".nrrd", ".mhd", ".nii.gz"])
def test_write_volume_keeps_geometry(tmp_path, suffix):
    import SimpleITK as sitk

    path = write_volume(_vol(), tmp_path / f"ct{suffix}")
    img = sitk.ReadImage(str(path))
    back = Volume.from_sitk_geometry(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                                     img.GetDirection())
    assert back.same_geometry(_vol(), atol_mm=1e-4)
    np.testing.assert_array_equal(back.array, _vol().array)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_csv(tmp_path):
    write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text() == "a\n1\n2\n"
