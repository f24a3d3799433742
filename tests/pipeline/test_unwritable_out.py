"""An output folder that cannot be written (#18 item 4): one line naming it, exit status 3,
no traceback and no work wasted before it is found; once writable, the same command runs."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _args(tmp_path, out):
    from synth.phantom import write_phantom_scan

    scans = tmp_path / "scans"
    if not scans.exists():
        write_phantom_scan(scans / "p1", fmt="dicom", seed=1, shape_zyx=(24, 48, 48),
                           spacing_mm=(3.0, 4.0, 4.0), n_nodules=1)
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["stages"] = ["ingest", "resample"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return ["run", str(scans), "--out", str(out), "--config", str(tmp_path / "c.yaml"),
            "--no-progress", "--pictures", "0"]


def _one_clean_error(console, out, reason):
    text = console.out + console.err
    assert "Traceback" not in text and "ingest started" not in text, text  # refused before any work
    lines = [t for t in text.splitlines() if t.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: {reason}; stopped after 0 of 1"), lines
    assert "make it a writable folder (or choose another --out)" in lines[0]


@pytest.fixture
def read_only_mount(tmp_path, tmpfs):
    """A read-only tmpfs at ``tmp_path / "ro"`` (root and mount rights needed, else skip)."""
    return tmpfs(tmp_path / "ro", "ro,size=1m")


@pytest.mark.parametrize("sub", ["", "new/folder"], ids=["the-folder", "below-it"])
def test_a_read_only_output_folder_is_one_clean_error_then_the_rerun_works(tmp_path, capfd,
                                                                         read_only_mount, sub):
    out = read_only_mount / sub if sub else read_only_mount
    assert main(_args(tmp_path, out)) == 3
    _one_clean_error(capfd.readouterr(), out, "read-only file system")
    subprocess.run(["mount", "-o", "remount,rw", str(read_only_mount)], check=True)
    assert main(_args(tmp_path, out)) == 0
    assert json.loads((out / "run.json").read_text())["n_failed"] == 0


def test_an_output_path_that_is_a_file_is_one_clean_error(tmp_path, capfd):
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    assert main(_args(tmp_path, out)) == 3
    _one_clean_error(capfd.readouterr(), out, "not a folder (a file of that name is in the way)")
    assert out.read_text() == "not a folder"
