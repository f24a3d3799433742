"""Runs over many scans: discovery, a process pool or a Dask cluster, ``errors.csv``,
the all-scans ``candidates.csv``, ``run.json`` and ``report.html``.

One bad scan never stops a run: its error (file and reason, one line) goes to
``OUT_DIR/errors.csv`` and the run goes on.  Run-level files are rebuilt from the per-scan
outputs at the end, sorted, so a resumed run writes byte-identical CSVs.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import platform
import resource
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from pipeline.io import write_csv, write_json
from pipeline.run import ScanResult, process_scan
from stages.errors import ScanError

log = logging.getLogger(__name__)

__all__ = ["discover_scans", "run_many", "IMAGE_SUFFIXES"]

#: File types read by SimpleITK, one scan per file.
IMAGE_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nii", ".nii.gz")
#: Files that are never part of a DICOM series (ignored when looking for scans).
NOT_DICOM_SUFFIXES = (".csv", ".txt", ".json", ".md", ".yaml", ".yml", ".raw", ".zraw",
                      ".png", ".jpg", ".html", ".h5", ".xml", ".py", ".lst")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def discover_scans(source, *, limit: int | None = None, only: list[str] | None = None) -> list[Path]:
    """Every scan under ``source``, sorted, each once.

    ``source`` may be one DICOM series folder, a folder of patient folders (Kaggle DSB 2017),
    a LUNA16 tree (``subset0..9/*.mhd``), one image file, a text file listing paths (one a
    line, ``#`` comments), or a mix.  A folder that directly holds DICOM-like files is one
    scan (nested series inside it are read with it); otherwise its subfolders are searched.

    Parameters
    ----------
    limit : int, optional
        Keep only the first ``limit`` scans.
    only : list of str, optional
        Keep scans whose path contains one of these strings (e.g. a seriesuid or patient folder).

    Raises
    ------
    ScanError
        ``source`` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise ScanError(source, "no such file or folder")
    found: list[Path] = []
    if source.is_file():
        if _suffix(source) in (".txt", ".lst"):
            for line in source.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    entry = Path(line) if Path(line).is_absolute() else source.parent / line
                    found.extend(discover_scans(entry))
        else:
            found.append(source)
    else:
        found.extend(_walk(source))
    seen, scans = set(), []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            scans.append(p)
    if only:
        def rel(p: Path) -> str:
            return str(p.relative_to(source)) if source.is_dir() and p.is_relative_to(source) else str(p)
        scans = [p for p in scans if any(o in rel(p) for o in only)]
    return scans[:limit] if limit else scans


def _walk(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if _suffix(p) in IMAGE_SUFFIXES]
    dicom_like = [p for p in files if _suffix(p) not in IMAGE_SUFFIXES + NOT_DICOM_SUFFIXES]
    if dicom_like:
        return [folder] + images
    out = list(images)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.extend(_walk(sub))
    return out


def _one(path, out_dir, config, force, pictures, prepare_only=False, on_stage=None) -> ScanResult:
    """Process one scan; turn any failure into a one-line error (never raises)."""
    logging.basicConfig(level=logging.WARNING)
    try:
        result = process_scan(path, out_dir, config, force=force, pictures=pictures,
                              prepare_only=prepare_only, on_stage=on_stage)
    except ScanError as exc:
        result = ScanResult(source=str(path), status="failed", error=exc.reason)
    except MemoryError:
        result = ScanResult(source=str(path), status="failed", error="out of memory")
    except Exception as exc:  # a bug or an unexpected file: record it, keep the run going
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = ScanResult(source=str(path), status="failed",
                            error=f"{type(exc).__name__}: {' '.join(str(exc).split())} "
                                  f"(at {Path(where.filename).name}:{where.lineno})")
    result.seconds["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def first_gpu_stage(config: dict) -> str | None:
    """The first stage of ``config`` that will run on CUDA (its ``device`` is cuda, or auto
    with a GPU present), or None."""
    import torch

    for name in config["stages"]:
        device = str((config.get(name) or {}).get("device", "")).lower()
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            return name
    return None


def run_many(scans: list[Path], out_dir, config: dict, *, workers: int = 1, force: bool = False,
             executor: str = "local", scheduler: str | None = None, pictures: int = 5,
             progress: bool | None = None, gpu_from: str | None = "auto") -> list[ScanResult]:
    """Process ``scans``, then write the run-level files; returns one result per scan.

    Parameters
    ----------
    workers : int
        Scans processed at once (a process pool when > 1).
    executor : {"local", "dask"}
        ``"dask"`` submits scans to the Dask distributed scheduler at ``scheduler``
        (``tcp://host:8786``); every worker must see ``out_dir`` and the scans.
    progress : bool, optional
        tqdm bars with ETA; default: when stderr is a terminal.
    gpu_from : str, optional
        With ``workers > 1`` on the local pool: the stages before this one run in the pool
        (and are cached), this stage and those after it run in this one process, scan after
        scan, so one CUDA context serves every scan and GPU memory is not split between
        workers.  ``"auto"``: the first stage that will run on CUDA (none without a GPU).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    args = [(str(p), str(out_dir), config, force, pictures) for p in scans]
    bar = tqdm(total=len(args), unit="scan", desc="scans",
               disable=not (sys.stderr.isatty() if progress is None else progress))
    results: list[ScanResult] = []

    def stage_shower(source):
        def show(stage):
            bar.set_postfix_str(f"{Path(source).name}: {stage}"[:60])
        return None if bar.disable else show

    def collect(res: ScanResult):
        results.append(res)
        bar.update(1)
        bar.set_postfix_str(f"{res.status} {res.scan_id or Path(res.source).name}"[:60])
        if res.status == "failed":
            log.warning("%s: %s", res.source, res.error)

    if executor == "dask":
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = [client.submit(_one, *a, pure=False) for a in args]
            for fut in as_completed(futures):
                collect(fut.result())
    elif workers > 1 and len(args) > 1:
        split = first_gpu_stage(config) if gpu_from == "auto" else gpu_from
        cpu_stages = config["stages"][:config["stages"].index(split)] if split else []
        ctx = multiprocessing.get_context("spawn")  # no fork after torch/OpenMP start
        if cpu_stages:  # CPU stages in the pool, then the GPU stages here, one scan at a time
            prep = tqdm(total=len(args), unit="scan", desc="CPU stages", disable=bar.disable)
            cpu_config = {**config, "stages": cpu_stages}
            prepared = {}
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futs = {pool.submit(_one, a[0], a[1], cpu_config, a[3], a[4], True): a for a in args}
                for fut in cf.as_completed(futs):
                    res = fut.result()
                    prep.update(1)
                    if res.status == "failed":
                        collect(res)
                    else:
                        prepared[res.source] = (futs[fut], res)
            prep.close()
            for source in sorted(prepared):
                a, cpu_res = prepared[source]
                res = _one(*a, on_stage=stage_shower(a[0]))
                res.seconds = {**cpu_res.seconds, **res.seconds,
                               "peak_rss_mb": max(cpu_res.seconds.get("peak_rss_mb", 0),
                                                  res.seconds.get("peak_rss_mb", 0))}
                collect(res)
        else:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for fut in cf.as_completed([pool.submit(_one, *a) for a in args]):
                    collect(fut.result())
    else:
        for a in args:
            collect(_one(*a, on_stage=stage_shower(a[0])))
    bar.close()
    results.sort(key=lambda r: r.source)
    write_run_files(out_dir, results, config, seconds=time.time() - t0, workers=workers,
                    executor=executor)
    return results


def write_run_files(out_dir: Path, results: list[ScanResult], config: dict, **run_info) -> None:
    """``candidates.csv`` (all scans), ``errors.csv``, ``run.json`` and ``report.html``."""
    from pipeline.report import write_report

    frames = []
    for res in sorted(results, key=lambda r: r.scan_id):
        csv = Path(res.out_dir) / "candidates.csv" if res.out_dir else None
        if res.status != "failed" and csv is not None and csv.exists():
            frames.append(pd.read_csv(csv, dtype={"seriesuid": str}))
    if frames:
        write_csv(pd.concat(frames, ignore_index=True), out_dir / "candidates.csv", float_format="%.4f")
    elif (out_dir / "candidates.csv").exists():  # never leave an older run's marks to be scored
        (out_dir / "candidates.csv").unlink()
    errors = pd.DataFrame([{"path": r.source, "error": r.error} for r in results if r.status == "failed"],
                          columns=["path", "error"]).sort_values("path")
    write_csv(errors, out_dir / "errors.csv")
    write_json({"python": sys.version.split()[0], "platform": platform.platform(),
                "versions": _versions(), "config": config,
                "n_scans": len(results), "n_failed": int(sum(r.status == "failed" for r in results)),
                **run_info, "scans": [asdict(r) for r in results]}, out_dir / "run.json")
    write_report(out_dir, results)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("lungscreen", "numpy", "scipy", "scikit-image", "pandas", "h5py", "pydicom",
                 "SimpleITK", "torch", "pylibjpeg"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
