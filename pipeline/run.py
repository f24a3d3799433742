"""Run the configured stages on one scan and write its outputs.

Outputs of a scan, in ``OUT_DIR/<scan_id>/`` (``scan_id``: SeriesInstanceUID for DICOM,
the file stem otherwise), each written under a temporary name and renamed:

* ``lung_mask.nrrd``  uint8 labels (1 right lung, 2 left lung) at 1 mm, LPS geometry (3D
  Slicer overlays it on the original scan)
* ``candidates.csv``  LUNA16 columns (seriesuid, coordX, coordY, coordZ, ...) then features
* ``preview.png``     three orthogonal slices with the lung mask and candidates drawn
* ``candidate_NN.png`` three slices through each top candidate
* ``scan.h5``         the stage cache (see :mod:`pipeline.cache`): by default every stage
  result but the CT volumes; ``cache="all"`` keeps those too, ``"none"`` leaves no file
* ``ct_1mm.nrrd``     only with ``save_ct=True``: int16 HU at 1 mm on the lung mask's grid
* ``scan.json``       written last: stage keys and timings; its presence means "done"

Sizes on a 512x512x300 phantom (0.7 x 0.7 x 1 mm, noise 20 HU; 300x358x358 at 1 mm): the
lung mask 0.4 MB, the pictures 0.3 MB each, ``scan.h5`` 0.4 MB, ``candidates.csv`` 0.04 MB;
``ct_1mm.nrrd`` 42 MB (gzip), which is why it is opt-in.
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
from pipeline.progress import Reporter, scan_name
from pipeline.steps import get_step, module_files

log = logging.getLogger(__name__)

__all__ = ["process_scan", "ScanResult", "source_key", "PICTURES", "CT_FILE"]

#: ``candidate_NN.png`` pictures written per scan (process_scan, run_many, ``--pictures``).
PICTURES = 5
#: The optional CT output (``save_ct=True``, ``--save-ct``).
CT_FILE = "ct_1mm.nrrd"


@dataclass
class ScanResult:
    """What happened to one input scan."""

    source: str
    scan_id: str = ""
    status: str = "ok"  # ok | cached | failed
    error: str = ""
    seconds: dict = field(default_factory=dict)
    n_candidates: int = 0
    out_dir: str = ""


def source_key(path) -> str:
    """Stable key of an input: its resolved path plus the sizes and mtimes of its files."""
    path = Path(path).resolve()
    h = hashlib.sha1(str(path).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _step_keys(config: dict, input_key: str) -> dict[str, str]:
    """Cache key of every step's outputs, computed without running anything."""
    value_keys = {"path": input_key}
    step_keys = {}
    for name in config["stages"]:
        step = get_step(name)
        key = stage_key(name, config.get(name, {}), code_version(module_files(step)),
                        [value_keys[i] for i in step.inputs if i in value_keys])
        step_keys[name] = key
        for out in step.outputs:
            value_keys[out] = key
    return step_keys


