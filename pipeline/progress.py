"""Where a run is: a progress bar on a terminal, log lines off one, or nothing.

One :class:`Reporter` serves a run (:func:`pipeline.batch.run_many`) and the scans in it
(:func:`pipeline.run.process_scan`).  Its mode (:data:`MODES`):

* ``"bar"``: tqdm bars on stderr: scans done with an ETA, the scan and stage now running,
  and inside a stage that counts its work (classify: cubes scored) a second bar with counts
  and an ETA;
* ``"log"``: lines on stderr, each flushed at once, prefixed with the time and the scan's
  name: one when a stage starts, one when it ends (with its seconds) or is loaded from the
  cache, one when a scan is finished (or set aside, or waited for, while another run on the
  output folder holds it), and inside a stage that counts its work a progress line at most
  every :data:`LOG_EVERY_S` seconds with the counts and an ETA::

      08:41:02 lung1: classify started
      08:41:12 lung1: classify 400/1000 cubes, ETA 15 s
      08:41:27 lung1: classify done in 25.1 s

* ``"quiet"``: nothing (the caller prints its summary and errors);
* ``"auto"`` (:data:`DEFAULT_MODE`): ``"bar"`` when stderr is a terminal, ``"log"``
  otherwise (CI, ``nohup``, a cluster job).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["Reporter", "resolve_mode", "scan_name", "MODES", "DEFAULT_MODE", "LOG_EVERY_S"]

#: What a run shows of its progress.
MODES = ("auto", "bar", "log", "quiet")
#: The ``progress`` of :func:`pipeline.batch.run_many` and what the CLI uses without flags.
DEFAULT_MODE = "auto"
#: Seconds between two progress lines of one stage in ``"log"`` mode.
LOG_EVERY_S = 10.0


def resolve_mode(mode: str = DEFAULT_MODE, stream=None) -> str:
    """``"bar"``, ``"log"`` or ``"quiet"`` for ``mode``; ``"auto"`` asks whether ``stream``
    (default: ``sys.stderr``) is a terminal.

    Raises
    ------
    ValueError
        ``mode`` is not one of :data:`MODES`.

    Examples
    --------
    >>> import io
    >>> resolve_mode("auto", io.StringIO()), resolve_mode("quiet")
    ('log', 'quiet')
    """
    if mode not in MODES:
        raise ValueError(f"progress must be one of {', '.join(MODES)}; got {mode!r}")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    return "bar" if getattr(stream, "isatty", lambda: False)() else "log"


def scan_name(source) -> str:
    """The name a scan goes by in progress lines: its file or folder name."""
    return Path(source).name or str(source)


def _format_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


class Reporter:
    """Shows where a run is, in one of :data:`MODES`.

    Parameters
    ----------
    mode : {"auto", "bar", "log", "quiet"}
        See the module docstring.
    stream : file, optional
        Where bars and lines go; default ``sys.stderr`` (looked up when writing, so a
        reporter can be sent to a worker process).
    clock : callable, optional
        Seconds on a monotonic clock (for the ETA and the spacing of progress lines);
        default ``time.monotonic``.
    every_s : float
        Seconds between two progress lines of one stage in ``"log"`` mode.

    Examples
    --------
    >>> import io
    >>> out, now = io.StringIO(), iter([0.0, 12.0, 13.0]).__next__
    >>> rep = Reporter("log", stream=out, clock=now)
    >>> rep.stage_started("lung1", "classify")
    >>> rep.stage_progress("lung1", "classify", 400, 1000, unit="cubes")
    >>> rep.stage_progress("lung1", "classify", 450, 1000, unit="cubes")  # under 10 s later
    >>> [line[9:] for line in out.getvalue().splitlines()]
    ['lung1: classify started', 'lung1: classify 400/1000 cubes, ETA 18 s']
    """

    def __init__(self, mode: str = DEFAULT_MODE, *, stream=None, clock=None,
                 every_s: float = LOG_EVERY_S):
        self.mode = resolve_mode(mode, stream)
        self.stream = stream
        self.clock = clock if clock is not None else time.monotonic
        self.every_s = float(every_s)
        self._bar = None  # the run's scans bar ("bar" mode)
        self._stage_bar = None  # the running stage's counts ("bar" mode)
        self._stage_start_s = 0.0
        self._last_line_s = 0.0

    # ------------------------------------------------------------------ output
    def _stream(self):
        return self.stream if self.stream is not None else sys.stderr

    def line(self, scan: str, text: str) -> None:
        """Write ``HH:MM:SS scan: text`` in ``"log"`` mode (nothing otherwise), flushed."""
        if self.mode != "log":
            return
        out = self._stream()
        out.write(f"{time.strftime('%H:%M:%S')} {scan}: {text}\n")  # one write: workers share stderr
        out.flush()

    # ------------------------------------------------------------------ the run
    def bar(self, total: int, desc: str, unit: str = "scan"):
        """A tqdm bar on the reporter's stream, disabled unless in ``"bar"`` mode."""
        from tqdm.auto import tqdm

        return tqdm(total=total, unit=unit, desc=desc, file=self._stream(), disable=self.mode != "bar")

    def scans_bar(self, total: int, desc: str = "scans"):
        """The run's bar: counts the scans (:meth:`scan_done`) and shows the stage running."""
        self._bar = self.bar(total, desc)
        return self._bar

    def scan_done(self, result, done: int, total: int) -> None:
        """One scan finished (a :class:`pipeline.run.ScanResult`): ``done`` of ``total``."""
        name = scan_name(result.source)
        if self._bar is not None and not self._bar.disable:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{result.status} {result.scan_id or name}"[:60])
        if result.status == "failed":
            what = "failed (see errors.csv)"
        elif result.status == "cached":
            what = "already done"
        else:
            seconds = sum(v for k, v in result.seconds.items() if k != "peak_rss_mb")
            what = f"{result.status} in {seconds:.1f} s, {result.n_candidates} candidates"
        if result.status != "failed" and getattr(result, "flags", None):
            what += " (flagged: " + "; ".join(f.split(":", 1)[0] for f in result.flags) + ")"
        self.line(name, f"{what} [{done}/{total} scans]")

    def scan_waiting(self, scan: str) -> None:
        """Another run on the output folder is screening ``scan``; this one waits for it."""
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(f"{scan}: waiting for another run"[:60])
        self.line(scan, "waiting for another run on this output folder to finish this scan")

    def scan_deferred(self, scan: str) -> None:
        """Another run is screening ``scan``: this one goes on and comes back to it last."""
        self.line(scan, "another run on this output folder is screening it; back to it "
                        "after the other scans")

    def close(self) -> None:
        """Close the bars."""
        for bar in (self._stage_bar, self._bar):
            if bar is not None:
                bar.close()
        self._stage_bar = self._bar = None

    # ------------------------------------------------------------------ stages of a scan
    def stage_started(self, scan: str, stage: str) -> None:
        """``stage`` of ``scan`` is about to be computed."""
        self._stage_start_s = self._last_line_s = self.clock()
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(f"{scan}: {stage}"[:60])
        self.line(scan, f"{stage} started")

    def stage_progress(self, scan: str, stage: str, done: int, total: int, *, unit: str = "") -> None:
        """``done`` of ``total`` units of ``stage``'s work are done."""
        if self.mode == "bar":
            if self._stage_bar is None:
                from tqdm.auto import tqdm

                self._stage_bar = tqdm(total=total, desc=stage, unit=f" {unit}" if unit else "it",
                                       leave=False, position=1, file=self._stream())
            self._stage_bar.total = total
            self._stage_bar.update(done - self._stage_bar.n)
            return
        now = self.clock()
        if self.mode != "log" or now - self._last_line_s < self.every_s or not 0 < done < total:
            return
        self._last_line_s = now
        eta_s = (now - self._stage_start_s) / done * (total - done)
        self.line(scan, f"{stage} {done}/{total}{' ' + unit if unit else ''}, ETA {_format_s(eta_s)}")

    def progress_callback(self, scan: str, stage: str, unit: str = ""):
        """``progress(done, total)`` for a stage function, reporting as :meth:`stage_progress`."""
        def progress(done: int, total: int) -> None:
            self.stage_progress(scan, stage, done, total, unit=unit)
        return progress

    def stage_done(self, scan: str, stage: str, seconds: float) -> None:
        """``stage`` of ``scan`` took ``seconds``."""
        if self._stage_bar is not None:
            self._stage_bar.close()
            self._stage_bar = None
        self.line(scan, f"{stage} done in {seconds:.1f} s")

    def stage_cached(self, scan: str, stage: str) -> None:
        """``stage``'s result of ``scan`` was loaded from the stage cache."""
        self.line(scan, f"{stage} loaded from cache")
