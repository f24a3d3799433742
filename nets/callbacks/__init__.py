"""Callbacks for :class:`nets.train.Learner`, one module per concern.

Each is a :class:`nets.train.Callback`: methods named after events, an ``order``, and state on
``self``.  Callbacks that must survive a restart implement ``state_dict()`` /
``load_state_dict()``; :class:`Checkpoint` saves those with the model, optimiser and RNGs.
Import them from here (``from nets.callbacks import Checkpoint``); the modules are:

- :mod:`nets.callbacks.core`: the event list, the ``Cancel*`` exceptions and the base
  :class:`Callback` (re-exported by :mod:`nets.train`); imports nothing from ``nets``.
- :mod:`nets.callbacks.schedule`: ``sched_*`` functions, :func:`combine_scheds`,
  :class:`ParamScheduler` (one-cycle), the LR range test :class:`LRFinder`.
- :mod:`nets.callbacks.tracker`: :class:`EarlyStopping`, :class:`TerminateOnNaN`.
- :mod:`nets.callbacks.metrics`: :func:`roc_auc`, :func:`accuracy`.
- :mod:`nets.callbacks.checkpoint`: :class:`Checkpoint` (save/resume), RNG state.
- :mod:`nets.callbacks.progress`: :class:`ProgressCallback`, :class:`MetricsLogger`.
- :mod:`nets.callbacks.mixed_precision`: :class:`MixedPrecision`, :class:`GradientClip`.
- :mod:`nets.callbacks.distributed`: :class:`DistributedTrainer` (DDP under ``torchrun``;
  the launcher side is :mod:`nets.distributed`).

None of them imports :mod:`nets.train`; the loop imports them.
"""
from nets.callbacks.checkpoint import Checkpoint, get_rng_state, set_rng_state
# not in __all__ (their home is nets.train), but importable from here as before the split
from nets.callbacks.core import (Callback, CancelFitException, CancelStepException,
                                 CancelValidException)
from nets.callbacks.distributed import DistributedTrainer
from nets.callbacks.metrics import accuracy, roc_auc
from nets.callbacks.mixed_precision import GradientClip, MixedPrecision
from nets.callbacks.progress import MetricsLogger, ProgressCallback
from nets.callbacks.schedule import (LRFinder, LRFindResult, ParamScheduler, combine_scheds,
                                     sched_cos, sched_exp, sched_lin, sched_no, set_hyper)
from nets.callbacks.tracker import EarlyStopping, TerminateOnNaN

__all__ = [
    "sched_lin", "sched_cos", "sched_exp", "sched_no", "combine_scheds", "set_hyper",
    "ParamScheduler", "LRFinder", "EarlyStopping", "Checkpoint", "MetricsLogger",
    "ProgressCallback", "MixedPrecision", "GradientClip", "TerminateOnNaN",
    "roc_auc", "accuracy", "get_rng_state", "set_rng_state", "DistributedTrainer",
]
