"""Callbacks for :class:`nets.train.Learner`: schedules, LR finder, early stopping, checkpoints,
logging, progress bars, mixed precision, gradient clipping, NaN guard, and the metrics.

Each is a :class:`nets.train.Callback`: methods named after events, an ``order``, and state on
``self``.  Callbacks that must survive a restart implement ``state_dict()`` /
``load_state_dict()``; :class:`Checkpoint` saves those with the model, optimiser and RNGs.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import random
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nets.train import (Callback, CancelFitException, CancelStepException, CancelValidException,
                        LRFindResult)

log = logging.getLogger(__name__)

__all__ = [
    "sched_lin", "sched_cos", "sched_exp", "sched_no", "combine_scheds", "set_hyper",
    "ParamScheduler", "LRFinder", "EarlyStopping", "Checkpoint", "MetricsLogger",
    "ProgressCallback", "MixedPrecision", "GradientClip", "TerminateOnNaN",
    "roc_auc", "accuracy", "get_rng_state", "set_rng_state",
]


# ---------------------------------------------------------------------- schedules (pure functions)
def _sched(f):
    def make(start, end):
        return partial(f, start, end)
    make.__name__, make.__doc__ = f.__name__, f.__doc__
    return make


@_sched
def sched_lin(start: float, end: float, pos: float) -> float:
    """Linear from ``start`` (pos 0) to ``end`` (pos 1).

    >>> sched_lin(0.0, 2.0)(0.25)
    0.5
    """
    return start + pos * (end - start)


@_sched
def sched_cos(start: float, end: float, pos: float) -> float:
    """Half cosine from ``start`` (pos 0) to ``end`` (pos 1).

    >>> round(sched_cos(1.0, 0.0)(0.5), 6)
    0.5
    """
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


@_sched
def sched_exp(start: float, end: float, pos: float) -> float:
    """Exponential from ``start`` to ``end`` (both > 0).

    >>> round(sched_exp(1e-4, 1e-2)(0.5), 8)
    0.001
    """
    return start * (end / start) ** pos


@_sched
def sched_no(start: float, end: float, pos: float) -> float:
    """Constant ``start``."""
    return start


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Callable[[float], float]]):
    """Join schedules: ``scheds[i]`` runs over the fraction ``pcts[i]`` of training.

    Examples
    --------
    >>> f = combine_scheds([0.5, 0.5], [sched_lin(0, 1), sched_lin(1, 0)])
    >>> [round(f(p), 2) for p in (0.0, 0.25, 0.5, 0.75)]
    [0.0, 0.5, 1.0, 0.5]
    """
    pcts = np.asarray(pcts, dtype=float)
    if len(pcts) != len(scheds) or np.any(pcts < 0) or not np.isclose(pcts.sum(), 1.0):
        raise ValueError(f"pcts must be {len(scheds)} non-negative fractions summing to 1, got "
                         f"{pcts.tolist()}")
    edges = np.concatenate([[0.0], np.cumsum(pcts)])

    def combined(pos: float) -> float:
        i = int(np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, len(scheds) - 1))
        width = edges[i + 1] - edges[i]
        return scheds[i](float((pos - edges[i]) / width) if width > 0 else 1.0)
    return combined


def set_hyper(opt: torch.optim.Optimizer, name: str, value: float) -> None:
    """Set ``lr``, ``mom`` (Adam's beta1 or SGD's momentum) or any param-group key."""
    for group in opt.param_groups:
        if name == "mom" and "betas" in group:
            group["betas"] = (value, group["betas"][1])
        elif name == "mom" and "momentum" in group:
            group["momentum"] = value
        elif name in group or name == "lr":
            group[name] = value
        else:
            raise ValueError(f"optimiser {type(opt).__name__} has no hyper-parameter {name!r}")


class ParamScheduler(Callback):
    """Set hyper-parameters every training batch from ``{name: f(pos)}``, ``pos`` in [0, 1).

    ``pos`` is :attr:`nets.train.Learner.pct_train`, computed from the epoch and batch
    numbers, so a resumed fit follows the same schedule.
    """

    order = 1
    run_valid = False

    def __init__(self, scheds: dict[str, Callable[[float], float]]):
        self.scheds = dict(scheds)

    def before_batch(self):
        pos = self.learn.pct_train
        for name, f in self.scheds.items():
            set_hyper(self.learn.opt, name, f(pos))


# ---------------------------------------------------------------------- RNG state
def get_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA RNG states as tensors/ints (weights_only-safe)."""
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
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ---------------------------------------------------------------------- LR finder
class LRFinder(Callback):
    """Exponential LR sweep from ``start_lr`` to ``end_lr`` over ``num_it`` training batches.

    Stops early when the smoothed loss exceeds 4x its minimum (``stop_div``) or is not finite;
    skips validation; restores weights, optimiser and RNG states in ``after_fit``.
    Use through :meth:`nets.train.Learner.lr_find`.
    """

    order = 1
    run_valid = False

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                 stop_div: bool = True, beta: float = 0.98):
        if not 0 < start_lr < end_lr:
            raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
        if num_it < 5:
            raise ValueError(f"num_it must be >= 5, got {num_it}")
        self.start_lr, self.end_lr, self.num_it = float(start_lr), float(end_lr), int(num_it)
        self.stop_div, self.beta = stop_div, beta

    def before_fit(self):
        self._saved = {"model": copy.deepcopy(self.learn.model.state_dict()),
                       "opt": copy.deepcopy(self.learn.opt.state_dict()), "rng": get_rng_state()}
        self.lrs, self.losses, self.best, self._avg, self._n = [], [], math.inf, 0.0, 0

    def before_batch(self):
        self._lr = sched_exp(self.start_lr, self.end_lr)(self._n / (self.num_it - 1))
        set_hyper(self.learn.opt, "lr", self._lr)

    def after_batch(self):
        self._n += 1
        loss = float(self.learn.loss.detach())
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** self._n)
        self.lrs.append(self._lr)
        self.losses.append(smooth)
        self.best = min(self.best, smooth)
        if self.stop_div and (not math.isfinite(smooth) or smooth > 4 * self.best):
            raise CancelFitException()
        if self._n >= self.num_it:
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()

    def after_fit(self):
        self.learn.model.load_state_dict(self._saved["model"])
        self.learn.opt.load_state_dict(self._saved["opt"])
        set_rng_state(self._saved["rng"])

    def suggestion(self) -> LRFindResult:
        """Steepest descent of the smoothed loss (vs log LR) before its minimum, and min/10."""
        lrs, losses = np.asarray(self.lrs, float), np.asarray(self.losses, float)
        finite = np.isfinite(losses)
        if finite.sum() < 3:
            raise ValueError(f"the LR sweep recorded only {int(finite.sum())} finite losses; "
                             "raise num_it, lower start_lr, or check the data")
        lrs, losses = lrs[finite], losses[finite]
        i_min = int(np.argmin(losses))
        min_lr = float(lrs[i_min])
        stop = max(i_min + 1, 3)
        slope = np.gradient(losses[:stop], np.log10(lrs[:stop]))
        steep = float(lrs[:stop][int(np.argmin(slope))])
        suggested = steep if min_lr / 100 <= steep <= min_lr else min_lr / 10
        return LRFindResult(suggested, steep, min_lr / 10, lrs.tolist(), losses.tolist())


