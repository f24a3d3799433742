"""Runs over many scans: discovery, a process pool or a Dask cluster, ``errors.csv``,
the all-scans ``candidates.csv``, ``run.json`` and ``report.html``.

One bad scan never stops a run: its error (file and reason, one line) goes to
``OUT_DIR/errors.csv`` and the run goes on.  Run-level files are rebuilt from the per-scan
outputs at the end, sorted, so a resumed run writes byte-identical CSVs.

Runs may share an output folder (two ``make run`` on one ``OUT_DIR``, same or overlapping
scans): each scan is screened once, under a lock (:mod:`pipeline.locks`,
:func:`pipeline.run.process_scan`).  A run that finds a scan held by another goes on with its
other scans and comes back to it at the end, waiting if need be (a progress line says so), and
then takes the other run's outputs (``cached``).  The run-level files are written under a lock
of the folder, all four by one run at a time, each holding exactly that run's scans: the
run that finishes last leaves its own.  Two runs over the same scans leave the CSVs one run
alone would.  ``flock`` needs a file system that supports it (see :mod:`pipeline.locks` for NFS
and Dask workers on several machines).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import logging
import multiprocessing
import os
import platform
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from pipeline.cache import DEFAULT_CACHE, check_cache_choice
from pipeline.config import effective_settings
from pipeline.io import write_csv, write_json
from pipeline.locks import hold, lock_path
from pipeline.outputs import DEFAULT_VOLUME_FORMAT, volume_file
from pipeline.progress import DEFAULT_MODE, Reporter
from pipeline.run import PICTURES, ScanResult, process_scan
from pipeline.steps import series_source, split_source
from stages.device import pick_device
from stages.errors import ScanError

__all__ = ["discover_scans", "run_many", "IMAGE_SUFFIXES", "Interrupted", "OutputFull"]


class OutputFull(OSError):
    """The output folder cannot take more (no space left, quota exceeded, read-only): the
    batch stops, since every later scan would fail the same way.  ``results`` holds the scans
    that finished; each of their files is complete (atomic writes)."""

    def __init__(self, out_dir, reason: str, results=()):
        super().__init__(f"{out_dir}: {reason}")
        self.out_dir, self.reason, self.results = str(out_dir), reason, list(results)

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.out_dir, self.reason, self.results))


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _output_full(exc: BaseException) -> str | None:
    """The reason when ``exc`` says the output's file system is full or read-only, else None
    (HDF5 reports it in its message, not its errno)."""
    if getattr(exc, "errno", None) in _FULL_ERRNOS:
        return os.strerror(exc.errno).lower()
    text = str(exc)
    if "No space left on device" in text or "errno = 28" in text:
        return "no space left on device"
    return None


def _check_output_folder(out_dir: Path) -> None:
    """Create ``out_dir`` and write a file in it, before any scan is screened: a folder that
    cannot be made or written (read-only, no permission, a file of that name) is one
    :class:`OutputFull` error naming it, not a traceback after the first scan's work."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except (FileExistsError, NotADirectoryError):
        raise OutputFull(out_dir, "not a folder (a file of that name is in the way)") from None
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else _first_line(exc)
        raise OutputFull(out_dir, reason) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Interrupted(KeyboardInterrupt):
    """A batch stopped by Ctrl-C (or SIGTERM, which the CLI turns into one): ``results`` holds
    the scans that finished; their outputs and the run's CSVs for them are written."""

    def __init__(self, results):
        super().__init__()
        self.results = results

