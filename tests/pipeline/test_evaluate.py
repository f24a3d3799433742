"""LUNA16 FROC: hand-computed answers and a literal re-implementation of the official loop."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluate import FP_RATES, _froc_curve, _roc_counts, froc, main, read_seriesuids, write_froc


def ann_df(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])


def cand_df(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])


ONE_NODULE = ann_df([("a", 0.0, 0.0, 0.0, 10.0)])


# ----------------------------------------------------------------------------- hits
@pytest.mark.parametrize("dist_mm, hit", [(4.99, True), (5.01, False), (5.0, False)])
def test_hit_is_strictly_inside_the_radius(dist_mm, hit):
    # official: dist**2 < (diameter/2)**2, so exactly on the radius is a miss
    cand = cand_df([("a", 0.0, dist_mm, 0.0, 0.9)])
    res = froc(ONE_NODULE, cand, n_bootstrap=0)
    assert res.n_true_positives == int(hit)
    assert res.n_false_positives == int(not hit)
    assert res.cpm == pytest.approx(1.0 if hit else 0.0)


def test_hit_distance_is_3d():
    # 3-4-0 in x,y plus 2 in z: sqrt(29) = 5.385 > 5 -> miss; without z it would be 5.0 (miss too)
    near = cand_df([("a", 2.0, 2.0, 2.0, 0.9)])   # sqrt(12) = 3.46 -> hit
    far = cand_df([("a", 3.0, 3.0, 2.0, 0.9)])    # sqrt(22) = 4.69 -> hit
    farther = cand_df([("a", 3.0, 3.0, 3.0, 0.9)])  # sqrt(27) = 5.196 -> miss
    assert froc(ONE_NODULE, near, n_bootstrap=0).n_true_positives == 1
    assert froc(ONE_NODULE, far, n_bootstrap=0).n_true_positives == 1
    assert froc(ONE_NODULE, farther, n_bootstrap=0).n_true_positives == 0


# ----------------------------------------------------------------------------- excluded findings
def test_marks_on_excluded_findings_are_neither_tp_nor_fp():
    excluded = ann_df([("a", 100.0, 0.0, 0.0, -1.0),     # -1: 10 mm diameter, radius 5
                       ("a", 0.0, 100.0, 0.0, 2.0)])     # radius 1
    cand = cand_df([("a", 0.0, 0.0, 0.0, 0.5),           # the nodule
                    ("a", 104.0, 0.0, 0.0, 0.9),         # 4 mm from the -1 finding: ignored
                    ("a", 0.0, 100.5, 0.0, 0.8),         # 0.5 mm from the 2 mm finding: ignored
                    ("a", 0.0, 101.5, 0.0, 0.7),         # 1.5 mm from it: false positive
                    ("a", 106.0, 0.0, 0.0, 0.6)])        # 6 mm from the -1 finding: false positive
    res = froc(ONE_NODULE, cand, excluded=excluded, n_bootstrap=0)
    assert (res.n_true_positives, res.n_false_positives, res.n_ignored) == (1, 2, 2)
    # entries: FP .7, FP .6, TP .5 -> curve (0,0) (1,0) (2,0) (2,1): found only at 2 FP/scan
    np.testing.assert_allclose(res.fps_per_scan, [0.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(res.sensitivity, [0.0, 0.0, 0.0, 1.0])
    assert res.sensitivity_at[1.0] == 0.0 and res.sensitivity_at[2.0] == 1.0
    assert res.cpm == pytest.approx(3 / 7)
    without = froc(ONE_NODULE, cand, n_bootstrap=0)
    assert without.n_false_positives == 4


def test_mark_on_nodule_and_excluded_finding_counts_for_the_nodule():
    excluded = ann_df([("a", 1.0, 0.0, 0.0, 4.0)])
    cand = cand_df([("a", 0.5, 0.0, 0.0, 0.9)])
    res = froc(ONE_NODULE, cand, excluded=excluded, n_bootstrap=0)
    assert (res.n_true_positives, res.n_false_positives, res.n_ignored) == (1, 0, 0)


# ----------------------------------------------------------------------------- double hits
def test_several_hits_on_one_nodule_count_once_with_the_max_score():
    cand = cand_df([("a", 1.0, 0.0, 0.0, 0.6), ("a", -1.0, 0.0, 0.0, 0.9),
                    ("a", 50.0, 0.0, 0.0, 0.7)])
    res = froc(ONE_NODULE, cand, n_bootstrap=0)
    assert (res.n_true_positives, res.n_false_positives, res.n_candidates) == (1, 1, 3)
    # the nodule's score is 0.9 (above the FP): sensitivity 1 at 0 FP; the 0.6 mark is no FP
    np.testing.assert_allclose(res.fps_per_scan, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(res.sensitivity, [0.0, 1.0, 1.0])
    assert res.cpm == pytest.approx(1.0)


# ----------------------------------------------------------------------------- cap
def test_cap_keeps_the_100_top_scored_marks():
    far = [("a", 50.0 + i, 0.0, 0.0, 0.01 * (i + 1)) for i in range(100)]  # 0.01 .. 1.00
    cand = cand_df(far + [("a", 0.0, 0.0, 0.0, 0.001)])  # the only hit has the lowest score
    capped = froc(ONE_NODULE, cand, n_bootstrap=0)
    assert (capped.n_candidates, capped.n_true_positives, capped.n_false_positives) == (100, 0, 100)
    assert capped.candidate_recall == 1.0  # recall ignores the cap and the score
    uncapped = froc(ONE_NODULE, cand, n_bootstrap=0, max_marks_per_scan=0)
    assert (uncapped.n_candidates, uncapped.n_true_positives) == (101, 1)
    # the cap is per scan: the same marks split over two scans are all kept
    two = cand.assign(seriesuid=["a"] * 50 + ["b"] * 51)
    split = froc(ONE_NODULE, two, seriesuids=["a", "b"], n_bootstrap=0)
    assert split.n_candidates == 101


def test_cap_drops_marks_tied_at_the_cut_like_the_official_script():
    cand = cand_df([("a", 50.0 + i, 0.0, 0.0, 0.5) for i in range(101)])
    assert froc(ONE_NODULE, cand, n_bootstrap=0).n_candidates == 0


# ----------------------------------------------------------------------------- curve
def _two_nodules_four_scans():
    ann = ann_df([("A", 0.0, 0.0, 0.0, 10.0), ("B", 0.0, 0.0, 0.0, 10.0)])
    cand = cand_df([("A", 0.0, 0.0, 0.0, 0.9),    # hit A
                    ("C", 0.0, 0.0, 0.0, 0.6),    # FP on a scan without findings
                    ("B", 1.0, 0.0, 0.0, 0.6)])   # hit B, tied with the FP
    return ann, cand


def test_interpolation_between_operating_points():
    ann, cand = _two_nodules_four_scans()
    res = froc(ann, cand, seriesuids=["A", "B", "C", "D"], n_bootstrap=0)
    # curve: (0, 0) -> (0, .5) at p=.9 -> (1 FP / 4 scans, 1.0) at p=.6
    np.testing.assert_allclose(res.fps_per_scan, [0.0, 0.0, 0.25])
    np.testing.assert_allclose(res.sensitivity, [0.0, 0.5, 1.0])
    assert res.sensitivity_at[0.125] == pytest.approx(0.75)
    assert all(res.sensitivity_at[r] == pytest.approx(1.0) for r in FP_RATES[1:])
    assert res.cpm == pytest.approx((0.75 + 6.0) / 7.0)


def _step_on_half_fp_per_scan():
    """40 scans, 4 nodules (scans s0..s3, one each, 10 mm at the origin), 20 FPs elsewhere.

    By descending probability: nodule 1 hit (0.9); FPs 1-9 (0.89 .. 0.81); FPs 10 and 11
    tied with the nodule 2 hit (0.80); FPs 12-20 (0.79 .. 0.71); nodule 3 hit (0.70);
    nodule 4 missed.
    """
    ann = ann_df([(f"s{i}", 0.0, 0.0, 0.0, 10.0) for i in range(4)])
    fp_scores = [0.89 - 0.01 * i for i in range(9)] + [0.80, 0.80] + [0.79 - 0.01 * i for i in range(9)]
    rows = [("s0", 1.0, 0.0, 0.0, 0.9), ("s1", 0.0, 1.0, 0.0, 0.8), ("s2", 0.0, 0.0, 1.0, 0.7)]
    rows += [(f"s{4 + i}", 50.0, 0.0, 0.0, p) for i, p in enumerate(fp_scores)]
    return ann, cand_df(rows), [f"s{i}" for i in range(40)]


def test_operating_points_are_read_on_the_official_grid():
    ann, cand, uids = _step_on_half_fp_per_scan()
    res = froc(ann, cand, seriesuids=uids, n_bootstrap=0)
    # ROC counts (FP, TP) at each distinct score: (0,1) at .9, (1,1)..(9,1), (11,2) at the tie
    # .8, (12,2)..(20,2), (20,3) at .7; collinear points dropped, (0,0) first:
    #   (0,0) (0,1) (9,1) (11,2) (20,2) (20,3)  ->  / 40 scans, / 4 nodules:
    np.testing.assert_allclose(res.fps_per_scan, [0, 0, 0.225, 0.275, 0.5, 0.5])
    np.testing.assert_allclose(res.sensitivity, [0, 0.25, 0.25, 0.5, 0.5, 0.75])
    # grid linspace(0.125, 8, 10001), step 7.875 / 10000 = 0.0007875; nearest grid points:
    #   1/8 -> index 0 = 0.125 (flat segment at 0.25)                        -> 0.25
    #   1/4 -> (0.25 - 0.125) / 0.0007875 = 158.73 -> index 159 = 0.2502125, on the tie's
    #          diagonal (0.225, 0.25)-(0.275, 0.5): 0.25 + 0.25 * 0.0252125 / 0.05 -> 0.3760625
    #          (np.interp at exactly 0.25 would give 0.375)
    #   1/2 -> 0.375 / 0.0007875 = 476.19 -> index 476 = 0.49985, on (0.275, 0.5)-(0.5, 0.5),
    #          before the step the 20th FP ends at 0.5                          -> 0.5
    #          (np.interp at exactly 0.5 takes the step's top, 0.75)
    #   1, 2, 4, 8 -> past the curve's last point (0.5, 0.75)                   -> 0.75
    expected = {0.125: 0.25, 0.25: 0.3760625, 0.5: 0.5, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    assert res.sensitivity_at == pytest.approx(expected, abs=1e-9)
    # CPM (0.25 + 0.3760625 + 0.5 + 4 * 0.75) / 7 = 4.1260625 / 7 (exact-rate reading: 4.375 / 7)
    assert res.cpm == pytest.approx(4.1260625 / 7, abs=1e-9)


def test_bootstrap_reads_the_same_grid_points():
    # 40 identical scans, each: nodule A hit (0.9), one FP (0.8), nodule B hit (0.6).  Every
    # bootstrap sample (scans drawn with replacement) is then the same curve as the whole:
    # counts (0,0) (0,40) (40,40) (40,80) -> FP/scan 0, 0, 1, 1; sensitivity 0, .5, .5, 1.
    # The step sits on 1 FP/scan, read at the grid point 0.9999125: 0.5 (exact rate: 1.0).
    # CPM = (0.5 * 4 + 1.0 * 3) / 7 = 5 / 7 (exact-rate reading: 5.5 / 7).
    uids = [f"s{i}" for i in range(40)]
    ann = ann_df([(u, 0.0, 0.0, 100.0 * k, 10.0) for u in uids for k in (0, 1)])
    cand = cand_df([(u, 0.0, 0.0, 0.0, 0.9) for u in uids] + [(u, 50.0, 0.0, 0.0, 0.8) for u in uids]
                   + [(u, 0.0, 0.0, 100.0, 0.6) for u in uids])
    res = froc(ann, cand, seriesuids=uids, n_bootstrap=50, seed=2)
    assert res.sensitivity_at[1.0] == pytest.approx(0.5)
    assert res.cpm == pytest.approx(5 / 7)
    assert res.cpm_ci95 == pytest.approx((5 / 7, 5 / 7))
    assert res.sensitivity_at_ci95[1.0] == pytest.approx((0.5, 0.5))


def test_operating_points_must_lie_on_the_grid():
    from pipeline.evaluate import operating_fps

    assert operating_fps(FP_RATES) == pytest.approx([0.125, 0.2502125, 0.49985, 0.9999125, 2.0000375,
                                                     4.0002875, 8.0], abs=1e-12)
    with pytest.raises(ValueError, match=r"within the official grid \[0.125, 8\]"):
        froc(ONE_NODULE, cand_df([]), fp_rates=[16.0], n_bootstrap=0)


def test_scans_without_findings_add_false_positives_per_scan():
    ann, cand = _two_nodules_four_scans()
    six = froc(ann, cand, seriesuids=list("ABCDEF"), n_bootstrap=0)
    # 1 FP over 6 scans: sensitivity .5 + .5 * (0.125 / (1/6)) at 1/8 FP/scan
    assert six.sensitivity_at[0.125] == pytest.approx(0.875)
    assert six.n_scans == 6
    # default scan list = scans with annotations: the FP on scan C is not evaluated
    default = froc(ann, cand, n_bootstrap=0)
    assert default.n_scans == 2 and default.n_false_positives == 0
    assert default.cpm == pytest.approx(1.0)


def test_perfect_system_has_cpm_one(rng):
    n = 12
    ann = ann_df([(f"s{i}", *rng.normal(0, 50, 3), rng.uniform(4, 20)) for i in range(n)])
    hits = [(r.seriesuid, r.coordX + 0.5, r.coordY, r.coordZ, 0.9 + 0.001 * i)
            for i, r in enumerate(ann.itertuples())]
    fps = [(f"s{i % n}", 500.0, 500.0, 500.0, 0.5 * rng.random()) for i in range(5 * n)]
    res = froc(ann, cand_df(hits + fps), n_bootstrap=200, seed=1)
    assert res.cpm == pytest.approx(1.0)
    assert res.cpm_ci95 == pytest.approx((1.0, 1.0))
    assert res.n_nodules == n and res.candidate_recall == 1.0


def test_missed_nodules_lower_the_sensitivity():
    ann = ann_df([("a", 0.0, 0.0, 0.0, 10.0), ("a", 100.0, 0.0, 0.0, 10.0)])
    cand = cand_df([("a", 0.0, 0.0, 0.0, 0.9)])
    res = froc(ann, cand, n_bootstrap=0)
    assert res.cpm == pytest.approx(0.5)
    assert res.candidate_recall == 0.5


# ----------------------------------------------------------------------------- ROC = sklearn
@pytest.mark.parametrize("n", [3, 40, 500])
def test_roc_points_match_scikit_learn(n, rng):
    metrics = pytest.importorskip("sklearn.metrics")
    y = (rng.random(n) < 0.3).astype(float)
    y[0], y[1] = 1.0, 0.0
    score = np.round(rng.random(n), 2)  # ties included
    fps, tps, thr = _roc_counts(y, score)
    fpr, tpr, thr_ref = metrics.roc_curve(y, score)
    np.testing.assert_allclose(fps / fps[-1], fpr)
    np.testing.assert_allclose(tps / tps[-1], tpr)
    np.testing.assert_allclose(thr[1:], thr_ref[1:])


def test_weighted_curve_equals_repeated_entries(rng):
    # the bootstrap weights entries by how often their scan was drawn
    y = (rng.random(60) < 0.4).astype(float)
    score = np.round(rng.random(60), 1)
    w = rng.integers(1, 4, 60).astype(float)
    fw, sw, _ = _froc_curve(y, score, 7, 11.0, w)
    fr, sr, _ = _froc_curve(np.repeat(y, w.astype(int)), np.repeat(score, w.astype(int)), 7, 11.0)
    grid = np.linspace(0.01, 10, 300)
    np.testing.assert_allclose(np.interp(grid, fw, sw), np.interp(grid, fr, sr))


# ----------------------------------------------------------------------------- official loop
def official_cpm(ann, exc, cand, uids, cap=100):
    """Straight re-implementation of noduleCADEvaluationLUNA16.evaluateCAD's loops."""
    metrics = pytest.importorskip("sklearn.metrics")
    gt, prob, excl = [], [], []
    for uid in uids:
        c = cand[cand.seriesuid == uid]
        marks = list(zip(c.coordX, c.coordY, c.coordZ, c.probability))
        if cap > 0 and len(marks) > cap:
            thr = sorted((m[3] for m in marks), reverse=True)[cap]
            marks = [m for m in marks if m[3] > thr][:cap]
        remaining = set(range(len(marks)))
        findings = [(r, "in") for r in ann[ann.seriesuid == uid].itertuples()]
        findings += [(r, "ex") for r in exc[exc.seriesuid == uid].itertuples()]
        for r, state in findings:
            d = r.diameter_mm if r.diameter_mm >= 0 else 10.0
            matches = [k for k, m in enumerate(marks)
                       if (r.coordX - m[0]) ** 2 + (r.coordY - m[1]) ** 2 + (r.coordZ - m[2]) ** 2 < (d / 2) ** 2]
            remaining -= set(matches)
            if state == "in":
                gt.append(1.0)
                excl.append(not matches)
                prob.append(max(marks[k][3] for k in matches) if matches else -1e9)
        for k in sorted(remaining):
            gt.append(0.0), prob.append(marks[k][3]), excl.append(False)
    gt, prob, excl = map(np.asarray, (gt, prob, excl))
    fpr, tpr, _ = metrics.roc_curve(gt[~excl], prob[~excl])
    fps = fpr * (np.sum(~excl) - gt[~excl].sum()) / len(uids)
    sens = tpr * gt[~excl].sum() / gt.sum()
    fps_itp = np.linspace(0.125, 8, num=10001)  # the official curve grid
    sens_itp = np.interp(fps_itp, fps, sens)
    return float(np.mean([sens_itp[np.argmin(np.abs(fps_itp - r))] for r in FP_RATES]))


