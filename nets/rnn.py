"""Patient-level model: a GRU over a scan's ranked candidate embeddings and scores.

Each scan is a variable-length sequence of candidate rows ``[embedding..., score]`` sorted by
score, best first (:func:`rank_candidates`).  :class:`PatientRNN` packs the padded batch
(``pack_padded_sequence``), runs a bidirectional GRU, pools the valid time steps (masked max
plus the final hidden states) and gives one logit per patient.

It trains with the same :class:`nets.train.Learner` as the CNN; :func:`rnn_cbs` returns the
callback bundle for what differs (the model returns ``(logits, outputs)``; gradients are
clipped; an optional activation penalty).  There is no second training loop.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nets.callbacks import GradientClip
from nets.train import Callback

__all__ = ["PatientRNN", "RNNCallback", "rnn_cbs", "rank_candidates", "MAX_CANDIDATES"]

#: Candidates per scan the RNN reads (the best-scoring ones).
MAX_CANDIDATES = 32


def rank_candidates(embeddings, scores, *, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """Rows ``[embedding, score]`` of the ``max_candidates`` best-scoring candidates, best first.

    Parameters
    ----------
    embeddings : (T, D) array
        :meth:`nets.cnn3d.NoduleNet3D.embed` of each candidate cube.
    scores : (T,) array
        Nodule probability of each candidate.
    max_candidates : int

    Returns
    -------
    (min(T, max_candidates), D + 1) float32 array.

    Examples
    --------
    >>> rank_candidates(np.eye(3), [0.1, 0.9, 0.5], max_candidates=2).tolist()
    [[0.0, 1.0, 0.0, 0.8999999761581421], [0.0, 0.0, 1.0, 0.5]]
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    sc = np.asarray(scores, dtype=np.float32).reshape(-1)
    if emb.ndim != 2 or len(emb) != len(sc):
        raise ValueError(f"embeddings must be (T, D) and scores (T,), got {emb.shape} and {sc.shape}")
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    order = np.argsort(-sc, kind="stable")[:max_candidates]
    return np.concatenate([emb[order], sc[order, None]], axis=1)


class PatientRNN(nn.Module):
    """Bidirectional GRU over candidate rows -> one patient logit.

    Parameters
    ----------
    in_features : int
        Width ``D`` of each candidate row (embedding size + 1 for the score, last).  The
        embedding part is layer-normalised; the score is used as it is.
    hidden : int
        GRU hidden size per direction.
    num_layers : int
    dropout : float
        Dropout before the final linear layer.

    ``forward(feats (B, T, D), lengths (B,))`` returns ``(logits (B,), outputs (B, T, 2*hidden))``;
    padded steps (``t >= lengths[b]``) never influence the logit.

    Examples
    --------
    >>> net = PatientRNN(4, hidden=8).eval()
    >>> logits, out = net(torch.zeros(2, 5, 4), torch.tensor([5, 2]))
    >>> tuple(logits.shape), tuple(out.shape)
    ((2,), (2, 5, 16))
    """

    def __init__(self, in_features: int, *, hidden: int = 64, num_layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        if in_features < 1 or hidden < 1:
            raise ValueError(f"in_features and hidden must be >= 1, got {in_features}, {hidden}")
        self.arch = {"in_features": int(in_features), "hidden": int(hidden),
                     "num_layers": int(num_layers), "dropout": float(dropout)}  # to save and rebuild
        self.norm = nn.LayerNorm(in_features - 1) if in_features > 1 else nn.Identity()
        self.gru = nn.GRU(in_features, hidden, num_layers=num_layers, batch_first=True,
                          bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * hidden, 1))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor):
        if feats.ndim != 3 or lengths.shape != feats.shape[:1]:
            raise ValueError(f"feats must be (B, T, D) with lengths (B,), got {tuple(feats.shape)} "
                             f"and {tuple(lengths.shape)}")
        T = feats.shape[1]
        # normalise the embedding part of each row; the score (last column) stays as it is
        x = torch.cat([self.norm(feats[..., :-1]), feats[..., -1:]], dim=-1)
        packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1),
                                      batch_first=True, enforce_sorted=False)
        out, h = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        mask = torch.arange(T, device=feats.device)[None, :] < lengths.to(feats.device)[:, None]
        pooled = out.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        last = torch.cat([h[-2], h[-1]], dim=1)      # final forward and backward states
        return self.head(torch.cat([pooled, last], dim=1))[:, 0], out


class RNNCallback(Callback):
    """Keep only the logits of ``(logits, outputs)`` as ``learn.pred``; optionally add
    ``alpha * mean(outputs**2)`` (activation regularisation) to the training loss."""

    order = -2

    def __init__(self, alpha: float = 0.0):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha, self.out = float(alpha), None

    def after_pred(self):
        if isinstance(self.learn.pred, tuple):
            self.learn.pred, self.out = self.learn.pred[0], self.learn.pred[1]

    def after_loss(self):
        if self.alpha and self.learn.training and self.out is not None:
            self.learn.loss_grad = self.learn.loss_grad + self.alpha * self.out.float().pow(2).mean()


def rnn_cbs(*, alpha: float = 0.0, max_grad_norm: float = 1.0) -> list[Callback]:
    """The callbacks that make :class:`nets.train.Learner` train a :class:`PatientRNN`."""
    return [RNNCallback(alpha), GradientClip(max_grad_norm)]
