"""Run the configured stages on one scan and write its outputs.

Outputs of a scan, in ``OUT_DIR/<scan_id>/`` (``scan_id``: SeriesInstanceUID for DICOM,
the file stem otherwise), each written under a temporary name and renamed:

* ``ct_1mm.nrrd``     int16 HU at 1 mm, LPS geometry (3D Slicer overlays it on the original)
* ``lung_mask.nrrd``  uint8 labels (1 right lung, 2 left lung) on the same grid
* ``candidates.csv``  LUNA16 columns (seriesuid, coordX, coordY, coordZ, ...) then features
* ``preview.png``     three orthogonal slices with the lung mask and candidates drawn
* ``candidate_NN.png`` three slices through each top candidate
* ``scan.h5``         the stage cache (see :mod:`pipeline.cache`)
* ``scan.json``       written last: stage keys and timings; its presence means "done"
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import StageCache, code_version, stage_key
from pipeline.io import write_csv, write_json, write_volume
from pipeline.steps import get_step, module_files

log = logging.getLogger(__name__)

__all__ = ["process_scan", "ScanResult", "source_key"]


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


def process_scan(path, out_dir, config: dict, *, force: bool = False,
                 pictures: int = 5, prepare_only: bool = False, on_stage=None) -> ScanResult:
    """Run ``config['stages']`` on the scan at ``path``; write its outputs under ``out_dir``.

    Finished scans are not recomputed: ``OUT_DIR/.sources/<key>.json`` remembers which scan
    id an input produced, and a scan whose ``scan.json`` holds the same stage keys is
    skipped.  A stage whose key matches a result in ``scan.h5`` is loaded, not recomputed.

    ``prepare_only=True`` computes and caches the stages but writes no outputs (the CPU half
    of a run whose GPU stages then run in one process, see :func:`pipeline.batch.run_many`).
    ``on_stage(name)`` is called before each stage that is computed (progress display).

    Raises
    ------
    stages.errors.ScanError
        The input is bad (the message names the file and the reason).
    """
    out_dir = Path(out_dir)
    result = ScanResult(source=str(path))
    src_key = source_key(path)
    step_keys = _step_keys(config, src_key)
    index_file = out_dir / ".sources" / f"{src_key}.json"
    known = json.loads(index_file.read_text()) if index_file.exists() else {}

    if not force and known.get("scan_id"):
        done = out_dir / known["scan_id"] / "scan.json"
        info = json.loads(done.read_text()) if done.exists() else {}
        if info.get("keys") == step_keys:
            result.scan_id, result.status = known["scan_id"], "cached"
            result.n_candidates, result.out_dir = info.get("n_candidates", 0), str(done.parent)
            result.seconds = info.get("seconds", {})
            return result

    order = list(config["stages"])
    values: dict = {(-1, "path"): str(path)}  # (index of the producing step, name) -> value
    cache = StageCache(out_dir / known["scan_id"] / "scan.h5") if known.get("scan_id") else None
    pending: dict = {}  # results computed before the scan id (and so the cache) was known

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
        nonlocal cache
        name = order[i]
        step, key = get_step(name), step_keys[name]
        cached = None
        if cache is not None and not force:
            cached = {out: cache.get(f"{name}.{out}", key) for out in step.outputs}
            if any(v is None for v in cached.values()):
                cached = None
        if cached is not None:
            values.update({(i, out): v for out, v in cached.items()})
            return
        inputs = {inp: value(producer(inp, i), inp) for inp in step.inputs}
        if on_stage is not None:
            on_stage(name)
        t0 = time.perf_counter()
        outputs = step.fn(**inputs, **config.get(name, {}))
        result.seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("%s: %s took %.2f s", Path(path).name, name, result.seconds[name])
        values.update({(i, out): outputs[out] for out in step.outputs})
        items = {f"{name}.{out}": (key, outputs[out]) for out in step.outputs}
        if cache is None:
            ct = outputs.get("ct")
            if ct is None:
                pending.update(items)
                return
            cache = StageCache(out_dir / ct.scan_id / "scan.h5")
            items.update(pending)
            pending.clear()
        cache.put_many(items)

    # only the final value of each output name is needed; earlier stages load lazily
    produced = {out for name in order for out in get_step(name).outputs}
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

    t0 = time.perf_counter()
    _write_outputs(scan_dir, finals, pictures=pictures)
    result.seconds["write"] = round(time.perf_counter() - t0, 3)
    cands = finals.get("candidates")
    result.n_candidates = 0 if cands is None else len(cands)
    write_json({"scan_id": scan_id, "keys": step_keys, "seconds": result.seconds,
                "n_candidates": result.n_candidates}, scan_dir / "scan.json")
    return result


def _write_outputs(scan_dir: Path, values: dict, *, pictures: int) -> None:
    from pipeline.preview import save_candidate_pictures, save_preview

    scan_dir.mkdir(parents=True, exist_ok=True)
    ct = values.get("ct_1mm", values.get("ct"))
    mask, cands = values.get("lung_mask"), values.get("candidates")
    if "ct_1mm" in values:
        write_volume(values["ct_1mm"], scan_dir / "ct_1mm.nrrd")
    if mask is not None:
        write_volume(mask, scan_dir / "lung_mask.nrrd")
    if cands is not None:
        write_csv(cands, scan_dir / "candidates.csv", float_format="%.4f")
    save_preview(ct, scan_dir / "preview.png", mask=mask, candidates=cands)
    for old in scan_dir.glob("candidate_*.png"):
        os.unlink(old)
    if cands is not None and pictures:
        save_candidate_pictures(ct, cands.head(pictures), scan_dir, mask=mask)
