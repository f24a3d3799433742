"""Fuzzing every scan reader (issue #18, item 7): mutated files give a Volume or a clean ScanError.

Seeds are tiny valid scans made by the project's writers (:mod:`synth.fuzz`): a DICOM series
folder (uncompressed and RLE Lossless), a single DICOM file, ``.mhd`` + ``.raw``, ``.mha``,
``.nrrd``, ``.nii``, ``.nii.gz`` and a list file for :func:`pipeline.batch.discover_scans`.
Hypothesis draws a list of mutations per seed (byte flips, truncation, inserted/deleted runs,
junk, and structured edits of DICOM elements, MetaImage/NRRD header keys, NIfTI header fields,
list lines) and shrinks a failure to a short recipe.

The contract checked on every read (:func:`_check_read`): :func:`stages.ingest.read_scan`
returns an int16 :class:`~stages.volume.Volume` with finite positive spacing, finite origin and
an orthonormal direction, or raises :class:`~stages.errors.ScanError` whose message is one line,
names the path given and holds no library internals; nothing else escapes, nothing prints a
traceback, no read takes more than ``READ_LIMIT_S``, and a header claiming more than
``MAX_VOXELS_FUZZ`` voxels is refused from the header.  ``discover_scans`` on a list file returns
paths and raises nothing.

Every crash found is a recipe in ``REGRESSIONS`` (rebuilt deterministically, no binary files).

Bounded for CI: ``LUNGSCREEN_FUZZ_EXAMPLES`` examples per reader (default 30), derandomized
(the same examples every run).  A long run, random, with Hypothesis' example database in
``.hypothesis/`` (failures replayed first next time)::

    LUNGSCREEN_FUZZ_EXAMPLES=20000 LUNGSCREEN_FUZZ_RANDOM=1 make test ARGS=tests/stages/test_fuzz.py

A failure prints its mutations (``Draw 1: [...]``): add ``(kind, mutations, expected)`` to
``REGRESSIONS``.  A crash that kills the process (a segfault in a C++ reader) cannot be shrunk:
with ``LUNGSCREEN_FUZZ_LOG=fuzz.log`` each case is appended to that file before it is read, so
the log's last line is the input.
"""
import faulthandler
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.batch import discover_scans
from stages.errors import ScanError
from stages.ingest import read_scan
from stages.volume import Volume
from synth.fuzz import (DICOM_KEYWORDS, HEADER_KEYS, LIST_LINES, NIFTI_FIELDS, SEED_KINDS,
                        SEED_SHAPE_ZYX, copy_seed, make_seed, mutate, seed_entry)

FUZZ_EXAMPLES = int(os.environ.get("LUNGSCREEN_FUZZ_EXAMPLES", "30"))
FUZZ_RANDOM = os.environ.get("LUNGSCREEN_FUZZ_RANDOM", "") not in ("", "0")
FUZZ_LOG = os.environ.get("LUNGSCREEN_FUZZ_LOG", "")
#: Largest header size the fuzzed reads accept (the seeds have 1024 voxels).
MAX_VOXELS_FUZZ = 1 << 20
#: Longest a read of a tiny seed may take, s (loaded 2-core CI machine included).
READ_LIMIT_S = 5.0
#: A read still running after this is a hang: the test process is stopped with a stack dump, s.
HANG_S = 120
#: What a user-facing message must not hold: C++ sources, ITK classes, Python tracebacks.
INTERNALS = re.compile(r"\.(cxx|hxx|txx|cpp)\b|\.h:|itk::|ITK ERROR|Traceback|File \"|\.py\", line")

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not FUZZ_RANDOM,
                database=None if not FUZZ_RANDOM else settings.default.database, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- strategies
_positions = st.integers(0, 1 << 20)
_targets = st.integers(0, 7)
_runs = st.one_of(st.binary(min_size=1, max_size=32),
                  st.sampled_from([b"\0" * 8, b"\xff" * 8, b"\n", b"\r\n", b" = ", b": ", b"\\"]))
