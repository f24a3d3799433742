"""Seed files and mutators for fuzzing the scan readers (``tests/stages/test_fuzz.py``).

A *seed* is a tiny valid scan written by the project's own writers (4 slices of 16 x 16, so a
read takes milliseconds), one per reader: a DICOM series folder (uncompressed and RLE
Lossless), a single DICOM file, MetaImage ``.mhd`` + ``.raw`` and ``.mha``, NRRD, NIfTI
``.nii`` and ``.nii.gz``, and a list file naming scans.  Seeds are byte-for-byte
deterministic (fixed UIDs, fixed voxel values), so a *recipe* ``(kind, mutations)`` rebuilds
the same input on any machine: that is how every crash the fuzzer finds becomes a regression
test without committing binary files.

A mutation is a tuple of plain values, its first item naming it; ``target`` picks the file
(modulo the number of files of the seed, see :func:`mutable_files`), positions are taken
modulo the file's length:

``("flip", target, position, xor)``
    XOR one byte with ``xor`` (1..255).
``("truncate", target, position)``
    Keep the first ``position % size`` bytes.
``("insert", target, position, data)`` / ``("delete", target, position, n_bytes)``
    Insert a run of bytes / delete ``n_bytes`` bytes.
``("junk", target, position, data)``
    Overwrite with ``data`` from ``position``.
``("dicom", target, keyword, value)``
    Set a DICOM element with pydicom (``None`` deletes it, ``bytes`` are written raw with VR
    UN, so any garbage reaches the reader); the file is re-encoded as explicit VR little endian
    whatever Transfer Syntax UID it then declares.
``("header", target, key, value)``
    MetaImage/NRRD text header: set ``key`` to ``value`` (``None`` deletes the line; a key
    not present is added before the data-file line).
``("nifti", target, field, values)``
    Overwrite a NIfTI-1 header field (``dim``, ``pixdim``, ``datatype``...) in the
    uncompressed header (a ``.nii.gz`` is decompressed, edited and compressed again).
``("line", target, position, text)``
    Insert a line into a list file.
"""
from __future__ import annotations

import gzip
import io
import shutil
import struct
from pathlib import Path

import numpy as np

__all__ = ["SEED_KINDS", "SEED_SHAPE_ZYX", "make_seed", "copy_seed", "seed_entry", "mutable_files", "mutate",
           "DICOM_KEYWORDS", "HEADER_KEYS", "NIFTI_FIELDS", "LIST_LINES"]

#: Seed kinds, one per reader (``list`` is :func:`pipeline.batch.discover_scans`).
SEED_KINDS = ("dicom_series", "dicom_rle", "dicom_file", "mhd", "mha", "nrrd", "nii", "nii_gz", "list")
#: Shape of every seed volume (one slice for ``dicom_file``).
SEED_SHAPE_ZYX = (4, 16, 16)
_UID = "1.2.826.0.1.3680043.2.1125.99.7"  # fixed UID root: deterministic bytes

#: DICOM elements the structured edits set (file meta's Transfer Syntax UID included).
DICOM_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                  "SamplesPerPixel", "PhotometricInterpretation", "PixelSpacing",
                  "ImageOrientationPatient", "ImagePositionPatient", "NumberOfFrames",
                  "TransferSyntaxUID", "RescaleSlope", "RescaleIntercept", "SliceThickness",
                  "SpacingBetweenSlices", "Modality", "SeriesInstanceUID", "SOPClassUID", "ImageType",
                  "PixelPaddingValue", "PixelData", "PerFrameFunctionalGroupsSequence",
                  "SharedFunctionalGroupsSequence")
#: Text header keys the structured edits set, MetaImage then NRRD.
HEADER_KEYS = ("NDims", "DimSize", "ElementSpacing", "ElementType", "ElementDataFile", "Offset",
               "TransformMatrix", "CompressedData", "CompressedDataSize", "HeaderSize",
               "ElementNumberOfChannels", "BinaryDataByteOrderMSB", "ObjectType",
               "dimension", "sizes", "type", "encoding", "endian", "space", "space directions",
               "space origin", "data file", "byte skip", "line skip", "kinds")
#: NIfTI-1 header fields: name -> (byte offset, struct format of one value, count).
NIFTI_FIELDS = {"sizeof_hdr": (0, "i", 1), "dim": (40, "h", 8), "datatype": (70, "h", 1),
                "bitpix": (72, "h", 1), "pixdim": (76, "f", 8), "vox_offset": (108, "f", 1),
                "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1), "qform_code": (252, "h", 1),
                "sform_code": (254, "h", 1), "quatern": (256, "f", 3), "qoffset": (268, "f", 3),
                "srow_x": (280, "f", 4), "srow_y": (296, "f", 4), "srow_z": (312, "f", 4),
                "magic": (344, "i", 1)}
