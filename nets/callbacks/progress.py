"""Reporting a fit as it runs: :class:`ProgressCallback` (a tqdm bar per epoch and a line of
results after it) and :class:`MetricsLogger` (the recorder's rows to CSV or JSON each epoch).
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from nets.callbacks.core import Callback
from nets.distributed import is_main_process
from pipeline.io import atomic_path

__all__ = ["ProgressCallback", "MetricsLogger"]


class MetricsLogger(Callback):
    """Rewrite ``path`` (``.csv``, ``.json`` or ``.jsonl``) with the recorder's rows each epoch.

    Parameters
    ----------
    path : str or Path
        The log file, written through a temporary name and renamed; its suffix picks the format.
        Under ``torchrun`` only rank 0 writes it.

    Raises
    ------
    ValueError
        If ``path`` ends in none of ``.csv``, ``.json``, ``.jsonl``.
    """

    order = 60

    def __init__(self, path):
        self.path = Path(path)
        if self.path.suffix not in (".csv", ".json", ".jsonl"):
            raise ValueError(f"log path must end in .csv, .json or .jsonl, got {self.path.name!r}")

    def after_epoch(self):
        if not is_main_process():  # under torchrun every rank records the same global rows
            return
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
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(text.encode())


class ProgressCallback(Callback):
    """tqdm bar over each epoch's training batches and, after each epoch, its recorder row.

    One of the Learner's default callbacks (``Learner(progress=...)``).

    Parameters
    ----------
    disable : bool or None
        ``True`` hides the bar and the rows; ``None`` shows them only when stderr is a terminal.
        Under ``torchrun`` only rank 0 shows them.
    """

    order = 70

    def __init__(self, disable: bool | None = None):
        self.disable, self.bar = disable, None

    def before_train(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.learn.dls.train), leave=False,
                        disable=self.disable if is_main_process() else True, desc=f"epoch {self.learn.epoch + 1}/{self.learn.n_epoch}")

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
        if not is_main_process():
            return
        if (not self.disable) if self.disable is not None else _isatty():
            from tqdm.auto import tqdm

            row = self.learn.recorder.values[-1]
            tqdm.write("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in row.items()), file=sys.stderr)


def _isatty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
