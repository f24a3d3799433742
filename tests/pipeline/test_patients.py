"""patients.csv: one verdict per patient (Kaggle DSB 2017's id,cancer first, then Lung-RADS)."""
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from nets.patient import NoisyOR
from pipeline.patients import PATIENT_COLUMNS, patient_id, scan_verdict, write_patients_csv
from pipeline.run import ScanResult

#: Small phantoms: two patients screened end to end.
PHANTOM = dict(shape_zyx=(36, 96, 96), spacing_mm=(3.0, 2.4, 2.4), n_nodules=2)


def _noisy_or(p_leak=0.1):
    net = NoisyOR()
    with torch.no_grad():  # p_i = the finding's nodule probability
        net.finding.weight[:] = torch.tensor([[1.0, 0.0]])
        net.finding.bias.zero_()
        net.leak_logit.fill_(math.log(p_leak / (1 - p_leak)))
    net.info = {"train_prevalence": 0.2}
    return net.eval()


def _cands(rows):
    cols = ["coordX", "coordY", "coordZ", "diameter_mm", "probability", "merged", "nodule_type",
            "solid_diameter_mm"]
    return pd.DataFrame(rows, columns=cols)


def test_scan_verdict_reads_the_reported_findings():
    cands = _cands([[0, 0, 0, 9.0, 0.9, False, "solid", 9.0],
                    [5, 0, 0, 20.0, 0.8, True, "solid", 20.0],      # a merged duplicate mark
                    [9, 9, 9, 25.0, 0.6, False, "ground_glass", 0.0],
                    [1, 1, 1, 16.0, 0.4, False, "solid", 16.0],     # below the finding threshold
                    [2, 2, 2, 7.0, 0.7, False, "", float("nan")]])  # no type: graded as solid
    v = scan_verdict(cands, model=_noisy_or())
    assert v["lung_rads"] == "4A" and v["lung_rads_reason"].startswith("solid nodule 9.0 mm at (0.0, 0.0, 0.0)")
    assert v["n_findings"] == 3 and v["largest_diameter_mm"] == 25.0 and v["largest_type"] == "ground_glass"
    top5 = [0.9, 0.8, 0.7, 0.6, 0.4]  # the model reads the most probable candidates, merged or not
    want = 1 - 0.9 * math.prod(1 - p for p in top5)
    assert v["cancer"] == pytest.approx(want, rel=1e-4)
    none = scan_verdict(cands.iloc[:0], model=_noisy_or())
    assert none["lung_rads"] == "1" and none["n_findings"] == 0 and none["cancer"] == pytest.approx(0.1, rel=1e-3)


def test_an_rnn_verdict_reads_the_embeddings():
    from nets.rnn import PatientRNN

    torch.manual_seed(0)
    rnn = PatientRNN(4, hidden=4, dropout=0.0).eval()
    rnn.kind = "rnn"
    cands = _cands([[0, 0, 0, 9.0, 0.9, False, "solid", 9.0], [1, 1, 1, 5.0, 0.3, False, "solid", 5.0]])
    emb = pd.DataFrame({"coordX": [0.0, 1.0], "coordY": 0.0, "coordZ": 0.0, "probability": [0.9, 0.3],
                        "emb_000": [1.0, -1.0], "emb_001": [0.5, 0.0], "emb_002": [0.0, 2.0]})
    v = scan_verdict(cands, embeddings=emb, model=rnn)
    rows = torch.tensor([[[1.0, 0.5, 0.0, 0.9], [-1.0, 0.0, 2.0, 0.3]]])
    with torch.no_grad():
        want = float(torch.sigmoid(rnn(rows, torch.tensor([2]))[0])[0])
    assert v["cancer"] == pytest.approx(want, abs=1e-6) and v["lung_rads"] == "4A"
    with pytest.raises(ValueError, match="embeddings"):
        scan_verdict(cands, model=rnn)


