"""Callbacks that watch the run and stop it: :class:`EarlyStopping` on a recorded metric,
:class:`TerminateOnNaN` on a non-finite training loss.

Both steer the loop by raising :class:`nets.train.CancelFitException`; ``after_fit`` still runs.
"""
from __future__ import annotations

import logging

import torch

from nets.callbacks.core import Callback, CancelFitException

log = logging.getLogger(__name__)

__all__ = ["EarlyStopping", "TerminateOnNaN"]


class EarlyStopping(Callback):
    """Cancel the fit when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    ``mode="auto"`` maximises names containing ``auc``/``acc``, minimises the rest.  The
    decision is taken after each epoch (after :class:`nets.train.Recorder`) and acted on by
    raising :class:`nets.train.CancelFitException` before the next epoch starts, so a
    :class:`nets.callbacks.Checkpoint` saved after the epoch already holds the decision.

    Parameters
    ----------
    monitor : str
        A key of the recorder's rows: ``"valid_loss"``, ``"train_loss"`` or a metric's name.
    mode : {"auto", "min", "max"}
        Whether smaller or larger is better.
    min_delta : float
        Smallest change, in the units of ``monitor``, that counts as an improvement.
    patience : int
        Epochs without improvement before the fit stops, at least 1.

    Raises
    ------
    ValueError
        On an unknown ``mode`` or ``patience < 1``; during the fit, when the recorder has no
        ``monitor`` column.
    """

    order = 52

    def __init__(self, monitor: str = "valid_loss", *, mode: str = "auto", min_delta: float = 0.0,
                 patience: int = 3):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode == "auto":
            mode = "max" if ("auc" in monitor or "acc" in monitor) else "min"
        self.monitor, self.mode, self.min_delta, self.patience = monitor, mode, min_delta, patience
        self.best, self.best_epoch, self.wait, self.stop = None, -1, 0, False

    def before_fit(self):
        self.best, self.best_epoch, self.wait, self.stop = None, -1, 0, False

    def before_epoch(self):
        if self.stop:
            raise CancelFitException()

    def after_epoch(self):
        row = self.learn.recorder.values[-1]
        if self.monitor not in row:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r} but the recorder has "
                             f"{sorted(row)}; pass one of those (metrics need a validation set)")
        value = float(row[self.monitor])
        better = (self.best is None
                  or (value < self.best - self.min_delta if self.mode == "min"
                      else value > self.best + self.min_delta))
        if better:
            self.best, self.best_epoch, self.wait = value, int(self.learn.epoch), 0
        else:
            self.wait += 1
            self.stop = self.wait >= self.patience

    def state_dict(self) -> dict:
        """The best value and epoch, epochs waited and the stop decision (for a checkpoint)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stop": int(self.stop)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stop = state["wait"], bool(state["stop"])


class TerminateOnNaN(Callback):
    """Cancel the fit when a training loss is NaN or infinite (before it reaches the weights).

    One of the Learner's default callbacks.
    """

    order = -5
    run_valid = False

    def after_loss(self):
        if not bool(torch.isfinite(self.learn.loss.detach()).all()):
            log.warning("loss is %s at epoch %d batch %d; stopping", float(self.learn.loss.detach()),
                        self.learn.epoch, self.learn.iter)
            raise CancelFitException()
