"""Validation metrics for :class:`nets.train.Recorder`: functions ``metric(pred, targ) -> float``
on the whole validation set (``Learner(metrics=[roc_auc, accuracy])``), recorded under their
function names, which :class:`nets.callbacks.EarlyStopping` can monitor.
"""
from __future__ import annotations

import torch

__all__ = ["roc_auc", "accuracy"]


def _binary_scores(pred: torch.Tensor) -> torch.Tensor:
    """Positive-class probabilities, shape (N,), of binary logits (N,), (N, 1) or (N, 2)."""
    pred = pred.detach().float().cpu()
    if pred.ndim == 2 and pred.shape[1] == 2:
        return torch.softmax(pred, dim=1)[:, 1]
    return torch.sigmoid(pred.reshape(-1))


def roc_auc(pred: torch.Tensor, targ: torch.Tensor) -> float:
    """Area under the ROC curve of binary logits.

    Ties count one half (Mann-Whitney U).

    Parameters
    ----------
    pred : (N,), (N, 1) or (N, 2) torch.Tensor
        Logits; for two columns, softmax's second column is the positive score.
    targ : (N,) torch.Tensor
        Labels; values > 0.5 are positive.

    Returns
    -------
    float
        The AUC in [0, 1]; NaN when only one class is present.

    Examples
    --------
    >>> roc_auc(torch.tensor([-1.0, 2.0, 0.5, -3.0]), torch.tensor([0, 1, 1, 0]))
    1.0
    """
    from scipy.stats import rankdata

    scores = _binary_scores(pred).numpy()
    y = targ.detach().cpu().reshape(-1).numpy() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(pred: torch.Tensor, targ: torch.Tensor) -> float:
    """Fraction correct: argmax for multi-class logits, sigmoid > 0.5 for binary logits.

    Parameters
    ----------
    pred : (N,), (N, 1), (N, 2) or (N, C) torch.Tensor
        Logits; more than two columns are read as ``C`` classes.
    targ : (N,) torch.Tensor
        Class indices, or binary labels (values > 0.5 are positive).

    Returns
    -------
    float
        In [0, 1].

    Examples
    --------
    >>> accuracy(torch.tensor([-1.0, 2.0, -0.5]), torch.tensor([0, 1, 1]))
    0.6666666865348816
    """
    targ = targ.detach().cpu()
    if pred.ndim == 2 and pred.shape[1] > 2:
        return float((pred.detach().cpu().argmax(1) == targ).float().mean())
    hit = (_binary_scores(pred) > 0.5) == (targ.reshape(-1) > 0.5)
    return float(hit.float().mean())
