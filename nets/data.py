"""Datasets, the positive-fraction batch sampler and cube augmentation for :mod:`nets`.

Randomness comes from the global torch RNG unless a ``torch.Generator`` is passed, so
:func:`nets.train.set_seed` makes a run repeatable and :class:`nets.callbacks.Checkpoint`
(which saves the torch RNG state) makes a resumed run continue identically.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nets.cnn3d import CLIP_HU, normalize_hu

__all__ = ["flip_cube", "augment_cube", "CubeDataset", "PositiveFractionSampler",
           "CandidateSetDataset", "pad_collate"]

#: Default range of the random isotropic zoom applied by :func:`augment_cube`.
SCALE_RANGE = (0.9, 1.1)


def flip_cube(cube: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Flip a cube ``(..., Z, Y, X)`` along ``axes`` (0 = z, 1 = y, 2 = x); its own inverse.

    Examples
    --------
    >>> c = torch.arange(8.).reshape(2, 2, 2)
    >>> bool(torch.equal(flip_cube(flip_cube(c, (0, 2)), (0, 2)), c))
    True
    """
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"axes must be among 0 (z), 1 (y), 2 (x), got {tuple(axes)}")
    if not axes:
        return cube
    return torch.flip(cube, dims=[cube.ndim - 3 + a for a in axes])


def _rand(generator, *shape):
    return torch.rand(*shape, generator=generator)


def _centre_fit(x: torch.Tensor, shape, fill: float) -> torch.Tensor:
    """Crop or pad the last three axes of ``x`` about the centre to ``shape``."""
    for dim, want in zip(range(x.ndim - 3, x.ndim), shape):
        have = x.shape[dim]
        if have > want:
            start = (have - want) // 2
            x = x.narrow(dim, start, want)
        elif have < want:
            before = (want - have) // 2
            pad = [0, 0] * (x.ndim - dim - 1) + [before, want - have - before]
            x = F.pad(x, pad, value=fill)
    return x


