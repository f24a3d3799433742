"""Runs that share one output folder (issue #18, item 3): two screens at once on one OUT_DIR
over the same or overlapping scans, a scan another run holds, a lock left by a killed run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from pipeline.__main__ import main
from pipeline.locks import LOCK_DIR, Busy, hold, lock_path
from pipeline.run import source_key

ROOT = Path(__file__).resolve().parents[2]

#: Tiny phantoms screened at 2 mm without the lung mask's lesion net: about 2 s a scan on
#: 2 cores, with candidates.
PHANTOM = dict(shape_zyx=(36, 96, 96), spacing_mm=(3.0, 2.4, 2.4), n_nodules=2)
N_SCANS = 4
#: Seconds a subprocess run may take before the test gives up on it (a lock that never frees).
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """``(tree, config, {folder name: scan id})``: four phantom DICOM series and a cheap config."""
    from synth.phantom import write_phantom_scan

    root = tmp_path_factory.mktemp("shared")
    uids = {}
    for i in range(N_SCANS):
        folder, truth = write_phantom_scan(root / "tree" / f"patient{i:03d}", fmt="dicom",
                                           seed=120 + i, **PHANTOM)
        uids[folder.name] = str(truth["seriesuid"].iloc[0])
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["stages"] = ["ingest", "resample", "lungmask", "candidates"]
    config["resample"] = {"spacing_mm": [2.0, 2.0, 2.0]}
    config["lungmask"] = {"lesions": None}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return root / "tree", path, uids


def _args(scans, out: Path, which) -> list[str]:
    tree, config, _ = scans
    only = [a for i in which for a in ("--only", f"patient{i:03d}")]
    return ["run", str(tree), "--out", str(out), "--config", str(config), "--pictures", "0", *only]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_runs_left_behind():
    """A test that fails while its runs go on kills them (by pid) rather than leave them."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(args, log: Path) -> subprocess.Popen:
    """``python -m pipeline ARGS`` with one progress line per event on ``log``; one thread
    each, as the runs share the machine's cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--no-progress"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    _started.append(proc)
    return proc


def _wait_for(text: str, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in log.read_text():
        assert proc.poll() is None, f"the run ended before {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {TIMEOUT_S} s:\n{log.read_text()}"
        time.sleep(0.05)


def _screened(logs, name: str) -> int:
    """How many of the runs' logs say they screened ``name`` (not found it done)."""
    return sum(log.read_text().count(f" {name}: ok in ") for log in logs)


def _check_outputs(out: Path, uids) -> None:
    """Every scan of ``uids`` finished, each file whole, nothing half-written left."""
    for uid in uids:
        scan_dir = out / uid
        assert json.loads((scan_dir / "scan.json").read_text())["scan_id"] == uid
        assert set(pd.read_csv(scan_dir / "candidates.csv", dtype={"seriesuid": str})["seriesuid"]) == {uid}
        assert sitk.ReadImage(str(scan_dir / "lung_mask.nrrd")).GetSize()[0] > 0
        with h5py.File(scan_dir / "scan.h5", "r") as f:
            assert sorted(f) == ["candidates.candidates", "lungmask.lung_mask"]
        assert (scan_dir / "preview.png").stat().st_size > 0
    assert not list(out.rglob(".*.part*")) and not list(out.rglob(".tmp-*"))


def _run_files_of_one_run(out: Path, uids: dict) -> set[str]:
    """The folder names of the run whose run-level files ``out`` holds, after checking that
    all four are that run's: one entry per scan, each scan's candidates once."""
    scans = json.loads((out / "run.json").read_text())["scans"]
    names = [Path(s["source"]).name for s in scans]
    assert len(names) == len(set(names)) and {s["status"] for s in scans} <= {"ok", "cached"}
    cands = pd.read_csv(out / "candidates.csv", dtype={"seriesuid": str})
    assert list(cands["seriesuid"].drop_duplicates()) == sorted(uids[n] for n in names)
    for name in names:
        own = pd.read_csv(out / uids[name] / "candidates.csv", dtype={"seriesuid": str})
        pd.testing.assert_frame_equal(cands[cands["seriesuid"] == uids[name]].reset_index(drop=True), own)
    assert pd.read_csv(out / "errors.csv").empty
    assert f"{len(names)} scans done, 0 failed" in (out / "report.html").read_text()
    return set(names)


