"""The callback protocol: the closed list of events, the ``Cancel*`` exceptions and
:class:`Callback`.

This is the one module that both the loop (:mod:`nets.train`) and every callback module
import; it imports nothing from ``nets`` itself, so there is no import cycle.  The names are
re-exported by :mod:`nets.train`, where users import them.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

__all__ = [
    "EVENTS", "event", "Callback",
    "CancelFitException", "CancelEpochException", "CancelTrainException", "CancelValidException",
    "CancelBatchException", "CancelBackwardException", "CancelStepException",
]

#: Every event a Learner fires, in the order of one training batch's life.
EVENTS = (
    "before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
    "before_backward", "after_cancel_backward", "after_backward", "before_step",
    "after_cancel_step", "after_step", "after_cancel_batch", "after_batch", "after_cancel_train",
    "after_train", "before_validate", "after_cancel_validate", "after_validate",
    "after_cancel_epoch", "after_epoch", "after_cancel_fit", "after_fit",
)
#: Batch-level events: ``run_train`` / ``run_valid`` decide whether a callback sees them.
_INNER_LOOP = frozenset(e for e in EVENTS if e.endswith(("_batch", "_pred", "_loss", "_backward",
                                                           "_step")))
#: ``event.before_fit == "before_fit"`` etc.; use it to avoid typing event names as strings.
event = SimpleNamespace(**{e: e for e in EVENTS})


class CancelFitException(Exception):
    """Stop training now (early stopping, NaN loss, LR finder done); ``after_fit`` still runs."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch."""


class CancelTrainException(Exception):
    """Skip the rest of this epoch's training batches."""


class CancelValidException(Exception):
    """Skip this epoch's validation."""


class CancelBatchException(Exception):
    """Skip the rest of this batch (no backward/step)."""


class CancelBackwardException(Exception):
    """Skip the backward pass of this batch."""


class CancelStepException(Exception):
    """Skip the optimiser step of this batch (a callback stepped it itself)."""


def _snake(name: str) -> str:
    name = re.sub(r"Callback$", "", name) or name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class Callback:
    """Base class: a callback is a set of methods named after events.

    Attributes
    ----------
    order : int
        Callbacks run in increasing ``order`` for each event (ties: order added).
    run_train, run_valid : bool
        Whether the callback runs during training / validation batches.
    learn : nets.train.Learner
        Set when the callback is added; read and write the loop's state through it.

    Examples
    --------
    >>> class CountBatches(Callback):
    ...     def before_fit(self): self.n = 0
    ...     def after_batch(self): self.n += 1
    >>> CountBatches().name
    'count_batches'
    """

    order = 0
    run_train = True
    run_valid = True

    @property
    def name(self) -> str:
        """Attribute name on the Learner: snake case of the class name minus ``Callback``."""
        return _snake(type(self).__name__)

    def __call__(self, event_name: str) -> None:
        training = getattr(self.learn, "training", True)
        if (event_name not in _INNER_LOOP or (self.run_train and training)
                or (self.run_valid and not training)):
            method = getattr(self, event_name, None)
            if method is not None:
                method()

    def __repr__(self) -> str:
        return type(self).__name__
