from pathlib import Path

import pandas as pd
import pytest

from pipeline.batch import discover_scans
from stages.errors import ScanError


def _touch(path: Path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_dsb_layout_one_scan_per_patient_folder(tmp_path):
    for patient in ("p2", "p1"):
        for i in range(3):
            _touch(tmp_path / patient / f"{i:03d}")
    _touch(tmp_path / "stage1_labels.csv")
    assert discover_scans(tmp_path) == [tmp_path / "p1", tmp_path / "p2"]


def test_luna_tree_and_single_series_and_list_file(tmp_path):
    mhd = [_touch(tmp_path / "luna" / f"subset{s}" / f"1.2.{s}.mhd") for s in (1, 0)]
    for m in mhd:
        _touch(m.with_suffix(".raw"))
    _touch(tmp_path / "luna" / "annotations.csv")
    assert discover_scans(tmp_path / "luna") == sorted(mhd)
    series = tmp_path / "series"
    _touch(series / "IM1")
    _touch(series / "IM2")
    assert discover_scans(series) == [series]
    listing = _touch(tmp_path / "list.txt", f"# my scans\n{mhd[0]}\nseries\n".encode())
    assert discover_scans(listing) == [mhd[0], series]


def test_limit_only_and_duplicates(tmp_path):
    for patient in ("a", "b", "c"):
        _touch(tmp_path / patient / "1.dcm")
    assert discover_scans(tmp_path, limit=2) == [tmp_path / "a", tmp_path / "b"]
    assert discover_scans(tmp_path, only=["c"]) == [tmp_path / "c"]
    listing = _touch(tmp_path / "l.lst", f"{tmp_path / 'a'}\n{tmp_path / 'a'}\n".encode())
    assert discover_scans(listing) == [tmp_path / "a"]


def test_missing_source_is_a_clean_error(tmp_path):
    with pytest.raises(ScanError, match="no such file or folder"):
        discover_scans(tmp_path / "nope")


def test_config_extends_and_rejects_bad_files(tmp_path):
    from pipeline.config import load_config

    from pipeline.config import effective_settings

    luna = load_config(Path(__file__).resolve().parents[2] / "configs" / "luna16.yaml")
    assert luna["stages"][0] == "ingest"
    settings = effective_settings(luna)  # extends default.yaml: the functions' defaults
    assert settings["candidates"]["max_candidates"] == 1000 and settings["candidates"]["bandwidth"] == 1.0
    (tmp_path / "bad.yaml").write_text("stages: [ingest\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "nostages.yaml").write_text("ingest: {}\n")
    with pytest.raises(ValueError, match="needs a 'stages:' list"):
        load_config(tmp_path / "nostages.yaml")
    (tmp_path / "python.yaml").write_text("stages: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "python.yaml")


@pytest.mark.parametrize("name", ["default.yaml", "luna16.yaml", "dsb2017.yaml"])
def test_configs_classify_more_candidates_than_the_froc_reads(name):
    """The classifier, not the detector's score, picks the marks LUNA16's FROC reads: the
    detector hands over more than the FROC's cap (real CT gives about 600 candidates and a
    nodule can rank past 100 by the detector's score)."""
    from pipeline.config import effective_settings, load_config
    from pipeline.evaluate import MAX_MARKS_PER_SCAN

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
    assert "classify" in config["stages"]
    settings = effective_settings(config)
    assert settings["candidates"]["max_candidates"] > MAX_MARKS_PER_SCAN
    assert settings["classify"]["max_candidates"] is None  # the classify stage cuts nothing


def test_a_missing_listed_path_and_an_empty_patient_folder_fail_alone(tmp_path):
    """Each becomes one failed scan with its reason in errors.csv; the good scans still run."""
    from pipeline.batch import run_many

    tree = tmp_path / "dsb"
    _touch(tree / "patient1" / "IM1")
    (tree / "patient2").mkdir()  # empty: exported without images
    (tree / ".hidden").mkdir()  # hidden folders stay ignored
    assert discover_scans(tree) == [tree / "patient1", tree / "patient2"]
    assert discover_scans(tree / "patient2") == []  # the source itself empty: nothing to run
    listing = _touch(tmp_path / "list.txt", f"dsb/patient2\nnot/there\n{tree / 'patient1'}\n".encode())
    assert discover_scans(listing) == [tree / "patient2", tmp_path / "not" / "there", tree / "patient1"]
    results = run_many(discover_scans(listing), tmp_path / "out", {"stages": ["ingest"]}, progress="quiet")
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    reasons = dict(zip(errors["path"].map(lambda p: Path(p).name), errors["error"]))
    assert "empty folder" in reasons["patient2"] and "no such file or folder" in reasons["there"]
    assert len(results) == 3


def _split_series(folder: Path, parts: list[Path], seed: int) -> str:
    """A phantom DICOM series written to ``folder``, then dealt out over ``parts`` (sibling
    folders, as a CD export splits a series); returns its Series Instance UID."""
    import pydicom
    from synth.phantom import write_phantom_scan

    write_phantom_scan(folder, fmt="dicom", seed=seed, shape_zyx=(24, 48, 48), spacing_mm=(3.0, 4.0, 4.0),
                       n_nodules=1)
    files = sorted(folder.iterdir())
    for part in parts:
        part.mkdir(parents=True)
    for i, f in enumerate(files):
        f.rename(parts[i % len(parts)] / f.name)  # interleaved: each folder alone has gaps
    folder.rmdir()
    return str(pydicom.dcmread(parts[0] / sorted(p.name for p in parts[0].iterdir())[0]).SeriesInstanceUID)


def test_a_series_split_over_sibling_folders_is_one_scan(tmp_path):
    from pipeline.steps import STEPS
    from stages.ingest import read_scan

    dicom = tmp_path / "cd" / "DICOM"
    uid = _split_series(tmp_path / "whole", [dicom / "SE001", dicom / "SE002", dicom / "SE003"], seed=1)
    assert discover_scans(tmp_path / "cd") == [dicom]
    # the same series beside another one: named by its UID, the other series stays a scan
    other = tmp_path / "cd2" / "DICOM"
    uid2 = _split_series(tmp_path / "whole2", [other / "A", other / "B"], seed=1)
    assert uid2 == uid
    _split_series(tmp_path / "third", [other / "C"], seed=2)
    scans = discover_scans(tmp_path / "cd2")
    assert scans == [Path(f"{other}#series={uid}"), other / "C"]
    # read: every slice, the true origin, the same volume as the series in one folder
    reference = read_scan(dicom)
    got = STEPS["ingest"].fn(scans[0])["ct"]
    assert got.scan_id == uid and got.shape == reference.shape == (24, 48, 48)
    assert got.same_geometry(reference, atol_mm=1e-6) and (got.array == reference.array).all()
    assert not got.meta["z_resampled"]


def test_a_list_file_may_name_one_series_of_a_folder(tmp_path):
    folder = tmp_path / "DICOM"
    uid = _split_series(tmp_path / "w", [folder / "A", folder / "B"], seed=3)
    _split_series(tmp_path / "w2", [folder / "C"], seed=4)
    listing = _touch(tmp_path / "scans.txt", f"DICOM#series={uid}  # the CT\n".encode())
    assert discover_scans(listing) == [Path(f"{folder}#series={uid}")]


def test_a_batch_over_a_split_series_writes_it_once_and_resumes(tmp_path):
    import json

    import yaml

    from pipeline.__main__ import main

    dicom = tmp_path / "cd" / "DICOM"
    uid = _split_series(tmp_path / "w", [dicom / "SE1", dicom / "SE2"], seed=5)
    _split_series(tmp_path / "w2", [dicom / "SE3"], seed=6)
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "default.yaml").read_text())
    config["stages"] = ["ingest", "resample", "lungmask"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["run", str(tmp_path / "cd"), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "c.yaml"),
            "--quiet", "--pictures", "0"]
    assert main(args) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted(s["status"] for s in run["scans"]) == ["ok", "ok"]
    assert len({s["scan_id"] for s in run["scans"]}) == 2 and uid in {s["scan_id"] for s in run["scans"]}
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [s["status"] for s in again["scans"]] == ["cached", "cached"]


def test_copies_of_one_series_in_two_patient_folders_stay_two_scans(tmp_path):
    """Folders whose first files are the same image (a series exported twice, a test file
    copied) are copies, not parts of one series: each stays a scan and fails or runs alone."""
    import shutil

    from synth.data import pydicom_test_file

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(pydicom_test_file("CT_small.dcm"), tmp_path / name / "ct.dcm")
    assert discover_scans(tmp_path) == [tmp_path / "a", tmp_path / "b"]