_byte_mutations = st.one_of(
    st.tuples(st.just("flip"), _targets, _positions, st.integers(0, 254)),
    st.tuples(st.just("truncate"), _targets, _positions),
    st.tuples(st.just("insert"), _targets, _positions, _runs),
    st.tuples(st.just("delete"), _targets, _positions, st.integers(1, 64)),
    st.tuples(st.just("junk"), _targets, _positions, _runs),
)
_numbers = st.one_of(st.integers(-2 ** 31, 2 ** 32),
                     st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 32, 64, 65535, 65536, 10 ** 9]),
                     st.floats(allow_nan=True, allow_infinity=True))
_texts = st.one_of(st.text(max_size=24),
                   st.sampled_from(["", "nan", "inf", "-inf", "1e309", "0", "-1", "0\\0", "1\\nan",
                                    "1\\0\\0\\0\\1\\0", "1\\0\\0\\1\\0\\0", "0\\0\\0\\0\\0\\0",
                                    "1\\0\\0\\0\\0\\1", "1e-300\\1e-300", "MONOCHROME1", "RGB",
                                    "PALETTE COLOR", "MR", "CT", "ORIGINAL\\PRIMARY\\LOCALIZER"]))
_uids = st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                         "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
                         "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                         "1.2.840.10008.1.2.4.100", "1.2.3.4", "junk", ""])
_dicom_values = st.one_of(st.none(), _numbers, _texts, _uids,
                          st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=7),
                          st.binary(max_size=24))
_dicom_edits = st.tuples(st.just("dicom"), _targets, st.sampled_from(DICOM_KEYWORDS), _dicom_values)

_header_values = st.one_of(
    st.none(), _texts, _numbers,
    st.lists(st.one_of(st.integers(-3, 10 ** 7), st.floats(allow_nan=True, allow_infinity=True)),
             max_size=10).map(lambda v: " ".join(map(str, v))),
    st.sampled_from(["4 4", "16 16 4 1", "0 16 4", "100000 100000 100000", "2147483647 2 2",
                     "MET_UCHAR", "MET_CHAR", "MET_FLOAT", "MET_DOUBLE", "MET_LONG_LONG", "MET_OTHER",
                     "MET_SHORT_ARRAY", "uchar", "float", "double", "int64", "block",
                     "raw", "gzip", "ascii", "hex", "bzip2", "txt", "little", "big",
                     "LOCAL", "LIST", "x.raw", "missing.raw", "../x.raw", "/dev/null", "/dev/zero",
                     "x%03d.raw 0 3 1", "True", "False",
                     "(1,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,1,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)",
                     "none (1,0,0) (0,1,0)", "(1,0) (0,1)", "left-posterior-superior", "RAS",
                     "domain domain domain", "1 0 0 0 1 0 0 0 1", "0 0 0 0 0 0 0 0 0",
                     "1 1 0 0 1 0 0 0 1"]))
_header_edits = st.tuples(st.just("header"), _targets, st.sampled_from(HEADER_KEYS), _header_values)
_nifti_edits = st.tuples(st.just("nifti"), _targets, st.sampled_from(sorted(NIFTI_FIELDS)),
                         st.lists(st.one_of(st.integers(-40000, 40000), st.floats(width=32)),
                                  min_size=1, max_size=8))
_line_edits = st.tuples(st.just("line"), _targets, st.integers(0, 8),
                        st.one_of(st.sampled_from(LIST_LINES), st.text(max_size=40)))
_STRUCTURED = {"dicom_series": _dicom_edits, "dicom_rle": _dicom_edits, "dicom_file": _dicom_edits,
               "mhd": _header_edits, "mha": _header_edits, "nrrd": _header_edits,
               "nii": _nifti_edits, "nii_gz": _nifti_edits, "list": _line_edits}


def mutation_lists(kind: str):
    """Hypothesis strategy: 1 to 4 mutations for a seed of ``kind`` (structured edits twice as
    likely as byte mutations)."""
    return st.lists(st.one_of(_STRUCTURED[kind], _STRUCTURED[kind], _byte_mutations), min_size=1, max_size=4)