def test_matches_a_literal_port_of_the_official_loop(rng):
    uids = [f"scan{i}" for i in range(15)]
    ann_rows, exc_rows, cand_rows = [], [], []
    for uid in uids[:12]:
        for _ in range(rng.integers(1, 4)):
            c, d = rng.uniform(-100, 100, 3), rng.uniform(3, 25)
            ann_rows.append((uid, *c, d))
            for _ in range(rng.integers(0, 3)):  # near-misses and double hits
                cand_rows.append((uid, *(c + rng.normal(0, d / 3, 3)), rng.random()))
        exc = rng.uniform(-100, 100, 3)
        exc_rows.append((uid, *exc, -1.0 if rng.random() < 0.5 else rng.uniform(1, 3)))
        cand_rows.append((uid, *(exc + rng.normal(0, 1, 3)), rng.random()))
    for _ in range(400):
        cand_rows.append((uids[rng.integers(len(uids))], *rng.uniform(-120, 120, 3),
                          round(rng.random(), 2)))
    ann, exc, cand = ann_df(ann_rows), ann_df(exc_rows), cand_df(cand_rows)
    for cap in (100, 20):
        ours = froc(ann, cand, excluded=exc, seriesuids=uids, max_marks_per_scan=cap, n_bootstrap=0)
        assert ours.cpm == pytest.approx(official_cpm(ann, exc, cand, uids, cap), abs=1e-12)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_and_brackets_the_cpm(rng):
    uids = [f"s{i}" for i in range(30)]
    ann = ann_df([(u, 0.0, 0.0, 0.0, 10.0) for u in uids])
    cand = cand_df([(u, 0.0, 0.0, 0.0, rng.random()) for u in uids[:24]]
                   + [(uids[rng.integers(30)], 90.0, 0.0, 0.0, rng.random()) for _ in range(60)])
    a = froc(ann, cand, n_bootstrap=300, seed=3)
    b = froc(ann, cand, n_bootstrap=300, seed=3)
    c = froc(ann, cand, n_bootstrap=300, seed=4)
    assert a.cpm_ci95 == b.cpm_ci95
    assert a.cpm_ci95 != c.cpm_ci95
    lo, hi = a.cpm_ci95
    assert lo < a.cpm < hi and hi - lo < 0.5
    assert all(a.sensitivity_at_ci95[r][0] <= a.sensitivity_at_ci95[r][1] for r in FP_RATES)
    assert a.band_fps.shape == a.band_lo.shape == (10000,)
    assert np.all(a.band_lo <= a.band_hi)
    assert math.isnan(froc(ann, cand, n_bootstrap=0).cpm_ci95[0])