def test_two_runs_at_once_leave_the_outputs_of_one(scans, tmp_path):
    """Same scans: both finish, each scan is screened once, the CSVs are a single run's."""
    _, _, uids = scans
    which = (0, 1, 2)
    assert main([*_args(scans, tmp_path / "single", which), "--quiet"]) == 0
    shared, logs = tmp_path / "shared", [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(_args(scans, shared, which), log) for log in logs]
    assert [p.wait(timeout=TIMEOUT_S) for p in procs] == [0, 0], [log.read_text() for log in logs]
    for i in which:  # one run screened it, the other found it done (it waited if need be)
        assert _screened(logs, f"patient{i:03d}") == 1, [log.read_text() for log in logs]
    for name in ("candidates.csv", "errors.csv"):
        assert (shared / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert _run_files_of_one_run(shared, uids) == {f"patient{i:03d}" for i in which}
    _check_outputs(shared, [uids[f"patient{i:03d}"] for i in which])


def test_overlapping_runs_at_once_finish_every_scan(scans, tmp_path):
    """Scans 0-2 and 1-3 at once: every scan done once; the run-level files are the last run's."""
    _, _, uids = scans
    out, logs = tmp_path / "out", [tmp_path / "a.log", tmp_path / "b.log"]
    sets = [(0, 1, 2), (1, 2, 3)]
    procs = [_start(_args(scans, out, which), log) for which, log in zip(sets, logs)]
    assert [p.wait(timeout=TIMEOUT_S) for p in procs] == [0, 0], [log.read_text() for log in logs]
    for i in range(N_SCANS):
        assert _screened(logs, f"patient{i:03d}") == 1, [log.read_text() for log in logs]
    last = _run_files_of_one_run(out, uids)
    assert last in [{f"patient{i:03d}" for i in which} for which in sets]
    _check_outputs(out, list(uids.values()))


def test_a_run_goes_round_a_scan_another_holds_and_comes_back_to_it(scans, tmp_path):
    """A scan held by another process is set aside and the others screened; a series whose
    outputs another process is writing (another input of it) waits to be written; the run
    says when it waits, and finishes each once the holder lets go."""
    tree, _, uids = scans
    out, log = tmp_path / "out", tmp_path / "run.log"
    with hold(lock_path(out, source_key(tree / "patient000"))):  # as another run would
        with hold(lock_path(out, f"scan-{uids['patient001']}")):
            proc = _start(_args(scans, out, (0, 1)), log)
            _wait_for("patient001: waiting for another run", log, proc)
            text = log.read_text()
            assert "patient000: another run on this output folder is screening it" in text
            assert "patient001: candidates done" in text and "patient001: write started" not in text
            time.sleep(0.5)
            assert proc.poll() is None  # nothing written yet but the stage cache:
            assert [p.name for p in (out / uids["patient001"]).iterdir()] == ["scan.h5"]
        _wait_for("patient000: waiting for another run", log, proc)
        text = log.read_text()
        assert " patient001: ok in " in text and " patient000: ok in " not in text
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting
    assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()
    assert " patient000: ok in " in log.read_text()
    _check_outputs(out, [uids["patient000"], uids["patient001"]])


def test_the_lock_of_a_killed_run_does_not_block_the_next(scans, tmp_path):
    """kill -9 inside a scan's screen leaves its lock file; the same command then finishes."""
    tree, _, uids = scans
    out, log = tmp_path / "out", tmp_path / "killed.log"
    proc = _start(_args(scans, out, (0,)), log)
    _wait_for("patient000: lungmask started", log, proc)  # inside the scan, its lock held
    lock = lock_path(out, source_key(tree / "patient000"))
    with pytest.raises(Busy):
        with hold(lock, wait=False):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / uids["patient000"] / "scan.json").exists()
    assert lock.exists()
    rerun = tmp_path / "rerun.log"
    started = time.monotonic()
    assert _start(_args(scans, out, (0,)), rerun).wait(timeout=TIMEOUT_S) == 0, rerun.read_text()
    assert "waiting" not in rerun.read_text() and " patient000: ok in " in rerun.read_text()
    assert time.monotonic() - started < TIMEOUT_S
    assert sorted(p.name for p in (out / LOCK_DIR).iterdir()) == sorted(
        [f"{source_key(tree / 'patient000')}.lock", f"scan-{uids['patient000']}.lock", "run.lock"])
    _check_outputs(out, [uids["patient000"]])


def test_a_file_system_without_locks_warns_once_and_runs_on(tmp_path, monkeypatch, caplog):
    import errno
    import logging

    import pipeline.locks as locks

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_warned_no_locks", False)
    entered = 0
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"):
        for name in ("a", "b"):
            with hold(lock_path(tmp_path, name), wait=False):
                entered += 1
    assert entered == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: the file system refuses file locks (no locks available); runs sharing "
        "this output folder are not kept apart"]