# ---------------------------------------------------------------------------- the contract
@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """``{kind: folder}`` holding each valid seed, written once."""
    root = tmp_path_factory.mktemp("seeds")
    for kind in SEED_KINDS:
        make_seed(kind, root / kind)
    return root


def _check_read(path: Path):
    """Read ``path`` and check the reader's contract; returns the Volume or the ScanError."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = read_scan(path, max_voxels=MAX_VOXELS_FUZZ)
    except ScanError as exc:
        out = exc
    except BaseException as exc:  # a Rust decoder's panic is a BaseException: let Hypothesis shrink it
        if type(exc).__name__ != "PanicException":
            raise
        raise AssertionError(f"a decoder panic escaped read_scan: {exc}") from None
    finally:
        faulthandler.cancel_dump_traceback_later()
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < READ_LIMIT_S, f"reading {path} took {elapsed_s:.1f} s"
    if isinstance(out, ScanError):
        message = str(out)
        assert "\n" not in message and out.reason, message
        assert out.path == str(path), f"the error names {out.path!r}, not {str(path)!r}: {message}"
        assert not INTERNALS.search(message), f"library internals in the message: {message}"
        return out
    assert isinstance(out, Volume)
    assert out.array.dtype == np.int16 and out.array.ndim == 3 and out.array.size <= MAX_VOXELS_FUZZ
    assert np.all(np.isfinite(out.spacing_mm)) and min(out.spacing_mm) > 0, out.spacing_mm
    assert np.all(np.isfinite(out.origin_mm)), out.origin_mm
    assert np.allclose(out.direction.T @ out.direction, np.eye(3), atol=1e-4), out.direction
    return out


def _check_case(kind: str, mutations, seeds: Path, capfd) -> list:
    """Copy the seed of ``kind``, apply ``mutations``, read it (a list file: discover, then read
    each scan found) under the contract; returns what each read gave."""
    capfd.readouterr()
    if FUZZ_LOG:  # written before the read: after a crash that kills the process, the last line
        with open(FUZZ_LOG, "a") as log:  # is the input
            log.write(f"{(kind, mutations)!r}\n")
    work = Path(tempfile.mkdtemp(prefix="case-", dir=seeds.parent))
    try:
        folder = copy_seed(seeds / kind, work / "scan")
        mutate(kind, folder, mutations)
        entry = folder / seed_entry(kind)
        if kind == "list":
            found = discover_scans(entry)  # the list file exists: nothing may be raised
            assert isinstance(found, list) and all(isinstance(p, Path) for p in found), found
            outs = [_check_read(p) for p in found[:8]]
        else:
            outs = [_check_read(entry)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    return outs


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", SEED_KINDS)
def test_unmutated_seed_reads(seeds, capfd, kind):
    """Each reader is really exercised: its seed reads back as the volume written."""
    outs = _check_case(kind, [], seeds, capfd)
    assert outs and all(isinstance(v, Volume) for v in outs), outs
    shape = (1,) + SEED_SHAPE_ZYX[1:] if kind == "dicom_file" else SEED_SHAPE_ZYX
    if kind == "list":
        assert len(outs) == 4  # series, x.mhd, tree/p1, tree/p2/y.nrrd
    else:
        assert outs[0].shape == shape
        np.testing.assert_allclose(outs[0].spacing_mm, (2.5, 0.7, 0.8), atol=1e-6)


@pytest.mark.parametrize("kind", SEED_KINDS)
@FUZZ
@given(data=st.data())
def test_fuzz_reader(seeds, capfd, kind, data):
    mutations = data.draw(mutation_lists(kind), label="mutations")
    _check_case(kind, mutations, seeds, capfd)


#: Every crash the fuzzer found: (seed kind, mutations, what a read must now give: a
#: substring of a ScanError's message, or "volume"), with the old behaviour in a comment.
REGRESSIONS = [
    # pylibjpeg-rle panicked on a corrupt RLE segment; its PanicException is a BaseException
    # and escaped read_scan (and a batch worker's `except Exception`)
    ("dicom_rle", [("flip", 3, 52889, 127)], "volume"),
    # a flipped byte in Pixel Data's VR ('OW' -> 'NW'): NotImplementedError on first access
    ("dicom_series", [("flip", 0, 956552, 0)], "volume"),
    ("dicom_file", [("dicom", 0, "Rows", 1), ("flip", 0, 13196, 0)], "Value Representation"),
    # a flipped byte made Transfer Syntax UID two values: AttributeError on the MultiValue
    ("dicom_rle", [("flip", 0, 252, 108)], "volume"),
    # an empty Pixel Data element: TypeError (len of None)
    ("dicom_series", [("dicom", 0, "PixelData", "")], "volume"),
    ("dicom_file", [("dicom", 0, "PixelData", "")], "no (7FE0,0010) Pixel Data"),
    # Bits Allocated deleted / empty: AttributeError / TypeError from _PixelReader
    ("dicom_file", [("dicom", 0, "BitsAllocated", None)], "Bits Allocated"),
    ("dicom_file", [("dicom", 0, "BitsAllocated", "")], "Bits Allocated"),
    ("dicom_series", [("dicom", 1, "BitsAllocated", None)], "volume"),
    # SimpleITK's errors reached the user with C++ source paths ("sitkImageReaderBase.cxx:99")
    ("mhd", [("truncate", 0, 1)], "unreadable mhd file (header not recognised)"),
    ("mha", [("header", 0, "NDims", None)], "unreadable mha file (header not recognised)"),
    ("nrrd", [("flip", 0, 0, 0)], "unreadable nrrd file (header not recognised)"),
    ("nrrd", [("header", 0, "type", None)], "didn't see required field: type"),
    ("nii", [("truncate", 0, 1)], "unreadable nii file (header not recognised)"),
    ("nii", [("nifti", 0, "datatype", [999])], "unreadable nii file (header not recognised)"),
    ("nii_gz", [("flip", 0, 0, 0)], "unreadable nii.gz file (header not recognised)"),
    # MetaImage NDims above 10 or below 1: MetaIO corrupted memory, a segfault / abort
    ("mhd", [("header", 0, "NDims", 1000000000)], "NDims = 1000000000"),
    ("mha", [("header", 0, "NDims", -1)], "NDims = -1"),
    # a size of 0 in DimSize: an empty Volume came back; with a huge other size, SimpleITK spun
    # for minutes
    ("mha", [("header", 0, "DimSize", "0 16 4")], "an empty image"),
    ("mha", [("header", 4, "DimSize", "-6.0869017219345724e-251 184612 -6.7398996300524696e+16")],
     "an empty image"),
    # list files: bytes that are not UTF-8 (UnicodeDecodeError), a NUL byte (ValueError from
    # resolve), a name too long (OSError from exists), a list naming itself (RecursionError),
    # a device (NotADirectoryError from the folder walk)
    ("list", [("flip", 0, 0, 127)], "no such file or folder"),
    ("list", [("insert", 0, 0, b"\x00")], "no such file or folder"),
    ("list", [("line", 0, 1, "a\x00b")], "no such file or folder"),
    ("list", [("line", 0, 1, "x" * 300)], "no such file or folder (file name too long)"),
    ("list", [("line", 0, 1, "scans.txt")], "volume"),
    ("list", [("line", 0, 1, "/dev/null")], "zero-byte file"),
]


@pytest.mark.parametrize("kind, mutations, expected", REGRESSIONS)
def test_fuzz_regression(seeds, capfd, kind, mutations, expected):
    outs = _check_case(kind, mutations, seeds, capfd)
    if expected == "volume":
        assert outs and all(isinstance(v, Volume) for v in outs), outs
    else:
        assert any(isinstance(e, ScanError) and expected in str(e) for e in outs), outs
