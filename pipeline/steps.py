"""The stages a pipeline run can list in its config, as thin adapters around ``stages``.

A step reads named values from the scan's state (``path``, ``ct``, ``ct_1mm``, ...) and
returns new named values; its keyword arguments are the keys of the config section of
the same name.  ``configs/default.yaml``'s ``stages:`` list says which run, in order::

    stages: [ingest, resample, lungmask, candidates, classify, nodule_type, embed]

To swap a stage, point the registry entry at another function with the same inputs and
outputs; nothing else changes.

A step with a ``progress_unit`` (classify: ``"cubes"``) also takes ``progress=``, a callable
``progress(done, total)`` counting that unit, which :func:`pipeline.run.process_scan`
passes for a progress display.  A step that ``uses_device`` takes ``device=``, the run's
device, chosen once by :mod:`pipeline.run`.  Neither is a setting: they never enter the
stage's cache key.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Step", "STEPS", "get_step", "SERIES_MARK", "split_source", "series_source"]


@dataclass(frozen=True)
class Step:
    """One pipeline step: ``fn(**inputs, **settings[, progress=...]) -> dict`` of ``outputs``."""

    name: str
    fn: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    modules: tuple[str, ...]  # whose source code is part of the cache key
    progress_unit: str | None = None  # what fn's progress(done, total) counts; None: no progress=
    uses_device: bool = False  # fn takes the run's device= (chosen once by pipeline.run)


#: Fewest slices a scan needs to be screened: one or two images are no chest CT series (a
#: single DICOM image read alone gave an empty lung mask and 0 candidates, as if all was well).
MIN_SLICES = 3


#: A scan given as one series of a DICOM folder: ``FOLDER#series=UID`` (what discovery gives
#: a series split over sibling folders; a list file may name one the same way).
SERIES_MARK = "#series="


def series_source(folder, series_uid: str) -> Path:
    """The scan ``series_uid`` (0020,000E) read from ``folder`` and everything under it."""
    return Path(f"{folder}{SERIES_MARK}{series_uid}")


def split_source(source) -> tuple[Path, str | None]:
    """``(path, series_uid)`` of a scan source: ``FOLDER#series=UID`` names one series of a
    folder; any other source (an existing path, whatever its name) is itself, with no UID."""
    text = str(source)
    if SERIES_MARK in text and not Path(text).exists():
        folder, _, uid = text.rpartition(SERIES_MARK)
        return Path(folder), uid
    return Path(text), None


def _ingest(path, **settings):
    from stages.errors import ScanError
    from stages.ingest import read_scan

    folder, series_uid = split_source(path)
    if series_uid is not None:
        settings = {**settings, "series_uid": series_uid}
    ct = read_scan(folder, **settings)
    if ct.shape[0] < MIN_SLICES:
        raise ScanError(path, f"only {ct.shape[0]} slice{'s' if ct.shape[0] > 1 else ''} "
                              f"({ct.shape[0] * ct.spacing_mm[0]:.1f} mm): too short to hold a lung "
                              f"(the screen needs a series of at least {MIN_SLICES} slices)")
    return {"ct": ct}


def _resample(ct, *, device, spacing_mm=(1.0, 1.0, 1.0), **settings):
    from stages.resample import resample

    return {"ct_1mm": resample(ct, spacing_mm=tuple(spacing_mm), device=device, **settings)}


def _lungmask(ct_1mm, **settings):
    from stages.lungmask import segment_lungs

    return {"lung_mask": segment_lungs(ct_1mm, **settings)}


def _candidates(ct_1mm, lung_mask, *, device, **settings):
    from stages.candidates import find_candidates

    return {"candidates": find_candidates(ct_1mm, lung_mask, device=device, **settings)}


def _classify(ct_1mm, candidates, *, device, progress=None, **settings):
    from stages.classify import classify_candidates

    return {"candidates": classify_candidates(ct_1mm, candidates, device=device, progress=progress,
                                              **settings)}


def _embed(ct_1mm, candidates, *, device, **settings):
    from stages.classify import embed_candidates

    return {"embeddings": embed_candidates(ct_1mm, candidates, device=device, **settings)}


def _nodule_type(ct_1mm, candidates, **settings):
    from stages.nodule_type import nodule_types

    return {"candidates": nodule_types(ct_1mm, candidates, **settings)}


STEPS: dict[str, Step] = {
    "ingest": Step("ingest", _ingest, ("path",), ("ct",), ("stages.ingest", "stages.hounsfield")),
    "resample": Step("resample", _resample, ("ct",), ("ct_1mm",), ("stages.resample",), uses_device=True),
    "lungmask": Step("lungmask", _lungmask, ("ct_1mm",), ("lung_mask",), ("stages.lungmask", "nets.lesionnet")),
    "candidates": Step("candidates", _candidates, ("ct_1mm", "lung_mask"), ("candidates",),
                       ("stages.candidates", "stages.features", "stages.cluster", "stages._cluster_dense",
                        "stages._meanshift", "stages._meanshift_grid", "stages._meanshift_paths",
                        "stages._kmeans"), uses_device=True),
    "classify": Step("classify", _classify, ("ct_1mm", "candidates"), ("candidates",),
                     ("stages.classify", "nets.cnn3d", "stages.patches"), progress_unit="cubes",
                     uses_device=True),
    "embed": Step("embed", _embed, ("ct_1mm", "candidates"), ("embeddings",),
                  ("stages.classify", "nets.cnn3d", "stages.patches"), uses_device=True),
    "nodule_type": Step("nodule_type", _nodule_type, ("ct_1mm", "candidates"), ("candidates",),
                        ("stages.nodule_type", "stages.patches")),
}


def get_step(name: str) -> Step:
    """The registered step ``name``; ValueError listing the known ones otherwise."""
    if name not in STEPS:
        raise ValueError(f"unknown stage {name!r} in config; known stages: {', '.join(STEPS)}")
    return STEPS[name]


def module_files(step: Step) -> list[Path]:
    """Source files of the step's modules (for the cache key)."""
    files = []
    for mod in step.modules:
        files.append(Path(importlib.import_module(mod).__file__))
    return files
