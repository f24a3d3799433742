"""The false-positive classifier: a small residual 3D CNN on candidate cubes.

Input: a cube of ``size_mm`` (default 32 mm) around a candidate, sampled at 1 mm, in HU,
normalised by :func:`normalize_hu` (clip to ``clip_hu`` = -1000..400 HU, scale to 0..1) and
given to the model as ``(B, 1, Z, Y, X)`` float32.  Output: one logit per cube (nodule vs not).
:meth:`NoduleNet3D.embed` gives the penultimate (pooled) features the patient RNN reads.

Weights are saved as a plain dict of tensors, ints, floats and strings
(:func:`save_classifier`) and read back only from an explicit path with
``torch.load(path, weights_only=True)`` (:func:`load_classifier`): no downloads.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CLIP_HU", "CUBE_SIZE_MM", "CUBE_SPACING_MM", "normalize_hu", "ResBlock3d",
           "NoduleNet3D", "predict_tta", "save_classifier", "load_classifier", "FLIP_AXES"]

#: HU window the classifier sees: air (-1000 HU) maps to 0, dense bone-ish (400 HU) to 1.
CLIP_HU = (-1000.0, 400.0)
#: Edge of the candidate cube, mm.
CUBE_SIZE_MM = 32.0
#: Voxel size of the cube, mm (isotropic).
CUBE_SPACING_MM = 1.0
#: The 8 flip combinations of the cube's (z, y, x) axes used by test-time augmentation.
FLIP_AXES = tuple(tuple(a for a in combo if a is not None)
                  for combo in itertools.product((None, 0), (None, 1), (None, 2)))
FORMAT = "lungscreen.cnn3d/1"


def normalize_hu(cube_hu, clip_hu: tuple[float, float] = CLIP_HU):
    """Clip HU to ``clip_hu`` and scale linearly to ``[0, 1]`` (float32, same type as input).

    Parameters
    ----------
    cube_hu : ndarray or torch.Tensor
        Hounsfield units, any shape.
    clip_hu : (float, float)
        Lower and upper HU; must be increasing.

    Examples
    --------
    >>> normalize_hu(np.array([-2000, -1000, -300, 400, 3000])).tolist()
    [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    lo, hi = float(clip_hu[0]), float(clip_hu[1])
    if not hi > lo:
        raise ValueError(f"clip_hu must be (low, high) with high > low, got {clip_hu}")
    if isinstance(cube_hu, torch.Tensor):
        return ((cube_hu.float().clamp(lo, hi) - lo) / (hi - lo))
    arr = np.asarray(cube_hu, dtype=np.float32)
    return ((np.clip(arr, lo, hi) - lo) / (hi - lo)).astype(np.float32)


class ResBlock3d(nn.Module):
    """Two 3x3x3 conv-BN layers with a (strided 1x1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm3d(c_out)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class NoduleNet3D(nn.Module):
    """Residual 3D CNN: stem, one stage per width (stride 2 after the first), global pool, logit.

    Parameters
    ----------
    widths : sequence of int
        Channels of each stage; a 32^3 cube ends at ``32 / 2**(len(widths)-1)`` voxels a side.
    blocks_per_stage : int
        Residual blocks per stage.
    dropout : float
        Dropout before the final linear layer.
    in_channels : int
        Input channels (1: one CT cube).

    Examples
    --------
    >>> net = NoduleNet3D(widths=(4, 8)).eval()
    >>> x = torch.zeros(2, 1, 16, 16, 16)
    >>> tuple(net(x).shape), tuple(net.embed(x).shape)
    ((2,), (2, 8))
    """

    def __init__(self, widths=(16, 32, 64, 128), *, blocks_per_stage: int = 1, dropout: float = 0.2,
                 in_channels: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {widths}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.arch = {"widths": list(widths), "blocks_per_stage": int(blocks_per_stage),
                     "dropout": float(dropout), "in_channels": int(in_channels)}
        self.stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True))
        blocks, prev = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(ResBlock3d(prev, w, stride=2 if (i > 0 and j == 0) else 1))
                prev = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.embed_dim = prev
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(prev, 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, embed_dim)`` of normalised cubes ``(B, C, Z, Y, X)``."""
        if x.ndim != 5:
            raise ValueError(f"cubes must be (B, C, Z, Y, X), got shape {tuple(x.shape)}")
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per cube, shape ``(B,)``."""
        return self.head(self.embed(x))[:, 0]


def _as_batch(cubes) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(cubes) if not isinstance(cubes, torch.Tensor) else cubes)
    if x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5:
        raise ValueError(f"cubes must be (N, Z, Y, X) or (N, C, Z, Y, X), got shape {tuple(x.shape)}")
    return x.float()


def predict_tta(model: nn.Module, cubes, n: int = 8, *, batch_size: int = 64, flips=None,
                progress=None) -> torch.Tensor:
    """Nodule probability per cube, averaged over ``n`` flip combinations (test-time augmentation).

    Runs under ``torch.inference_mode`` with the cubes in channels-last order (the same
    numbers as contiguous order, within float rounding, and faster on the CPU's oneDNN and on
    cuDNN).

    Parameters
    ----------
    model : NoduleNet3D
        Any module mapping ``(B, C, Z, Y, X)`` to ``(B,)`` logits; run in eval mode on its device.
    cubes : (N, Z, Y, X) or (N, C, Z, Y, X) array or tensor
        Normalised cubes (:func:`normalize_hu`).
    n : int
        Number of flip combinations, 1 (no flip) to 8 (all of :data:`FLIP_AXES`).
    batch_size : int
        Cubes per forward pass.
    flips : sequence of tuple of int, optional
        The flip combinations to average (entries of :data:`FLIP_AXES`, ``()`` for none);
        overrides ``n``.  A cascade scores every cube with ``[()]`` first, then the few
        that matter with ``FLIP_AXES[1:]``.
    progress : callable, optional
        ``progress(done, total)`` after each batch; counts are forward passes of one cube.

    Returns
    -------
    (N,) float32 tensor on the CPU, probabilities in ``[0, 1]``.

    Examples
    --------
    >>> net = NoduleNet3D(widths=(4, 8))
    >>> predict_tta(net, np.zeros((3, 8, 8, 8), np.float32), n=4).shape
    torch.Size([3])
    >>> predict_tta(net, np.zeros((2, 8, 8, 8), np.float32), flips=FLIP_AXES[1:3]).shape
    torch.Size([2])
    """
    if flips is None:
        if not 1 <= int(n) <= len(FLIP_AXES):
            raise ValueError(f"n must be 1..{len(FLIP_AXES)} flip combinations, got {n}")
        flips = FLIP_AXES[:n]
    flips = [tuple(f) for f in flips]
    if not flips or any(f not in FLIP_AXES for f in flips):
        raise ValueError(f"flips must be a non-empty list of entries of FLIP_AXES, got {flips}")
    x = _as_batch(cubes)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    total, done = len(x) * len(flips), 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            probs = torch.zeros(len(xb), device=device)
            for axes in flips:
                xf = torch.flip(xb, dims=[a + 2 for a in axes]) if axes else xb
                probs += torch.sigmoid(model(xf.contiguous(memory_format=torch.channels_last_3d)).float())
            out.append((probs / len(flips)).cpu())
            done += len(xb) * len(flips)
            if progress is not None:
                progress(done, total)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def save_classifier(model: NoduleNet3D, path, *, clip_hu=CLIP_HU, size_mm: float = CUBE_SIZE_MM,
                    spacing_mm: float = CUBE_SPACING_MM, info: dict | None = None) -> Path:
    """Write the architecture, preprocessing and weights (CPU tensors) to ``path``.

    ``info`` (str/int/float values: data, seed, metrics) is stored as is.  The file is written
    to a temporary name and renamed (:func:`pipeline.io.write_torch`).
    """
    from pipeline.io import write_torch

    if not isinstance(model, NoduleNet3D):
        raise TypeError(f"model must be a NoduleNet3D, got {type(model).__name__}")
    state = {"format": FORMAT, "arch": dict(model.arch),
             "preprocessing": {"clip_hu": [float(v) for v in clip_hu], "size_mm": float(size_mm),
                               "spacing_mm": float(spacing_mm)},
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "info": dict(info or {})}
    return write_torch(state, path)


def load_classifier(path, device=None) -> NoduleNet3D:
    """Read a classifier saved by :func:`save_classifier` from an explicit path (no downloads).

    Parameters
    ----------
    path : str or Path
        The weights file.
    device : str or torch.device, optional
        Where to put the model; ``None``: CUDA if available, else the CPU.

    Returns
    -------
    NoduleNet3D in eval mode, with ``model.preprocessing`` (``clip_hu``, ``size_mm``,
    ``spacing_mm``) and ``model.info`` attached.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (train one with ``python -m pipeline.training``).
    ValueError
        If the file is not a lungscreen classifier.
    """
    from stages.device import pick_device

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; train them with "
                                "`python -m pipeline.training --data DIR --out models/` or "
                                "point the config at an existing file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lungscreen 3D CNN classifier (expected format {FORMAT!r})")
    arch = state["arch"]
    model = NoduleNet3D(arch["widths"], blocks_per_stage=arch["blocks_per_stage"],
                        dropout=arch["dropout"], in_channels=arch["in_channels"])
    model.load_state_dict(state["state_dict"])
    model.preprocessing = dict(state["preprocessing"])
    model.info = dict(state.get("info", {}))
    # channels-last weights: oneDNN (CPU) and cuDNN run 3D convolutions faster in this layout
    return model.to(pick_device(device), memory_format=torch.channels_last_3d).eval()
