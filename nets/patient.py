"""Patient-level models beside :class:`nets.rnn.PatientRNN`: the baselines it has to beat.

All take a padded batch of a scan's findings, most probable first, ``(B, T, F)`` with
``lengths (B,)``, and return one logit per patient, so the same :class:`nets.train.Learner`
and loss (:func:`patient_loss`) train all three.  Finding columns (:data:`FINDING_COLUMNS`):
the CNN's nodule probability and the diameter in mm.

* :class:`NoisyOR`: grt123's Kaggle DSB 2017 combination.  Each of the ``top`` most probable
  findings gets a cancer probability ``p_i = sigmoid(w . x_i + b)`` from its features
  ``x_i = (logit(probability), log(diameter_mm))``; the patient's is the leaky noisy-OR
  ``P = 1 - (1 - p_leak) * prod_i (1 - p_i)``.
* :class:`SizeRule`: size only: ``P = sigmoid(a + b * d)``, ``d`` the diameter (mm) of the
  largest finding whose probability is at least ``threshold`` (0 when there is none).

The models are saved with their kind and arguments (:func:`save_patient_model`) and read with
``torch.load(path, weights_only=True)`` (:func:`load_patient_model`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["NoisyOR", "SizeRule", "patient_loss", "FINDING_COLUMNS", "NOISY_OR_TOP",
           "save_patient_model", "load_patient_model", "FORMAT"]

#: Columns of a finding row the baselines read, in order.
FINDING_COLUMNS = ("probability", "diameter_mm")
#: Findings the noisy-OR combines (grt123: the top 5 nodule proposals).
NOISY_OR_TOP = 5
FORMAT = "lungscreen.patient/1"
_EPS = 1e-6


def _valid(lengths: torch.Tensor, T: int, device) -> torch.Tensor:
    return torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None]


class NoisyOR(nn.Module):
    """Leaky noisy-OR over the ``top`` most probable findings (rows are sorted, best first).

    Parameters
    ----------
    top : int
        Findings combined.

    ``forward(findings (B, T, 2), lengths (B,))`` returns the logit of ``P`` per patient.

    Examples
    --------
    >>> net = NoisyOR()
    >>> net(torch.tensor([[[0.9, 12.0], [0.2, 4.0]]]), torch.tensor([2])).shape
    torch.Size([1])
    """

    def __init__(self, top: int = NOISY_OR_TOP):
        super().__init__()
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        self.top = int(top)
        self.arch = {"top": self.top}
        self.finding = nn.Linear(2, 1)
        with torch.no_grad():  # start from "a finding is rarely cancer": p_i = 0.05, p_leak = 0.12
            self.finding.weight.zero_()
            self.finding.bias.fill_(-3.0)
        self.leak_logit = nn.Parameter(torch.tensor(-2.0))

    def finding_probability(self, findings: torch.Tensor) -> torch.Tensor:
        """``p_i`` of each finding row ``(..., 2)`` -> ``(...)``."""
        p = findings[..., 0].clamp(_EPS, 1 - _EPS)
        x = torch.stack([torch.log(p) - torch.log1p(-p), torch.log(findings[..., 1].clamp(min=1.0))], -1)
        return torch.sigmoid(self.finding(x)[..., 0])

    def forward(self, findings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = min(self.top, findings.shape[1])
        f = findings[:, :T]
        valid = _valid(lengths, T, f.device)
        log_not = torch.log1p(-self.finding_probability(f).clamp(max=1 - _EPS)) * valid
        log_not_p = torch.nn.functional.logsigmoid(-self.leak_logit) + log_not.sum(1)  # log(1 - P)
        log_not_p = log_not_p.clamp(max=-_EPS)
        return torch.log(-torch.expm1(log_not_p)) - log_not_p  # logit(P)


class SizeRule(nn.Module):
    """``logit P = a + b * d``, ``d``: diameter (mm) of the largest finding with probability
    at least ``threshold`` (0 mm when none).

    Examples
    --------
    >>> rule = SizeRule(0.5)
    >>> float(rule.largest(torch.tensor([[[0.9, 6.0], [0.6, 9.0], [0.1, 30.0]]]), torch.tensor([3]))[0])
    9.0
    """

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.arch = {"threshold": self.threshold}
        self.a = nn.Parameter(torch.tensor(-2.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def largest(self, findings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = _valid(lengths, findings.shape[1], findings.device) & (findings[..., 0] >= self.threshold)
        return (findings[..., 1] * valid).amax(dim=1) if findings.shape[1] else findings.new_zeros(len(findings))

    def forward(self, findings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.a + self.b * self.largest(findings, lengths) / 10.0  # b per cm: better scaled


def patient_loss(pred, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (log loss, Kaggle DSB 2017's score) of patient logits."""
    if isinstance(pred, tuple):  # PatientRNN returns (logits, outputs)
        pred = pred[0]
    return nn.functional.binary_cross_entropy_with_logits(pred.float(), target.float())


def save_patient_model(model: nn.Module, path, *, info: dict | None = None) -> Path:
    """Write ``model`` (a :class:`NoisyOR`, :class:`SizeRule` or :class:`nets.rnn.PatientRNN`)
    with its kind, arguments and ``info`` (str/int/float values) to ``path`` (atomically)."""
    from nets.rnn import PatientRNN
    from pipeline.io import write_torch

    kinds = {NoisyOR: "noisy_or", SizeRule: "size", PatientRNN: "rnn"}
    if type(model) not in kinds:
        raise TypeError(f"not a patient model: {type(model).__name__}")
    state = {"format": FORMAT, "kind": kinds[type(model)], "arch": dict(model.arch),
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "info": dict(info or {})}
    return write_torch(state, path)


def load_patient_model(path) -> nn.Module:
    """Read a model written by :func:`save_patient_model` (``weights_only=True``), in eval
    mode on the CPU, with ``model.kind`` and ``model.info`` attached.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not a lungscreen patient model.
    """
    from nets.rnn import PatientRNN

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patient model not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lungscreen patient model (expected format {FORMAT!r})")
    make = {"noisy_or": NoisyOR, "size": SizeRule, "rnn": PatientRNN}[state["kind"]]
    model = make(**state["arch"])
    model.load_state_dict(state["state_dict"])
    model.kind, model.info = state["kind"], dict(state["info"])
    return model.eval()
