"""Data-parallel training under ``torchrun``: the launcher adapter and the sharded batch sampler.

``torchrun --nproc_per_node N -m pipeline.training ...`` starts N copies of the same program;
each finds its place in the environment torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  :func:`init_distributed` reads it, joins
the process group (NCCL on CUDA, gloo on the CPU) and picks the rank's device
(``cuda:LOCAL_RANK``); it returns ``None`` outside torchrun, so the same code runs as one
process.  The training loop itself is unchanged: :class:`nets.callbacks.DistributedTrainer`
wraps the model in ``DistributedDataParallel``, shards the batches with
:class:`ShardedBatchSampler` and all-reduces the recorded losses.

The helpers :func:`rank`, :func:`world_size`, :func:`is_main_process` and :func:`barrier` work
with or without a process group (rank 0 of 1 without), so callbacks that write files ask
:func:`is_main_process` and need no other change.  This module imports nothing from ``nets``.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from stages.device import pick_device

log = logging.getLogger(__name__)

__all__ = ["DistContext", "init_distributed", "leave_distributed", "rank", "world_size",
           "is_main_process", "barrier", "broadcast_int", "all_reduce_mean", "on_main_process",
           "ShardedBatchSampler", "TIMEOUT_S"]

#: Seconds a collective (a barrier while rank 0 cuts the cube cache, say) waits before failing.
TIMEOUT_S = 3600


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a torchrun job.

    Attributes
    ----------
    rank, local_rank, world_size : int
        Global rank, rank on this machine, number of processes.
    device : torch.device
        ``cuda:<local_rank>`` with NCCL, else the CPU with gloo.
    backend : str
        ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an int; it is set by "
                         "torchrun (start the job with `torchrun --nproc_per_node N ...`)") from None


def init_distributed(device=None, *, timeout_s: float = TIMEOUT_S) -> DistContext | None:
    """Join the torchrun job this process belongs to; ``None`` when not started by torchrun.

    Parameters
    ----------
    device : str or torch.device, optional
        As for :func:`stages.device.pick_device` (``None``/``"auto"``: CUDA when torch sees a
        GPU).  On CUDA each rank takes ``cuda:LOCAL_RANK`` and the backend is NCCL; on the CPU
        the backend is gloo.
    timeout_s : float
        How long a collective waits for the other ranks, seconds.

    Returns
    -------
    DistContext or None
        ``None`` when ``WORLD_SIZE`` is unset or 1 (a plain single-process run).  Calling it
        again in the same process returns the same context.

    Raises
    ------
    ValueError
        If torchrun's variables are malformed, or a rank's ``cuda:LOCAL_RANK`` does not exist.
    RuntimeError
        If ``torch.distributed`` is not available in this torch build.
    """
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    n, r, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    dev = pick_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} GPU(s); "
                             "start at most one process per GPU (--nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
        atexit.register(_destroy)
    return DistContext(rank=r, local_rank=local, world_size=n, device=dev, backend=backend)


def leave_distributed() -> None:
    """Leave the torchrun job at the end of a run that went well on every rank.

    Every rank waits for the others (a barrier: no collective is still in flight anywhere),
    then leaves the process group and frees it, while the interpreter is whole.  Without
    this a rank could exit while a gloo worker thread still held the last reference to a
    tensor of its last collective: freeing it during interpreter shutdown aborts the process
    (``terminate called without an active exception``, exit -6): 3 of about 18 two-process
    jobs beside 3 busy loops on 2 CPU cores, 0 of 30 with it.  Nothing without a process
    group.

    Call it on every rank, after the last collective; not on an error path that only some
    ranks take (the others would never reach the barrier).  On any exit the process group
    is still left at interpreter exit (no barrier there).
    """
    if not _active():
        return
    dist.barrier()
    _destroy()


def _destroy() -> None:
    if _active():
        dist.destroy_process_group()
    gc.collect()  # the group's last Python references, while the interpreter is whole


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


_rank, _world_size = rank, world_size  # for the methods whose arguments shadow the names


def is_main_process() -> bool:
    """True on rank 0, the one process that writes files (and on a single-process run).

    Examples
    --------
    >>> is_main_process()
    True
    """
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if _active():
        dist.barrier()


def _collective_device() -> torch.device:
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (``value`` itself without a process group)."""
    if not _active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks, on every rank (a detached copy; ``t`` without a group)."""
    t = t.detach()
    if not _active() or world_size() == 1:
        return t
    out = t.clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / world_size()).to(t.dtype)


def on_main_process(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on rank 0 alone, its (picklable) result given to every rank.

    The other ranks wait meanwhile (e.g. while rank 0 cuts the cube cache).  When ``fn`` raises
    on rank 0, every rank raises: rank 0 its own exception, the others a ``RuntimeError``
    naming it, so no rank is left waiting.
    """
    if not _active():
        return fn(*args, **kwargs)
    box = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except BaseException as exc:
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(box, src=0, device=_collective_device())
            raise
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _random_samplers(batch_sampler) -> list:
    """The objects in ``batch_sampler`` that draw their seed from the global torch RNG at each
    ``iter``: those with a ``generator`` attribute that is ``None`` (PositiveFractionSampler,
    a BatchSampler's RandomSampler)."""
    found = []
    for obj in (batch_sampler, getattr(batch_sampler, "sampler", None)):
        if obj is not None and hasattr(obj, "generator") and obj.generator is None:
            found.append(obj)
    return found


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of every global batch of ``batch_sampler``.

    Every rank iterates the same global batches (a sampler that seeds itself from the global
    torch RNG at each epoch gets rank 0's seed, broadcast), and rank ``r`` of ``n`` keeps the
    ``r``-th of ``n`` equal contiguous slices of each.  So the global batch, and its make-up
    (e.g. :class:`nets.data.PositiveFractionSampler`'s fraction of positives), is exactly the
    single-process run's, and the seed draw consumes the global RNG as that run does.

    Parameters
    ----------
    batch_sampler : iterable of list of int
        Yields global batches of indices, each of a size divisible by ``world_size``.
    rank, world_size : int, optional
        Default: this process's, from the process group.

    Raises
    ------
    ValueError
        At construction, on a bad rank; while iterating, on a global batch whose size is not a
        multiple of ``world_size`` (the slices would differ in size and the averaged gradient
        would not be the global batch's).

    Examples
    --------
    >>> batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> list(ShardedBatchSampler(batches, rank=1, world_size=2))
    [[2, 3], [6, 7]]
    """

    def __init__(self, batch_sampler, *, rank: int | None = None, world_size: int | None = None):
        self.batch_sampler = batch_sampler
        self.world_size = int(_world_size() if world_size is None else world_size)
        self.rank = int(_rank() if rank is None else rank)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        seeded = []
        for obj in _random_samplers(self.batch_sampler):
            # the draw the sampler would make itself, then rank 0's value everywhere
            seed = broadcast_int(int(torch.empty((), dtype=torch.int64).random_()))
            obj.generator = torch.Generator().manual_seed(seed)
            seeded.append(obj)
        try:
            for batch in self.batch_sampler:
                batch = list(batch)
                if len(batch) % self.world_size:
                    raise ValueError(f"a global batch of {len(batch)} does not split over "
                                     f"{self.world_size} processes; make the batch size a "
                                     f"multiple of the number of processes")
                k = len(batch) // self.world_size
                yield batch[self.rank * k:(self.rank + 1) * k]
        finally:
            for obj in seeded:
                obj.generator = None
