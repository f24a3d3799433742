"""A scan read with repaired slices (#18 f) is screened, and its outputs, run.json, the report
and the console say so; a rerun from the cache keeps the flag."""
import json
from pathlib import Path

import pandas as pd
import pydicom
import yaml

from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_repaired_slices_are_flagged_in_every_output(tmp_path, capfd):
    from synth.phantom import write_phantom_scan

    scan = tmp_path / "scans" / "patient0"
    write_phantom_scan(scan, fmt="dicom", seed=5, shape_zyx=(36, 64, 64), spacing_mm=(3.0, 3.0, 3.0),
                       n_nodules=1)
    files = sorted(scan.iterdir(),
                   key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    middle = files[len(files) // 2]
    middle.write_bytes(middle.read_bytes()[:-100])  # a truncated slice inside the series
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["stages"] = ["ingest", "resample", "lungmask"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = ["run", str(tmp_path / "scans"), "--out", str(out), "--config", str(tmp_path / "c.yaml"),
            "--no-progress", "--pictures", "0"]

    assert main(args) == 0
    console = capfd.readouterr()
    flag_start = "1 unreadable slice replaced by interpolation from its neighbours: " + middle.name
    assert (console.out + console.err).count(f"flagged: {scan}: {flag_start}") == 1
    run = json.loads((out / "run.json").read_text())
    assert run["n_failed"] == 0 and run["scans"][0]["flags"][0].startswith(flag_start)
    assert "truncated file: pixel data has" in run["scans"][0]["flags"][0]
    scan_json = json.loads((out / run["scans"][0]["scan_id"] / "scan.json").read_text())
    assert scan_json["flags"] == run["scans"][0]["flags"]
    assert flag_start in (out / "report.html").read_text()
    assert pd.read_csv(out / "errors.csv").empty

    assert main(args) == 0  # from the cache: still flagged
    rerun = json.loads((out / "run.json").read_text())
    assert rerun["scans"][0]["status"] == "cached" and rerun["scans"][0]["flags"] == run["scans"][0]["flags"]
