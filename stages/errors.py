"""The one error type for bad input: a file (or folder) and the reason, on one line."""
from __future__ import annotations

from pathlib import Path

__all__ = ["ScanError"]


class ScanError(ValueError):
    """A scan cannot be read or processed.

    ``str(err)`` is the one line a user sees: ``"<path>: <reason>"``.  Batch runs write
    ``err.path`` and ``err.reason`` to ``errors.csv`` and go on with the next scan.

    Examples
    --------
    >>> str(ScanError("/data/a.dcm", "zero-byte file"))
    '/data/a.dcm: zero-byte file'
    """

    def __init__(self, path, reason: str):
        self.path = str(path) if path is not None else ""
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.path, self.reason))
