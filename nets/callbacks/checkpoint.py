"""Saving and resuming a fit: :class:`Checkpoint`, and the RNG state capture it (and
:class:`nets.callbacks.LRFinder`) restores, :func:`get_rng_state` / :func:`set_rng_state`.

Callbacks that must survive a restart implement ``state_dict()`` / ``load_state_dict()``;
:class:`Checkpoint` saves those with the model, optimiser and RNGs.
"""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch

from nets.callbacks.core import Callback
from nets.distributed import is_main_process
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "get_rng_state", "set_rng_state"]


def get_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA RNG states as tensors and ints (``weights_only``-safe).

    Returns
    -------
    dict
        ``{"torch", "cuda", "numpy", "python"}``; give it to :func:`set_rng_state`.

    Examples
    --------
    >>> state = get_rng_state(); a = np.random.rand()
    >>> set_rng_state(state); bool(np.random.rand() == a)
    True
    """
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2]},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned.

    The CUDA states are restored only when as many GPUs are visible as when they were taken.

    Parameters
    ----------
    state : dict
        As returned by :func:`get_rng_state` (or read back from a checkpoint).
    """
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


class Checkpoint(Callback):
    """Save everything needed to resume after every ``every`` epochs; resume in ``before_fit``.

    The file (``torch.save`` to a temporary name, then renamed, through
    :func:`pipeline.io.atomic_path`) holds the epoch, model and optimiser state, the state of
    every callback with ``state_dict()`` (recorder, early stopping, grad scaler) and the
    Python/numpy/torch RNG states, all as tensors, dicts, lists, ints and floats, so
    ``torch.load(path, weights_only=True)`` reads it.  With ``resume=True`` and an existing
    file, training continues at the next epoch exactly as it would have without the
    interruption (same ``n_epoch`` and data order required).  Under ``torchrun`` only rank 0
    writes the file; every rank reads it on resume.

    Parameters
    ----------
    path : str or Path
        The checkpoint file; its folder is created when missing.
    resume : bool
        Load ``path`` in ``before_fit`` when it exists.
    every : int
        Save after every ``every`` epochs (and after the last one), at least 1.

    Raises
    ------
    ValueError
        If ``every < 1``; on resume, if ``path`` is not a lungscreen checkpoint.
    """

    order = 55
    FORMAT = "lungscreen.checkpoint/1"

    def __init__(self, path, *, resume: bool = False, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1 epoch, got {every}")
        self.path, self.resume, self.every = Path(path), bool(resume), int(every)

    def before_fit(self):
        if self.resume and self.path.exists():
            self.load()

    def after_epoch(self):
        epoch = self.learn.epoch
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.learn.n_epoch:
            self.save()

    def save(self) -> Path:
        """Write the checkpoint now (rank 0 only under torchrun: the ranks hold the same
        weights); returns its path."""
        if not is_main_process():
            return self.path
        learn = self.learn
        state = {"format": self.FORMAT, "epoch": int(learn.epoch), "n_epoch": int(learn.n_epoch),
                 "model": learn.model.state_dict(), "opt": learn.opt.state_dict(),
                 "cbs": {cb.name: cb.state_dict() for cb in learn.cbs
                         if hasattr(cb, "state_dict") and cb is not self},
                 "rng": get_rng_state()}
        # through a buffer: torch.save to a file names the archive after the (random) temp name
        buf = io.BytesIO()
        torch.save(state, buf)
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(buf.getvalue())
        return self.path

    def load(self) -> None:
        """Restore the model, optimiser, callbacks and RNGs; the fit goes on at the next epoch."""
        learn = self.learn
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("format") != self.FORMAT:
            raise ValueError(f"{self.path} is not a lungscreen checkpoint (format "
                             f"{state.get('format')!r}); delete it or pass resume=False")
        if state["n_epoch"] != learn.n_epoch:
            log.warning("checkpoint was made for %d epochs, fitting %d: the LR schedule differs",
                        state["n_epoch"], learn.n_epoch)
        learn.model.load_state_dict(state["model"])
        learn.opt.load_state_dict(state["opt"])
        for cb in learn.cbs:
            if cb.name in state["cbs"] and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(state["cbs"][cb.name])
        set_rng_state(state["rng"])
        learn.start_epoch = state["epoch"] + 1
        log.info("resumed from %s after epoch %d", self.path, state["epoch"])
