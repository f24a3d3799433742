"""LUNA16 10-fold cross-validation (``lungscreen train --fold K / --folds all``) and the
per-scan preprocessing cache it shares between folds (pipeline.luna16_cache)."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nets.callbacks import Checkpoint
from pipeline import luna16, luna16_cache, training
from synth.luna16_tree import ANNOTATION_COLUMNS, write_luna16_tree
from synth.phantom import write_phantom_scan

REPO = Path(__file__).resolve().parents[2]
N_SCANS = 30
#: The smallest phantoms that still hold a nodule: 61x78x78 at 1 mm (their lungs are under
#: segment_lungs' 20 mL, so the mask is empty: fine for candidates_V2 negatives).
SHAPE, SPACING = (16, 32, 32), (4.0, 2.5, 2.5)
PREP = dict(negatives="candidates", size_mm=16.0, spacing_mm=1.0, max_neg_per_scan=4,
            lung_neg_per_scan=0, detect_max_candidates=None, seed=0, device="cpu")


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """30 phantom scans (3 per subset) in LUNA16's layout, one nodule each, 6 easy negatives."""
    bench = tmp_path_factory.mktemp("bench")
    folder = bench / "all"
    folder.mkdir()
    anns = []
    for i in range(N_SCANS):
        _, ann = write_phantom_scan(folder, fmt="mhd", shape_zyx=SHAPE, spacing_mm=SPACING, seed=i,
                                    n_nodules=1, diameter_range_mm=(6.0, 10.0), scan_id=f"scan-{i:03d}")
        anns.append(ann)
    pd.concat(anns)[ANNOTATION_COLUMNS].to_csv(folder / "annotations.csv", index=False)
    pd.DataFrame(columns=ANNOTATION_COLUMNS).to_csv(folder / "annotations_excluded.csv", index=False)
    out = tmp_path_factory.mktemp("luna16")
    write_luna16_tree(bench, out, negatives_per_scan=6)
    return out


@pytest.fixture(scope="module")
def reference_cache(tree, tmp_path_factory):
    """The cache of one uninterrupted preprocessing run (in this process)."""
    cache = tmp_path_factory.mktemp("reference") / "cache"
    luna16_cache.preprocess_luna16(tree, cache, workers=1, progress="quiet", **PREP)
    return cache


class Opens:
    """Records every file read during a phase: Python ``open`` (audit hook), cache entries
    (:func:`pipeline.luna16_cache.open_entry`) and scans (:func:`pipeline.luna16.read_luna_scan`),
    each as ``(phase, path)``; the phase is set by the wrappers in :meth:`install`."""

    hook_installed = False
    active = None

    def __init__(self):
        self.events, self.phase = [], ("setup",)

    def install(self, monkeypatch):
        Opens.active = self
        if not Opens.hook_installed:  # audit hooks cannot be removed: one, for the session
            sys.addaudithook(lambda ev, args: Opens.active is not None and ev == "open"
                             and isinstance(args[0], (str, os.PathLike))
                             and Opens.active.events.append((Opens.active.phase, str(args[0]))))
            Opens.hook_installed = True
        for mod, name in ((luna16_cache, "open_entry"), (luna16, "read_luna_scan")):
            orig = getattr(mod, name)
            monkeypatch.setattr(mod, name, self._recording(orig))
        # the phases: a fold's training is train_classifier(fold=K) outside its preprocessing
        # and its prediction
        self._phase(monkeypatch, training, "train_classifier", lambda a, kw: ("train", kw["fold"]))
        self._phase(monkeypatch, luna16_cache, "preprocess_luna16", lambda a, kw: ("preprocess",))
        self._phase(monkeypatch, training, "predict_fold", lambda a, kw: ("predict", self.phase[1]))
        monkeypatch.setattr(Opens, "active", self)

    def _recording(self, orig):
        def wrapper(path, *a, **kw):
            self.events.append((self.phase, str(path)))
            return orig(path, *a, **kw)
        return wrapper

    def _phase(self, monkeypatch, mod, name, phase_of):
        orig = getattr(mod, name)

        @functools.wraps(orig)
        def wrapper(*a, **kw):
            before, self.phase = self.phase, phase_of(a, kw)
            try:
                return orig(*a, **kw)
            finally:
                self.phase = before
        monkeypatch.setattr(mod, name, wrapper)

    def reads(self, phase, subset=None):
        return [p for ph, p in self.events if ph == phase
                and (subset is None or f"{os.sep}subset{subset}{os.sep}" in p)]