def process_scan(path, out_dir, config: dict, *, force: bool = False, pictures: int = PICTURES,
                 prepare_only: bool = False, cache: str = DEFAULT_CACHE, save_ct: bool = False,
                 reporter: Reporter | None = None) -> ScanResult:
    """Run ``config['stages']`` on the scan at ``path``; write its outputs under ``out_dir``.

    Finished scans are not recomputed: ``OUT_DIR/.sources/<key>.json`` remembers which scan
    id an input produced, and a scan whose ``scan.json`` holds the same stage keys is
    skipped.  A stage whose key matches a result in ``scan.h5`` is loaded, not recomputed.

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
    reporter : Reporter, optional
        Told when each stage starts, ends or is loaded from the cache, and given to the
        stages that count their work (:attr:`pipeline.steps.Step.progress_unit`).

    Raises
    ------
    stages.errors.ScanError
        The input is bad (the message names the file and the reason).
    ValueError
        ``cache`` is not one of :data:`pipeline.cache.CACHE_CHOICES`.
    """
    check_cache_choice(cache)
    out_dir = Path(out_dir)
    result = ScanResult(source=str(path))
    scan = scan_name(path)
    src_key = source_key(path)
    step_keys = _step_keys(config, src_key)
    index_file = out_dir / ".sources" / f"{src_key}.json"
    known = json.loads(index_file.read_text()) if index_file.exists() else {}
    order = list(config["stages"])
    produced = {out for name in order for out in get_step(name).outputs}

    if not force and known.get("scan_id"):
        done = out_dir / known["scan_id"] / "scan.json"
        info = json.loads(done.read_text()) if done.exists() else {}
        ct_written = (done.parent / CT_FILE).exists() or "ct_1mm" not in produced
        if info.get("keys") == step_keys and (ct_written or not save_ct):
            result.scan_id, result.status = known["scan_id"], "cached"
            result.n_candidates, result.out_dir = info.get("n_candidates", 0), str(done.parent)
            result.seconds = info.get("seconds", {})
            _trim_cache(StageCache(done.parent / "scan.h5"), cache)
            return result

    values: dict = {(-1, "path"): str(path)}  # (index of the producing step, name) -> value
    store = StageCache(out_dir / known["scan_id"] / "scan.h5") if known.get("scan_id") else None
    pending: dict = {}  # results to cache computed before the scan id (and so the file) was known
    keep = "all" if prepare_only else cache  # what is written to scan.h5 while the scan runs

    def producer(name_of_value, before: int) -> int:
        """Index of the last step before ``before`` that outputs the value (-1: the input path)."""
        for j in range(before - 1, -1, -1):
            if name_of_value in get_step(order[j]).outputs:
                return j
        if name_of_value == "path":
            return -1
        raise ValueError(f"stage {order[before] if before < len(order) else 'output'!r} needs "
                         f"{name_of_value!r}, which no earlier stage in {order} produces")

    def value(j: int, name_of_value):
        if (j, name_of_value) not in values:
            run_step(j)
        return values[(j, name_of_value)]

    def run_step(i: int):
        nonlocal store
        name = order[i]
        step, key = get_step(name), step_keys[name]
        cached = None
        if store is not None and not force:
            cached = {out: store.get(f"{name}.{out}", key) for out in step.outputs}
            if any(v is None for v in cached.values()):
                cached = None
        if cached is not None:
            values.update({(i, out): v for out, v in cached.items()})
            if reporter is not None:
                reporter.stage_cached(scan, name)
            return
        inputs = {inp: value(producer(inp, i), inp) for inp in step.inputs}
        extra = {}  # not settings: never part of the stage key
        if reporter is not None:
            reporter.stage_started(scan, name)
            if step.progress_unit:
                extra["progress"] = reporter.progress_callback(scan, name, step.progress_unit)
        t0 = time.perf_counter()
        outputs = step.fn(**inputs, **config.get(name, {}), **extra)
        result.seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: %s took %.2f s", scan, name, result.seconds[name])
        if reporter is not None:
            reporter.stage_done(scan, name, result.seconds[name])
        values.update({(i, out): outputs[out] for out in step.outputs})
        items = {f"{name}.{out}": (key, outputs[out]) for out in step.outputs
                 if caches_output(out, keep)}
        if store is None:
            ct = outputs.get("ct")
            if ct is None:
                pending.update(items)
                return
            store = StageCache(out_dir / ct.scan_id / "scan.h5")
            items.update(pending)
            pending.clear()
        if items:
            store.put_many(items)

    # only the final value of each output name is needed; earlier stages load lazily
    wanted = [o for o in ("ct_1mm", "lung_mask", "candidates") if o in produced] or ["ct"]
    finals = {out: value(producer(out, len(order)), out) for out in wanted}
    first = finals[wanted[0]] if wanted[0] != "candidates" else value(producer("ct", len(order)), "ct")
    scan_id = first.scan_id
    scan_dir = out_dir / scan_id
    result.scan_id, result.out_dir = scan_id, str(scan_dir)
    write_json({"scan_id": scan_id, "source": str(path)}, index_file)
    if prepare_only:
        result.status = "prepared"
        return result

    if reporter is not None:
        reporter.stage_started(scan, "write")
    t0 = time.perf_counter()
    _write_outputs(scan_dir, finals, pictures=pictures, save_ct=save_ct)
    result.seconds["write"] = round(time.perf_counter() - t0, 3)
    if reporter is not None:
        reporter.stage_done(scan, "write", result.seconds["write"])
    cands = finals.get("candidates")
    result.n_candidates = 0 if cands is None else len(cands)
    _trim_cache(StageCache(scan_dir / "scan.h5"), cache)  # before scan.json: a kill leaves it unfinished
    write_json({"scan_id": scan_id, "keys": step_keys, "seconds": result.seconds,
                "n_candidates": result.n_candidates}, scan_dir / "scan.json")
    return result


def _trim_cache(store: StageCache, cache: str) -> None:
    """Leave in ``store`` only what the ``cache`` choice keeps of a finished scan."""
    store.drop([name for name in store.keys() if not caches_output(name.split(".", 1)[-1], cache)])


def _write_outputs(scan_dir: Path, values: dict, *, pictures: int, save_ct: bool) -> None:
    from pipeline.preview import save_candidate_pictures, save_preview

    scan_dir.mkdir(parents=True, exist_ok=True)
    ct = values.get("ct_1mm", values.get("ct"))
    mask, cands = values.get("lung_mask"), values.get("candidates")
    if save_ct and "ct_1mm" in values:
        write_volume(values["ct_1mm"], scan_dir / CT_FILE)
    elif (scan_dir / CT_FILE).exists():  # an earlier run's, maybe from other settings
        os.unlink(scan_dir / CT_FILE)
    if mask is not None:
        write_volume(mask, scan_dir / "lung_mask.nrrd")
    if cands is not None:
        write_csv(cands, scan_dir / "candidates.csv", float_format="%.4f")
    save_preview(ct, scan_dir / "preview.png", mask=mask, candidates=cands)
    for old in scan_dir.glob("candidate_*.png"):
        os.unlink(old)
    if cands is not None and pictures:
        save_candidate_pictures(ct, cands.head(pictures), scan_dir, mask=mask)
