"""Run the configured stages on one scan and write its outputs.

Outputs of a scan, in ``OUT_DIR/<scan_id>/`` (``scan_id``: SeriesInstanceUID for DICOM,
the file stem otherwise), each written under a temporary name and renamed.  Volumes are NRRD
(``.nrrd``, the default) or NIfTI (``.nii.gz``, ``volume_format="nifti"``, ``--format
nifti``); the viewer files (:mod:`pipeline.outputs`) are written in either case:

* ``lung_mask.nrrd``  uint8 labels (1 right lung, 2 left lung) at 1 mm, LPS geometry (3D
  Slicer overlays it on the original scan)
* ``lung_mask.seg.nrrd`` the same labels as a 3D Slicer segmentation: segments "right lung"
  and "left lung" with their colours and terminology
* ``lung_mask_native.nrrd`` the same labels on the input scan's own grid (nearest
  neighbour): its shape, spacing, origin and direction
* ``candidates.csv``  LUNA16 columns (seriesuid, coordX, coordY, coordZ, ...) then features
* ``candidates.mrk.json`` the rows of ``candidates.csv`` as 3D Slicer markups (LPS), one
  control point per finding in rank order, labelled ``F01``, ``F02``... with the rank, the
  probability, the diameter and the finding type in its description
* ``embeddings.csv``  the CNN embedding of the 32 most probable candidates (``embed`` stage),
  what the patient model reads
* ``preview.png``     three orthogonal slices with the lung mask and candidates drawn
* ``candidate_NN.png`` three slices through each top candidate
* ``finding_NN.jpg``  each top candidate zoomed (60 mm) beside its whole source slice, and
  ``findings.json`` their facts and source slice numbers (:func:`pipeline.preview.save_finding_pictures`)
* ``scan.h5``         the stage cache (see :mod:`pipeline.cache`): by default every stage
  result but the CT volumes; ``cache="all"`` keeps those too, ``"none"`` leaves no file
* ``ct_1mm.nrrd``     only with ``save_ct=True``: int16 HU at 1 mm on the lung mask's grid
* ``lung_mask.seg.dcm``, ``findings.sr.dcm``  DICOM inputs only: the lung mask as a DICOM SEG
  and the findings as a DICOM SR, in the source series' study (:mod:`pipeline.dicom_outputs`)
* ``scan.json``       written last: stage keys and timings; its presence means "done"

Runs that share ``OUT_DIR`` screen each scan once: :func:`process_scan` holds a lock per scan
(``OUT_DIR/.locks/``, :mod:`pipeline.locks`) from its look-up to its last write.

Sizes on a 512x512x300 phantom (0.7 x 0.7 x 1 mm, noise 20 HU; 300x358x358 at 1 mm): the
lung mask 0.4 MB, the pictures 0.3 MB each, ``scan.h5`` 0.4 MB, ``candidates.csv`` 0.04 MB;
``ct_1mm.nrrd`` 42 MB (gzip), which is why it is opt-in.

A finished scan is skipped only when the files these settings write are all there: a rerun
with another ``volume_format`` (or after an upgrade that adds an output) writes them from
the stage cache, and removes the other format's volumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import (DEFAULT_CACHE, StageCache, caches_output, check_cache_choice, code_version,
                            stage_key)
from pipeline.io import write_csv, write_json, write_volume
from pipeline.outputs import (CSV_DECIMALS, DEFAULT_VOLUME_FORMAT, VOLUME_FORMATS, mask_on_native_grid,
                              volume_file, write_markups, write_segmentation)
from pipeline.locks import Busy, hold, lock_path
from pipeline.progress import Reporter, scan_name
from pipeline.steps import SERIES_MARK, get_step, module_files, split_source
from stages.device import pick_device

log = logging.getLogger(__name__)

__all__ = ["screen", "StageRunner", "process_scan", "ScanResult", "source_key", "PICTURES", "CT_FILE"]

#: ``candidate_NN.png`` pictures written per scan (process_scan, run_many, ``--pictures``).
PICTURES = 5
#: The optional CT output (``save_ct=True``, ``--save-ct``), in the default volume format
#: (:func:`pipeline.outputs.volume_file` gives the other's name).
CT_FILE = volume_file("ct_1mm", DEFAULT_VOLUME_FORMAT)
#: Stems of the volume outputs; their suffix follows the volume format.
CT_STEM, MASK_STEM, NATIVE_MASK_STEM = "ct_1mm", "lung_mask", "lung_mask_native"


@dataclass
class ScanResult:
    """What happened to one input scan."""

    source: str
    scan_id: str = ""
    status: str = "ok"  # ok | cached | failed | prepared | busy (another run holds it)
    error: str = ""
    seconds: dict = field(default_factory=dict)
    n_candidates: int = 0
    out_dir: str = ""
    flags: list = field(default_factory=list)  # what a reader should know: e.g. repaired slices


def scan_flags(ct) -> list[str]:
    """Warnings about how the scan ``ct`` (a :class:`stages.volume.Volume`) was read, for the
    outputs and the report: slices replaced by interpolation (``meta["repaired_slices"]``)."""
    repaired = ct.meta.get("repaired_slices") or []
    if not repaired:
        return []
    return [f"{len(repaired)} unreadable slice{'s' * (len(repaired) > 1)} replaced by interpolation "
            f"from {'their' if len(repaired) > 1 else 'its'} neighbours: {'; '.join(repaired)}"]


def source_key(path) -> str:
    """Stable key of an input: its resolved path (and series, for ``FOLDER#series=UID``) plus
    the sizes and mtimes of its files."""
    path, series_uid = split_source(path)
    path = path.resolve()
    h = hashlib.sha1(str(path).encode() + (f"{SERIES_MARK}{series_uid}".encode() if series_uid else b""))
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _step_keys(config: dict, input_key: str) -> dict[str, str]:
    """Cache key of every stage's outputs, computed without running anything.

    Raises
    ------
    ValueError
        A stage needs a value that no stage before it in ``config['stages']`` produces.
    """
    value_keys = {"path": input_key}
    step_keys = {}
    for name in config["stages"]:
        step = get_step(name)
        missing = [i for i in step.inputs if i not in value_keys]
        if missing:
            raise ValueError(f"stage {name!r} needs {', '.join(map(repr, missing))}, which no "
                             f"stage before it in {config['stages']} produces")
        key = stage_key(name, config.get(name, {}), code_version(module_files(step)),
                        [value_keys[i] for i in step.inputs])
        step_keys[name] = key
        for out in step.outputs:
            value_keys[out] = key
    import pipeline.dicom_outputs as dicom_outputs  # its settings and code shape the outputs
    step_keys["outputs"] = stage_key("outputs", config.get("outputs") or {},
                                     code_version([dicom_outputs.__file__]), [])
    return step_keys


def screen(path, config: dict, *, device=None, stages: "StageRunner | None" = None) -> dict:
    """Run the stages of ``config['stages']`` on one scan, in order, and return what they made.

    With the default config that is, top to bottom::

        ct          = ingest(path)                      # stages.ingest.read_scan
        ct_1mm      = resample(ct)                      # stages.resample.resample
        lung_mask   = lungmask(ct_1mm)                  # stages.lungmask.segment_lungs
        candidates  = candidates(ct_1mm, lung_mask)     # stages.candidates.find_candidates
        candidates  = classify(ct_1mm, candidates)      # stages.classify.classify_candidates

    Each stage reads its inputs by name from what the stages before it made, and its
    settings from ``config[name]`` (:mod:`pipeline.steps` maps a name to its function), so a
    stage is swapped or dropped in the config alone.

    Parameters
    ----------
    path : str or Path
        The scan: a DICOM series folder or an image file.
    config : dict
        From :func:`pipeline.config.load_config`.
    device : str or torch.device, optional
        For the stages that compute on one; ``None``: CUDA when torch sees a GPU, else CPU.
    stages : StageRunner, optional
        Runs each stage (through a scan's stage cache, with progress and timing); default:
        plain calls.

    Returns
    -------
    dict
        ``{"path": ..., "ct": Volume, "ct_1mm": Volume, "lung_mask": Volume, "candidates":
        DataFrame}`` for the default stages: every value a stage made, the last one of each name.
    """
    stages = stages if stages is not None else StageRunner(config, device=device)
    values = {"path": str(path)}
    for name in config["stages"]:
        values.update(stages.run(name, values))
    return values


class StageRunner:
    """Runs one stage of a scan: loads its result from the scan's stage cache when the key
    matches, else calls it, times it, reports it and caches what the ``cache`` choice keeps.

    The cache file (``OUT_DIR/<scan_id>/scan.h5``) is known once the scan id is: before the
    scan has run (a rerun: ``scan_id``) or when a stage returns the scan (``ct``).
    """

    def __init__(self, config: dict, *, device=None, keys: dict | None = None, out_dir=None,
                 scan_id: str | None = None, keep: str = "none", force: bool = False,
                 reporter: Reporter | None = None, scan: str = "", seconds: dict | None = None):
        self.config, self.device = config, pick_device(device)
        self.keys, self.out_dir, self.keep, self.force = keys or {}, out_dir, keep, force
        self.reporter, self.scan = reporter, scan
        self.seconds = seconds if seconds is not None else {}
        self.store = (StageCache(Path(out_dir) / scan_id / "scan.h5")
                      if out_dir is not None and scan_id else None)

    def run(self, name: str, values: dict) -> dict:
        """The outputs of stage ``name`` given the values made so far: ``{output: value}``."""
        step, key = get_step(name), self.keys.get(name)
        if self.store is not None and key is not None and not self.force:
            cached = {out: self.store.get(f"{name}.{out}", key) for out in step.outputs}
            if all(v is not None for v in cached.values()):
                if self.reporter is not None:
                    self.reporter.stage_cached(self.scan, name)
                return cached
        extra = {"device": self.device} if step.uses_device else {}  # not settings: not in the key
        if self.reporter is not None:
            self.reporter.stage_started(self.scan, name)
            if step.progress_unit:
                extra["progress"] = self.reporter.progress_callback(self.scan, name, step.progress_unit)
        t0 = time.perf_counter()
        outputs = step.fn(**{i: values[i] for i in step.inputs}, **self.config.get(name, {}), **extra)
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: %s took %.2f s", self.scan, name, self.seconds[name])
        if self.reporter is not None:
            self.reporter.stage_done(self.scan, name, self.seconds[name])
        self._cache(name, key, outputs)
        return {out: outputs[out] for out in step.outputs}

    def _cache(self, name: str, key: str | None, outputs: dict) -> None:
        if self.store is None and self.out_dir is not None and outputs.get("ct") is not None:
            self.store = StageCache(Path(self.out_dir) / outputs["ct"].scan_id / "scan.h5")
        items = {f"{name}.{out}": (key, value) for out, value in outputs.items()
                 if caches_output(out, self.keep)}
        if self.store is not None and key is not None and items:
            self.store.put_many(items)


def process_scan(path, out_dir, config: dict, *, force: bool = False, pictures: int = PICTURES,
                 prepare_only: bool = False, cache: str = DEFAULT_CACHE, save_ct: bool = False,
                 device=None, reporter: Reporter | None = None,
                 volume_format: str = DEFAULT_VOLUME_FORMAT, wait: bool = True) -> ScanResult:
    """Screen the scan at ``path`` (:func:`screen`) and write its outputs under ``out_dir``.

    Finished scans are not recomputed: ``OUT_DIR/.sources/<key>.json`` remembers which scan
    id an input produced, and a scan whose ``scan.json`` holds the same stage keys, and whose
    folder holds every file these settings write, is skipped.  A stage whose key matches a
    result in ``scan.h5`` is loaded, not recomputed.

    Runs sharing ``out_dir`` are kept apart (:mod:`pipeline.locks`): the whole look-up,
    screen and write happen under an exclusive lock on ``OUT_DIR/.locks/<key>.lock``, so a
    second run that reaches the scan meanwhile waits (``wait``) and then finds it done
    (``cached``); the outputs are written under a second lock named after the scan id, so
    two inputs holding one series never mix their files in ``OUT_DIR/<scan_id>/`` (the
    last one's stay).

    Parameters
    ----------
    path : str or Path
        The scan: a DICOM series folder or an image file.
    out_dir : str or Path
        The run's output folder; the scan's outputs go to ``out_dir/<scan_id>/``.
    config : dict
        From :func:`pipeline.config.load_config`.
    force : bool
        Recompute every stage, ignoring ``scan.json`` and ``scan.h5``.
    pictures : int
        ``candidate_NN.png`` pictures of the best candidates.
    prepare_only : bool
        Compute and cache the stages but write no outputs (the CPU half of a run whose GPU
        stages then run in one process, see :func:`pipeline.batch.run_many`).  The hand-off
        caches every result, the CT included, whatever ``cache`` says; the scan's
        ``scan.h5`` is trimmed to ``cache`` when the scan is finished.
    cache : {"none", "stages", "all"}
        What ``scan.h5`` keeps of a finished scan (:mod:`pipeline.cache`): nothing (no
        file), every stage result but the CT volumes, or everything.  Whatever it holds
        with a matching key is loaded, whichever the choice.
    save_ct : bool
        Also write ``ct_1mm.nrrd`` (int16 HU at 1 mm, about 40 MB for a 512x512x300
        scan); without it an older ``ct_1mm.nrrd`` is removed when the outputs are written.
    volume_format : {"nrrd", "nifti"}
        File format of the volumes (``lung_mask``, ``lung_mask_native``, ``ct_1mm``):
        ``.nrrd`` or ``.nii.gz`` (NIfTI-1, qform and sform in scanner RAS, read aligned by
        nibabel and ITK-SNAP).  ``lung_mask.seg.nrrd`` and ``candidates.mrk.json`` are 3D
        Slicer's formats and are written with either.  Default
        :data:`pipeline.outputs.DEFAULT_VOLUME_FORMAT` (``--format``'s default too).
    device : str or torch.device, optional
        Chosen once here (:func:`stages.device.pick_device`) and passed to the stages that
        compute on one; ``None``: CUDA when torch sees a GPU, else the CPU.
    reporter : Reporter, optional
        Told when each stage starts, ends or is loaded from the cache, and given to the
        stages that count their work (:attr:`pipeline.steps.Step.progress_unit`).
    wait : bool
        When another process (another run on ``out_dir``) holds this scan: wait for it (the
        reporter says so) and then use what it wrote, or, with False, return at once a
        result with status ``"busy"`` (:func:`pipeline.batch.run_many` comes back to it).

    Raises
    ------
    stages.errors.ScanError
        The input is bad (the message names the file and the reason).
    ValueError
        ``cache`` is not one of :data:`pipeline.cache.CACHE_CHOICES`, or ``volume_format``
        not one of :data:`pipeline.outputs.VOLUME_FORMATS`.
    """
    check_cache_choice(cache)
    volume_file(MASK_STEM, volume_format)  # refuses an unknown format before any work
    out_dir = Path(out_dir)
    scan = scan_name(path)
    src_key = source_key(path)
    step_keys = _step_keys(config, src_key)

    def waiting():
        if reporter is not None:
            reporter.scan_waiting(scan)

    try:
        with hold(lock_path(out_dir, src_key), wait=wait, on_wait=waiting):
            return _process_locked(path, out_dir, config, src_key, step_keys, force=force,
                                   pictures=pictures, prepare_only=prepare_only, cache=cache,
                                   save_ct=save_ct, device=device, reporter=reporter,
                                   volume_format=volume_format)
    except Busy:
        return ScanResult(source=str(path), status="busy")


def _process_locked(path, out_dir: Path, config: dict, src_key: str, step_keys: dict, *,
                    force, pictures, prepare_only, cache, save_ct, device, reporter,
                    volume_format) -> ScanResult:
    """:func:`process_scan`'s work, done while it holds the scan's lock."""
    result = ScanResult(source=str(path))
    scan = scan_name(path)
    index_file = out_dir / ".sources" / f"{src_key}.json"
    known = json.loads(index_file.read_text()) if index_file.exists() else {}
    produced = {out for name in config["stages"] for out in get_step(name).outputs}

    if not force and known.get("scan_id"):
        done = out_dir / known["scan_id"] / "scan.json"
        info = json.loads(done.read_text()) if done.exists() else {}
        written = all((done.parent / name).exists()
                      for name in _output_files(produced, save_ct=save_ct, volume_format=volume_format))
        if info.get("keys") == step_keys and written:
            result.scan_id, result.status = known["scan_id"], "cached"
            result.n_candidates, result.out_dir = info.get("n_candidates", 0), str(done.parent)
            result.seconds, result.flags = info.get("seconds", {}), info.get("flags", [])
            _trim_cache(StageCache(done.parent / "scan.h5"), cache)
            return result

    stages = StageRunner(config, device=device, keys=step_keys, out_dir=out_dir,
                         scan_id=known.get("scan_id"), keep="all" if prepare_only else cache,
                         force=force, reporter=reporter, scan=scan, seconds=result.seconds)
    values = screen(path, config, stages=stages)
    scan_id = values["ct"].scan_id
    scan_dir = out_dir / scan_id
    result.scan_id, result.out_dir = scan_id, str(scan_dir)
    result.flags = scan_flags(values["ct"])
    write_json({"scan_id": scan_id, "source": str(path)}, index_file)
    if prepare_only:
        result.status = "prepared"
        return result

    waiting = (lambda: reporter.scan_waiting(scan)) if reporter is not None else None
    with hold(lock_path(out_dir, f"scan-{scan_id}"), on_wait=waiting):  # another input, same series
        if reporter is not None:
            reporter.stage_started(scan, "write")
        t0 = time.perf_counter()
        result.flags += _write_outputs(scan_dir, values, pictures=pictures, save_ct=save_ct,
                                       volume_format=volume_format,
                                       outputs=config.get("outputs") or {})
        result.seconds["write"] = round(time.perf_counter() - t0, 3)
        if reporter is not None:
            reporter.stage_done(scan, "write", result.seconds["write"])
        cands = values.get("candidates")
        result.n_candidates = 0 if cands is None else len(cands)
        _trim_cache(StageCache(scan_dir / "scan.h5"), cache)  # before scan.json: a kill leaves it unfinished
        write_json({"scan_id": scan_id, "keys": step_keys, "seconds": result.seconds,
                    "n_candidates": result.n_candidates, "flags": result.flags},
                   scan_dir / "scan.json")
    return result


def _trim_cache(store: StageCache, cache: str) -> None:
    """Leave in ``store`` only what the ``cache`` choice keeps of a finished scan."""
    store.drop([name for name in store.keys() if not caches_output(name.split(".", 1)[-1], cache)])


def _output_files(produced: set, *, save_ct: bool, volume_format: str) -> list[str]:
    """Names of the files :func:`_write_outputs` writes for a scan whose stages made the
    values named in ``produced`` (pictures and ``scan.h5`` aside)."""
    names = []
    if "lung_mask" in produced:
        names += [volume_file(MASK_STEM, volume_format), "lung_mask.seg.nrrd"]
        if "ct" in produced:
            names.append(volume_file(NATIVE_MASK_STEM, volume_format))
    if "candidates" in produced:
        names += ["candidates.csv", "candidates.mrk.json"]
    if save_ct and "ct_1mm" in produced:
        names.append(volume_file(CT_STEM, volume_format))
    return names


def _write_outputs(scan_dir: Path, values: dict, *, pictures: int, save_ct: bool,
                   volume_format: str = DEFAULT_VOLUME_FORMAT, outputs: dict | None = None) -> list[str]:
    """Write a scan's outputs (the module's list) from the stage ``values``; remove what an
    earlier run with other settings left (a CT not asked for, the other format's volumes).
    Returns flags about them (``outputs``: the config's section, for the DICOM SEG and SR)."""
    from pipeline.dicom_outputs import write_dicom_outputs
    from pipeline.preview import save_candidate_pictures, save_finding_pictures, save_preview

    scan_dir.mkdir(parents=True, exist_ok=True)
    for tmp in scan_dir.glob(".*.part*"):  # a killed run's (kill -9); this run holds the scan
        tmp.unlink(missing_ok=True)
    ct = values.get("ct_1mm", values.get("ct"))
    mask, cands = values.get("lung_mask"), values.get("candidates")
    keep = set(_output_files(set(values), save_ct=save_ct, volume_format=volume_format))
    for stem in (CT_STEM, MASK_STEM, NATIVE_MASK_STEM):
        for fmt in VOLUME_FORMATS:
            old = scan_dir / volume_file(stem, fmt)
            if old.name not in keep and old.exists():  # an earlier run's, maybe from other settings
                os.unlink(old)
    if save_ct and "ct_1mm" in values:
        write_volume(values["ct_1mm"], scan_dir / volume_file(CT_STEM, volume_format))
    native = None
    if mask is not None:
        write_volume(mask, scan_dir / volume_file(MASK_STEM, volume_format))
        write_segmentation(mask, scan_dir / "lung_mask.seg.nrrd")
        if values.get("ct") is not None:
            native = mask_on_native_grid(mask, values["ct"])
            write_volume(native, scan_dir / volume_file(NATIVE_MASK_STEM, volume_format))
    if cands is not None:
        write_csv(cands, scan_dir / "candidates.csv", float_format=f"%.{CSV_DECIMALS}f")
        write_markups(cands, scan_dir / "candidates.mrk.json")
    if values.get("embeddings") is not None:  # the patient RNN's input (stages.classify.embed_candidates)
        write_csv(values["embeddings"], scan_dir / "embeddings.csv", float_format="%.6g")
    save_preview(ct, scan_dir / "preview.png", mask=mask, candidates=cands)
    for old in scan_dir.glob("candidate_*.png"):
        os.unlink(old)
    if cands is not None and pictures:
        save_candidate_pictures(ct, cands.head(pictures), scan_dir, mask=mask)
    source_mask = native if native is not None else mask  # the mask on the source grid, made once
    save_finding_pictures(values.get("ct", ct), None if cands is None else cands.head(pictures), scan_dir,
                          mask=source_mask)
    # DICOM inputs: SEG (of the mask on the source grid) and SR
    return write_dicom_outputs(scan_dir, {**values, "lung_mask": source_mask}, **(outputs or {}))
