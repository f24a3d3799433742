"""Batch runs (issue 7): DSB-layout trees with broken scans, kill -9 and resume, Dask."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from pipeline.__main__ import main
from synth.data import pydicom_test_file

ROOT = Path(__file__).resolve().parents[2]

#: Small phantoms keep the batch tests (a dozen scans a run at most) inside CI's budget.
PHANTOM = dict(shape_zyx=(36, 96, 96), spacing_mm=(3.0, 2.4, 2.4), n_nodules=2)


def _config(tmp_path, stages=("ingest", "resample", "lungmask", "candidates")) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["stages"] = list(stages)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _phantom_tree(root: Path, n: int, seed0: int = 0) -> list[Path]:
    from synth.phantom import write_phantom_scan

    folders = []
    for i in range(n):
        folder = root / f"patient{i:03d}"
        write_phantom_scan(folder, fmt="dicom", seed=seed0 + i, **PHANTOM)
        folders.append(folder)
    return folders


def _broken_scans(root: Path) -> None:
    from synth.dicomio import write_rtstruct
    from synth.phantom import write_phantom_scan

    # 1. truncated files: a whole series cut short
    trunc = root / "broken_truncated"
    write_phantom_scan(trunc, fmt="dicom", seed=99, **PHANTOM)
    for f in trunc.iterdir():
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3])
    # 2. a non-image series only
    write_rtstruct(root / "broken_rtstruct")
    # 3. mixed series with no CT
    mixed = root / "broken_no_ct"
    mixed.mkdir()
    shutil.copy(pydicom_test_file("MR_small.dcm"), mixed / "mr1")
    write_rtstruct(mixed)
    # 4. absurd header dimensions
    absurd = root / "broken_absurd"
    absurd.mkdir()
    ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 4000
    ds.save_as(absurd / "big.dcm")
    # 5. an unreadable file: not DICOM at all
    junk = root / "broken_junk"
    junk.mkdir()
    (junk / "scan.dcm").write_bytes(b"\x00garbage, not a DICOM file" * 10)
    # 6. a single CT image: no series to screen
    one = root / "broken_one_slice"
    one.mkdir()
    shutil.copy(pydicom_test_file("CT_small.dcm"), one / "ct.dcm")


def test_dsb_tree_with_broken_scans_runs_to_the_end(tmp_path):
    tree = tmp_path / "dsb"
    _phantom_tree(tree, 6)  # six good scans beside the six broken ones
    _broken_scans(tree)
    out = tmp_path / "out"
    status = main(["run", str(tree), "--out", str(out), "--config", str(_config(tmp_path)),
                   "--no-progress", "--pictures", "0"])
    assert status == 1  # some failed
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 6, errors
    assert sorted(Path(p).name for p in errors["path"]) == [
        "broken_absurd", "broken_junk", "broken_no_ct", "broken_one_slice", "broken_rtstruct",
        "broken_truncated"]
    one = errors[errors["path"].str.endswith("broken_one_slice")]["error"].iloc[0]
    assert one.startswith("only 1 slice (5.0 mm): too short to hold a lung"), one
    assert all("\n" not in e and e for e in errors["error"])
    done = [d for d in out.iterdir() if (d / "scan.json").exists()]
    assert len(done) == 6
    cands = pd.read_csv(out / "candidates.csv", dtype={"seriesuid": str})
    assert cands["seriesuid"].nunique() == 6
    html = (out / "report.html").read_text()
    assert "6 scans done, 6 failed" in html
    for d in done:
        for name in ("lung_mask.nrrd", "candidates.csv", "preview.png", "scan.h5"):
            assert (d / name).exists(), (d, name)
        assert not (d / "ct_1mm.nrrd").exists()  # only with --save-ct
    assert not list(out.rglob(".*.part*"))


def _cli(args, stderr=subprocess.DEVNULL):
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def test_kill_9_and_resume_gives_identical_csvs(tmp_path):
    tree = tmp_path / "dsb"
    _phantom_tree(tree, 3, seed0=40)
    _broken_scans(tree)
    config = str(_config(tmp_path))
    clean = tmp_path / "clean"
    assert _cli(["run", str(tree), "--out", str(clean), "--config", config, "--pictures", "1"]).wait() == 1
    killed = tmp_path / "killed"
    rnd = random.Random(7)
    for k in range(3):
        log = tmp_path / f"run{k}.log"
        with open(log, "w") as err:  # not a terminal: one line per stage start and end
            proc = _cli(["run", str(tree), "--out", str(killed), "--config", config, "--pictures", "1"],
                        stderr=err)
            deadline = time.monotonic() + 300
            while " started" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rnd.uniform(0.0, 1.5))  # somewhere inside a scan's screen
            assert proc.poll() is None, "the run ended before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
        text = log.read_text()
        assert text.count(" started") > text.count(" done in "), text  # killed inside a stage
        assert not (killed / "run.json").exists()  # the run never reached its end
    assert _cli(["run", str(tree), "--out", str(killed), "--config", config, "--pictures", "1"]).wait() == 1
    for name in ("candidates.csv", "errors.csv"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    # a further rerun recomputes nothing: every scan reports "cached"
    import json

    proc = _cli(["run", str(tree), "--out", str(killed), "--config", config, "--pictures", "1"])
    assert proc.wait() == 1
    scans = json.loads((killed / "run.json").read_text())["scans"]
    assert {s["status"] for s in scans if s["status"] != "failed"} == {"cached"}


def test_dask_executor_matches_local_pool(tmp_path):
    distributed = pytest.importorskip("distributed")
    tree = tmp_path / "dsb"
    _phantom_tree(tree, 2, seed0=70)
    config = str(_config(tmp_path))
    assert main(["run", str(tree), "--out", str(tmp_path / "local"), "--config", config,
                 "--no-progress", "--pictures", "0"]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert main(["run", str(tree), "--out", str(tmp_path / "dask"), "--config", config,
                     "--executor", "dask", "--scheduler", cluster.scheduler_address,
                     "--no-progress", "--pictures", "0"]) == 0
    for name in ("candidates.csv", "errors.csv"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


@pytest.mark.parametrize("cache, again", [("stages", {"ingest", "resample"}), ("all", set())])
def test_stage_cache_recomputes_only_what_changed(tmp_path, cache, again):
    """A changed candidates setting recomputes candidates, and the CT when it is not cached."""
    tree = tmp_path / "one"
    _phantom_tree(tree, 1, seed0=80)
    out = tmp_path / "out"
    config = _config(tmp_path)
    args = ["--no-progress", "--pictures", "0", "--cache", cache]
    assert main(["run", str(tree), "--out", str(out), "--config", str(config), *args]) == 0
    import json

    first = json.loads((out / "run.json").read_text())["scans"][0]
    assert set(first["seconds"]) >= {"ingest", "resample", "lungmask", "candidates"}
    settings = yaml.safe_load(config.read_text())
    settings.setdefault("candidates", {})["max_candidates"] = 7
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", str(tree), "--out", str(out), "--config", str(config), *args]) == 0
    second = json.loads((out / "run.json").read_text())["scans"][0]
    assert "candidates" in second["seconds"]
    assert {"ingest", "resample", "lungmask"} & set(second["seconds"]) == again
    assert len(pd.read_csv(out / "candidates.csv")) <= 7


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--executor", "dask"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ingest, nosuchstage]\n")
    assert main(["run", str(tmp_path), "--config", str(bad)]) == 2
    assert "unknown stage 'nosuchstage'" in capsys.readouterr().err


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "2")],
                         ids=["ctrl-c", "sigterm-pool"])
def test_an_interrupted_batch_ends_cleanly_and_resumes(tmp_path, sig, workers):
    tree = tmp_path / "dsb"
    _phantom_tree(tree, 4, seed0=60)
    config = str(_config(tmp_path))
    out = tmp_path / "out"
    args = ["run", str(tree), "--out", str(out), "--config", config, "--pictures", "0", "--workers", workers]
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        proc = _cli(args, stderr=err)
        deadline = time.monotonic() + 300
        while not list(out.glob("*/scan.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 130
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "interrupted:" in text and "the same command again resumes" in text
    finished = {d.name for d in out.iterdir() if (d / "scan.json").exists()}
    assert 1 <= len(finished) < 4
    assert json.loads((out / "run.json").read_text())["interrupted"] is True
    # the run's CSV holds the scans the run had collected: a worker may finish a scan (its
    # scan.json) an instant before the signal and never hand it back; the rerun lists it
    run_csv = out / "candidates.csv"
    listed = set(pd.read_csv(run_csv, dtype={"seriesuid": str})["seriesuid"]) if run_csv.exists() else set()
    assert listed <= finished
    assert not list(out.rglob(".*.part*"))  # nothing half-written under any name
    # the next run resumes: the finished scans are not screened again
    assert _cli(args).wait() == 0
    scans = json.loads((out / "run.json").read_text())["scans"]
    assert len(scans) == 4 and sum(s["status"] == "cached" for s in scans) >= len(finished)


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """A 1.2 MB tmpfs mounted at ``tmp_path / "out"`` (root and mount rights needed, else skip)."""
    return tmpfs(tmp_path / "out", "size=1200k")


def test_a_full_disk_stops_the_batch_cleanly_and_a_rerun_resumes(tmp_path, small_disk):
    tree = tmp_path / "dsb"
    _phantom_tree(tree, 4, seed0=70)
    args = ["run", str(tree), "--out", str(small_disk), "--config", str(_config(tmp_path)),
            "--pictures", "1", "--no-progress"]
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        assert _cli(args, stderr=err).wait() == 3  # stopped: not a crash (it was a segfault)
    text = log.read_text()
    assert "Traceback" not in text and "HDF5" not in text, text
    line = [t for t in text.splitlines() if t.startswith("error:")]
    assert len(line) == 1 and line[0].startswith(f"error: {small_disk}: no space left on device; stopped after")
    assert "run the same command again to resume" in line[0]
    finished = [d for d in small_disk.iterdir() if (d / "scan.json").exists()]
    assert 1 <= len(finished) < 4
    assert not list(small_disk.rglob(".*.part*"))  # nothing half-written left, under any name
    for d in finished:  # every file under a final name is whole
        pd.read_csv(d / "candidates.csv")
        json.loads((d / "scan.json").read_text())
    # room again: the same command finishes the rest and recomputes nothing already done
    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)
    assert _cli(args).wait() == 0
    scans = json.loads((small_disk / "run.json").read_text())["scans"]
    assert len(scans) == 4 and sum(s["status"] == "cached" for s in scans) == len(finished)


def test_a_failure_is_reported_once_on_the_console(tmp_path, capfd):
    junk = tmp_path / "scans" / "junk"
    junk.mkdir(parents=True)
    (junk / "a.dcm").write_bytes(b"garbage, not a DICOM file " * 20)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "scans"), "--out", str(out), "--no-progress", "--pictures", "0"]) == 1
    console = capfd.readouterr()
    reason = "no CT image series found (a.dcm: not a DICOM file)"
    assert (console.out + console.err).count(reason) == 1, console
    assert pd.read_csv(out / "errors.csv")["error"].tolist() == [reason]


def test_no_patient_identifiers_in_any_output(tmp_path, caplog):
    """Patient name, ID, birth date and accession number never reach outputs, logs or names."""
    import logging

    import numpy as np

    from synth.dicomio import write_dicom_series
    from stages.volume import Volume

    secrets = {"PatientName": "DOE^JOHN", "PatientID": "PID778899", "PatientBirthDate": "19450317",
               "AccessionNumber": "ACC55661"}
    folder = tmp_path / "PID778899"  # DSB-style folder named after the patient
    hu = np.full((6, 32, 32), -800, np.int16)
    write_dicom_series(Volume(hu, spacing_mm=(2.0, 1.0, 1.0), scan_id="1.2.3.4"), folder)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        for tag, value in secrets.items():
            setattr(ds, tag, value)
        ds.save_as(f)
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    assert main(["run", str(folder), "--out", str(out), "--config", str(_config(tmp_path, ("ingest", "resample"))),
                 "--no-progress"]) == 0
    blobs = [(p, p.read_bytes()) for p in out.rglob("*") if p.is_file()]
    assert blobs
    for value in secrets.values():
        if value == "PID778899":  # the user's own folder name may appear in run.json's source paths
            assert not [p for p, _ in blobs if value in p.name or value in p.parent.name]
            continue
        assert not [p for p, b in blobs if value.encode() in b], value
        assert value not in caplog.text


def test_default_config_screens_with_the_classifier(tmp_path):
    """The shipped config (stages ... candidates, classify) runs end to end and ranks by probability."""
    tree = tmp_path / "one"
    _, truth = _phantom_tree_with_truth(tree)
    out = tmp_path / "out"
    assert main(["run", str(tree), "--out", str(out), "--no-progress", "--pictures", "2"]) == 0
    cands = pd.read_csv(out / "candidates.csv", dtype={"seriesuid": str})
    assert {"probability", "score", "diameter_mm"} <= set(cands.columns)
    assert cands["probability"].is_monotonic_decreasing
    scan_dir = out / truth["seriesuid"].iloc[0]
    assert (scan_dir / "candidate_01.png").exists() and (scan_dir / "candidate_02.png").exists()
    # the best-ranked mark is one of the phantom's nodules
    best = cands.iloc[0][["coordX", "coordY", "coordZ"]].to_numpy(float)
    dist = np.linalg.norm(truth[["coordX", "coordY", "coordZ"]].to_numpy(float) - best, axis=1)
    assert (dist <= truth["diameter_mm"].to_numpy() / 2).any()


def _phantom_tree_with_truth(root: Path):
    from synth.phantom import write_phantom_scan

    return write_phantom_scan(root / "patient", fmt="dicom", seed=3,
                              shape_zyx=(60, 160, 160), spacing_mm=(2.5, 1.8, 1.8), n_nodules=3)


def test_gpu_stages_in_one_process_give_the_same_outputs(tmp_path, capfd):
    """CPU stages in a 2-worker pool, later stages in the main process (as with a GPU)."""
    import h5py

    from pipeline.batch import discover_scans, run_many
    from pipeline.config import load_config

    tree = tmp_path / "dsb"
    _phantom_tree(tree, 3, seed0=90)
    _broken_scans(tree)
    config = load_config(_config(tmp_path))
    scans = discover_scans(tree)
    plain = run_many(scans, tmp_path / "plain", config, progress=False, pictures=0)
    capfd.readouterr()
    split = run_many(scans, tmp_path / "split", config, workers=2, gpu_from="candidates",
                     progress="log", pictures=0)
    assert [r.status for r in split] == [r.status for r in plain]
    log = capfd.readouterr().err  # the workers' lines too (spawned processes share stderr)
    for r in split:
        if r.status == "ok":
            name = Path(r.source).name
            for line in ("ingest started", "lungmask done in", "resample loaded from cache",
                         "candidates started"):
                assert f"{name}: {line}" in log, (name, line)
            with h5py.File(Path(r.out_dir) / "scan.h5", "r") as f:  # the hand-off's CT is gone
                assert sorted(f) == ["candidates.candidates", "lungmask.lung_mask"]
    assert all({"ingest", "lungmask", "candidates"} <= set(r.seconds) for r in split if r.status == "ok")
    for name in ("candidates.csv", "errors.csv"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def _scan_dirs(out: Path) -> list[Path]:
    return sorted(d for d in out.iterdir() if (d / "scan.json").exists())


def test_cache_choices_give_the_same_candidates(tmp_path):
    """--cache none|stages|all: the same CSVs; scan.h5 holds no CT by default, none at all
    with none; --save-ct writes ct_1mm.nrrd."""
    import h5py

    tree = tmp_path / "dsb"
    _phantom_tree(tree, 1, seed0=60)
    config = str(_config(tmp_path))
    runs = {"none": ["--cache", "none"], "stages": [], "all": ["--cache", "all", "--save-ct"]}
    for name, extra in runs.items():
        assert main(["run", str(tree), "--out", str(tmp_path / name), "--config", config,
                     "--quiet", "--pictures", "0", *extra]) == 0
    for name in ("none", "all"):
        for csv in ("candidates.csv", "errors.csv"):
            assert (tmp_path / name / csv).read_bytes() == (tmp_path / "stages" / csv).read_bytes()
    assert all(not (d / "scan.h5").exists() for d in _scan_dirs(tmp_path / "none"))
    for d in _scan_dirs(tmp_path / "stages"):
        assert not (d / "ct_1mm.nrrd").exists()
        with h5py.File(d / "scan.h5", "r") as f:
            assert sorted(f) == ["candidates.candidates", "lungmask.lung_mask"]
            assert f["lungmask.lung_mask/array"].compression == "gzip"
    for d in _scan_dirs(tmp_path / "all"):
        assert (d / "ct_1mm.nrrd").exists()
        with h5py.File(d / "scan.h5", "r") as f:
            assert {"ingest.ct", "resample.ct_1mm"} <= set(f)
    # a finished scan is skipped, and its scan.h5 trimmed to the run's choice
    assert main(["run", str(tree), "--out", str(tmp_path / "all"), "--config", config, "--quiet",
                 "--pictures", "0"]) == 0
    for d in _scan_dirs(tmp_path / "all"):
        with h5py.File(d / "scan.h5", "r") as f:
            assert not {"ingest.ct", "resample.ct_1mm"} & set(f)


def test_pool_workers_share_the_cores_as_torch_threads():
    import os

    from pipeline.batch import _pool

    with _pool(2) as pool:
        threads = {pool.submit(_torch_threads).result() for _ in range(4)}
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_a_worker_stop_dropped_by_a_finalizer_is_silent_and_remembered(monkeypatch):
    """SIGTERM's _WorkerStopped raised inside a weakref callback is dropped by Python (the
    sigterm-pool test once printed its traceback that way): a pool worker's unraisable hook
    keeps it off stderr, and _STOP_REQUESTED keeps the stop, so the worker starts no next scan."""
    import weakref

    from pipeline import batch

    def raise_stop(_ref):
        batch._stop_worker(signal.SIGTERM, None)

    monkeypatch.setattr(batch, "_IN_SCAN", True)
    monkeypatch.setattr(batch, "_STOP_REQUESTED", False)
    monkeypatch.setattr(sys, "unraisablehook", batch._ignore_stop_in_finalizers)
    printed = []  # what goes on to the default hook (which prints a traceback)
    monkeypatch.setattr(batch._ignore_stop_in_finalizers, "__defaults__", (printed.append,))

    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing, raise_stop)
    del thing  # the callback runs here; its exception cannot propagate
    assert ref() is None and batch._STOP_REQUESTED and printed == []
    other = Thing()
    ref = weakref.ref(other, lambda _ref: 1 / 0)
    del other  # any other dropped exception still reaches the default hook
    assert [type(u.exc_value) for u in printed] == [ZeroDivisionError]


def test_a_ctrl_c_dropped_by_a_finalizer_is_silent_and_stops_the_next_scan(monkeypatch):
    """The run's own Ctrl-C (the ctrl-c test once ended with status 0): KeyboardInterrupt
    raised inside a weakref callback is dropped by Python, so the run keeps the stop in
    _INTERRUPT_PENDING and its loop raises it before the next scan, silently."""
    import weakref

    from pipeline import batch

    monkeypatch.setattr(batch, "_INTERRUPT_PENDING", False)
    monkeypatch.setattr(sys, "unraisablehook", batch._ignore_stop_in_finalizers)
    printed = []
    monkeypatch.setattr(batch._ignore_stop_in_finalizers, "__defaults__", (printed.append,))
    screened = []
    monkeypatch.setattr(batch, "_one", lambda *a, **k: screened.append(a[0]) or a[0])

    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing, lambda _ref: batch.interrupt(signal.SIGINT, None))
    del thing  # the callback runs here; its KeyboardInterrupt cannot propagate
    assert ref() is None and batch._INTERRUPT_PENDING and printed == []
    with pytest.raises(KeyboardInterrupt):
        batch._execute([("a",), ("b",)], {}, {}, "local", None, 1, None, None, lambda r: None,
                       None, None)
    assert screened == []  # no scan started after the stop
