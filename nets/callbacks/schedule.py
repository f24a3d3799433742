"""Hyper-parameter schedules: pure schedule functions, :class:`ParamScheduler` (what
:meth:`nets.train.Learner.fit_one_cycle` builds) and the LR range test :class:`LRFinder`
(what :meth:`nets.train.Learner.lr_find` runs).

A schedule is a function ``f(pos) -> value`` of the fraction ``pos`` in [0, 1] of training
done; ``sched_cos(start, end)`` etc. make one, :func:`combine_scheds` joins several.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from nets.callbacks.checkpoint import get_rng_state, set_rng_state
from nets.callbacks.core import Callback, CancelFitException, CancelValidException

__all__ = [
    "sched_lin", "sched_cos", "sched_exp", "sched_no", "combine_scheds", "set_hyper",
    "ParamScheduler", "LRFinder", "LRFindResult",
]


# ---------------------------------------------------------------------- schedules (pure functions)
def _sched(f):
    """Turn ``f(start, end, pos)`` into ``make(start, end) -> (pos -> value)``."""
    def make(start, end):
        return partial(f, start, end)
    make.__name__, make.__doc__ = f.__name__, f.__doc__
    return make


@_sched
def sched_lin(start: float, end: float, pos: float) -> float:
    """Linear from ``start`` (pos 0) to ``end`` (pos 1).

    Called as ``sched_lin(start, end)(pos)``.

    >>> sched_lin(0.0, 2.0)(0.25)
    0.5
    """
    return start + pos * (end - start)


@_sched
def sched_cos(start: float, end: float, pos: float) -> float:
    """Half cosine from ``start`` (pos 0) to ``end`` (pos 1).

    Called as ``sched_cos(start, end)(pos)``.

    >>> round(sched_cos(1.0, 0.0)(0.5), 6)
    0.5
    """
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


@_sched
def sched_exp(start: float, end: float, pos: float) -> float:
    """Exponential from ``start`` to ``end`` (both > 0).

    Called as ``sched_exp(start, end)(pos)``.

    >>> round(sched_exp(1e-4, 1e-2)(0.5), 8)
    0.001
    """
    return start * (end / start) ** pos


@_sched
def sched_no(start: float, end: float, pos: float) -> float:
    """Constant ``start``.

    Called as ``sched_no(start, end)(pos)``.

    >>> sched_no(3.0, 1.0)(0.9)
    3.0
    """
    return start


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Callable[[float], float]]):
    """Join schedules: ``scheds[i]`` runs over the fraction ``pcts[i]`` of training.

    Parameters
    ----------
    pcts : sequence of float, shape (n,)
        Non-negative fractions of training, summing to 1.
    scheds : sequence of callable, length n
        Schedules ``f(pos) -> value``; each sees its own ``pos`` rescaled to [0, 1].

    Returns
    -------
    callable
        ``f(pos) -> value`` over the whole of training.

    Raises
    ------
    ValueError
        If ``pcts`` and ``scheds`` differ in length, or ``pcts`` has a negative entry or does
        not sum to 1.

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
    """Set a hyper-parameter in every parameter group of ``opt``.

    Parameters
    ----------
    opt : torch.optim.Optimizer
        The optimiser to change in place.
    name : str
        ``"lr"``, ``"mom"`` (Adam's beta1 or SGD's momentum) or any param-group key.
    value : float
        The new value.

    Raises
    ------
    ValueError
        If a parameter group has no such key.

    Examples
    --------
    >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> set_hyper(opt, "mom", 0.8); opt.param_groups[0]["betas"]
    (0.8, 0.999)
    """
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

    Parameters
    ----------
    scheds : dict of str to callable
        Hyper-parameter name (as for :func:`set_hyper`) to schedule ``f(pos) -> value``.
    """

    order = 1
    run_valid = False

    def __init__(self, scheds: dict[str, Callable[[float], float]]):
        self.scheds = dict(scheds)

    def before_batch(self):
        pos = self.learn.pct_train
        for name, f in self.scheds.items():
            set_hyper(self.learn.opt, name, f(pos))


# ---------------------------------------------------------------------- LR finder
class LRFindResult(NamedTuple):
    """What :meth:`nets.train.Learner.lr_find` found: the suggestion and the curve behind it."""

    suggested: float
    steep: float
    min_div10: float
    lrs: list
    losses: list


class LRFinder(Callback):
    """Exponential LR sweep from ``start_lr`` to ``end_lr`` over ``num_it`` training batches.

    Stops early when the smoothed loss exceeds 4x its minimum (``stop_div``) or is not finite;
    skips validation; restores weights, optimiser and RNG states in ``after_fit``.
    Use through :meth:`nets.train.Learner.lr_find`.

    Parameters
    ----------
    start_lr, end_lr : float
        First and last learning rate of the sweep, ``0 < start_lr < end_lr``.
    num_it : int
        Training batches in the sweep, at least 5.
    stop_div : bool
        Stop when the smoothed loss diverges (above 4x its minimum, or not finite).
    beta : float
        Exponential smoothing factor of the loss.

    Raises
    ------
    ValueError
        If the learning rates are not ``0 < start_lr < end_lr`` or ``num_it < 5``.
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
        """Steepest descent of the smoothed loss (vs log LR) before its minimum, and min/10.

        Returns
        -------
        LRFindResult
            ``suggested`` is ``steep`` when it lies within a factor 100 below the minimum's
            LR, else ``min_div10``.

        Raises
        ------
        ValueError
            If the sweep recorded fewer than 3 finite losses.
        """
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