#: List-file lines worth trying besides random text (names are relative to the list file).
LIST_LINES = ("", "#", "series", "x.mhd", "tree", "scans.txt", "missing.mhd", "..", ".", "/dev/null",
              "tree/p1", "./series/../x.mhd", "x.mhd # comment", "  x.mhd  ", "a\x00b", "é.nrrd",
              "x" * 300, "series/" + "y" * 300, "\\\\server\\share")


# ---------------------------------------------------------------------------- seeds
def _seed_volume(n_slices: int):
    from stages.volume import Volume

    rng = np.random.default_rng(7)
    hu = rng.integers(-1024, 1500, (n_slices,) + SEED_SHAPE_ZYX[1:]).astype(np.int16)
    return Volume(hu, spacing_mm=(2.5, 0.7, 0.8), origin_mm=(-40.0, 10.5, -5.25), scan_id="x")


def _fix_uids(paths: list[Path], series: str) -> None:
    """Replace the random SOP Instance / Frame of Reference UIDs by fixed ones."""
    import pydicom

    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{_UID}.{series}.{k + 1}"
        ds.FrameOfReferenceUID = f"{_UID}.{series}.0"
        ds.save_as(path)


def _write_dicom(folder: Path, n_slices: int, series: str, transfer_syntax=None) -> list[Path]:
    from synth.dicomio import write_dicom_series

    paths = write_dicom_series(_seed_volume(n_slices), folder, shuffle_names=False,
                               series_uid=f"{_UID}.{series}", study_uid=f"{_UID}.1",
                               transfer_syntax=transfer_syntax)
    _fix_uids(paths, series)
    return paths


def _write_sitk(path: Path, *, compress: bool = False) -> Path:
    import SimpleITK as sitk

    vol = _seed_volume(SEED_SHAPE_ZYX[0])
    img = sitk.GetImageFromArray(vol.array)
    spacing, origin, direction = vol.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def seed_entry(kind: str) -> str:
    """Path, relative to the seed's folder, that the reader is given for ``kind``."""
    return {"dicom_series": "series", "dicom_rle": "series", "dicom_file": "one.dcm",
            "mhd": "x.mhd", "mha": "x.mha", "nrrd": "x.nrrd", "nii": "x.nii", "nii_gz": "x.nii.gz",
            "list": "scans.txt"}[kind]