def augment_cube(cube: torch.Tensor, *, flip: bool = True, rot90: bool = True,
                 scale_range: tuple[float, float] | None = SCALE_RANGE, fill: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random zoom, axis flips and axial 90-degree rotation of a normalised cube.

    Parameters
    ----------
    cube : (C, Z, Y, X) or (Z, Y, X) float tensor
        Normalised intensities (0 = air); ``Y == X`` when ``rot90``.
    flip : bool
        Flip each of z, y, x with probability 1/2.
    rot90 : bool
        Rotate by a random multiple of 90 degrees in the axial (y, x) plane.
    scale_range : (float, float) or None
        Isotropic zoom factor drawn uniformly from this range (trilinear
        ``torch.nn.functional.interpolate``), then centre-cropped or padded back to the
        input shape with ``fill``.  ``None`` disables zooming.
    fill : float
        Value for voxels padded in after zooming out (0 is air after :func:`normalize_hu`).
    generator : torch.Generator, optional
        Source of randomness; the global torch RNG by default.

    Returns
    -------
    Tensor of the input's shape and dtype.

    Examples
    --------
    >>> out = augment_cube(torch.rand(1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    >>> tuple(out.shape)
    (1, 8, 8, 8)
    """
    if not isinstance(cube, torch.Tensor):
        raise TypeError(f"cube must be a torch.Tensor, got {type(cube).__name__}")
    if cube.ndim not in (3, 4):
        raise ValueError(f"cube must be (C, Z, Y, X) or (Z, Y, X), got shape {tuple(cube.shape)}")
    if rot90 and cube.shape[-1] != cube.shape[-2]:
        raise ValueError(f"rot90 needs a square axial plane, got Y, X = {tuple(cube.shape[-2:])}; "
                         "pass rot90=False")
    shape = tuple(cube.shape[-3:])
    x = cube
    if scale_range is not None:
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        s = lo + (hi - lo) * float(_rand(generator, 1))
        size = [max(1, round(n * s)) for n in shape]
        if size != list(shape):
            batch = x.reshape(1, -1, *shape).float()
            zoomed = F.interpolate(batch, size=size, mode="trilinear", align_corners=False)
            x = _centre_fit(zoomed, shape, fill).reshape(cube.shape).to(cube.dtype)
    if flip:
        axes = [a for a, r in zip((0, 1, 2), _rand(generator, 3)) if r < 0.5]
        x = flip_cube(x, axes)
    if rot90:
        k = int(torch.randint(0, 4, (1,), generator=generator))
        x = torch.rot90(x, k, dims=(-2, -1))
    return x.contiguous()


class CubeDataset(torch.utils.data.Dataset):
    """Candidate cubes in HU and their labels, served as ``(1, Z, Y, X)`` normalised float32.

    Parameters
    ----------
    cubes : (N, Z, Y, X) array-like
        HU cubes; any indexable array (numpy, ``h5py.Dataset``: read one cube at a time).
    labels : (N,) array-like
        1 for a nodule, 0 otherwise.
    augment : callable, optional
        ``augment(cube) -> cube`` on the normalised ``(1, Z, Y, X)`` tensor
        (e.g. :func:`augment_cube`); ``None`` for validation.
    clip_hu : (float, float)
        HU window of :func:`nets.cnn3d.normalize_hu`.
    """

    def __init__(self, cubes, labels, *, augment=None, clip_hu=CLIP_HU):
        labels = np.asarray(labels, dtype=np.float32).reshape(-1)
        if len(cubes) != len(labels):
            raise ValueError(f"{len(cubes)} cubes but {len(labels)} labels")
        if len(cubes) and len(getattr(cubes, "shape", np.shape(cubes[0:1]))) != 4:
            raise ValueError(f"cubes must be (N, Z, Y, X), got shape {getattr(cubes, 'shape', '?')}")
        self.cubes, self.labels, self.augment, self.clip_hu = cubes, labels, augment, clip_hu

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(normalize_hu(np.asarray(self.cubes[i]), self.clip_hu))[None]
        if self.augment is not None:
            x = self.augment(x)
        return x, torch.tensor(self.labels[i])


class PositiveFractionSampler(torch.utils.data.Sampler):
    """Batch sampler: every batch holds ``round(batch_size * pos_fraction)`` positives.

    Positives (rare) are drawn by cycling through reshuffled permutations, negatives by one
    permutation per epoch; an epoch is ``num_batches`` batches (default: enough to show every
    negative once).  Use as ``DataLoader(ds, batch_sampler=...)``.

    Parameters
    ----------
    labels : (N,) array-like of 0/1
    batch_size : int
    pos_fraction : float
        In (0, 1); at least one positive and one negative per batch.
    num_batches : int, optional
    generator : torch.Generator, optional
        Default: a fresh seed is drawn from the global torch RNG at each epoch.

    Examples
    --------
    >>> s = PositiveFractionSampler([1, 0, 0, 0, 0, 0, 0, 0], batch_size=4, pos_fraction=0.25,
    ...                             generator=torch.Generator().manual_seed(0))
    >>> [sum(i == 0 for i in b) for b in s]
    [1, 1, 1]
    """

    def __init__(self, labels, batch_size: int, pos_fraction: float = 0.25, *,
                 num_batches: int | None = None, generator: torch.Generator | None = None):
        labels = np.asarray(labels).reshape(-1)
        if not 0 < pos_fraction < 1:
            raise ValueError(f"pos_fraction must be in (0, 1), got {pos_fraction}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self.pos = np.flatnonzero(labels > 0.5)
        self.neg = np.flatnonzero(labels <= 0.5)
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise ValueError(f"need positives and negatives, got {len(self.pos)} positives and "
                             f"{len(self.neg)} negatives")
        self.n_pos = min(batch_size - 1, max(1, round(batch_size * pos_fraction)))
        self.n_neg = batch_size - self.n_pos
        self.num_batches = int(num_batches or math.ceil(len(self.neg) / self.n_neg))
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def _stream(self, idx, count, g):
        out = []
        while len(out) < count:
            out.extend(idx[torch.randperm(len(idx), generator=g).numpy()].tolist())
        return out[:count]

    def __iter__(self):
        g = self.generator
        if g is None:
            g = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_()))
        pos = self._stream(self.pos, self.n_pos * self.num_batches, g)
        neg = self._stream(self.neg, self.n_neg * self.num_batches, g)
        for b in range(self.num_batches):
            batch = pos[b * self.n_pos:(b + 1) * self.n_pos] + neg[b * self.n_neg:(b + 1) * self.n_neg]
            order = torch.randperm(len(batch), generator=g).tolist()
            yield [batch[i] for i in order]


class CandidateSetDataset(torch.utils.data.Dataset):
    """One item per scan: its candidates' feature rows ``(T_i, D)`` and the patient label.

    Build the rows with :func:`nets.rnn.rank_candidates` (embeddings + score, best first).
    """

    def __init__(self, features: Sequence, labels):
        labels = np.asarray(labels, dtype=np.float32).reshape(-1)
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature sets but {len(labels)} labels")
        dims = {np.asarray(f).shape[1] for f in features if np.asarray(f).ndim == 2}
        if len(dims) > 1 or any(np.asarray(f).ndim != 2 for f in features):
            raise ValueError(f"every feature set must be (T_i, D) with one D, got D in {sorted(dims)}")
        self.features = [torch.as_tensor(np.asarray(f, dtype=np.float32)) for f in features]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.features[i], torch.tensor(self.labels[i])


def pad_collate(batch):
    """Collate ``[(feats (T_i, D), label), ...]`` to ``(feats (B, T, D), lengths (B,), labels (B,))``.

    Padding is zeros; a scan without candidates gets one all-zero row (length 1), so every
    sequence is non-empty.

    Examples
    --------
    >>> f, n, y = pad_collate([(torch.ones(3, 2), torch.tensor(1.)), (torch.ones(0, 2), torch.tensor(0.))])
    >>> tuple(f.shape), n.tolist(), y.tolist()
    ((2, 3, 2), [3, 1], [1.0, 0.0])
    """
    feats, labels = zip(*batch)
    dim = feats[0].shape[1]
    lengths = torch.tensor([max(1, len(f)) for f in feats], dtype=torch.int64)
    out = torch.zeros(len(feats), int(lengths.max()), dim, dtype=torch.float32)
    for i, f in enumerate(feats):
        out[i, :len(f)] = f
    return out, lengths, torch.stack([torch.as_tensor(y, dtype=torch.float32) for y in labels])