#: File types read by SimpleITK, one scan per file.
IMAGE_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nii", ".nii.gz")
#: Files that are never part of a DICOM series (ignored when looking for scans).
NOT_DICOM_SUFFIXES = (".csv", ".txt", ".json", ".md", ".yaml", ".yml", ".raw", ".zraw",
                      ".png", ".jpg", ".html", ".h5", ".xml", ".py", ".lst")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def discover_scans(source, *, limit: int | None = None, only: list[str] | None = None,
                   _chain: tuple = ()) -> list[Path]:
    """Every scan under ``source``, sorted, each once.

    ``source`` may be one DICOM series folder, a folder of patient folders (Kaggle DSB 2017),
    a LUNA16 tree (``subset0..9/*.mhd``), one image file, a text file listing paths (one a
    line, ``#`` comments; ``FOLDER#series=UID`` names one series of a folder), or a mix.  A
    folder that directly holds DICOM-like files is one scan (nested series inside it are read
    with it); otherwise its subfolders are searched, and sibling subfolders holding one series
    between them (a CD export's split series) are one scan: their parent, or
    ``PARENT#series=UID`` when the parent holds other series too.
    An empty folder inside ``source`` and a listed path that is missing or holds no scan are
    returned too, so that each fails alone with its reason in ``errors.csv`` while the other
    scans run.

    Parameters
    ----------
    limit : int, optional
        Keep only the first ``limit`` scans.
    only : list of str, optional
        Keep scans whose path contains one of these strings (e.g. a seriesuid or patient folder).
    _chain : tuple
        Internal: the list files being read, so that a list naming itself (directly or through
        another list) is read once.

    Raises
    ------
    ScanError
        ``source`` does not exist.
    """
    source = Path(source)
    if not _exists(source):
        raise ScanError(source, "no such file or folder")
    found: list[Path] = []
    if source.is_file():
        if _suffix(source) in (".txt", ".lst"):
            found.extend(_read_list(source, _chain))
        else:
            found.append(source)
    elif source.is_dir():
        found.extend(_walk(source))
    else:
        found.append(source)  # a device or pipe: handed on, it fails alone
    seen, scans = set(), []
    for p in found:
        if _key(p) not in seen:
            seen.add(_key(p))
            scans.append(p)
    if only:
        def rel(p: Path) -> str:
            return str(p.relative_to(source)) if source.is_dir() and p.is_relative_to(source) else str(p)
        scans = [p for p in scans if any(o in rel(p) for o in only)]
    return scans[:limit] if limit else scans


