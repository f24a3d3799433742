import pytest

import synth.demo as demo
from synth.data import DataUnavailable
from stages.ingest import read_scan


def test_demo_falls_back_to_a_phantom_series(tmp_path, monkeypatch):
    def unavailable():
        raise DataUnavailable("no registry here")

    monkeypatch.setattr(demo, "lung1_paths", unavailable)
    folder = demo.demo_scan(tmp_path)
    assert folder.name == "phantom-dicom"
    vol = read_scan(folder)
    assert vol.meta["modality"] == "CT" and vol.shape[0] > 10
    assert demo.demo_scan(tmp_path) == folder  # made once, then reused


def test_demo_is_lung1_as_dicom(tmp_path, lung1):
    folder = demo.demo_scan(tmp_path)
    assert folder.name == "lung1-dicom"
    ct = read_scan(folder)
    assert ct.shape == (48, 512, 512)
    assert read_scan(lung1[0]).array.tobytes() == ct.array.tobytes()