# ----------------------------------------------------------------------------- errors
def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"annotations is missing column\(s\) \['diameter_mm'\]"):
        froc(ONE_NODULE.drop(columns="diameter_mm"), cand_df([]), n_bootstrap=0)
    with pytest.raises(ValueError, match="probability.*or 'score'"):
        froc(ONE_NODULE, cand_df([]).drop(columns="probability"), n_bootstrap=0)
    with pytest.raises(ValueError, match="excluded is missing"):
        froc(ONE_NODULE, cand_df([]), excluded=ONE_NODULE[["seriesuid"]], n_bootstrap=0)
    with pytest.raises(TypeError, match="DataFrame"):
        froc(ONE_NODULE.to_dict(), cand_df([]))


def test_score_column_is_accepted_and_bad_values_rejected():
    cand = cand_df([("a", 0.0, 0.0, 0.0, 0.9)]).rename(columns={"probability": "score"})
    assert froc(ONE_NODULE, cand, n_bootstrap=0).cpm == pytest.approx(1.0)
    with pytest.raises(ValueError, match="coordX.*non-numeric"):
        froc(ONE_NODULE, cand.assign(coordX=["oops"]), n_bootstrap=0)
    with pytest.raises(ValueError, match="no nodule"):
        froc(ONE_NODULE, cand, seriesuids=["other"], n_bootstrap=0)


