"""Fuzzing DICOM ingest (issue 7): mutated files give a Volume or a clean ScanError, nothing else.

Bounded for CI: a fixed number of examples, no deadline per example.
"""
import io
import warnings

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synth.data import pydicom_test_file
from stages.errors import ScanError
from stages.ingest import read_scan
from stages.volume import Volume

SEED_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _read_clean(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            vol = read_scan(path)
        except ScanError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            return None
    assert isinstance(vol, Volume) and vol.array.dtype == np.int16
    return vol


@FUZZ
@given(name=st.sampled_from(SEED_FILES),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_byte_mutations_fail_cleanly(tmp_path_factory, name, flips, cut):
    data = bytearray(pydicom_test_file(name).read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path_factory.mktemp("fuzz") / "x.dcm"
    path.write_bytes(bytes(data))
    _read_clean(path)


@FUZZ
@given(rows=st.integers(-5, 70000), cols=st.integers(-5, 70000), frames=st.integers(-2, 10**7),
       bits=st.sampled_from([0, 1, 8, 12, 16, 32, 64]), slope=st.floats(allow_nan=True, allow_infinity=True),
       modality=st.sampled_from(["CT", "MR", "", "ct"]))
def test_header_mutations_fail_cleanly(tmp_path_factory, rows, cols, frames, bits, slope, modality):
    ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.Modality = rows % 65536, cols % 65536, bits, modality
    if frames >= 0:
        ds.NumberOfFrames = frames
    buf = io.BytesIO()
    try:
        ds.RescaleSlope = str(slope)[:16]
        ds.save_as(buf)
    except (ValueError, OverflowError):  # pydicom refuses to write this: nothing to read
        return
    path = tmp_path_factory.mktemp("fuzzh") / "h.dcm"
    path.write_bytes(buf.getvalue())
    _read_clean(path)


def test_unmodified_seed_file_reads():
    assert _read_clean(pydicom_test_file("CT_small.dcm")) is not None
