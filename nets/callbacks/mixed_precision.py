"""Callbacks between the backward pass and the optimiser step: :class:`MixedPrecision`
(autocast and loss scaling on CUDA) and :class:`GradientClip`.

They live together because their orders interlock: ``MixedPrecision`` (order 10) unscales the
gradients in ``after_backward``, ``GradientClip`` (order 5) clips them in ``before_step``, and
``MixedPrecision.before_step`` then steps the optimiser through the scaler.
"""
from __future__ import annotations

import torch

from nets.callbacks.core import Callback, CancelStepException

__all__ = ["MixedPrecision", "GradientClip"]


class MixedPrecision(Callback):
    """``torch.autocast`` + ``GradScaler`` on CUDA; does nothing on any other device.

    Gradients are unscaled right after backward, so :class:`GradientClip` (lower order) sees
    true gradients; the scaler then steps the optimiser and the Learner's own step is skipped.

    Parameters
    ----------
    dtype : torch.dtype
        ``torch.float16`` (with a gradient scaler) or ``torch.bfloat16`` (without).

    Raises
    ------
    ValueError
        If ``dtype`` is neither.
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
        """The gradient scaler's state (empty without a scaler), for a checkpoint."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (ignored without a scaler)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class GradientClip(Callback):
    """Clip the global gradient norm to ``max_norm`` before each optimiser step.

    Parameters
    ----------
    max_norm : float
        Largest L2 norm of all gradients together, > 0.

    Raises
    ------
    ValueError
        If ``max_norm`` is not positive.
    """

    order = 5

    def __init__(self, max_norm: float = 1.0):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def before_step(self):
        torch.nn.utils.clip_grad_norm_(self.learn.model.parameters(), self.max_norm)