def _exists(path: Path) -> bool:
    """``path.exists()``; False for a name the file system refuses (too long, a NUL byte)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _key(path: Path):
    """What tells two listed paths apart: the resolved path, or the path itself when it cannot
    be resolved (a NUL byte, a symlink loop)."""
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError):
        return path


def _read_list(path: Path, chain: tuple) -> list[Path]:
    """The scans a list file names, one path a line (relative to the list; ``FOLDER#series=UID``
    names one series of a folder), ``#`` comments; any
    bytes are taken (undecodable ones become U+FFFD).  A list among ``chain`` (the lists
    being read, which name this one) is not read again."""
    chain = chain + (_key(path),)
    found: list[Path] = []
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        line = re.sub(r"#(?!series=).*", "", line).strip()  # a comment, not a series mark
        if not line:
            continue
        entry = Path(line) if Path(line).is_absolute() else path.parent / line
        if split_source(entry)[1] is not None:  # FOLDER#series=UID: that series
            found.append(entry)
            continue
        if _key(entry) in chain:
            continue  # a list naming itself, or a list that names it
        # an entry that is missing or holds no scan is handed on as it is: it fails
        # alone, with its reason in errors.csv, and the rest run
        found.extend((discover_scans(entry, _chain=chain) if _exists(entry) else []) or [entry])
    return found


def _walk(folder: Path, *, top: bool = True) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top and not files and not subs:
        return [folder]  # an empty patient folder: it fails alone, in errors.csv, not in silence
    images = [p for p in files if _suffix(p) in IMAGE_SUFFIXES]
    dicom_like = [p for p in files if _suffix(p) not in IMAGE_SUFFIXES + NOT_DICOM_SUFFIXES]
    if dicom_like:
        return [folder] + images
    out = list(images)
    for sub in subs:
        out.extend(_walk(sub, top=False))
    return _join_split_series(folder, out)


def _join_split_series(folder: Path, found: list[Path]) -> list[Path]:
    """Make one scan of a DICOM series whose files lie in several subfolders of ``folder``
    (CD/DVD exports and some PACS tools split a series at a few hundred files a folder): the
    subfolders whose first DICOM files have the same Series Instance UID, and different SOP
    Instance UIDs (copies of one series are not parts of it), become ``folder`` (when they are
    all it holds) or ``folder#series=UID``, read from everything under ``folder``.  One header
    is read per subfolder."""
    ids = {p: _first_dicom_ids(p) for p in found if p.parent == folder and p.is_dir()}
    groups: dict[str, list[str]] = {}
    for series_uid, sop_uid in filter(None, ids.values()):
        groups.setdefault(series_uid, []).append(sop_uid)
    split = {uid for uid, sops in groups.items() if len(sops) > 1 and len(set(sops)) == len(sops)}
    if not split:
        return found
    uid_of = {p: i[0] for p, i in ids.items() if i}
    out, done = [], set()
    for p in found:
        uid = uid_of.get(p)
        if uid not in split:
            out.append(p)
        elif uid not in done:
            done.add(uid)
            whole = len(split) == 1 and all(uid_of.get(q) == uid for q in found)
            out.append(folder if whole else series_source(folder, uid))
    return out


def _first_dicom_ids(folder: Path) -> tuple[str, str] | None:
    """``(Series Instance UID, SOP Instance UID)`` of the first file (by name) in ``folder``
    that has a series UID, else None."""
    import pydicom

    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if _suffix(f) in IMAGE_SUFFIXES + NOT_DICOM_SUFFIXES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, stop_before_pixels=True,
                                     specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM, damaged: that folder stays a scan of its own
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            return uid, str(ds.get("SOPInstanceUID", "") or f.name)
    return None


def _one(path, out_dir, config, force, pictures, prepare_only=False, *, cache=DEFAULT_CACHE,
         save_ct=False, device=None, reporter=None, volume_format=DEFAULT_VOLUME_FORMAT,
         wait=True) -> ScanResult:
    """Process one scan; turn any failure into a one-line error (never raises, but for a full
    output folder).  ``wait=False``: status ``"busy"`` when another run holds the scan."""
    global _IN_SCAN
    logging.basicConfig(level=logging.WARNING)
    try:
        if _STOP_REQUESTED:  # stopped while its last scan ran on (the raise was dropped): start no other
            os._exit(128 + signal.SIGTERM)
        _IN_SCAN = True
        result = process_scan(path, out_dir, config, force=force, pictures=pictures,
                              prepare_only=prepare_only, cache=cache, save_ct=save_ct,
                              device=device, reporter=reporter, volume_format=volume_format, wait=wait)
    except _WorkerStopped:  # the pool is being stopped: the scan has unwound, leave now
        os._exit(128 + signal.SIGTERM)
    except ScanError as exc:
        result = ScanResult(source=str(path), status="failed", error=exc.reason)
    except MemoryError:
        result = ScanResult(source=str(path), status="failed", error="out of memory")
    except Exception as exc:  # a bug or an unexpected file: record it, keep the run going
        if (full := _output_full(exc)) is not None:  # ... unless the output can take no more
            raise OutputFull(out_dir, full) from None
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = ScanResult(source=str(path), status="failed",
                            error=f"{type(exc).__name__}: {' '.join(str(exc).split())} "
                                  f"(at {Path(where.filename).name}:{where.lineno})")
    finally:
        _IN_SCAN = False
    result.seconds["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


class _WorkerStopped(BaseException):
    """Raised in a pool worker by SIGTERM (the parent stopping the pool) while it screens a
    scan: the scan unwinds, so every atomic write under way removes its temporary file, and
    the worker exits (:func:`_one`)."""


_IN_SCAN = False  # a pool worker is inside _one
_STOP_REQUESTED = False  # SIGTERM came: kept, since the raise may land where Python drops it
_INTERRUPT_PENDING = False  # Ctrl-C or SIGTERM came to the run's own process: kept, as above


def interrupt(signum, frame):
    """The run's Ctrl-C and SIGTERM handler (``lungscreen run``): raise KeyboardInterrupt and
    remember the stop, since a raise inside a finalizer (a weakref callback run by the
    garbage collector) is dropped by Python; the scan loop raises it again before the next
    scan and after the last (:func:`_check_interrupt`)."""
    global _INTERRUPT_PENDING
    _INTERRUPT_PENDING = True
    raise KeyboardInterrupt


def _check_interrupt() -> None:
    """Raise the Ctrl-C that :func:`interrupt` took, if a finalizer dropped its raise."""
    if _INTERRUPT_PENDING:
        raise KeyboardInterrupt


def _stop_worker(signum, frame):
    global _STOP_REQUESTED
    _STOP_REQUESTED = True
    if _IN_SCAN:
        raise _WorkerStopped
    os._exit(128 + signum)  # idle: nothing to clean up


def _ignore_stop_in_finalizers(unraisable, _default=sys.unraisablehook) -> None:
    """sys.unraisablehook of a pool worker and of the run: a :class:`_WorkerStopped` or a
    KeyboardInterrupt raised inside a finalizer (a weakref callback run by the garbage
    collector) is dropped by Python, which would print its traceback; the stop is remembered
    in ``_STOP_REQUESTED`` or ``_INTERRUPT_PENDING`` instead."""
    if not isinstance(unraisable.exc_value, (_WorkerStopped, KeyboardInterrupt)):
        _default(unraisable)


def _start_worker(torch_threads: int) -> None:
    """Pool initializer: the worker's torch threads, set once (workers share the cores); Ctrl-C
    is left to the parent, which stops the workers with SIGTERM (no traceback from each of
    them; a scan under way unwinds first, leaving no temporary file)."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    sys.unraisablehook = _ignore_stop_in_finalizers
    torch.set_num_threads(torch_threads)


