"""DICOM outputs of DICOM inputs (issue 19, item 2): the lung mask as a DICOM SEG and the
findings as a TID 1500 SR, read back with highdicom and pydicom, checked by dciodvfy.

The lung mask and the candidates come from cheap stand-ins for those stages (the real ones
take half a minute on 2 cores; what is tested here is what the outputs make of them): a
threshold mask split left/right, and a fixed candidate list with probabilities on both sides
of the threshold, a mass among them.
"""
import dataclasses
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PHANTOM = dict(shape_zyx=(36, 96, 96), spacing_mm=(3.0, 2.4, 2.4), n_nodules=2)
STAGES = ("ingest", "resample", "lungmask", "candidates")
#: Written into every source header: what the outputs must not carry ...
SECRETS = {"PatientBirthDate": "19450317", "InstitutionName": "St Elsewhere Hospital",
           "OperatorsName": "RADTECH^ANNA", "ReferringPhysicianName": "HOUSE^GREGORY",
           "OtherPatientIDs": "OTHER4455", "StationName": "CTSTATION7", "PatientAge": "079Y",
           "Manufacturer": "ACME CT SCANNERS", "DeviceSerialNumber": "SN0123456"}
#: ... and the study's identity, which they must carry to join the study.
IDENTITY = {"PatientName": "DOE^JOHN", "PatientID": "PID778899", "AccessionNumber": "ACC55661"}
#: The stand-in candidates: (coordX, coordY, coordZ) offsets from the volume's centre (mm),
#: diameter (mm), finding, probability.  The default threshold (0.5) keeps rows 1, 2 and 4.
CANDIDATES = [((-40.123456, 10.5, 3.25), 6.2, "nodule", 0.93),
              ((35.0, -5.125, -12.0), 31.5, "mass", 0.5),
              ((20.0, 15.0, 20.0), 4.0, "nodule", 0.4999),
              ((-30.5, -20.25, -30.75), 9.875, "nodule", 0.61)]


def _fake_lungmask(ct_1mm, **settings):
    """Air inside the body's box, 1 on the patient's right (low x), 2 on the left."""
    air = ct_1mm.array < -400
    inside = np.zeros_like(air)
    inside[:, 20:-20, 20:-20] = True
    labels = np.zeros(ct_1mm.shape, np.uint8)
    half = ct_1mm.shape[2] // 2
    labels[:, :, :half][(air & inside)[:, :, :half]] = 1
    labels[:, :, half:][(air & inside)[:, :, half:]] = 2
    return {"lung_mask": ct_1mm.with_array(labels)}


def _fake_candidates(ct_1mm, lung_mask, **settings):
    centre_zyx = ct_1mm.index_to_world((np.asarray(ct_1mm.shape) - 1) / 2)
    rows = [{"seriesuid": ct_1mm.scan_id, "coordX": centre_zyx[2] + d[0], "coordY": centre_zyx[1] + d[1],
             "coordZ": centre_zyx[0] + d[2], "diameter_mm": diameter, "finding": finding,
             "score": 1.0, "probability": p} for d, diameter, finding, p in CANDIDATES]
    return {"candidates": pd.DataFrame(rows)}


def _config(tmp_path, outputs=None) -> Path:
    config = {"stages": list(STAGES)}
    if outputs is not None:
        config["outputs"] = outputs
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _process(scan, out, config_path):
    """process_scan with the stand-in lung mask and candidate stages."""
    from pipeline import steps
    from pipeline.config import load_config
    from pipeline.run import process_scan

    with pytest.MonkeyPatch.context() as mp:
        for name, fn in (("lungmask", _fake_lungmask), ("candidates", _fake_candidates)):
            mp.setitem(steps.STEPS, name, dataclasses.replace(steps.STEPS[name], fn=fn))
        return process_scan(scan, out, load_config(config_path), pictures=0, device="cpu")


def _dicom_phantom(folder: Path, seed: int = 7) -> Path:
    from synth.phantom import write_phantom_scan

    scan, _ = write_phantom_scan(folder, fmt="dicom", seed=seed, **PHANTOM)
    for f in scan.iterdir():
        ds = pydicom.dcmread(f)
        for keyword, value in {**SECRETS, **IDENTITY}.items():
            setattr(ds, keyword, value)
        ds.save_as(f)
    return scan


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    """A DICOM phantom screened with the default output settings."""
    from stages.ingest import read_scan

    tmp = tmp_path_factory.mktemp("dicomout")
    scan = _dicom_phantom(tmp / "series")
    result = _process(scan, tmp / "out", _config(tmp))
    assert result.status == "ok" and result.flags == []
    return {"scan": scan, "result": result, "dir": Path(result.out_dir), "ct": read_scan(scan)}


