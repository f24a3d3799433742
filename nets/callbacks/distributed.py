"""Data-parallel training through the one loop: :class:`DistributedTrainer`.

Modelled on fastai's ``DistributedTrainer`` (``callback/distributed.py``): the Learner and its
``fit`` are unchanged; under ``torchrun`` (see :mod:`nets.distributed`) this callback wraps the
model in ``torch.nn.parallel.DistributedDataParallel``, gives each rank its slice of every
global training batch, and makes the recorded training loss the global batch's.  Outside a
process group (one process) it does nothing, so it can always be added.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from nets.callbacks.core import Callback
from nets.distributed import ShardedBatchSampler, all_reduce_mean, rank, world_size

__all__ = ["DistributedTrainer"]


class _SlicedBatches:
    """This rank's slice (dim 0 of every tensor) of each batch of an iterable of batches."""

    def __init__(self, batches, rank_: int, world: int):
        self.batches, self.rank, self.world = batches, rank_, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            out = []
            for item in batch:
                if isinstance(item, torch.Tensor) and item.ndim:
                    if item.shape[0] % self.world:
                        raise ValueError(f"a global batch of {item.shape[0]} does not split over "
                                         f"{self.world} processes; make the batch size a multiple "
                                         "of the number of processes")
                    k = item.shape[0] // self.world
                    item = item[self.rank * k:(self.rank + 1) * k]
                out.append(item)
            yield type(batch)(out) if isinstance(batch, (tuple, list)) else out


def _shard(dl, rank_: int, world: int):
    """``dl`` giving this rank's slice of each global batch: a DataLoader is rebuilt around a
    :class:`nets.distributed.ShardedBatchSampler` (each rank loads only its slice); any other
    iterable of batches is sliced after loading."""
    if isinstance(dl, torch.utils.data.DataLoader):
        if isinstance(dl.batch_sampler, ShardedBatchSampler):
            return dl
        if dl.batch_sampler is None:
            raise ValueError("a DataLoader with batch_size=None cannot be sharded over processes; "
                             "give it a batch_size or a batch_sampler")
        return torch.utils.data.DataLoader(
            dl.dataset, batch_sampler=ShardedBatchSampler(dl.batch_sampler, rank=rank_, world_size=world),
            num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory,
            timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
            multiprocessing_context=dl.multiprocessing_context, generator=dl.generator,
            prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers)
    return _SlicedBatches(dl, rank_, world)


class DistributedTrainer(Callback):
    """Train with ``DistributedDataParallel`` when the process is one rank of a torchrun job.

    Start the job with ``torchrun --nproc_per_node N`` and call
    :func:`nets.distributed.init_distributed` first (it picks each rank's device: give it to
    the Learner).  Then, during ``fit``:

    - ``before_fit``: the training loader is replaced by one that yields this rank's slice of
      each global batch (:class:`nets.distributed.ShardedBatchSampler`: the global batches are
      the single-process run's, so the global batch size is the loader's batch size), and the
      model is wrapped in DDP, which broadcasts rank 0's weights and averages the gradients;
    - ``before_train`` / ``after_train``: the DDP wrapper is the Learner's model during the
      training batches only, so validation, checkpoints and metrics see the plain model (its
      ``state_dict`` keys unchanged); ranks other than 0 reseed their global RNGs from their
      state and rank, so their augmentations and dropout differ from rank 0's;
    - ``after_loss``: the training loss becomes the mean over the ranks (the global batch's
      loss: the slices are equal), so :class:`nets.train.Recorder`, the progress bar,
      :class:`nets.callbacks.TerminateOnNaN` and early stopping see the same value on every
      rank and take the same decisions; the local loss is still what is back-propagated;
    - ``after_fit``: the plain model and the original loaders are put back.

    Validation is not sharded: every rank runs the whole validation set (forward only) on the
    same weights, so the validation loss and metrics are the global ones without gathering.
    Only rank 0 writes files (:class:`nets.callbacks.Checkpoint`, ``MetricsLogger`` and the
    progress bar ask :func:`nets.distributed.is_main_process`).

    Parameters
    ----------
    sync_bn : bool
        On CUDA, convert BatchNorm layers to ``torch.nn.SyncBatchNorm`` so their batch
        statistics are the global batch's.  torch's SyncBatchNorm refuses CPU tensors, so on
        the CPU (gloo) each rank normalises its own slice.
    find_unused_parameters : bool
        Passed to DDP (for models whose forward skips parameters).

    Notes
    -----
    Per-rank randomness (augmentation, dropout) and, without ``sync_bn``, per-rank BatchNorm
    statistics make a DDP run differ from the single-process run with the same global batch;
    without those the loss curves agree to float rounding (a test holds them equal).
    """

    order = -20  # after_loss before TerminateOnNaN (-5); before TrainEvalCallback sets modes

    def __init__(self, *, sync_bn: bool = True, find_unused_parameters: bool = False):
        self.sync_bn, self.find_unused_parameters = bool(sync_bn), bool(find_unused_parameters)
        self.active, self.ddp, self._model, self._dls = False, None, None, None

    def before_fit(self):
        self.active = world_size() > 1
        if not self.active:
            return
        learn = self.learn
        self._model, self._dls = learn.model, learn.dls
        learn.dls = dataclasses.replace(learn.dls, train=_shard(learn.dls.train, rank(), world_size()))
        cuda = learn.device.type == "cuda"
        if cuda and self.sync_bn:
            learn.model = self._model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(learn.model)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            learn.model, device_ids=[learn.device.index] if cuda else None,
            find_unused_parameters=self.find_unused_parameters)

    def before_train(self):
        if not self.active:
            return
        self.learn.model = self.ddp
        r = rank()
        if r:
            seed = int(torch.empty((), dtype=torch.int64).random_()) + r
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)

    def after_loss(self):
        if self.active and self.learn.training:
            self.learn.loss = all_reduce_mean(self.learn.loss)

    def _unwrap(self):
        if self.active:
            self.learn.model = self._model

    after_train = after_cancel_train = _unwrap

    def after_fit(self):
        if not self.active:
            return
        self.learn.model, self.learn.dls = self._model, self._dls
        self.ddp = None
