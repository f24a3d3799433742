"""The one training loop of lungscreen: a small :class:`Learner` steered by callbacks.

Modelled on fastai v2 (``learner.py``, ``callback/core.py``): ``fit`` -> ``_do_fit`` ->
``_do_epoch`` -> ``all_batches`` -> ``one_batch``, every phase wrapped by
:meth:`Learner._with_events`, which fires ``before_<phase>``, runs it, fires
``after_cancel_<phase>`` when a ``Cancel<Phase>Exception`` is raised, then ``after_<phase>``.
The loop knows nothing about the model: it calls ``model(*xb)`` and ``loss_func(pred, *yb)``
and leaves ``xb, yb, pred, loss, epoch, iter, training`` on the Learner for callbacks to read
or overwrite.  Everything else (metrics, schedules, checkpoints, mixed precision, RNN
handling) is a callback in :mod:`nets.callbacks`.

Event names form a closed list (:data:`EVENTS`, also as the namespace :data:`event`); firing
an unknown name raises ``ValueError`` so that a typo in a callback fails at once.  The list,
:class:`Callback` and the ``Cancel*`` exceptions are defined in :mod:`nets.callbacks.core`,
which every callback module imports, and re-exported here; this module imports the callbacks,
never the other way round.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from nets.callbacks.core import (EVENTS, Callback, CancelBackwardException, CancelBatchException,
                                 CancelEpochException, CancelFitException, CancelStepException,
                                 CancelTrainException, CancelValidException, event)
from nets.callbacks.progress import ProgressCallback
from nets.callbacks.schedule import (LRFinder, LRFindResult, ParamScheduler, combine_scheds,
                                     sched_cos)
from nets.callbacks.tracker import TerminateOnNaN
from stages.device import pick_device

__all__ = [
    "EVENTS", "event", "Callback", "Learner", "DataLoaders", "TrainEvalCallback", "Recorder",
    "CancelFitException", "CancelEpochException", "CancelTrainException", "CancelValidException",
    "CancelBatchException", "CancelBackwardException", "CancelStepException",
    "set_seed", "pick_device", "LRFindResult",
]


class TrainEvalCallback(Callback):
    """Switch the model between train and eval mode and keep ``learn.training`` and counters."""

    order = -10

    def before_train(self):
        self.learn.model.train()
        self.learn.training = True

    def before_validate(self):
        self.learn.model.eval()
        self.learn.training = False

    def after_batch(self):
        if self.learn.training:
            self.learn.train_iter += 1


class Recorder(Callback):
    """Per-batch training losses and learning rates, per-epoch losses and metrics.

    ``values`` is a list with one dict per finished epoch: ``epoch``, ``train_loss``,
    ``valid_loss`` (when there is a validation set), one key per metric, ``lr`` and ``time_s``.
    Metrics are functions ``metric(pred, targ) -> float`` given every validation prediction
    and the first target of every validation batch (concatenated, on the CPU).
    """

    order = 50

    def __init__(self):
        self.values: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def before_fit(self):
        self.values, self.losses, self.lrs = [], [], []

    def before_epoch(self):
        self._t0 = time.perf_counter()
        self._train = []
        self._valid, self._preds, self._targs = [], [], []

    def after_batch(self):
        loss = float(self.learn.loss.detach())
        n = _batch_size(self.learn.yb, self.learn.xb)
        if self.learn.training:
            self.losses.append(loss)
            self.lrs.append(float(self.learn.opt.param_groups[0]["lr"]))
            self._train.append((loss, n))
        else:
            self._valid.append((loss, n))
            self._preds.append(self.learn.pred.detach().float().cpu())
            if len(self.learn.yb):
                self._targs.append(self.learn.yb[0].detach().cpu())

    def after_epoch(self):
        row = {"epoch": int(self.learn.epoch), "train_loss": _weighted_mean(self._train)}
        if self._valid:
            row["valid_loss"] = _weighted_mean(self._valid)
            if self.learn.metrics and self._targs:
                preds, targs = torch.cat(self._preds), torch.cat(self._targs)
                for metric in self.learn.metrics:
                    row[getattr(metric, "__name__", type(metric).__name__)] = float(metric(preds, targs))
        row["lr"] = self.lrs[-1] if self.lrs else float(self.learn.lr)
        row["time_s"] = time.perf_counter() - self._t0
        self.values.append(row)

    def state_dict(self) -> dict:
        return {"values": [dict(v) for v in self.values], "losses": list(self.losses),
                "lrs": list(self.lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.values = [dict(v) for v in state["values"]]
        self.losses, self.lrs = list(state["losses"]), list(state["lrs"])


def _batch_size(yb, xb) -> int:
    for t in (*yb, *xb):
        if isinstance(t, torch.Tensor) and t.ndim:
            return int(t.shape[0])
    return 1


def _weighted_mean(pairs) -> float:
    total = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / total) if total else float("nan")


@dataclass
class DataLoaders:
    """A training loader and an optional validation loader (any iterables of batches with ``len``).

    Each batch is a tuple/list ``(*xb, *yb)``: the Learner's ``n_inp`` first items go to the
    model, the rest to the loss function.
    """

    train: Iterable
    valid: Iterable | None = None


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every GPU).

    ``deterministic=True`` also asks cuDNN for deterministic kernels (slower).

    Examples
    --------
    >>> set_seed(0); a = torch.rand(1); set_seed(0); bool(torch.rand(1) == a)
    True
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class Learner:
    """Train ``model`` on ``dls`` with ``loss_func``, steered by callbacks.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(*xb)``.
    dls : DataLoaders
        ``dls.train`` and optionally ``dls.valid``.
    loss_func : callable
        Called as ``loss_func(pred, *yb)``; returns a scalar tensor.
    opt_func : callable, optional
        ``opt_func(params, lr=..., weight_decay=...)``; default ``torch.optim.AdamW``.
    lr : float
        Learning rate (schedulers overwrite it per batch).
    wd : float
        Weight decay given to the optimiser.
    cbs : list of Callback, optional
        Added after the defaults (``TrainEvalCallback``, ``Recorder``, ``TerminateOnNaN``,
        ``ProgressCallback``); each becomes an attribute (``learn.recorder``).
    metrics : list of callable
        ``metric(pred, targ) -> float`` on the whole validation set each epoch.
    device : str or torch.device, optional
        Chosen once here (``None``: CUDA if available); the model is moved to it.
    n_inp : int, optional
        How many leading items of a batch are model inputs (default: all but the last).
    progress : bool, optional
        ``False`` hides progress bars; ``None`` shows them only on a terminal.

    Examples
    --------
    >>> set_seed(0)
    >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).float()
    >>> dl = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    >>> learn = Learner(torch.nn.Linear(2, 1), DataLoaders(dl, dl),
    ...                 lambda p, t: torch.nn.functional.binary_cross_entropy_with_logits(p[:, 0], t),
    ...                 lr=0.1, device="cpu", progress=False)
    >>> learn.fit(5)
    >>> learn.recorder.values[-1]["train_loss"] < learn.recorder.values[0]["train_loss"]
    True
    """

    def __init__(self, model: torch.nn.Module, dls: DataLoaders, loss_func: Callable, *,
                 opt_func: Callable | None = None, lr: float = 1e-3, wd: float = 0.0,
                 cbs: Iterable[Callback] | None = None, metrics: Iterable[Callable] = (),
                 device=None, n_inp: int | None = None, progress: bool | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_func):
            raise TypeError(f"loss_func must be callable, got {type(loss_func).__name__}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.device = pick_device(device)
        self.model = model.to(self.device)
        self.dls, self.loss_func, self.lr, self.wd, self.n_inp = dls, loss_func, float(lr), wd, n_inp
        self.opt_func = opt_func or torch.optim.AdamW
        self.metrics = list(metrics)
        self.opt = None
        self.cbs: list[Callback] = []
        self.epoch = self.iter = self.n_iter = self.train_iter = self.start_epoch = self.n_epoch = 0
        self.training = False
        self.xb: tuple = ()
        self.yb: tuple = ()
        self.pred = self.loss = self.loss_grad = None
        self.add_cbs([TrainEvalCallback(), Recorder(), TerminateOnNaN(),
                      ProgressCallback(disable=None if progress is None else not progress)])
        self.add_cbs(cbs or [])

    # ------------------------------------------------------------------ callbacks
    def add_cb(self, cb: Callback) -> "Learner":
        if isinstance(cb, type):
            cb = cb()
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}")
        old = getattr(self, cb.name, None)
        if isinstance(old, Callback):
            self.remove_cb(old)
        cb.learn = self
        setattr(self, cb.name, cb)
        self.cbs.append(cb)
        return self

    def add_cbs(self, cbs) -> "Learner":
        for cb in cbs:
            self.add_cb(cb)
        return self

    def remove_cb(self, cb: Callback) -> "Learner":
        self.cbs.remove(cb)
        if getattr(self, cb.name, None) is cb:
            delattr(self, cb.name)
        return self

    @contextlib.contextmanager
    def added_cbs(self, cbs):
        """Add ``cbs`` for the duration of a ``with`` block."""
        cbs = [cb() if isinstance(cb, type) else cb for cb in cbs]
        self.add_cbs(cbs)
        try:
            yield self
        finally:
            for cb in cbs:
                if cb in self.cbs:
                    self.remove_cb(cb)

    def __call__(self, event_name: str) -> None:
        if event_name not in EVENTS:
            raise ValueError(f"unknown event {event_name!r}; events are {', '.join(EVENTS)}")
        for cb in sorted(self.cbs, key=lambda c: c.order):
            cb(event_name)

    # ------------------------------------------------------------------ the loop
    def _with_events(self, f: Callable, name: str, exc: type[Exception]) -> None:
        try:
            self(f"before_{name}")
            f()
        except exc:
            self(f"after_cancel_{name}")
        self(f"after_{name}")

    def fit(self, n_epoch: int, *, lr: float | None = None, cbs: Iterable[Callback] = ()) -> None:
        """Train for ``n_epoch`` epochs (fewer when a checkpoint resumes or a callback cancels)."""
        if not isinstance(n_epoch, (int, np.integer)) or n_epoch < 1:
            raise ValueError(f"n_epoch must be a positive int, got {n_epoch!r}")
        if lr is not None:
            self.lr = float(lr)
        if self.opt is None:
            self.opt = self.opt_func(self.model.parameters(), lr=self.lr, weight_decay=self.wd)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.n_epoch, self.start_epoch, self.train_iter = int(n_epoch), 0, 0
        with self.added_cbs(cbs):
            self._with_events(self._do_fit, "fit", CancelFitException)

    def _do_fit(self) -> None:
        for epoch in range(self.start_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)

    def _do_epoch(self) -> None:
        self._with_events(lambda: self.all_batches(self.dls.train), "train", CancelTrainException)
        if self.dls.valid is not None:
            self._with_events(self._do_validate, "validate", CancelValidException)

    def _do_validate(self) -> None:
        with torch.no_grad():
            self.all_batches(self.dls.valid)

    def all_batches(self, dl) -> None:
        self.n_iter = len(dl)
        for i, batch in enumerate(dl):
            self.iter = i
            self.one_batch(batch)

    def one_batch(self, batch) -> None:
        batch = _to(tuple(batch), self.device)
        n_inp = self.n_inp if self.n_inp is not None else max(len(batch) - 1, 1)
        self.xb, self.yb = batch[:n_inp], batch[n_inp:]
        self._with_events(self._do_one_batch, "batch", CancelBatchException)

    def _do_one_batch(self) -> None:
        self.pred = self.model(*self.xb)
        self("after_pred")
        self.loss = self.loss_grad = self.loss_func(self.pred, *self.yb)
        self("after_loss")
        if not self.training:
            return
        self._with_events(lambda: self.loss_grad.backward(), "backward", CancelBackwardException)
        self._with_events(self.opt.step, "step", CancelStepException)
        self.opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ conveniences
    @property
    def pct_train(self) -> float:
        """Fraction of the whole fit done at the current training batch, in ``[0, 1)``."""
        n_iter = max(self.n_iter, 1)
        return (self.epoch + self.iter / n_iter) / max(self.n_epoch, 1)

    def fit_one_cycle(self, n_epoch: int, lr_max: float | None = None, *, div: float = 25.0,
                      div_final: float = 1e5, pct_start: float = 0.25,
                      moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
                      cbs: Iterable[Callback] = ()) -> None:
        """One-cycle policy: LR warms up (cosine) from ``lr_max/div`` to ``lr_max`` over
        ``pct_start`` of training, then anneals to ``lr_max/div_final``; momentum does the opposite.

        Builds a :class:`nets.callbacks.ParamScheduler` and calls the same :meth:`fit`.
        """
        lr_max = float(lr_max if lr_max is not None else self.lr)
        scheds = {"lr": combine_scheds([pct_start, 1 - pct_start],
                                       [sched_cos(lr_max / div, lr_max),
                                        sched_cos(lr_max, lr_max / div_final)])}
        if moms is not None:
            scheds["mom"] = combine_scheds([pct_start, 1 - pct_start],
                                           [sched_cos(moms[0], moms[1]), sched_cos(moms[1], moms[2])])
        self.fit(n_epoch, lr=lr_max, cbs=[ParamScheduler(scheds), *cbs])

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                stop_div: bool = True) -> LRFindResult:
        """Exponential LR sweep; weights, optimiser and RNG are restored afterwards.

        Returns the LR at the steepest descent of the smoothed loss before its minimum
        (``steep``), the LR of the minimum divided by 10 (``min_div10``) and ``suggested``:
        ``steep`` when it lies within a factor 100 below the minimum's LR, else ``min_div10``.
        """
        n_epoch = max(1, math.ceil(num_it / max(len(self.dls.train), 1)))
        finder = LRFinder(start_lr, end_lr, num_it, stop_div)
        self.fit(n_epoch, cbs=[finder])
        return finder.suggestion()

    def predict(self, dl) -> torch.Tensor:
        """Model outputs over ``dl`` (eval mode, no gradients), concatenated on the CPU."""
        self.model.eval()
        outs = []
        with torch.no_grad():
            for batch in dl:
                batch = _to(tuple(batch), self.device)
                n_inp = self.n_inp if self.n_inp is not None else max(len(batch) - 1, 1)
                pred = self.model(*batch[:n_inp])
                outs.append((pred[0] if isinstance(pred, tuple) else pred).float().cpu())
        return torch.cat(outs)