def test_patient_ids_and_one_row_per_patient(tmp_path):
    def scan(name, rows, source, status="ok"):
        d = tmp_path / "out" / name
        d.mkdir(parents=True)
        _cands(rows).assign(seriesuid=name).to_csv(d / "candidates.csv", index=False)
        return ScanResult(source=str(source), scan_id=name, status=status, out_dir=str(d))

    folder = tmp_path / "dsb" / "patientA"
    folder.mkdir(parents=True)
    (tmp_path / "luna").mkdir()
    mhd = tmp_path / "luna" / "1.3.6.99.mhd"
    mhd.write_text("x")
    results = [
        scan("uid-a1", [[0, 0, 0, 6.5, 0.9, False, "solid", 6.5]], f"{folder}#series=uid-a1"),
        scan("uid-a2", [[0, 0, 0, 12.0, 0.95, False, "solid", 12.0]], f"{folder}#series=uid-a2"),
        scan("1.3.6.99", [[0, 0, 0, 4.0, 0.3, False, "solid", 4.0]], mhd),
        ScanResult(source=str(tmp_path / "dsb" / "broken"), status="failed", error="no CT series"),
    ]
    (tmp_path / "dsb" / "broken").mkdir()
    assert patient_id(results[0].source, "uid-a1") == "patientA"
    assert patient_id(str(mhd), "1.3.6.99") == "1.3.6.99"
    path = write_patients_csv(tmp_path / "out", results, model=_noisy_or())
    table = pd.read_csv(path, dtype={"id": str, "lung_rads": str})
    assert list(table.columns) == PATIENT_COLUMNS and list(table.columns[:2]) == ["id", "cancer"]
    assert table["id"].tolist() == ["1.3.6.99", "broken", "patientA"]
    a = table.set_index("id").loc["patientA"]
    assert a["lung_rads"] == "4A" and a["scans"] == "uid-a1;uid-a2" and a["n_findings"] == 2
    assert a["cancer"] == pytest.approx(1 - 0.9 * 0.05, rel=1e-4)  # the higher of the two scans
    broken = table.set_index("id").loc["broken"]
    assert broken["lung_rads"] == "0" and "no CT series" in broken["lung_rads_reason"]
    assert broken["cancer"] == pytest.approx(0.2)  # the training prevalence
    assert table.set_index("id").loc["1.3.6.99", "lung_rads"] == "1"
    assert write_patients_csv(tmp_path / "out", []) is None and not path.exists()


def test_dsb_batch_has_one_row_per_patient_folder_kaggle_columns_first(tmp_path, one_thread):
    from pipeline.__main__ import main
    from synth.phantom import write_phantom_scan

    tree = tmp_path / "stage1"
    names = ["0a38e7597ca26f9374f8ea2770ba870d", "0acbebb8d463b4b9ca88cf38431aac69"]
    for i, name in enumerate(names):
        write_phantom_scan(tree / name, fmt="dicom", seed=i, **PHANTOM)
    (tree / "0c0de3749d4fe175b7a5098b060982a1").mkdir()  # an empty patient folder fails alone
    (tree / "0c0de3749d4fe175b7a5098b060982a1" / "x.dcm").write_bytes(b"not dicom")
    out = tmp_path / "out"
    # the whole screen, on few candidates without flips (cheap on a busy CI machine)
    assert main(["run", str(tree), "--out", str(out), "--quiet", "--pictures", "0",
                 "--set", "candidates.max_candidates=8", "--set", "classify.tta=1"]) == 1
    table = pd.read_csv(out / "patients.csv", dtype={"id": str, "lung_rads": str})
    assert list(table.columns[:2]) == ["id", "cancer"]
    folders = sorted(p.name for p in tree.iterdir())
    assert table["id"].tolist() == folders and table["id"].is_unique
    assert table["cancer"].between(0, 1).all()
    ok = table[table["id"].isin(names)]
    assert set(ok["lung_rads"]) <= {"1", "2", "3", "4A", "4B"}
    assert table.set_index("id").loc["0c0de3749d4fe175b7a5098b060982a1", "lung_rads"] == "0"
    # each row is the verdict of that patient's scan, from its candidates.csv
    for _, row in ok.iterrows():
        cands = pd.read_csv(out / row["scans"] / "candidates.csv", dtype={"seriesuid": str})
        emb = pd.read_csv(out / row["scans"] / "embeddings.csv")
        assert "nodule_type" in cands.columns and len(emb) == min(len(cands), 32)
        v = scan_verdict(cands, embeddings=emb)
        assert row["cancer"] == pytest.approx(v["cancer"], abs=1e-6) and row["lung_rads"] == v["lung_rads"]
