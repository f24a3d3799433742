"""One verdict per patient: a cancer probability (Kaggle DSB 2017) and a Lung-RADS category.

:func:`scan_verdict` reads one scan's candidates (``OUT_DIR/<scan_id>/candidates.csv``) and
gives

* ``cancer``: the patient model's probability (``models/patient_model.pt``, see its card
  ``models/patient_model.md``), from the scan's most probable findings (the RNN: their CNN
  embeddings, ``OUT_DIR/<scan_id>/embeddings.csv`` from the ``embed`` stage);
* ``lung_rads`` and ``lung_rads_reason``: :func:`stages.lungrads.lung_rads_category` of the
  *reported findings*, the candidates whose nodule probability is at least
  :data:`FINDING_PROBABILITY` (merged duplicate marks left out);
* ``n_findings``, ``largest_diameter_mm`` and ``largest_type`` of those findings.

:func:`write_patients_csv` writes ``OUT_DIR/patients.csv``, one row per patient, Kaggle's
columns first: ``id, cancer, lung_rads, lung_rads_reason, n_findings, largest_diameter_mm,
largest_type, scans``.  The id is the patient's: for a DICOM folder its name (Kaggle DSB 2017:
the patient folder), for an image file the scan id (LUNA16: the seriesuid).  Scans of one
patient (several series in one folder) give one row: the highest probability and category.
A scan that failed still gives its patient a row (Kaggle scores every patient): the
training prevalence stored with the model, Lung-RADS ``0`` (incomplete) and the reason.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["scan_verdict", "write_patients_csv", "patient_id", "findings_tensor",
           "FINDING_PROBABILITY", "DEFAULT_PATIENT_MODEL", "PATIENT_COLUMNS"]

#: The patient model `make run` uses (models/patient_model.md says how it was chosen).
DEFAULT_PATIENT_MODEL = Path(__file__).resolve().parent.parent / "models" / "patient_model.pt"
#: A candidate is a reported finding (Lung-RADS, ``n_findings``) from this nodule probability:
#: the CNN's decision point, not tuned.
FINDING_PROBABILITY = 0.5
#: Columns of ``patients.csv``; Kaggle DSB 2017's ``id, cancer`` first.
PATIENT_COLUMNS = ["id", "cancer", "lung_rads", "lung_rads_reason", "n_findings",
                   "largest_diameter_mm", "largest_type", "scans"]


@lru_cache(maxsize=2)
def _model(path: str, _mtime_ns: int):
    from nets.patient import load_patient_model

    return load_patient_model(path)


def _load(model):
    if model is None or isinstance(model, (str, Path)):
        path = Path(model) if model is not None else DEFAULT_PATIENT_MODEL
        if not path.is_file():
            raise FileNotFoundError(f"{path}: patient model not found; train it with "
                                    "`python -m pipeline.patient_training`")
        return _model(str(path), path.stat().st_mtime_ns)
    return model


def findings_tensor(candidates: pd.DataFrame, *, top: int | None = None) -> np.ndarray:
    """The ``top`` most probable candidates as rows ``(probability, diameter_mm)``, best first.

    What :class:`nets.patient.NoisyOR` and :class:`nets.patient.SizeRule` read; training
    (:mod:`pipeline.patient_training`) and :func:`scan_verdict` build it here alike.

    Returns
    -------
    (T, 2) float32 array, ``T = min(len(candidates), top)``.
    """
    from nets.rnn import MAX_CANDIDATES

    top = MAX_CANDIDATES if top is None else int(top)
    if len(candidates) == 0:
        return np.zeros((0, 2), np.float32)
    order = np.argsort(-candidates["probability"].to_numpy(float), kind="stable")[:top]
    rows = candidates.iloc[order]
    return np.stack([rows["probability"].to_numpy(float), rows["diameter_mm"].to_numpy(float)],
                    axis=1).astype(np.float32)


def _cancer(model, candidates: pd.DataFrame, embeddings: pd.DataFrame | None) -> float:
    import torch

    if getattr(model, "kind", None) == "rnn":
        from nets.rnn import rank_candidates

        if embeddings is None:
            raise ValueError("the RNN patient model reads the CNN embeddings (embeddings.csv, "
                             "the 'embed' stage); the screen did not make them")
        emb = embeddings[[c for c in embeddings.columns if c.startswith("emb_")]].to_numpy(np.float32)
        rows = rank_candidates(emb, embeddings["probability"].to_numpy(float))
        with torch.no_grad():
            logit, _ = model(torch.from_numpy(rows)[None], torch.tensor([max(len(rows), 1)]))
        return float(torch.sigmoid(logit)[0])
    rows = findings_tensor(candidates)
    with torch.no_grad():
        logit = model(torch.from_numpy(rows)[None], torch.tensor([len(rows)]))
    return float(torch.sigmoid(logit)[0])


def scan_verdict(candidates: pd.DataFrame, *, embeddings: pd.DataFrame | None = None, model=None,
                 finding_probability: float = FINDING_PROBABILITY) -> dict:
    """The verdict on one scan from its candidates table.

    Parameters
    ----------
    candidates : DataFrame
        A scan's ``candidates.csv``: ``probability``, ``diameter_mm`` and, for Lung-RADS,
        ``nodule_type`` and ``solid_diameter_mm`` (the ``nodule_type`` stage); ``merged``
        marks are left out of the findings.
    embeddings : DataFrame, optional
        The scan's ``embeddings.csv`` (the ``embed`` stage), needed by an RNN patient model.
    model : nn.Module or path, optional
        A patient model (:func:`nets.patient.load_patient_model`); default
        :data:`DEFAULT_PATIENT_MODEL`.
    finding_probability : float
        Nodule probability from which a candidate is a reported finding.

    Returns
    -------
    dict
        ``cancer`` (probability), ``lung_rads`` (``"1"`` .. ``"4B"``), ``lung_rads_reason``
        (the finding that sets it), ``n_findings``, ``largest_diameter_mm`` (NaN when none)
        and ``largest_type`` (``""`` when none).
    """
    from stages.lungrads import lung_rads_category

    model = _load(model)
    cands = candidates.reset_index(drop=True)
    keep = cands["probability"].to_numpy(float) >= finding_probability
    if "merged" in cands.columns:
        keep &= ~cands["merged"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    findings = cands[keep].copy()
    if "nodule_type" not in findings.columns:
        findings["nodule_type"] = ""
    types = findings["nodule_type"].fillna("").astype(str)
    # a finding without a type (a config without the nodule_type stage) is graded as solid
    findings["nodule_type"] = types.where(types != "", "solid")
    if "solid_diameter_mm" not in findings.columns:
        findings["solid_diameter_mm"] = findings["diameter_mm"]
    findings["solid_diameter_mm"] = findings["solid_diameter_mm"].fillna(findings["diameter_mm"])
    category, reason = lung_rads_category(findings)
    largest = findings.loc[findings["diameter_mm"].idxmax()] if len(findings) else None
    return {"cancer": _cancer(model, cands, embeddings), "lung_rads": category, "lung_rads_reason": reason,
            "n_findings": int(len(findings)),
            "largest_diameter_mm": float(largest["diameter_mm"]) if largest is not None else math.nan,
            "largest_type": str(largest["nodule_type"]) if largest is not None else ""}


def patient_id(source: str, scan_id: str = "") -> str:
    """The patient a scan belongs to: a DICOM folder's name (``FOLDER#series=UID``: the
    folder's), else the scan id (an image file: its stem, LUNA16's seriesuid)."""
    from pipeline.steps import split_source

    path, series = split_source(source)
    if series is not None or path.is_dir():
        return path.name
    if scan_id:
        return scan_id
    name = path.name
    for suffix in (".nii.gz", ".mhd", ".mha", ".nrrd", ".nii", ".raw"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def write_patients_csv(out_dir, results, *, model=None) -> Path | None:
    """Write ``out_dir/patients.csv`` from a run's results (:class:`pipeline.run.ScanResult`).

    Returns the path, or None when there are no results (an older file is removed, so an
    old verdict is never taken for this run's).
    """
    from pipeline.io import write_csv

    out_dir = Path(out_dir)
    target = out_dir / "patients.csv"
    if not results:
        if target.exists():
            target.unlink()
        return None
    model = _load(model)
    prevalence = float(model.info.get("train_prevalence", math.nan))
    rows = []
    for res in results:
        pid = patient_id(res.source, res.scan_id)
        csv = Path(res.out_dir) / "candidates.csv" if res.out_dir else None
        cands = (pd.read_csv(csv, dtype={"seriesuid": str})
                 if res.status != "failed" and csv is not None and csv.exists() else None)
        emb_csv = csv.parent / "embeddings.csv" if csv is not None else None
        emb = pd.read_csv(emb_csv) if emb_csv is not None and emb_csv.exists() else None
        if cands is not None and "probability" in cands.columns and (emb is not None or getattr(model, "kind", "") != "rnn"):
            row = scan_verdict(cands, embeddings=emb, model=model)
        else:
            why = res.error or ("no candidates" if cands is None else "no classified candidates"
                                if "probability" not in cands.columns else "no embeddings (embed stage)")
            row = {"cancer": prevalence, "lung_rads": "0", "lung_rads_reason": f"scan not evaluated: {why}",
                   "n_findings": 0, "largest_diameter_mm": math.nan, "largest_type": ""}
        rows.append({"id": pid, **row, "scans": res.scan_id or Path(str(res.source)).name})
    from stages.lungrads import CATEGORIES

    table = pd.DataFrame(rows, columns=PATIENT_COLUMNS)
    table["rank"] = table["lung_rads"].map(CATEGORIES.index)
    out = []
    for pid, group in table.groupby("id", sort=True):
        worst = group.sort_values(["rank", "largest_diameter_mm"], ascending=False,
                                  na_position="last").iloc[0].to_dict()
        worst["cancer"] = group["cancer"].max()
        worst["n_findings"] = int(group["n_findings"].sum())
        worst["scans"] = ";".join(sorted(group["scans"].astype(str)))
        out.append(worst)
    table = pd.DataFrame(out, columns=PATIENT_COLUMNS)
    table["cancer"] = table["cancer"].round(6)
    write_csv(table, target, float_format="%.6g")
    return target
