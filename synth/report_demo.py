"""A run's ``report.html`` from phantoms, and a look at it in headless Chromium.

* :func:`write_quick_run`: two phantom scans read by the real ingest stage, written by the
  real output step with findings whose values are known (the phantoms' own nodules), one
  failed scan, one flag.  The report tests use it.
* :func:`write_screened_run`: phantoms screened by the whole default pipeline (minutes).
* :func:`chromium`: the headless browser (Debian's ``chromium``), to screenshot a page or
  dump its DOM after it loaded.

``python -m synth.report_demo docs/report_screenshot.png [WORK_DIR]`` screens the phantoms
(in WORK_DIR, where a rerun resumes) and saves the report's screenshot (the README's picture).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["write_quick_run", "write_screened_run", "chromium_path", "chromium", "WINDOW_SIZE"]

#: Browser window of the screenshots, pixels (width, height).
WINDOW_SIZE = (1280, 1600)
#: Small phantoms: a whole chest at 2.5 mm in 48x144x144 voxels.
_QUICK = dict(shape_zyx=(48, 144, 144), spacing_mm=(2.5, 2.5, 2.5))


def _renumber(folder: Path, first: int = 1000) -> None:
    """Give the slices of a DICOM series InstanceNumbers that count down from ``first``
    (head to feet), so that a slice's InstanceNumber differs from its place in the series."""
    import pydicom

    files = sorted(folder.iterdir(), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = first - k
        ds.save_as(path)


def write_quick_run(root) -> dict:
    """Write a small run's outputs and ``report.html`` under ``root / "out"``.

    Scan A is a DICOM series (InstanceNumbers counting down from 1000) with two nodules given
    probabilities 0.91 and 0.35; scan B a NRRD file with one nodule at 0.62; a third scan
    failed; scan A carries a flag.  The findings are the phantoms' own nodules (their
    annotations), so every value the report shows is known.  The scans are read by the real
    ingest stage and their outputs written by the real output step (which draws the
    pictures from the scan as read); the phantoms' true lung masks stand in for the lung mask
    stage, the known findings for the candidate and classify stages.

    Parameters
    ----------
    root : str or Path
        Folder for the scans (``root/scans``) and the run (``root/out``).

    Returns
    -------
    dict
        ``out`` (the run folder), ``report`` (its ``report.html``), ``results`` (the
        :class:`pipeline.run.ScanResult` list), ``findings`` (a DataFrame of what the report
        must list, most probable first: scan_id, rank, probability, diameter_mm, coordX,
        coordY, coordZ) and ``dicom`` (scan A's series folder).
    """
    from pipeline.io import write_volume
    from pipeline.report import write_report
    from pipeline.run import ScanResult, _write_outputs
    from pipeline.steps import get_step
    from stages.volume import Volume
    from synth.dicomio import write_dicom_series
    from synth.phantom import make_phantom

    root = Path(root)
    out = root / "out"
    results, expected, dicom = [], [], None
    for name, seed, probabilities in (("A", 11, [0.91, 0.35]), ("B", 12, [0.62])):
        vol, ann, truth = make_phantom(**_QUICK, seed=seed, n_nodules=len(probabilities),
                                       diameter_range_mm=(6.0, 14.0), return_truth=True)
        if dicom is None:
            path = dicom = root / "scans" / name
            write_dicom_series(vol, path, shuffle_names=True, seed=seed)
            _renumber(path)
        else:
            path = write_volume(vol, root / "scans" / name / f"{vol.scan_id}.nrrd")
        ct = get_step("ingest").fn(path=str(path))["ct"]
        cands = pd.DataFrame({"seriesuid": ct.scan_id, "coordX": ann["coordX"], "coordY": ann["coordY"],
                              "coordZ": ann["coordZ"], "diameter_mm": ann["diameter_mm"],
                              "finding": "nodule", "score": 0.5, "probability": probabilities})
        mask = Volume(truth["lung_mask"], spacing_mm=vol.spacing_mm, origin_mm=vol.origin_mm,
                      scan_id=ct.scan_id)
        scan_dir = out / ct.scan_id
        _write_outputs(scan_dir, {"path": str(path), "ct": ct, "lung_mask": mask, "candidates": cands},
                       pictures=5, save_ct=False)
        results.append(ScanResult(source=str(path), scan_id=ct.scan_id, seconds={"ingest": 0.1, "write": 0.5},
                                  n_candidates=len(cands), out_dir=str(scan_dir)))
        expected += [{"scan_id": ct.scan_id, "rank": i + 1, **row}
                     for i, row in enumerate(cands[["probability", "diameter_mm", "coordX", "coordY",
                                                    "coordZ"]].to_dict("records"))]
    results[0].flags = ["1 unreadable slice replaced by interpolation from its neighbours: x.dcm: truncated"]
    results.append(ScanResult(source=str(root / "scans" / "broken"), status="failed",
                              error="no CT image series found (empty folder)"))
    report = write_report(out, results)
    findings = pd.DataFrame(expected).sort_values("probability", ascending=False, ignore_index=True)
    return {"out": out, "report": report, "results": results, "findings": findings, "dicom": dicom}


def write_screened_run(root, *, pictures: int = 3) -> Path:
    """Screen two phantom DICOM series (1.4 mm pixels, 4 and 3 nodules) and an empty folder
    with the whole default pipeline, as ``lungscreen run`` does, and return ``report.html``
    (about 9 minutes on 2 busy cores).  Run again on the same ``root``, the finished scans are
    not recomputed: only the report is written again."""
    from pipeline.__main__ import main
    from synth.phantom import write_phantom_scan

    root = Path(root)
    for i, seed in enumerate((21, 22)):
        folder = root / "scans" / f"patient{i}"
        if not folder.exists():
            write_phantom_scan(folder, fmt="dicom", seed=seed, shape_zyx=(100, 240, 240),
                               spacing_mm=(2.5, 1.4, 1.4), n_nodules=4 - i)
    (root / "scans" / "patient2").mkdir(exist_ok=True)
    main(["run", str(root / "scans"), "--out", str(root / "out"), "--no-progress",
          "--pictures", str(pictures)])
    return root / "out" / "report.html"


def chromium_path() -> str | None:
    """The headless browser on PATH (Debian's ``chromium``, or ``chromium-browser``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page, *, screenshot=None, dump_dom: bool = False, window_size=WINDOW_SIZE,
             timeout_s: float = 60.0) -> str:
    """Open ``page`` (an HTML file) in headless Chromium once it has loaded.

    Parameters
    ----------
    page : str or Path
        The HTML file.
    screenshot : str or Path, optional
        Write a PNG of the window (``window_size`` pixels, the top of the page) here.
    dump_dom : bool
        Return the DOM as serialised after the page loaded and its scripts ran.
    window_size : tuple of int
        ``(width, height)`` pixels.
    timeout_s : float
        The browser is killed after this many seconds (``subprocess.TimeoutExpired``).

    Returns
    -------
    str
        The DOM with ``dump_dom``, else what the browser printed.

    Raises
    ------
    FileNotFoundError
        No Chromium on PATH.
    RuntimeError
        The browser failed (its output in the message).
    """
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no chromium or chromium-browser on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="lungscreen-chromium-") as profile:
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", f"--user-data-dir={profile}",
                f"--window-size={window_size[0]},{window_size[1]}"]
        args += [f"--screenshot={Path(screenshot).resolve()}"] if screenshot else []
        args += ["--dump-dom"] if dump_dom else []
        done = subprocess.run(args + [Path(page).resolve().as_uri()], capture_output=True, text=True,
                              timeout=timeout_s)
    if done.returncode != 0 or (screenshot and not Path(screenshot).exists()):
        raise RuntimeError(f"chromium failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout if dump_dom else done.stderr


def _save_small_png(src: Path, dest: Path, colours: int = 48) -> Path:
    """``src`` (a report screenshot) as a palette PNG, about 3x smaller: 208 greys for the CT and
    the page, and ``colours`` colours (rings, square, outline, links) picked from its coloured
    pixels; no dithering."""
    from PIL import Image

    with Image.open(src) as im:
        rgb = im.convert("RGB")
    pixels = np.asarray(rgb)
    coloured = pixels[(pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 24].reshape(1, -1, 3)
    picked = Image.fromarray(coloured).quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    greys = np.repeat(np.linspace(0, 255, 256 - colours).round()[:, None], 3, axis=1)
    palette = np.concatenate([greys, np.reshape(picked.getpalette()[:3 * colours], (-1, 3))])
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    rgb.quantize(palette=holder, dither=Image.Dither.NONE).save(dest, optimize=True)
    return dest


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/report_screenshot.png")
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="lungscreen-report-"))
    report = write_screened_run(work)
    shot = work / "screenshot.png"
    chromium(report, screenshot=shot)
    target.parent.mkdir(parents=True, exist_ok=True)
    _save_small_png(shot, target)
    print(f"{target}: {target.stat().st_size / 1e3:.0f} kB, {WINDOW_SIZE[0]}x{WINDOW_SIZE[1]} px, "
          f"from the run in {work}")