def _sources(scan: Path) -> list:
    """The source headers in slice order (along the slice normal)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in scan.iterdir()]
    return sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))


def test_seg_is_the_lung_mask_on_the_source_grid(screened):
    import highdicom as hd

    from pipeline.__main__ import version
    from stages.resample import resample, resample_like

    seg = hd.seg.segread(screened["dir"] / "lung_mask.seg.dcm")
    sources = _sources(screened["scan"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert (seg.Manufacturer, seg.SoftwareVersions) == ("lungscreen", version())
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["right lung", "left lung"]
    assert [seg.get_segment_description(n).SegmentedPropertyTypeCodeSequence[0].CodeValue
            for n in (1, 2)] == ["3341006", "44029006"]
    # the mask, frame by frame on its source image, is the 1 mm mask brought back to the input grid
    mask_1mm = _fake_lungmask(resample(screened["ct"], device="cpu"))["lung_mask"]
    native = resample_like(mask_1mm, screened["ct"], order=0).array
    assert (native == 1).any() and (native == 2).any()
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], segment_numbers=[1, 2],
        combine_segments=True, skip_overlap_checks=True)
    assert got.shape == native.shape
    assert np.count_nonzero(got == 1) == np.count_nonzero(native == 1)
    assert np.count_nonzero(got == 2) == np.count_nonzero(native == 2)
    assert np.array_equal(got, native)


def test_sr_has_one_finding_per_candidate_at_the_threshold(screened):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sr = hd.sr.srread(screened["dir"] / "findings.sr.dcm")
    sources = _sources(screened["scan"])
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert len(evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence) == len(sources)
    cands = pd.read_csv(screened["dir"] / "candidates.csv")
    above = cands[cands["probability"] >= 0.5]
    assert len(above) == 3  # 0.93, 0.5 (at the threshold: kept), 0.61; not 0.4999
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(above)
    for group, (i, cand) in zip(groups, above.iterrows()):
        assert group.tracking_identifier == f"candidate {i + 1}"
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert group.roi.frame_of_reference_uid == sources[0].FrameOfReferenceUID
        np.testing.assert_allclose(group.roi.value[0], cand[["coordX", "coordY", "coordZ"]].to_numpy(float),
                                   atol=1e-3)
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert diameter.unit == codes.UCUM.Millimeter and probability.unit == codes.UCUM.NoUnits
        assert diameter.value == pytest.approx(cand["diameter_mm"], abs=1e-4)  # the CSV keeps 4 decimals
        assert probability.value == pytest.approx(cand["probability"], abs=1e-4)
        assert group.finding_type == (codes.SCT.Mass if cand["finding"] == "mass" else codes.SCT.Nodule)


def test_outputs_carry_the_study_identity_and_nothing_else_of_the_source(screened):
    from pipeline.__main__ import version

    for name in ("lung_mask.seg.dcm", "findings.sr.dcm"):
        path = screened["dir"] / name
        blob = path.read_bytes()
        for keyword, value in SECRETS.items():
            assert value.encode() not in blob, (name, keyword)
        ds = pydicom.dcmread(path)
        assert {k: str(ds.get(k, "")) for k in IDENTITY} == IDENTITY  # needed to join the study
        assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.ReferringPhysicianName == ""
        # highdicom names itself as processing equipment; the scanner (its site, station) is absent
        assert [item.PurposeOfReferenceCodeSequence[0].CodeValue
                for item in ds.get("ContributingEquipmentSequence", [])] == ["109102"]
        assert (ds.Manufacturer, ds.SoftwareVersions) == ("lungscreen", version())


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (dicom3tools) is not on PATH: apt-get install dicom3tools")
def test_dciodvfy_finds_no_error(screened):
    for name in ("lung_mask.seg.dcm", "findings.sr.dcm"):
        run = subprocess.run(["dciodvfy", str(screened["dir"] / name)], capture_output=True, text=True,
                             timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], (name, lines)
        assert any(line.strip() in ("Segmentation", "Comprehensive3DSR") for line in lines), lines


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump (dcmtk) is not on PATH")
def test_dcmtk_reads_both_files(screened):
    for name in ("lung_mask.seg.dcm", "findings.sr.dcm"):
        run = subprocess.run(["dcmdump", "-q", str(screened["dir"] / name)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0 and "E:" not in run.stderr, (name, run.stderr)


def test_the_threshold_is_a_setting_and_a_changed_one_rewrites_the_report(screened, tmp_path):
    import highdicom as hd

    from pipeline.config import load_config

    out = tmp_path / "out"
    shutil.copytree(screened["dir"].parent, out)  # the finished run
    again = _process(screened["scan"], out, _config(tmp_path, {"sr_min_probability": 0.9}))
    assert again.status == "ok"  # not "cached": the outputs' setting is part of the scan's keys
    groups = hd.sr.srread(Path(again.out_dir) / "findings.sr.dcm").content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["candidate 1"]
    (tmp_path / "bad.yaml").write_text("stages: [ingest]\noutputs:\n  sr_min_probabilty: 0.9\n")
    with pytest.raises(ValueError, match="did you mean 'sr_min_probability'"):
        load_config(tmp_path / "bad.yaml")


def test_a_series_ingest_had_to_interpolate_gets_neither_file_and_a_flag(screened, tmp_path):
    """A missing slice: ingest interpolates the gap, so the volume's slices are not the
    source images; the scan is flagged, and the first run's SEG and SR are removed."""
    out = tmp_path / "out"
    shutil.copytree(screened["dir"].parent, out)
    scan = tmp_path / "series"
    shutil.copytree(screened["scan"], scan)
    middle = _sources(scan)[len(list(scan.iterdir())) // 2]
    for f in scan.iterdir():
        if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == middle.SOPInstanceUID:
            f.unlink()
    result = _process(scan, out, _config(tmp_path))
    scan_dir = Path(result.out_dir)
    assert result.status == "ok" and scan_dir == out / screened["dir"].name
    assert (scan_dir / "candidates.csv").exists() and (scan_dir / "lung_mask.nrrd").exists()
    assert not (scan_dir / "lung_mask.seg.dcm").exists() and not (scan_dir / "findings.sr.dcm").exists()
    (flag,) = result.flags
    assert flag.startswith("no DICOM SEG or SR written: ingest interpolated the series"), flag


def test_a_non_dicom_input_writes_neither_file(tmp_path):
    from synth.phantom import write_phantom_scan

    scan, _ = write_phantom_scan(tmp_path / "mhd", fmt="mhd", seed=3, **PHANTOM)
    result = _process(scan, tmp_path / "out", _config(tmp_path))
    assert result.status == "ok" and result.flags == []
    written = {p.name for p in Path(result.out_dir).iterdir()}
    assert "candidates.csv" in written and not [n for n in written if n.endswith(".dcm")]
