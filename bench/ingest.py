"""Ingest benchmark: ``read_scan`` + ``resample`` to 1 mm beside SimpleITK's plain
``ImageSeriesReader`` + ``Resample`` on the same DICOM files.

``python -m bench.ingest [--out bench] [--repeats 1] [--slices 300]`` writes
``bench/ingest.json``.  Two series are written to a temporary folder: lung1 (512x512x48,
shuffled file names) and a synthetic 512x512x300 chest CT (``synth.phantom``).  Each
measurement runs in its own subprocess, so the peak resident memory (``VmHWM``) is that
measurement's alone (``import_rss_mb`` is the part taken by the imports: torch for us,
SimpleITK for them); the time excludes interpreter start-up and imports.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run"]

METHODS = ("lungscreen", "simpleitk")
SPACING_MM = (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------- one measurement
def _measure_lungscreen(folder: str, device: str | None) -> dict:
    from stages.ingest import read_scan
    from stages.resample import resample

    t0 = time.perf_counter()
    vol = read_scan(folder)
    t1 = time.perf_counter()
    out = resample(vol, spacing_mm=SPACING_MM, order=1, device=device)
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "resample_s": t2 - t1, "shape_in": vol.shape, "shape_out": out.shape}


def _measure_simpleitk(folder: str, device: str | None) -> dict:
    import SimpleITK as sitk

    from stages.resample import resampled_shape  # pure Python: the same output grid as ours

    t0 = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    img = reader.Execute()
    t1 = time.perf_counter()
    spacing_in = img.GetSpacing()[::-1]
    shape_out = resampled_shape(img.GetSize()[::-1], spacing_in, SPACING_MM)
    out = sitk.Resample(img, shape_out[::-1], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        SPACING_MM[::-1], img.GetDirection(), -1000, img.GetPixelID())
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "resample_s": t2 - t1, "shape_in": img.GetSize()[::-1],
            "shape_out": out.GetSize()[::-1]}


def _peak_rss_mb() -> float:
    """This process's peak resident memory, MB.

    ``/proc/self/status`` ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss`` does not (a child
    started from a big parent inherits its peak), so it is only the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(method: str, folder: str, device: str | None) -> None:
    """Run one measurement and print its JSON (called in a fresh interpreter)."""
    # each method imports only what it needs; imports are not part of the timing
    if method == "lungscreen":
        import stages.ingest  # noqa: F401
        import stages.resample  # noqa: F401
        import torch

        if device != "cpu" and torch.cuda.is_available():
            torch.zeros(1, device="cuda")  # CUDA context start-up is paid once per process, not per scan
    else:
        import SimpleITK  # noqa: F401
    import_rss_mb = _peak_rss_mb()
    result = {"lungscreen": _measure_lungscreen, "simpleitk": _measure_simpleitk}[method](folder, device)
    result["import_rss_mb"] = import_rss_mb
    result["seconds"] = result["read_s"] + result["resample_s"]
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _spawn(method: str, folder: Path, device: str | None) -> dict:
    cmd = [sys.executable, "-m", "bench.ingest", "--child", method, str(folder),
           "--device", device or "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {folder} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- data
def _write_cases(tmp: Path, slices: int) -> dict[str, Path]:
    from synth.dicomio import write_dicom_series
    from synth.phantom import make_phantom
    from stages.ingest import read_scan

    cases = {}
    try:
        from synth.data import DataUnavailable, lung1_paths

        image, _ = lung1_paths()
        cases["lung1_512x512x48"] = tmp / "lung1"
        write_dicom_series(read_scan(image), cases["lung1_512x512x48"], shuffle_names=True, seed=1)
    except DataUnavailable as exc:
        print(f"lung1 skipped: {exc}", file=sys.stderr)
    phantom = make_phantom((slices, 512, 512), (1.0, 0.7, 0.7), seed=0)[0]
    name = f"synthetic_512x512x{slices}"
    cases[name] = tmp / "synthetic"
    write_dicom_series(phantom, cases[name], shuffle_names=True, seed=2)
    return cases


# ---------------------------------------------------------------------------- driver
def run(out_dir="bench", *, repeats: int = 1, slices: int = 300, device: str | None = None) -> dict:
    """Time ingest + 1 mm resampling of lung1 and a 512x512x``slices`` series; write ``ingest.json``.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``ingest.json`` (written atomically).
    repeats : int
        Subprocess runs per (case, method); the fastest is kept, the peak memory is the largest.
    slices : int
        Number of slices of the synthetic series.
    device : str, optional
        Device for :func:`stages.resample.resample`: None = GPU if present, else CPU.

    Returns
    -------
    dict
        ``{"cases": {case: {"lungscreen": {...}, "simpleitk": {...}, "ratio": float}}, ...}``;
        ``ratio`` is lungscreen seconds / SimpleITK seconds (below 1: we are faster).
    """
    from pipeline.io import write_json

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    import torch

    report = {"python": platform.python_version(), "machine": platform.machine(),
              "cpus": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
              "cuda": torch.cuda.is_available(), "device": device or "auto",
              "spacing_mm": SPACING_MM, "repeats": repeats, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="lungscreen-bench-ingest-") as tmp:
        cases = _write_cases(Path(tmp), slices)
        for case, folder in cases.items():
            entry = {}
            for method in METHODS:
                runs = [_spawn(method, folder, device) for _ in range(repeats)]
                best = min(runs, key=lambda r: r["seconds"])
                best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
                entry[method] = best
                print(f"{case:>26} {method:>10}: {best['seconds']:.2f} s (read {best['read_s']:.2f}, "
                      f"resample {best['resample_s']:.2f}), peak {best['peak_rss_mb']:.0f} MB", flush=True)
            entry["ratio"] = entry["lungscreen"]["seconds"] / entry["simpleitk"]["seconds"]
            report["cases"][case] = entry
    write_json(report, Path(out_dir) / "ingest.json")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = None if args.device == "auto" else args.device
    if args.child:
        _child(args.child[0], args.child[1], device)
        return 0
    run(args.out, repeats=args.repeats, slices=args.slices, device=device)
    print(f"wrote {Path(args.out) / 'ingest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