def make_seed(kind: str, folder) -> Path:
    """Write the valid seed of ``kind`` (one of :data:`SEED_KINDS`) into ``folder``.

    Returns
    -------
    Path
        What the reader is given: the series folder, the image file or the list file.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    from pydicom.uid import RLELossless

    if kind not in SEED_KINDS:
        raise ValueError(f"kind must be one of {SEED_KINDS}, got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / seed_entry(kind)
    if kind == "dicom_series":
        _write_dicom(entry, SEED_SHAPE_ZYX[0], "2")
    elif kind == "dicom_rle":
        _write_dicom(entry, SEED_SHAPE_ZYX[0], "3", transfer_syntax=RLELossless)
    elif kind == "dicom_file":
        (_write_dicom(folder / "tmp", 1, "4")[0]).rename(entry)
        (folder / "tmp").rmdir()
    elif kind == "list":  # a DICOM folder, a MetaImage and a tree of patient folders
        _write_dicom(folder / "series", 2, "5")
        _write_sitk(folder / "x.mhd")
        _write_dicom(folder / "tree" / "p1", 2, "6")
        (folder / "tree" / "p2").mkdir()
        _write_sitk(folder / "tree" / "p2" / "y.nrrd")
        entry.write_text("# scans to screen\nseries\nx.mhd\ntree\n")
    else:
        _write_sitk(entry, compress=kind == "nii_gz")
    return entry


def mutable_files(kind: str, folder) -> list[Path]:
    """The files of a seed that mutations target, in a fixed order (a list file: itself only;
    the scans it names have their own seeds)."""
    folder = Path(folder)
    if kind == "list":
        return [folder / seed_entry(kind)]
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------- mutations
def _dicom_raw(value) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
    return data + b"\0" * (len(data) % 2)


def _dicom_edit(data: bytes, keyword: str, value) -> bytes:
    """``data`` with DICOM element ``keyword`` set to ``value`` (see the module docstring);
    unchanged when pydicom cannot parse ``data`` at all."""
    import warnings

    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.datadict import tag_for_keyword
    from pydicom.sequence import Sequence

    def load():
        return pydicom.dcmread(io.BytesIO(data), force=True)

    def dump(ds) -> bytes:
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True, force_encoding=True)
        return out.getvalue()

    def set_natural(ds):
        if keyword == "TransferSyntaxUID":
            if value is None:
                del ds.file_meta.TransferSyntaxUID
            else:
                ds.file_meta.TransferSyntaxUID = str(value)
        elif value is None:
            if keyword in ds:
                delattr(ds, keyword)
        elif keyword.endswith("Sequence"):
            item = Dataset()
            inner = Dataset()
            inner.PixelSpacing = [str(value)[:16], "1"]
            item.PixelMeasuresSequence = Sequence([inner])
            setattr(ds, keyword, Sequence([item] * (len(str(value)) % 3)))
        elif isinstance(value, bytes):
            tag = tag_for_keyword(keyword)
            ds[tag] = DataElement(tag, "OB" if keyword == "PixelData" else "UN", _dicom_raw(value))
        elif isinstance(value, list):
            setattr(ds, keyword, [repr(v)[:16] for v in value])
        else:
            setattr(ds, keyword, value)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = load()
        except Exception:  # noqa: BLE001 - earlier mutations left nothing pydicom can parse
            return data
        try:
            set_natural(ds)
            return dump(ds)
        except Exception:  # noqa: BLE001 - pydicom refuses the value: write its bytes raw
            pass
        try:
            ds = load()
            tag = tag_for_keyword(keyword)
            if keyword == "TransferSyntaxUID":
                ds.file_meta[tag] = DataElement(tag, "UN", _dicom_raw(value or b""))
            else:
                ds[tag] = DataElement(tag, "UN", _dicom_raw(value if value is not None else b""))
            return dump(ds)
        except Exception:  # noqa: BLE001
            return data


def _header_edit(data: bytes, key: str, value) -> bytes:
    """``data`` (a MetaImage or NRRD file) with text header line ``key`` set to ``value``."""
    nrrd = data.startswith(b"NRRD")
    sep = b": " if nrrd else b" = "
    if nrrd:
        end = data.find(b"\n\n")
        end = len(data) if end < 0 else end + 1
    else:
        end = data.find(b"ElementDataFile")
        end = len(data) if end < 0 else (data.find(b"\n", end) + 1 or len(data))
    lines = data[:end].split(b"\n")
    body = data[end:]
    name = key.encode()
    new = None if value is None else name + sep + str(value).encode("utf-8", "surrogateescape")
    for k, line in enumerate(lines):
        if line.split(sep.strip(), 1)[0].strip() == name:
            if new is None:
                del lines[k]
            else:
                lines[k] = new
            return b"\n".join(lines) + body
    if new is not None:  # a new key: before the data-file line (MetaImage) / the blank line (NRRD)
        at = max(1, len(lines) - 2) if nrrd else max(0, len(lines) - 2)
        lines.insert(at, new)
    return b"\n".join(lines) + body


def _nifti_edit(data: bytes, field: str, values, gz: bool) -> bytes:
    """``data`` (NIfTI-1) with header ``field`` overwritten by ``values``."""
    if gz:
        try:
            data = gzip.decompress(data)
        except Exception:  # noqa: BLE001 - the stream is already broken: leave it
            return data
    offset, fmt, count = NIFTI_FIELDS[field]
    values = (list(values) + [0] * count)[:count]
    if fmt in "ih":
        lim = 2 ** (8 * struct.calcsize(fmt) - 1)
        values = [(int(v) + lim) % (2 * lim) - lim if np.isfinite(v) else 0 for v in values]
    packed = struct.pack("<" + fmt * count, *values)
    buf = bytearray(data)
    if len(buf) >= offset + len(packed):
        buf[offset:offset + len(packed)] = packed
    out = bytes(buf)
    return gzip.compress(out, mtime=0) if gz else out


def _line_edit(data: bytes, position: int, text: str) -> bytes:
    lines = data.split(b"\n")
    lines.insert(position % (len(lines) + 1), text.encode("utf-8", "surrogateescape"))
    return b"\n".join(lines)


def mutate(kind: str, folder, mutations) -> None:
    """Apply ``mutations`` (tuples, see the module docstring) in order to the seed of ``kind``
    written by :func:`make_seed` in ``folder``."""
    files = mutable_files(kind, folder)
    for op, target, *args in mutations:
        path = files[target % len(files)]
        data = path.read_bytes()
        size = len(data)
        if op == "flip":
            if size:
                pos, xor = args[0] % size, args[1] % 255 + 1
                data = data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1:]
        elif op == "truncate":
            data = data[: args[0] % size] if size else data
        elif op == "insert":
            pos = args[0] % (size + 1)
            data = data[:pos] + bytes(args[1]) + data[pos:]
        elif op == "delete":
            pos = args[0] % (size + 1)
            data = data[:pos] + data[pos + args[1]:]
        elif op == "junk":
            pos = args[0] % (size + 1)
            data = data[:pos] + bytes(args[1]) + data[pos + len(args[1]):]
        elif op == "dicom":
            data = _dicom_edit(data, *args)
        elif op == "header":
            data = _header_edit(data, *args)
        elif op == "nifti":
            data = _nifti_edit(data, *args, gz=path.name.endswith(".gz"))
        elif op == "line":
            data = _line_edit(data, *args)
        else:
            raise ValueError(f"unknown mutation {op!r}")
        path.write_bytes(data)


def copy_seed(src, dst) -> Path:
    """Copy a seed folder made by :func:`make_seed` (cheaper than writing it again)."""
    return Path(shutil.copytree(src, dst))