#: Seconds a stopped pool worker gets to unwind its scan before it is killed.
STOP_WAIT_S = 30


@contextlib.contextmanager
def _pool(workers: int):
    """``workers`` spawned processes (no fork after torch/OpenMP start), each with its share
    of the CPU cores as torch threads.  Left by an exception (Ctrl-C), the workers are stopped
    at once and nothing queued starts; every file a worker writes is written atomically, so a
    scan stopped half-way leaves nothing under a final name."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_start_worker, initargs=(threads,))
    try:
        yield pool
    except BaseException:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        for proc in procs:  # a worker unwinds its scan (removing temporary files), then exits
            proc.join(timeout=STOP_WAIT_S)
            if proc.is_alive():
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def first_gpu_stage(config: dict, device=None) -> str | None:
    """The first stage of ``config`` that will run on CUDA (one that computes on the run's
    ``device`` when that is a GPU), or None."""
    from pipeline.steps import get_step
    from stages.device import pick_device

    if pick_device(device).type != "cuda":
        return None
    return next((name for name in config["stages"] if get_step(name).uses_device), None)


def run_many(scans: list[Path], out_dir, config: dict, *, workers: int = 1, force: bool = False,
             executor: str = "local", scheduler: str | None = None, pictures: int = PICTURES,
             progress: str | bool | None = DEFAULT_MODE, gpu_from: str | None = "auto",
             cache: str = DEFAULT_CACHE, save_ct: bool = False, device=None,
             volume_format: str = DEFAULT_VOLUME_FORMAT) -> list[ScanResult]:
    """Process ``scans``, then write the run-level files; returns one result per scan.

    Parameters
    ----------
    workers : int
        Scans processed at once (a process pool when > 1, each worker with
        ``cpu_count // workers`` torch threads, set once; one process keeps torch's default).
    executor : {"local", "dask"}
        ``"dask"`` submits scans to the Dask distributed scheduler at ``scheduler``
        (``tcp://host:8786``); every worker must see ``out_dir`` and the scans.
    pictures : int
        ``candidate_NN.png`` pictures of each scan's best candidates.
    progress : {"auto", "bar", "log", "quiet"}
        What the run shows on stderr (:mod:`pipeline.progress`): tqdm bars, one line per
        stage start and end, or nothing; ``"auto"``: bars on a terminal, lines otherwise.
        Worker processes print lines in ``"log"`` mode and nothing otherwise.  ``True``,
        ``False`` and ``None`` (before these modes) mean ``"bar"``, ``"log"`` and ``"auto"``.
    gpu_from : str, optional
        With ``workers > 1`` on the local pool: the stages before this one run in the pool
        (and are cached), this stage and those after it run in this one process, scan after
        scan, so one CUDA context serves every scan and GPU memory is not split between
        workers.  ``"auto"``: the first stage that will run on CUDA (none without a GPU).
    cache : {"none", "stages", "all"}
        What each scan's ``scan.h5`` keeps (:mod:`pipeline.cache`).
    save_ct : bool
        Also write each scan's ``ct_1mm.nrrd``.
    volume_format : {"nrrd", "nifti"}
        Each scan's volumes as ``.nrrd`` or ``.nii.gz`` (:func:`pipeline.run.process_scan`);
        recorded in ``run.json``.
    device : str, optional
        Where the stages that compute on a device run: ``"cpu"``, ``"cuda"``, ``"cuda:N"``;
        ``None`` or ``"auto"``: CUDA when torch sees a GPU, else the CPU.

    Notes
    -----
    Another run may share ``out_dir``: a scan it holds is set aside and screened (or found
    done) after the others, waiting for that run if need be (see the module docstring).
    """
    check_cache_choice(cache)
    volume_file("lung_mask", volume_format)  # an unknown format is refused before any scan
    if progress is None or isinstance(progress, bool):
        progress = {None: "auto", True: "bar", False: "log"}[progress]
    reporter = Reporter(progress)
    worker_reporter = Reporter("log") if reporter.mode == "log" else None  # no bars from workers
    out_dir = Path(out_dir)
    _check_output_folder(out_dir)
    t0 = time.time()
    args = [(str(p), str(out_dir), config, force, pictures) for p in scans]
    options = {"cache": cache, "save_ct": save_ct, "device": device, "volume_format": volume_format}
    reporter.scans_bar(len(args))
    results: list[ScanResult] = []
    busy: set[str] = set()  # held by another run on out_dir: set aside, screened last

    def collect(res: ScanResult):
        if res.status == "busy":
            busy.add(res.source)
            reporter.scan_deferred(Path(res.source).name)
            return
        results.append(res)
        reporter.scan_done(res, len(results), len(args))  # a failure's reason: errors.csv and
        # the command's summary (pipeline.__main__), once each

    # run.json: how the run ran; the device is where the device stages computed (resolved:
    # "cuda" when torch saw a GPU and --device was auto), for the record
    info = {"workers": workers, "executor": executor, "cache": cache, "device": str(pick_device(device)),
            "volume_format": volume_format}
    try:
        _execute(args, {**options, "wait": False}, config, executor, scheduler, workers, gpu_from,
                 device, collect, reporter, worker_reporter)
        if busy:  # now wait for the other run where it still holds them
            _execute([a for a in args if a[0] in busy], {**options, "wait": True}, config, executor,
                     scheduler, workers, gpu_from, device, collect, reporter, worker_reporter)
    except KeyboardInterrupt:
        reporter.close()
        results.sort(key=lambda r: r.source)
        write_run_files(out_dir, results, config, seconds=time.time() - t0, **info,
                        interrupted=True)
        raise Interrupted(results) from None
    except OSError as exc:
        full = exc.reason if isinstance(exc, OutputFull) else _output_full(exc)
        if full is None:
            raise
        reporter.close()
        results.sort(key=lambda r: r.source)
        with contextlib.suppress(OSError):  # the run's CSVs for the finished scans, if they fit
            write_run_files(out_dir, results, config, seconds=time.time() - t0, **info,
                            stopped=full)
        raise OutputFull(out_dir, full, results) from None
    reporter.close()
    results.sort(key=lambda r: r.source)
    try:
        write_run_files(out_dir, results, config, seconds=time.time() - t0, **info)
    except OSError as exc:
        if (full := _output_full(exc)) is None:
            raise
        raise OutputFull(out_dir, full, results) from None
    return results


def _execute(args, options, config, executor, scheduler, workers, gpu_from, device, collect,
             reporter, worker_reporter) -> None:
    """Screen every scan of ``args`` (run_many's loop), handing each result to ``collect``."""
    if executor == "dask":
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = [client.submit(_one, *a, **options, reporter=worker_reporter, pure=False)
                       for a in args]
            for fut in as_completed(futures):
                collect(fut.result())
    elif workers > 1 and len(args) > 1:
        split = first_gpu_stage(config, device) if gpu_from == "auto" else gpu_from
        cpu_stages = config["stages"][:config["stages"].index(split)] if split else []
        if cpu_stages:  # CPU stages in the pool, then the GPU stages here, one scan at a time
            cpu_config = {**config, "stages": cpu_stages}
            prepared = {}
            with _pool(workers) as pool:
                futs = {pool.submit(_one, a[0], a[1], cpu_config, a[3], a[4], True, **options,
                                    reporter=worker_reporter): a for a in args}
                prep = reporter.bar(len(args), desc="CPU stages")
                for fut in cf.as_completed(futs):
                    res = fut.result()
                    prep.update(1)
                    if res.status in ("failed", "busy"):
                        collect(res)
                    else:
                        prepared[res.source] = (futs[fut], res)
            prep.close()
            for source in sorted(prepared):
                a, cpu_res = prepared[source]
                res = _one(*a, **options, reporter=reporter)
                res.seconds = {**cpu_res.seconds, **res.seconds,
                               "peak_rss_mb": max(cpu_res.seconds.get("peak_rss_mb", 0),
                                                  res.seconds.get("peak_rss_mb", 0))}
                collect(res)
        else:
            with _pool(workers) as pool:
                futs = [pool.submit(_one, *a, **options, reporter=worker_reporter) for a in args]
                pending = set(futs)
                try:
                    for fut in cf.as_completed(futs):
                        pending.discard(fut)
                        collect(fut.result())
                except KeyboardInterrupt:  # scans the workers finished meanwhile count as done
                    for fut in [f for f in futs if f in pending and f.done() and not f.cancelled()]:
                        with contextlib.suppress(Exception):
                            collect(fut.result(timeout=0))
                    raise
    else:
        for a in args:
            _check_interrupt()
            collect(_one(*a, **options, reporter=reporter))
    _check_interrupt()


def write_run_files(out_dir: Path, results: list[ScanResult], config: dict, **run_info) -> None:
    """``candidates.csv`` (all scans), ``patients.csv`` (one verdict per patient), ``errors.csv``,
    ``run.json`` and ``report.html``, each written atomically, all five under the folder's run
    lock (another run on ``out_dir`` writes its own before or after, never between)."""
    with hold(lock_path(out_dir, "run")):
        _write_run_files(Path(out_dir), results, config, **run_info)


def _write_run_files(out_dir: Path, results: list[ScanResult], config: dict, **run_info) -> None:
    from pipeline.patients import write_patients_csv
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
    write_patients_csv(out_dir, sorted(results, key=lambda r: r.scan_id))
    errors = pd.DataFrame([{"path": r.source, "error": r.error} for r in results if r.status == "failed"],
                          columns=["path", "error"]).sort_values("path")
    write_csv(errors, out_dir / "errors.csv")
    write_json({"python": sys.version.split()[0], "platform": platform.platform(),
                "versions": _versions(), "config": config,
                "settings": effective_settings(config),
                "n_scans": len(results), "n_failed": int(sum(r.status == "failed" for r in results)),
                **run_info, "scans": [asdict(r) for r in results]}, out_dir / "run.json")
    write_report(out_dir, results)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("lungscreen", "numpy", "scipy", "scikit-image", "pandas", "h5py", "pydicom",
                 "SimpleITK", "nibabel", "torch", "pylibjpeg"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