# ---------------------------------------------------------------------- early stopping, NaN
class EarlyStopping(Callback):
    """Cancel the fit when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    ``mode="auto"`` maximises names containing ``auc``/``acc``, minimises the rest.  The
    decision is taken after each epoch (after :class:`nets.train.Recorder`) and acted on by
    raising :class:`nets.train.CancelFitException` before the next epoch starts, so a
    :class:`Checkpoint` saved after the epoch already holds the decision.
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
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stop": int(self.stop)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stop = state["wait"], bool(state["stop"])


class TerminateOnNaN(Callback):
    """Cancel the fit when a training loss is NaN or infinite (before it reaches the weights)."""

    order = -5
    run_valid = False

    def after_loss(self):
        if not bool(torch.isfinite(self.learn.loss.detach()).all()):
            log.warning("loss is %s at epoch %d batch %d; stopping", float(self.learn.loss.detach()),
                        self.learn.epoch, self.learn.iter)
            raise CancelFitException()


class GradientClip(Callback):
    """Clip the global gradient norm to ``max_norm`` before each optimiser step."""

    order = 5

    def __init__(self, max_norm: float = 1.0):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def before_step(self):
        torch.nn.utils.clip_grad_norm_(self.learn.model.parameters(), self.max_norm)


# ---------------------------------------------------------------------- mixed precision
class MixedPrecision(Callback):
    """``torch.autocast`` + ``GradScaler`` on CUDA; does nothing on any other device.

    Gradients are unscaled right after backward, so :class:`GradientClip` (lower order) sees
    true gradients; the scaler then steps the optimiser and the Learner's own step is skipped.
    """

    order = 10

    def __init__(self, dtype: torch.dtype = torch.float16):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        self.enabled, self.scaler, self._ctx = False, None, None

    def before_fit(self):
        self.enabled = self.learn.device.type == "cuda"
        use_scaler = self.enabled and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def before_batch(self):
        if self.enabled:
            self._ctx = torch.autocast("cuda", dtype=self.dtype)
            self._ctx.__enter__()

    def _exit(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    after_loss = after_cancel_batch = after_fit = _exit

    def before_backward(self):
        if self.scaler is not None:
            self.learn.loss_grad = self.scaler.scale(self.learn.loss_grad)

    def after_backward(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.learn.opt)

    def before_step(self):
        if self.scaler is not None:
            self.scaler.step(self.learn.opt)
            self.scaler.update()
            raise CancelStepException()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


# ---------------------------------------------------------------------- checkpoints, logs
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Checkpoint(Callback):
    """Save everything needed to resume after every ``every`` epochs; resume in ``before_fit``.

    The file (``torch.save`` to a temporary name, then renamed) holds the epoch, model and
    optimiser state, the state of every callback with ``state_dict()`` (recorder, early
    stopping, grad scaler) and the Python/numpy/torch RNG states, all as tensors, dicts,
    lists, ints and floats, so ``torch.load(path, weights_only=True)`` reads it.  With
    ``resume=True`` and an existing file, training continues at the next epoch exactly as
    it would have without the interruption (same ``n_epoch`` and data order required).
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
        learn = self.learn
        state = {"format": self.FORMAT, "epoch": int(learn.epoch), "n_epoch": int(learn.n_epoch),
                 "model": learn.model.state_dict(), "opt": learn.opt.state_dict(),
                 "cbs": {cb.name: cb.state_dict() for cb in learn.cbs
                         if hasattr(cb, "state_dict") and cb is not self},
                 "rng": get_rng_state()}
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write_bytes(self.path, buf.getvalue())
        return self.path

    def load(self) -> None:
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


