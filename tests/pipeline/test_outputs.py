"""Viewer outputs (issue 19, item 1): each new file read back with the library its users use:
Slicer markups JSON, a Slicer ``.seg.nrrd`` through SimpleITK, NIfTI through nibabel."""
import argparse
import inspect
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipeline.io import nifti_affine, write_csv, write_volume
from pipeline.outputs import (CSV_DECIMALS, DEFAULT_VOLUME_FORMAT, LUNG_RGB, MARKUPS_SCHEMA,
                              mask_on_native_grid, write_markups, write_segmentation)
from stages.volume import Volume

#: Slicer's control point fields (markups-schema-v1.0.3.json, ``#markup/controlPoint``).
CONTROL_POINT_FIELDS = {"id", "label", "description", "position", "orientation", "selected",
                        "locked", "visibility", "positionStatus"}
#: A tiny chest: a few seconds per stage on 2 cores (the README test's phantom).
PHANTOM = dict(shape_zyx=(40, 96, 96), spacing_mm=(4.0, 2.6, 2.6), seed=5, n_nodules=3)


def _rotated(deg: float) -> np.ndarray:
    """A direction matrix (z, y, x components) turning the y-x plane by ``deg``."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _sitk_volume(path) -> Volume:
    img = sitk.ReadImage(str(path))
    return Volume.from_sitk_geometry(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                                     img.GetDirection())


def _candidates(n: int = 3, *, probability: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"seriesuid": "1.2.3", "coordX": rng.uniform(-150, 150, n),
                       "coordY": rng.uniform(-150, 150, n), "coordZ": rng.uniform(-400, -100, n),
                       "diameter_mm": rng.uniform(3, 40, n), "finding": ["nodule"] * n,
                       "score": np.sort(rng.uniform(0, 1, n))[::-1]})
    if n:
        df.loc[n - 1, "finding"] = "mass"
    if probability:
        df["probability"] = np.sort(rng.uniform(0, 1, n))[::-1]
    return df


def _markups(path) -> dict:
    doc = json.loads(path.read_text())
    assert doc["@schema"] == MARKUPS_SCHEMA and doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    assert markup["coordinateUnits"] == "mm" and isinstance(markup["display"], dict)
    for point in markup["controlPoints"]:
        assert CONTROL_POINT_FIELDS <= set(point)
        assert point["positionStatus"] == "defined" and len(point["orientation"]) == 9
        assert len(point["position"]) == 3 and all(isinstance(v, float) for v in point["position"])
    return markup


def _positions_equal_csv(markup: dict, csv) -> None:
    table = pd.read_csv(csv, dtype=str)[["coordX", "coordY", "coordZ"]]  # the text, parsed by Python
    positions = np.array([p["position"] for p in markup["controlPoints"]]).reshape(-1, 3)
    np.testing.assert_array_equal(positions, np.vectorize(float)(table.to_numpy()).reshape(-1, 3))


# ----------------------------------------------------------------------------- markups
def test_markups_hold_one_point_per_finding_at_the_csv_positions(tmp_path):
    cands = _candidates(12)
    write_csv(cands, tmp_path / "candidates.csv", float_format=f"%.{CSV_DECIMALS}f")
    markup = _markups(write_markups(cands, tmp_path / "candidates.mrk.json"))
    _positions_equal_csv(markup, tmp_path / "candidates.csv")
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == [f"F{i:02d}" for i in range(1, 13)]
    assert [p["id"] for p in points] == [str(i) for i in range(1, 13)]
    first, last = points[0]["description"], points[-1]["description"]
    assert first == (f"rank 1: nodule, probability {cands.probability[0]:.3f}, "
                     f"diameter {cands.diameter_mm[0]:.1f} mm")
    assert last.startswith("rank 12: mass, probability")


def test_markups_without_a_classifier_give_the_score_and_none_give_an_empty_list(tmp_path):
    cands = _candidates(2, probability=False)
    points = _markups(write_markups(cands, tmp_path / "a.mrk.json"))["controlPoints"]
    assert points[0]["description"].startswith(f"rank 1: nodule, score {cands.score[0]:.3f},")
    assert _markups(write_markups(_candidates(0), tmp_path / "b.mrk.json"))["controlPoints"] == []


# ----------------------------------------------------------------------------- seg.nrrd
def _two_lungs() -> Volume:
    labels = np.zeros((12, 20, 30), np.uint8)
    labels[2:9, 4:15, 3:12] = 1   # right lung: lower x
    labels[3:11, 5:17, 16:27] = 2
    return Volume(labels, spacing_mm=(2.0, 0.8, 0.9), origin_mm=(-300.0, -120.5, 80.25),
                  direction=_rotated(20))


def test_seg_nrrd_segments_read_back_with_simpleitk(tmp_path):
    mask = _two_lungs()
    path = write_segmentation(mask, tmp_path / "lung_mask.seg.nrrd")
    img = sitk.ReadImage(str(path))
    meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    assert meta["NRRD_space"] == "left-posterior-superior"
    assert meta["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert meta["Segmentation_ContainedRepresentationNames"].split("|")[0] == "Binary labelmap"
    assert meta["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    back = sitk.GetArrayFromImage(img)
    expected = {"right lung": (1, "24028007", (3, 11, 4, 14, 2, 8)),
                "left lung": (2, "7771000", (16, 26, 5, 16, 3, 10))}
    for i, (name, (value, side, extent_xyz)) in enumerate(expected.items()):
        key = f"Segment{i}_"
        assert meta[key + "Name"] == name and meta[key + "LabelValue"] == str(value)
        assert meta[key + "ID"] and meta[key + "Layer"] == "0"
        np.testing.assert_allclose([float(c) for c in meta[key + "Color"].split()], LUNG_RGB, atol=1e-5)
        assert tuple(int(v) for v in meta[key + "Extent"].split()) == extent_xyz
        assert f"~SCT^39607008^Lung~SCT^{side}^" in meta[key + "Tags"]
        assert (back == value).sum() == (mask.array == value).sum() > 0
    np.testing.assert_array_equal(back, mask.array)
    assert _sitk_volume(path).same_geometry(mask, atol_mm=1e-6)


def test_seg_nrrd_of_one_lung_has_an_empty_left_segment(tmp_path):
    mask = _two_lungs()
    one = mask.with_array(np.where(mask.array == 2, 0, mask.array).astype(np.uint8))
    img = sitk.ReadImage(str(write_segmentation(one, tmp_path / "one.seg.nrrd")))
    assert img.GetMetaData("Segment1_Name") == "left lung"
    assert img.GetMetaData("Segment1_Extent") == "0 -1 0 -1 0 -1"


# ----------------------------------------------------------------------------- NIfTI
def test_nifti_affine_maps_a_phantom_nodule_to_its_world_position(tmp_path):
    from synth.phantom import make_phantom

    flat, ann = make_phantom(shape_zyx=(32, 64, 64), spacing_mm=(5.0, 4.0, 4.0), seed=2, noise_hu=0.0,
                             nodules=[{"centre_zyx_mm": (-250.0, 30.0, 70.0), "diameter_mm": 20.0}])
    nodule_index = flat.world_to_index(ann[["coordZ", "coordY", "coordX"]].to_numpy(float)[0])
    # the same voxels on a turned, mirrored grid: an LPS/RAS or axis-order slip cannot cancel out
    vol = Volume(flat.array, spacing_mm=flat.spacing_mm, origin_mm=(-310.0, 42.0, -17.5),
                 direction=_rotated(30) @ np.diag([1.0, -1.0, 1.0]), scan_id=flat.scan_id)
    nrrd = write_volume(vol, tmp_path / "ct.nrrd")
    nodule_lps = np.array(sitk.ReadImage(str(nrrd)).TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in nodule_index[::-1]]))  # ITK's own world position of the nodule
    path = write_volume(vol, tmp_path / "ct.nii.gz")
    img = nib.load(path)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.header.get_qform(), nifti_affine(vol), atol=1e-4)
    np.testing.assert_allclose(img.header.get_sform(), nifti_affine(vol), atol=1e-4)
    # nibabel: the nodule's voxel (NIfTI's i, j, k = x, y, z) maps to its world position
    centre_lps = (img.affine @ np.r_[nodule_index[::-1], 1.0])[:3] * [-1, -1, 1]
    assert np.linalg.norm(centre_lps - nodule_lps) < 1e-3
    # ... and back: the world position lands in the nodule (solid, not lung at -850 HU)
    ijk = np.linalg.solve(img.affine, np.r_[nodule_lps * [-1, -1, 1], 1.0])[:3]
    assert np.asarray(img.dataobj)[tuple(np.round(ijk).astype(int))] > -100
    # ITK (SimpleITK, ITK-SNAP, Slicer) reads the same grid from the NIfTI as from the NRRD
    nifti = _sitk_volume(path)
    assert nifti.same_geometry(_sitk_volume(nrrd), atol_mm=1e-4) and nifti.same_geometry(vol, atol_mm=1e-4)
    np.testing.assert_array_equal(nifti.array, vol.array)


def test_native_grid_mask_keeps_the_labels_on_the_scan_grid():
    from stages.resample import resample

    ct = Volume(np.zeros((10, 30, 40), np.int16), spacing_mm=(2.5, 0.7, 0.7),
                origin_mm=(-200.0, -10.0, 5.0), direction=_rotated(10))
    mask_1mm = resample(ct, 1.0, order=0, device="cpu")
    zyx = np.indices(mask_1mm.shape)
    labels = np.where(zyx[2] < 14, 1, 2) * (zyx[0] >= 5)
    native = mask_on_native_grid(mask_1mm.with_array(labels.astype(np.uint8)), ct)
    assert native.shape == ct.shape and native.array.dtype == np.uint8
    assert native.spacing_mm == ct.spacing_mm and native.origin_mm == ct.origin_mm
    np.testing.assert_array_equal(native.direction, ct.direction)
    assert set(np.unique(native.array)) == {0, 1, 2}
    # the labels keep their place: each voxel's label is the 1 mm voxel's at its centre
    # (the 1 mm grid ends short of the scan's last slice, 22.5 mm: it takes the edge voxel's)
    world = ct.index_to_world(np.argwhere(np.ones(ct.shape, bool)))
    nearest = np.floor(mask_1mm.world_to_index(world) + 0.5).astype(int)
    assert nearest[:, 0].max() == mask_1mm.shape[0]  # one past the grid, before clipping
    nearest = np.clip(nearest, 0, np.array(mask_1mm.shape) - 1)
    np.testing.assert_array_equal(native.array.ravel(), labels[tuple(nearest.T)])
    assert (native.array[-1] == native.array[-2]).all() and native.array[-1].any()


# ----------------------------------------------------------------------------- options
def test_format_default_is_one_for_the_cli_and_the_api():
    from pipeline.__main__ import add_arguments
    from pipeline.batch import run_many
    from pipeline.run import process_scan

    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["scan"]).volume_format == DEFAULT_VOLUME_FORMAT
    assert inspect.signature(process_scan).parameters["volume_format"].default == DEFAULT_VOLUME_FORMAT
    assert inspect.signature(run_many).parameters["volume_format"].default == DEFAULT_VOLUME_FORMAT
    assert parser.parse_args(["scan", "--format", "nifti"]).volume_format == "nifti"
    with pytest.raises(SystemExit):
        parser.parse_args(["scan", "--format", "png"])


def test_an_unknown_format_is_refused_before_any_work(tmp_path):
    from pipeline.config import load_config
    from pipeline.run import process_scan

    with pytest.raises(ValueError, match="volume format must be one of nrrd, nifti, got 'png'"):
        process_scan(tmp_path / "missing", tmp_path / "out", load_config(), volume_format="png")


# ----------------------------------------------------------------------------- end to end
def test_run_writes_viewer_files_in_either_format(tmp_path, one_thread):
    """``lungscreen run --format nifti`` with the shipped stages (CNN included), then the same
    scan through process_scan in the default format: the stage cache serves the stages, the
    NRRD volumes replace the NIfTI ones and hold the same voxels."""
    from pipeline.__main__ import main
    from pipeline.config import DEFAULT_CONFIG, load_config
    from pipeline.run import process_scan
    from synth.phantom import write_phantom_scan

    scan, ann = write_phantom_scan(tmp_path / "scan", fmt="nrrd", **PHANTOM)
    config = tmp_path / "config.yaml"  # the shipped config, fewer marks for the CNN to score
    config.write_text(f"extends: {DEFAULT_CONFIG}\ncandidates:\n  max_candidates: 30\n")
    out = tmp_path / "out"
    assert main(["run", str(scan), "--out", str(out), "--config", str(config), "--quiet",
                 "--pictures", "0", "--format", "nifti", "--save-ct"]) == 0
    d = out / ann.seriesuid[0]
    for name in ("lung_mask.nii.gz", "lung_mask_native.nii.gz", "ct_1mm.nii.gz", "lung_mask.seg.nrrd",
                 "candidates.mrk.json", "candidates.csv"):
        assert (d / name).is_file(), name
    assert not list(d.glob("*_1mm.nrrd")) and not (d / "lung_mask.nrrd").exists()
    _positions_equal_csv(_markups(d / "candidates.mrk.json"), d / "candidates.csv")
    cands = pd.read_csv(d / "candidates.csv")

    # the biggest dense phantom nodule, found in ct_1mm.nii.gz through nibabel's affine alone
    img = nib.load(d / "ct_1mm.nii.gz")
    data = np.asarray(img.dataobj)
    dense = ann[ann.kind != "ground-glass"].sort_values("diameter_mm")
    truth = dense.iloc[-1][["coordX", "coordY", "coordZ"]].to_numpy(float)
    ijk = tuple(np.round(np.linalg.solve(img.affine, np.r_[truth * [-1, -1, 1], 1.0])[:3]).astype(int))
    assert data[ijk] > -400
    blob, _ = ndi.label(data > -400)
    centre_lps = (img.affine @ np.r_[ndi.center_of_mass(blob == blob[ijk]), 1.0])[:3] * [-1, -1, 1]
    found = np.linalg.norm(cands[["coordX", "coordY", "coordZ"]].to_numpy(float) - centre_lps, axis=1)
    assert found.min() < 1.0 and np.linalg.norm(centre_lps - truth) < 1.0

    # lung_mask.nii.gz and lung_mask.seg.nrrd: the same voxels on the same grid
    seg = _sitk_volume(d / "lung_mask.seg.nrrd")
    mask_nii = nib.load(d / "lung_mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(mask_nii.dataobj).transpose(2, 1, 0), seg.array)
    np.testing.assert_allclose(mask_nii.affine, nifti_affine(seg), atol=1e-4)
    assert _sitk_volume(d / "lung_mask.nii.gz").same_geometry(seg, atol_mm=1e-4)
    assert {1, 2} <= set(np.unique(seg.array))
    # lung_mask_native: the input scan's own grid
    source = sitk.ReadImage(str(scan))
    native_img = sitk.ReadImage(str(d / "lung_mask_native.nii.gz"))
    assert native_img.GetSize() == source.GetSize()
    np.testing.assert_allclose(native_img.GetSpacing(), source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(native_img.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(native_img.GetDirection(), source.GetDirection(), atol=1e-6)
    native = sitk.GetArrayFromImage(native_img)
    voxel_ml = np.prod(PHANTOM["spacing_mm"]) / 1000
    for lung in (1, 2):  # each lung's volume on either grid, within 5 %
        assert (native == lung).sum() * voxel_ml == pytest.approx((seg.array == lung).sum() / 1000, rel=0.05)

    # the default format from the API: stages from the cache, NRRD volumes replace NIfTI's
    again = process_scan(scan, out, load_config(config), pictures=0)
    assert again.status == "ok" and set(again.seconds) >= {"ingest", "write"}
    assert not list(d.glob("*.nii.gz"))  # nor ct_1mm: not asked for this time
    np.testing.assert_array_equal(_sitk_volume(d / "lung_mask.nrrd").array, seg.array)
    np.testing.assert_array_equal(_sitk_volume(d / "lung_mask_native.nrrd").array, native)
    assert process_scan(scan, out, load_config(config), pictures=0).status == "cached"