def _interrupt_fold(monkeypatch, fold, epoch):
    """Ctrl-C in ``fold``'s training just after epoch ``epoch``'s checkpoint."""
    orig = Checkpoint.after_epoch

    def interrupted(self):
        orig(self)
        if self.path.parent.name == f"fold_{fold}" and self.learn.epoch == epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(Checkpoint, "after_epoch", interrupted)


def test_ten_folds_end_to_end_resumed_and_never_reading_the_test_subset(tree, tmp_path, monkeypatch,
                                                                          caplog, capsys):
    """--folds all on 30 scans: interrupted in fold 2, rerun: folds 0-1 skipped, fold 2 resumed
    from its checkpoint, ten predictions.csv covering every candidate of every scan once;
    no fold's training opened a file of its test subset."""
    from pipeline.__main__ import main as lungscreen

    out = tmp_path / "cv"
    args = ["--data", str(tree), "--out", str(out), "--folds", "all", "--epochs", "2",
            "--batch-size", "8", "--widths", "4", "--size-mm", "16", "--max-neg-per-scan", "4",
            "--device", "cpu", "--prep-workers", "2"]  # progress: log lines (stderr is no terminal)
    opens = Opens()
    opens.install(monkeypatch)
    with monkeypatch.context() as m:
        _interrupt_fold(m, fold=2, epoch=0)
        with pytest.raises(KeyboardInterrupt):
            training.main(args)
    assert [_done(out / f"fold_{k}") for k in range(4)] == [True, True, False, False]
    err = capsys.readouterr().err  # the batch log: preprocessing, then fold by fold, epoch by epoch
    assert f"preprocess: {N_SCANS} of {N_SCANS} scans to preprocess" in err
    assert f"[{N_SCANS}/{N_SCANS} scans]" in err
    assert "fold 1: fold 2 of 10" in err and "fold 1: epoch 2/2 train_loss=" in err
    assert "fold 1: done: " in err and "fold 2: training on 24 scans" in err
    assert "fold 2: epoch" not in err  # interrupted (just after its first checkpoint)
    state = torch.load(out / "fold_2" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0
    epoch0 = state["cbs"]["recorder"]["values"][0]
    done_before = {k: (out / f"fold_{k}" / "fold.json").stat().st_mtime_ns for k in (0, 1)}

    caplog.set_level("INFO", logger="nets.callbacks.checkpoint")
    assert lungscreen(["train", *args]) == 0
    err = capsys.readouterr().err
    assert "fold 0: done already" in err and "fold 1: done already" in err and "preprocess:" not in err
    assert "fold 2: epoch 1/2" not in err and "fold 2: epoch 2/2" in err and "fold 9: fold 10 of 10" in err
    assert "resumed from" in caplog.text and "fold_2" in caplog.text and "after epoch 0" in caplog.text
    assert {k: (out / f"fold_{k}" / "fold.json").stat().st_mtime_ns for k in (0, 1)} == done_before
    log_after = pd.read_csv(out / "fold_2" / "train_log.csv")
    assert log_after["epoch"].tolist() == [0, 1]
    assert log_after.iloc[0]["train_loss"] == pytest.approx(epoch0["train_loss"], rel=1e-9)  # kept

    # the preprocessing ran once (two worker processes), in the first run
    log_lines = (out / "cache" / luna16_cache.LOG_NAME).read_text().splitlines()
    assert len(log_lines) == N_SCANS

    # ten folds, every scan scored in exactly one, every candidate once
    scans = luna16.find_luna_scans(tree)
    cands = luna16.read_candidates(tree)
    seen = []
    for k in range(10):
        info = json.loads((out / f"fold_{k}" / "fold.json").read_text())
        subset_uids = sorted(scans.loc[scans["subset"] == f"subset{k}", "seriesuid"])
        assert info["done"] is True and info["fold"] == k and info["test_subset"] == k
        assert info["val_subset"] == (k + 1) % 10
        assert sorted(info["train_subsets"]) == sorted(set(range(10)) - {k, (k + 1) % 10})
        assert sorted(info["test_seriesuids"]) == subset_uids and len(subset_uids) == 3
        pred = pd.read_csv(out / f"fold_{k}" / "predictions.csv", dtype={"seriesuid": str})
        assert pred.columns.tolist() == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
        assert pred["probability"].between(0, 1).all()
        assert sorted(set(pred["seriesuid"])) == subset_uids
        mine = cands[cands["seriesuid"].isin(subset_uids)]
        key = ["seriesuid", "coordX", "coordY", "coordZ"]
        pd.testing.assert_frame_equal(pred[key].sort_values(key).reset_index(drop=True),
                                      mine[key].sort_values(key).reset_index(drop=True),
                                      check_exact=False, atol=1e-6)
        for name in ("nodule_cnn3d.pt", "nodule_cnn3d.md", "train_log.csv", "checkpoint.pt"):
            assert (out / f"fold_{k}" / name).is_file()
        seen += info["test_seriesuids"]
        # fold k's training read the entries of its 9 other subsets, nothing of subset k
        train_reads = opens.reads(("train", k))
        assert not opens.reads(("train", k), subset=k), f"fold {k} read its test subset"
        assert {Path(p).parent.name for p in train_reads if p.endswith(".h5")} == \
            {f"subset{j}" for j in range(10) if j != k}
        assert not [p for p in train_reads if p.endswith((".mhd", ".raw"))]
        predict_reads = [p for p in opens.reads(("predict", k))  # the data, not modules or weights
                         if p.startswith((str(tree), str(out / "cache")))]
        assert predict_reads and all(f"{os.sep}subset{k}{os.sep}" in p for p in predict_reads)
    assert sorted(seen) == sorted(scans["seriesuid"])

    # the protocol's last step: the ten folds pooled into one LUNA16 FROC and the submission
    assert lungscreen(["evaluate", "--folds", str(out), "--data", str(tree), "--n-bootstrap", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[2:13]] == [str(k) for k in range(10)] + ["pooled"]
    summary = json.loads((out / "cpm.json").read_text())
    assert summary["pooled"]["n_scans"] == len(scans) and 0.0 <= summary["pooled"]["cpm"] <= 1.0
    submission = pd.read_csv(out / "submission.csv", dtype={"seriesuid": str})
    assert submission.columns.tolist() == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(submission) == sum(len(pd.read_csv(out / f"fold_{k}" / "predictions.csv"))
                                  for k in range(10))

    # the check catches a wrong split: a fold whose training takes in subset 3 is flagged
    wrong = Opens()
    wrong.install(monkeypatch)
    monkeypatch.setattr(training, "fold_subsets",
                        lambda n, fold: {"train": list(range(n)), "val": (fold + 1) % n, "test": fold})
    manifest = luna16_cache.preprocess_luna16(tree, out / "cache", workers=1, progress="quiet", **PREP)
    assert manifest.attrs["computed"] == []  # the folds' cache, as it was
    wrong.phase = ("train", 3)
    info = training._fold_info(manifest, 3, tree)
    luna16_cache.EntryCubes(info["_train_entries"])
    assert wrong.reads(("train", 3), subset=3)


def _done(folder):
    return training._fold_done(folder) is not None


def _entries(cache):
    """The finished entries (not the temporary ``.<name>.part.h5`` of a run under way)."""
    return [p for p in cache.glob("subset*/*.h5") if not p.name.startswith(".")]


def test_preprocessing_killed_and_restarted(tree, reference_cache, tmp_path):
    """kill -9 of a preprocessing run (two workers) after a few scans, then a rerun: no scan
    computed twice, and the cache byte-identical to an uninterrupted run's."""
    cache = tmp_path / "cache"
    code = ("from pipeline.luna16_cache import preprocess_luna16\n"
            "if __name__ == '__main__':\n"
            f"    preprocess_luna16({str(tree)!r}, {str(cache)!r}, workers=2, progress='log', **{PREP!r})\n")
    script = tmp_path / "prep.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_entries(cache)) < 4 and time.monotonic() < deadline:
            assert proc.poll() is None, "the preprocessing ended before it was killed"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, as kill -9 of a job
        proc.wait()
    first = {p.name.split(".")[0] for p in _entries(cache)}
    assert 4 <= len(first) < N_SCANS, "killed too late to test anything"
    manifest = luna16_cache.preprocess_luna16(tree, cache, workers=1, progress="quiet", **PREP)
    second = {r["seriesuid"] for r in manifest.attrs["computed"]}
    assert not first & second and first | second == set(manifest["seriesuid"])
    done = [line.split()[2] for line in (cache / luna16_cache.LOG_NAME).read_text().splitlines()]
    assert len(done) == len(set(done)) and set(done) >= second  # no scan computed twice
    assert not list(cache.glob("subset*/.*part*"))  # no temporary file left
    ref = sorted(p.relative_to(reference_cache) for p in _entries(reference_cache))
    got = sorted(p.relative_to(cache) for p in _entries(cache))
    assert got == ref and len(ref) == N_SCANS
    assert all((cache / p).read_bytes() == (reference_cache / p).read_bytes() for p in ref)
    # a third run computes nothing and opens no scan
    again = luna16_cache.preprocess_luna16(tree, cache, workers=1, progress="quiet", **PREP)
    assert again.attrs["computed"] == []


def test_entry_holds_the_screens_volumes_and_cubes(tmp_path):
    """A detector entry: the screen's ct_1mm and lung mask, the detector's candidates as the
    test rows, training cubes cut from ct_1mm (as classify cuts them) with the nodule as a
    positive, lung points as negatives, at most max_neg_per_scan negatives."""
    from stages.candidates import find_candidates
    from stages.ingest import read_scan
    from stages.lungmask import segment_lungs
    from stages.patches import extract_patches
    from stages.resample import resample

    path, ann = write_phantom_scan(tmp_path / "subset0", fmt="mhd", shape_zyx=(20, 40, 40),
                                   spacing_mm=(4.0, 2.5, 2.5), seed=3, n_nodules=1,
                                   diameter_range_mm=(8.0, 10.0), scan_id="s")
    ann = ann[ANNOTATION_COLUMNS]
    entry = tmp_path / "cache" / "s.h5"
    res = luna16_cache.preprocess_scan(path, entry, seriesuid="s", subset="subset0", candidates=None,
                                       annotations=ann, excluded=ann.iloc[:0],
                                       **{**PREP, "negatives": "detector", "max_neg_per_scan": 5,
                                          "lung_neg_per_scan": 3}, log_dir=tmp_path)
    ct = resample(read_scan(path), device="cpu")
    mask = segment_lungs(ct)
    found = find_candidates(ct, mask, device="cpu")
    got_ct, cands = luna16_cache.read_test_scan(entry)
    with luna16_cache.open_entry(entry) as h5:
        start, full_shape = h5.attrs["crop_start_zyx"], tuple(h5.attrs["ct_1mm_shape"])
    box = tuple(slice(a, a + n) for a, n in zip(start, got_ct.shape))
    assert full_shape == ct.shape and np.array_equal(got_ct.array, ct.array[box])
    assert got_ct.spacing_mm == ct.spacing_mm
    np.testing.assert_allclose(got_ct.origin_mm, ct.index_to_world(start))
    assert len(cands) == len(found) == res["n_test"] > 5
    # the crop is smaller than the scan, and every candidate's cube is the whole scan's
    assert np.prod(got_ct.shape) < 0.9 * np.prod(ct.shape)
    xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy()
    assert np.array_equal(extract_patches(got_ct, centres_xyz_mm=xyz, size_mm=16.0, spacing_mm=1.0),
                          extract_patches(ct, centres_xyz_mm=xyz, size_mm=16.0, spacing_mm=1.0))
    np.testing.assert_allclose(cands[["coordX", "coordY", "coordZ"]], found[["coordX", "coordY", "coordZ"]])
    assert cands["finding"].tolist() == found["finding"].tolist()
    with luna16_cache.open_entry(entry) as h5:
        assert np.array_equal(h5["lung_mask"][:], mask.array[box]) and mask.array[box].sum() == mask.array.sum()
        labels, centres, cubes = h5["train/labels"][:], h5["train/centre_xyz_mm"][:], h5["train/cubes"][:]
    assert (labels == 0).sum() == 5 and (labels == 1).sum() >= 1
    nodule = ann[["coordX", "coordY", "coordZ"]].to_numpy()
    assert np.isclose(centres[labels == 1], nodule).all(axis=1).any()  # the annotation itself
    expect = extract_patches(ct, centres_xyz_mm=centres, size_mm=16.0, spacing_mm=1.0)
    assert cubes.dtype == np.int16 and np.abs(cubes - expect).max() <= 0.5
    assert (tmp_path / luna16_cache.LOG_NAME).read_text().startswith("done subset0 s ")


def test_candidates_entry_leaves_out_negatives_near_excluded_findings(tmp_path):
    path, ann = write_phantom_scan(tmp_path, fmt="mhd", shape_zyx=SHAPE, spacing_mm=SPACING, seed=1,
                                   n_nodules=1, diameter_range_mm=(6.0, 8.0), scan_id="s")
    c = ann.iloc[0]
    rows = [("s", c.coordX, c.coordY, c.coordZ, 1), ("s", c.coordX + 30, c.coordY, c.coordZ, 0),
            ("s", c.coordX - 30, c.coordY, c.coordZ, 0)]
    cands = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "class"])
    excl = pd.DataFrame([("s", c.coordX + 31, c.coordY, c.coordZ, 4.0)], columns=ANNOTATION_COLUMNS)
    luna16_cache.preprocess_scan(path, tmp_path / "e.h5", seriesuid="s", subset="subset0",
                                 candidates=cands, annotations=ann[ANNOTATION_COLUMNS], excluded=excl,
                                 **PREP)
    _, test = luna16_cache.read_test_scan(tmp_path / "e.h5")
    assert test["class"].tolist() == [1, 0, 0]  # every candidate is scored
    with luna16_cache.open_entry(tmp_path / "e.h5") as h5:
        assert h5["train/labels"][:].tolist() == [1, 0]  # not the one next to the excluded finding
        assert h5["train/centre_xyz_mm"][1, 0] == pytest.approx(c.coordX - 30)


def test_fold_subsets_and_errors(tree, tmp_path, capsys):
    assert training.fold_subsets(10, 0) == {"train": [2, 3, 4, 5, 6, 7, 8, 9], "val": 1, "test": 0}
    with pytest.raises(ValueError, match="fold must be an int in 0..9"):
        training.fold_subsets(10, 10)
    with pytest.raises(ValueError, match="at least 3 subsets"):
        training.fold_subsets(2, 0)
    base = ["--data", str(tree), "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    assert training.main([*base, "--fold", "10"]) == 2
    assert "fold must be an int in 0..9" in capsys.readouterr().err
    assert training.main([*base, "--fold", "1", "--folds", "all"]) == 2
    assert "not both" in capsys.readouterr().err
    assert training.main([*base, "--folds", "1,x"]) == 2
    assert "--folds takes" in capsys.readouterr().err
    (tmp_path / "bench" / "train").mkdir(parents=True)
    assert training.main(["--data", str(tmp_path / "bench"), "--out", str(tmp_path / "o"),
                          "--folds", "all"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="negatives must be one of"):
        luna16_cache.resolve_negatives(tree, "random")
    assert luna16_cache.resolve_negatives(tree, "auto") == "candidates"