class MetricsLogger(Callback):
    """Rewrite ``path`` (``.csv``, ``.json`` or ``.jsonl``) with the recorder's rows each epoch."""

    order = 60

    def __init__(self, path):
        self.path = Path(path)
        if self.path.suffix not in (".csv", ".json", ".jsonl"):
            raise ValueError(f"log path must end in .csv, .json or .jsonl, got {self.path.name!r}")

    def after_epoch(self):
        rows = self.learn.recorder.values
        if self.path.suffix == ".csv":
            keys = list(dict.fromkeys(k for row in rows for k in row))
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            text = out.getvalue()
        elif self.path.suffix == ".json":
            text = json.dumps(rows, indent=1) + "\n"
        else:
            text = "".join(json.dumps(row) + "\n" for row in rows)
        _atomic_write_bytes(self.path, text.encode())


class ProgressCallback(Callback):
    """tqdm bar over each epoch's training batches; ``disable=None`` hides it off a terminal."""

    order = 70

    def __init__(self, disable: bool | None = None):
        self.disable, self.bar = disable, None

    def before_train(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.learn.dls.train), leave=False,
                        disable=self.disable, desc=f"epoch {self.learn.epoch + 1}/{self.learn.n_epoch}")

    def after_batch(self):
        if self.bar is not None and self.learn.training:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(self.learn.loss.detach()):.4f}", refresh=False)

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    after_train = after_fit = _close

    def after_epoch(self):
        if (not self.disable) if self.disable is not None else _isatty():
            import sys

            from tqdm.auto import tqdm

            row = self.learn.recorder.values[-1]
            tqdm.write("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in row.items()), file=sys.stderr)


def _isatty() -> bool:
    import sys
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ---------------------------------------------------------------------- metrics
def _binary_scores(pred: torch.Tensor) -> torch.Tensor:
    pred = pred.detach().float().cpu()
    if pred.ndim == 2 and pred.shape[1] == 2:
        return torch.softmax(pred, dim=1)[:, 1]
    return torch.sigmoid(pred.reshape(-1))


def roc_auc(pred: torch.Tensor, targ: torch.Tensor) -> float:
    """Area under the ROC curve of binary logits (``(N,)``, ``(N, 1)`` or 2-class ``(N, 2)``).

    NaN when only one class is present.  Ties count one half (Mann-Whitney U).

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

    >>> accuracy(torch.tensor([-1.0, 2.0, -0.5]), torch.tensor([0, 1, 1]))
    0.6666666865348816
    """
    targ = targ.detach().cpu()
    if pred.ndim == 2 and pred.shape[1] > 2:
        return float((pred.detach().cpu().argmax(1) == targ).float().mean())
    hit = (_binary_scores(pred) > 0.5) == (targ.reshape(-1) > 0.5)
    return float(hit.float().mean())
