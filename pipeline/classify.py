"""Stage 2 of the screen: give every candidate a nodule probability with the 3D CNN.

Weights come only from an explicit path (``classify: weights:`` in the config); they are read
with ``torch.load(..., weights_only=True)``.  Cubes are cut around each candidate's world
centre with :func:`stages.patches.extract_patches` exactly as in training, normalised with
the HU window stored in the weights file, and scored with test-time augmentation.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["classify_candidates", "DEFAULT_WEIGHTS"]

#: The weights `make train` writes and the repository ships (see models/nodule_cnn3d.md).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "nodule_cnn3d.pt"


@lru_cache(maxsize=4)
def _model(path: str, mtime_ns: int, device):
    from nets.cnn3d import load_classifier

    return load_classifier(path, device=device)


def classify_candidates(ct, candidates: pd.DataFrame, *, weights=None, device=None, tta: int = 8,
                        batch_size: int = 64) -> pd.DataFrame:
    """Add a ``probability`` column to ``candidates`` and sort by it (highest first).

    Parameters
    ----------
    ct : Volume
        The HU volume the candidates were found on (any spacing; cubes are resampled).
    candidates : DataFrame
        LUNA16 columns ``coordX, coordY, coordZ`` (world mm) plus anything else (kept).
    weights : str or Path, optional
        Classifier file written by ``make train``; relative paths are taken from the
        repository root; ``None``: :data:`DEFAULT_WEIGHTS`.
    device : str, optional
        ``None``: CUDA if available, else the CPU.
    tta : int
        Flip combinations averaged (1 = none, 8 = all).
    batch_size : int
        Cubes per forward pass.

    Raises
    ------
    FileNotFoundError
        The weights file does not exist (train one with ``make train``).
    """
    import torch

    from nets.cnn3d import normalize_hu, predict_tta
    from stages.patches import extract_patches

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.is_absolute() and not path.exists():
        path = DEFAULT_WEIGHTS.parent.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier weights not found; train them with `make train` "
                                "or remove 'classify' from the config's stages")
    model = _model(str(path), path.stat().st_mtime_ns, device)
    out = candidates.copy()
    if len(out) == 0:
        out["probability"] = pd.Series(dtype=float)
        return out
    pre = model.preprocessing
    cubes = extract_patches(ct, centres_xyz_mm=out[["coordX", "coordY", "coordZ"]].to_numpy(float),
                            size_mm=pre["size_mm"], spacing_mm=pre["spacing_mm"])
    x = torch.from_numpy(normalize_hu(cubes, tuple(pre["clip_hu"])))
    prob = predict_tta(model, x, n=tta, batch_size=batch_size).numpy().astype(np.float64)
    where = out.columns.get_loc("score") + 1 if "score" in out.columns else len(out.columns)
    out.insert(where, "probability", np.round(prob, 6))  # LUNA16 columns, score, probability, features
    return out.sort_values(["probability", "score"], ascending=False, kind="stable").reset_index(drop=True)