# ----------------------------------------------------------------------------- outputs and CLI
def test_write_froc_and_cli(tmp_path, capsys):
    ann, cand = _two_nodules_four_scans()
    ann.to_csv(tmp_path / "annotations.csv", index=False)
    cand.to_csv(tmp_path / "cands.csv", index=False)
    ann.iloc[:0].to_csv(tmp_path / "excluded.csv", index=False)
    (tmp_path / "seriesuids.csv").write_text("A\nB\nC\nD\n")  # LUNA16's file has no header
    assert read_seriesuids(tmp_path / "seriesuids.csv") == ["A", "B", "C", "D"]
    out = tmp_path / "out"
    assert main(["--annotations", str(tmp_path / "annotations.csv"), "--candidates", str(tmp_path / "cands.csv"),
                 "--excluded", str(tmp_path / "excluded.csv"), "--seriesuids", str(tmp_path / "seriesuids.csv"),
                 "--out", str(out), "--n-bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert f"CPM {(0.75 + 6) / 7:.4f}" in printed
    assert "sensitivity at 0.125 FP/scan: 0.7500" in printed and printed.count("sensitivity at") == 7
    summary = json.loads((out / "froc.json").read_text())
    assert summary["cpm"] == pytest.approx((0.75 + 6) / 7) and summary["n_scans"] == 4
    curve = pd.read_csv(out / "froc.csv")
    np.testing.assert_allclose(curve["sensitivity"], [0.0, 0.5, 1.0])
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="FrocResult"):
        write_froc({"cpm": 1}, out)


def test_registered_as_lungscreen_subcommand(tmp_path, capsys):
    from pipeline import __main__ as cli

    ann, cand = _two_nodules_four_scans()
    ann.to_csv(tmp_path / "a.csv", index=False)
    cand.rename(columns={"probability": "score"}).to_csv(tmp_path / "c.csv", index=False)
    assert cli.main(["evaluate", "--annotations", str(tmp_path / "a.csv"), "--candidates",
                     str(tmp_path / "c.csv"), "--n-bootstrap", "0"]) == 0
    assert "CPM 1.0000" in capsys.readouterr().out  # default scans: A and B only, no FP


# ----------------------------------------------------------------------------- folds pooled
def write_folds(root, predictions: dict, test_scans: dict, *, done=True):
    """A cross-validation's output as `lungscreen train --folds all` writes it."""
    for k, uids in test_scans.items():
        folder = root / f"fold_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        cand_df(predictions.get(k, [])).to_csv(folder / "predictions.csv", index=False)
        (folder / "fold.json").write_text(json.dumps({"fold": k, "test_subset": k,
                                                      "test_seriesuids": uids, "done": done}))
    return root


def ten_folds(tmp_path, rng):
    """20 scans, 2 per fold (fold K tests on sKa, sKb); a nodule on each sKa, a second on s0b.

    Fold 0, by hand: FP 0.95 on s0b, then nodule s0a hit at 0.9, nodule s0b missed: counts
    (0,0) (1,0) (1,1), i.e. FP/scan 0, 0.5, 0.5 and sensitivity 0, 0, 0.5.  Its other folds' marks are random hits and FPs.
    """
    scans = {k: [f"s{k}a", f"s{k}b"] for k in range(10)}
    ann = ann_df([(f"s{k}a", 0.0, 0.0, 0.0, 10.0) for k in range(10)] + [("s0b", 0.0, 0.0, 0.0, 10.0)])
    exc = ann_df([("s3a", 80.0, 0.0, 0.0, -1.0)])
    preds = {0: [("s0b", 50.0, 0.0, 0.0, 0.95), ("s0a", 1.0, 0.0, 0.0, 0.9)]}
    for k in range(1, 10):
        rows = [(f"s{k}a", 1.0, 0.0, 0.0, round(rng.random(), 3))] if k % 4 else []  # folds 4, 8: missed
        rows += [(scans[k][rng.integers(2)], 50.0 + i, 0.0, 0.0, round(rng.random(), 3))
                 for i in range(rng.integers(1, 5))]
        preds[k] = rows
    preds[3].append(("s3a", 81.0, 0.0, 0.0, 0.99))  # on the excluded finding: ignored
    return write_folds(tmp_path / "cv", preds, scans), ann, exc, preds, scans


def test_pooled_cpm_is_the_froc_of_the_concatenated_predictions(tmp_path, rng):
    from pipeline.evaluate import pool_folds

    root, ann, exc, preds, scans = ten_folds(tmp_path, rng)
    res = pool_folds(root, ann, excluded=exc, n_bootstrap=0)
    every = cand_df([r for k in range(10) for r in preds[k]])
    all_scans = [u for k in range(10) for u in scans[k]]
    ref = froc(ann, every, excluded=exc, seriesuids=all_scans, n_bootstrap=0)
    assert res.pooled.cpm == ref.cpm and res.pooled.sensitivity_at == ref.sensitivity_at
    assert (res.pooled.n_scans, res.pooled.n_nodules, res.pooled.n_ignored) == (20, 11, 1)
    for k in range(10):
        alone = froc(ann, cand_df(preds[k]), excluded=exc, seriesuids=scans[k], n_bootstrap=0)
        assert res.folds[k].cpm == alone.cpm and res.folds[k].n_scans == 2
    # fold 0 by hand: 0.125, 0.25 -> 0; 1/2 read at 0.49985, before the FP's step -> 0;
    # 1..8 -> 0.5: CPM 4 * 0.5 / 7
    assert res.folds[0].cpm == pytest.approx(2 / 7)
    # pooling is not averaging the folds
    assert res.pooled.cpm != pytest.approx(np.mean([res.folds[k].cpm for k in range(10)]))
    pd.testing.assert_frame_equal(res.submission, every)


def test_fold_without_nodules_has_no_cpm_of_its_own(tmp_path):
    from pipeline.evaluate import format_pooled, pool_folds

    scans = {k: [f"s{k}"] for k in range(10)}
    preds = {k: [(f"s{k}", 0.0, 0.0, 0.0, 0.9)] for k in range(10)}
    ann = ann_df([(f"s{k}", 0.0, 0.0, 0.0, 10.0) for k in range(9)])  # none on s9
    res = pool_folds(write_folds(tmp_path, preds, scans), ann, n_bootstrap=0)
    assert res.folds[9] is None and res.folds[8].cpm == 1.0
    # the pooled curve: 9 hits at 0.9 tied with the FP on s9 -> diagonal (0,0)-(0.1,1):
    # 0.125 .. 8 FP/scan all past it -> CPM 1
    assert res.pooled.cpm == pytest.approx(1.0) and res.pooled.n_false_positives == 1
    table = format_pooled(res)
    assert "fold(s) 9: no nodule" in table
    row9 = next(line for line in table.splitlines() if line.split()[:1] == ["9"])
    assert row9.split()[4] == "-"


def test_cli_writes_the_table_the_files_and_the_submission(tmp_path, rng, capsys):
    from pipeline import __main__ as cli
    from pipeline.evaluate import SUBMISSION_COLUMNS

    root, ann, exc, preds, scans = ten_folds(tmp_path, rng)
    ann.to_csv(tmp_path / "annotations.csv", index=False)
    exc.to_csv(tmp_path / "excluded.csv", index=False)
    assert cli.main(["evaluate", "--folds", str(root), "--annotations", str(tmp_path / "annotations.csv"),
                     "--excluded", str(tmp_path / "excluded.csv"), "--n-bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert [line.split()[0] for line in lines[2:13]] == [str(k) for k in range(10)] + ["pooled"]
    submission = pd.read_csv(root / "submission.csv", dtype={"seriesuid": str})
    assert list(submission.columns) == list(SUBMISSION_COLUMNS)
    assert len(submission) == sum(len(v) for v in preds.values())
    table = pd.read_csv(root / "cpm.csv")
    assert table["fold"].tolist() == [str(k) for k in range(10)] + ["pooled"]
    summary = json.loads((root / "cpm.json").read_text())
    assert summary["folds"]["0"]["cpm"] == pytest.approx(2 / 7)
    assert summary["folds"]["0"]["seriesuids"] == ["s0a", "s0b"]
    assert f"{summary['pooled']['cpm']:.4f}" in lines[12]
    assert table["cpm"].iloc[-1] == pytest.approx(summary["pooled"]["cpm"])
    assert json.loads((root / "froc.json").read_text())["n_scans"] == 20
    assert (root / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --out moves the evaluation's files, not the submission
    assert cli.main(["evaluate", "--folds", str(root), "--annotations", str(tmp_path / "annotations.csv"),
                     "--n-bootstrap", "0", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "cpm.csv").is_file()
    assert not (tmp_path / "elsewhere" / "submission.csv").exists()


def test_data_finds_the_tables_in_a_luna16_tree(tmp_path, rng, capsys):
    from pipeline import __main__ as cli

    root, ann, exc, preds, scans = ten_folds(tmp_path, rng)
    luna = tmp_path / "luna16"
    (luna / "evaluationScript" / "annotations").mkdir(parents=True)
    ann.to_csv(luna / "annotations.csv", index=False)
    exc.to_csv(luna / "evaluationScript" / "annotations" / "annotations_excluded.csv", index=False)
    uids = [u for k in range(10) for u in scans[k]] + ["never_tested"]
    (luna / "evaluationScript" / "annotations" / "seriesuids.csv").write_text("\n".join(uids) + "\n")
    assert cli.main(["evaluate", "--folds", str(root), "--data", str(luna), "--n-bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "1 evaluated scan(s) are in no fold's test_seriesuids (e.g. never_tested)" in printed
    summary = json.loads((root / "cpm.json").read_text())
    ref = froc(ann, cand_df([r for k in range(10) for r in preds[k]]), excluded=exc, seriesuids=uids,
               n_bootstrap=0)
    assert summary["pooled"]["n_scans"] == 21 and summary["pooled"]["cpm"] == pytest.approx(ref.cpm)
    assert summary["pooled"]["n_ignored_on_excluded"] == 1  # the excluded file was read
    # the same --data for one run's candidates
    every = tmp_path / "candidates.csv"
    cand_df([r for k in range(10) for r in preds[k]]).to_csv(every, index=False)
    assert cli.main(["evaluate", "--candidates", str(every), "--data", str(luna), "--n-bootstrap", "0"]) == 0
    assert f"CPM {ref.cpm:.4f}" in capsys.readouterr().out
    # a tree without annotations_excluded.csv: one line naming the places looked at
    (luna / "evaluationScript" / "annotations" / "annotations_excluded.csv").unlink()
    assert cli.main(["evaluate", "--folds", str(root), "--data", str(luna)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "annotations_excluded.csv" in err[0] and "evaluationScript/annotations" in err[0]


def test_data_with_five_subsets_expects_five_folds(tmp_path, capsys):
    from pipeline import __main__ as cli

    scans = {k: [f"s{k}"] for k in range(5)}
    root = write_folds(tmp_path / "cv", {k: [(f"s{k}", 0.0, 0.0, 0.0, 0.9)] for k in range(5)}, scans)
    luna = tmp_path / "luna16"
    for k in range(5):
        (luna / f"subset{k}").mkdir(parents=True)
    ann_df([(f"s{k}", 0.0, 0.0, 0.0, 10.0) for k in range(5)]).to_csv(luna / "annotations.csv", index=False)
    ann_df([]).to_csv(luna / "annotations_excluded.csv", index=False)
    assert cli.main(["evaluate", "--folds", str(root), "--data", str(luna), "--n-bootstrap", "0"]) == 0
    assert "pooled CPM 1.0000 over 5 scans" in capsys.readouterr().out
    assert len(pd.read_csv(root / "cpm.csv")) == 6
    (luna / "subset5").mkdir()
    assert cli.main(["evaluate", "--folds", str(root), "--data", str(luna), "--n-bootstrap", "0"]) == 2
    assert "fold(s) 5 missing (no fold_K folder); the pooled evaluation needs all folds 0..5" in \
        capsys.readouterr().err


def _break_missing(root):
    import shutil

    shutil.rmtree(root / "fold_3")
    shutil.rmtree(root / "fold_7")
    meta = json.loads((root / "fold_5" / "fold.json").read_text())
    (root / "fold_5" / "fold.json").write_text(json.dumps({**meta, "done": False}))
    return r"fold\(s\) 3, 7 missing .*fold\(s\) 5 not done .*needs all folds 0\.\.9"


def _break_two_folds(root):
    df = pd.read_csv(root / "fold_2" / "predictions.csv", dtype={"seriesuid": str})
    meta = json.loads((root / "fold_6" / "fold.json").read_text())
    (root / "fold_6" / "fold.json").write_text(json.dumps({**meta, "test_seriesuids": ["s6a", "s6b", "s2a"]}))
    df.assign(seriesuid="s2a").to_csv(root / "fold_6" / "predictions.csv", index=False)
    return r"scan s2a is a test scan of two folds: .*fold_2.fold\.json and .*fold_6.fold\.json"


def _break_predicted_twice(root):
    df = pd.read_csv(root / "fold_2" / "predictions.csv", dtype={"seriesuid": str})
    df.assign(seriesuid="s1a").to_csv(root / "fold_2" / "predictions.csv", index=False)
    return r"scan s1a is predicted in two folds: .*fold_1.predictions\.csv and .*fold_2.predictions\.csv"


def _break_outside(root):
    df = pd.read_csv(root / "fold_4" / "predictions.csv", dtype={"seriesuid": str})
    df.assign(seriesuid="stranger").to_csv(root / "fold_4" / "predictions.csv", index=False)
    return r"fold_4.predictions\.csv has marks on 1 scan\(s\) that are not fold 4's test scans"


def _break_columns(root):
    df = pd.read_csv(root / "fold_8" / "predictions.csv")
    df.rename(columns={"probability": "score"}).to_csv(root / "fold_8" / "predictions.csv", index=False)
    return r"fold_8.predictions\.csv lacks column\(s\) \['probability'\]"


def _break_values(root):
    (root / "fold_9" / "predictions.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\ns9a,x,0,0,1\n")
    return r"fold_9.predictions\.csv column 'coordX' has 1 non-numeric"


def _break_json(root):
    (root / "fold_1" / "fold.json").write_text("{not json")
    return r"fold_1.fold\.json is not valid JSON"


@pytest.mark.parametrize("breaker", [_break_missing, _break_two_folds, _break_predicted_twice,
                                     _break_outside, _break_columns, _break_values, _break_json])
def test_bad_folds_are_refused_in_one_line(tmp_path, rng, capsys, breaker):
    from pipeline import __main__ as cli
    from pipeline.evaluate import pool_folds

    root, ann, *_ = ten_folds(tmp_path, rng)
    match = breaker(root)
    with pytest.raises(ValueError, match=match):
        pool_folds(root, ann, n_bootstrap=0)
    ann.to_csv(tmp_path / "annotations.csv", index=False)
    assert cli.main(["evaluate", "--folds", str(root), "--annotations", str(tmp_path / "annotations.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (root / "submission.csv").exists()


def test_folds_folder_must_exist_and_not_come_with_candidates(tmp_path, capsys):
    from pipeline import __main__ as cli
    from pipeline.evaluate import read_folds

    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_folds(tmp_path / "nowhere")
    ONE_NODULE.to_csv(tmp_path / "a.csv", index=False)
    assert cli.main(["evaluate", "--folds", str(tmp_path), "--candidates", str(tmp_path / "a.csv"),
                     "--annotations", str(tmp_path / "a.csv")]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["evaluate", "--folds", str(tmp_path)]) == 2
    assert "--annotations (or --data LUNA16_ROOT)" in capsys.readouterr().err


def test_readme_cross_validation_commands_parse():
    import argparse
    import re
    import shlex
    from pathlib import Path

    from pipeline.evaluate import add_arguments

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### LUNA16 10-fold cross-validation"):readme.index("## The verdict per patient")]
    commands = [line.split("#")[0] for block in re.findall(r"```sh\n(.*?)```", section, re.S)
                for line in block.splitlines() if line.startswith("lungscreen evaluate ")]
    assert len(commands) == 2
    parser = add_arguments(argparse.ArgumentParser())
    for command in commands:
        args = parser.parse_args(shlex.split(command)[2:])
        assert args.folds and args.data and not args.candidates
