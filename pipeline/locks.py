"""Locks that keep runs sharing an output folder apart.

Two runs (two ``make run``, two cluster jobs) may write into one ``OUT_DIR`` at once, over
the same scans or overlapping sets.  Each scan is screened under an exclusive lock on
``OUT_DIR/.locks/<source key>.lock`` (:func:`pipeline.run.process_scan`), its outputs are
written under a second one named after its scan id (two inputs holding one series), and the
run-level files under ``OUT_DIR/.locks/run.lock`` (:func:`pipeline.batch.write_run_files`).

The locks are ``flock(2)`` locks: the kernel drops them when their holder's file is closed or
its process dies, even by ``kill -9``, so a lock file left behind never blocks a later run.
The lock files themselves (empty, one per scan) stay: removing one while another run waits
on it would let a third run take a fresh lock beside it.  They may be deleted when no run
uses the folder.

``flock`` needs a file system that supports it: any local one; NFS with locking (NFSv4, or
v3 with ``lockd``; Linux emulates ``flock`` with whole-file POSIX locks there, which the
server shares between clients, so Dask workers on several machines exclude each other).  On
NFS mounted ``nolock`` the locks stay local to each machine: runs on one machine are kept
apart, runs on different machines are not (each file is still whole, written atomically,
but a scan may be screened twice and the last writer's outputs kept).  Where ``flock`` is
refused (ENOLCK, EOPNOTSUPP, ENOSYS: e.g. Lustre without ``-o flock``), one warning says
so and the run goes on without locks.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["LOCK_DIR", "Busy", "hold", "lock_path"]

#: Folder of ``OUT_DIR`` that holds the lock files.
LOCK_DIR = ".locks"

#: errno values of a file system that does not support ``flock``.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_warned_no_locks = False


class Busy(Exception):
    """Another process holds the lock (raised by :func:`hold` with ``wait=False``)."""

    def __init__(self, path):
        super().__init__(f"{path}: held by another process")
        self.path = str(path)


def lock_path(out_dir, name: str) -> Path:
    """``out_dir/.locks/<name>.lock``: the lock file called ``name`` of an output folder."""
    return Path(out_dir) / LOCK_DIR / f"{name}.lock"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:  # a read-only folder: an existing lock file can still be locked
        if exc.errno in (errno.EROFS, errno.EACCES) and path.exists():
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        raise


@contextlib.contextmanager
def hold(path, *, wait: bool = True, on_wait=None):
    """Hold an exclusive ``flock`` on the file ``path`` (made if missing) while inside.

    Parameters
    ----------
    path : str or Path
        The lock file (see :func:`lock_path`).
    wait : bool
        When another process holds it: wait until it lets go (True), or raise :class:`Busy`
        at once (False).
    on_wait : callable, optional
        Called once, with no argument, before waiting (to say why the run stands still).

    Raises
    ------
    Busy
        ``wait`` is False and another process holds the lock.
    OSError
        The lock file cannot be made (no space left, read-only folder without it).

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with hold(lock_path(out, "scan")):
    ...     try:  # a second open file of the lock, as another run's: refused while held
    ...         with hold(lock_path(out, "scan"), wait=False):
    ...             pass
    ...     except Busy:
    ...         print("busy")
    busy
    >>> with hold(lock_path(out, "scan"), wait=False):  # let go: free again
    ...     print("free")
    free
    """
    global _warned_no_locks
    path = Path(path)
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise Busy(path) from None
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            if not _warned_no_locks:
                _warned_no_locks = True
                log.warning("%s: the file system refuses file locks (%s); runs sharing this "
                            "output folder are not kept apart", path.parent.parent,
                            os.strerror(exc.errno).lower())
        yield path
    finally:
        os.close(fd)  # drops the lock
