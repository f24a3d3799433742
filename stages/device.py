"""The one place the compute device is chosen: CUDA when torch sees a GPU, else the CPU.

The screen's runner (:mod:`pipeline.run`) calls :func:`pick_device` once and passes the device
down to every stage; a stage called on its own with ``device=None`` asks here too.
"""
from __future__ import annotations

__all__ = ["pick_device"]


def pick_device(device=None):
    """The torch device for ``device``: ``None`` or ``"auto"`` means CUDA when available, else CPU.

    Parameters
    ----------
    device : None, str or torch.device
        ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        ``device`` is not a device name, or names CUDA where torch sees no GPU.

    Examples
    --------
    >>> str(pick_device("cpu"))
    'cpu'
    """
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be None, 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch sees no CUDA GPU; "
                         "use device=None (auto) or 'cpu'")
    return dev
