"""DistributedDataParallel through the one Learner.fit: torchrun with 2 CPU processes (gloo).

Run as a script (``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE OUT``), this
file is the worker the tests launch: :func:`_fit_tiny` under torchrun, its recorded values
written to ``OUT/result-<rank>.json``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # as a torchrun script: import the tree this file belongs to

from nets.distributed import ShardedBatchSampler, init_distributed, rank, world_size  # noqa: E402

#: Loss agreement of the 2-process run with the single process (the gradients are averaged in
#: a different order: float32 rounding; 1.2e-7 at most measured over the 30 steps).
LOSS_ATOL = 1e-5


def _distributed_ok() -> str:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend"
    return ""


needs_gloo = pytest.mark.skipif(bool(_distributed_ok()), reason=_distributed_ok() or "ok")


def _torchrun(args, cwd, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the tiny fit
def _tiny_model():
    """A small 3-D CNN without BatchNorm or dropout: per-rank BN statistics (SyncBatchNorm
    refuses CPU tensors) and per-rank dropout masks would make the DDP run differ from the
    single process by design, not by error."""
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1), torch.nn.Flatten(0))


def _cubes(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 4 == 0).float()  # a quarter positive
    x = torch.rand(n, 1, 8, 8, 8, generator=g)
    x[y > 0, :, 2:6, 2:6, 2:6] += 0.5  # a bright blob: learnable
    return TensorDataset(x, y)


def _fit_tiny(out_dir, *, epochs: int = 5) -> dict:
    """One fit of the tiny CNN, single process or one rank of a torchrun job.

    Global batch 8 with 2 positives (PositiveFractionSampler, seeded from the global RNG at each
    epoch), 48 training cubes (6 batches an epoch), one-cycle, validation with ROC AUC, a
    checkpoint and a CSV log.  Rank r > 0 is given ``out_dir/rank<r>/`` for its files: it must
    write none there.
    """
    from nets.callbacks import Checkpoint, DistributedTrainer, MetricsLogger, roc_auc
    from nets.data import PositiveFractionSampler
    from nets.train import Callback, DataLoaders, Learner, set_seed

    class LocalBatches(Callback):
        def before_fit(self):
            self.sizes = []

        def after_batch(self):
            if self.learn.training:
                self.sizes.append(len(self.learn.yb[0]))

    ctx = init_distributed("cpu")
    torch.set_num_threads(1)
    # rank 1 starts from other weights and another RNG state on purpose: DDP must give it rank
    # 0's weights, and the sampler rank 0's seed each epoch
    set_seed(rank())
    train = _cubes(48, seed=1)
    dl = DataLoader(train, batch_sampler=PositiveFractionSampler(train.tensors[1].numpy(), 8, 0.25))
    dls = DataLoaders(dl, DataLoader(_cubes(20, seed=2), batch_size=8))
    out = Path(out_dir) / (f"rank{rank()}" if rank() else "")
    cbs = [DistributedTrainer(), Checkpoint(out / "checkpoint.pt"), MetricsLogger(out / "log.csv"),
           LocalBatches()]
    learn = Learner(_tiny_model(), dls, torch.nn.functional.binary_cross_entropy_with_logits,
                    cbs=cbs, metrics=[roc_auc], device=ctx.device if ctx else "cpu", progress=False)
    learn.fit_one_cycle(epochs, 1e-2)
    return {"rank": rank(), "world_size": world_size(), "losses": learn.recorder.losses,
            "values": [{k: v for k, v in row.items() if k != "time_s"} for row in learn.recorder.values],
            "weights": [float(p.detach().double().sum()) for p in learn.model.parameters()],
            "local_batch_sizes": learn.local_batches.sizes,
            "model_is_plain": type(learn.model).__name__ == "Sequential"}


# ----------------------------------------------------------------------------- tests
def test_sharded_batches_are_slices_of_the_single_process_batches():
    from nets.data import PositiveFractionSampler

    labels = np.r_[np.ones(6), np.zeros(30)]
    whole = PositiveFractionSampler(labels, 8, 0.25, generator=torch.Generator().manual_seed(3))
    shards = [ShardedBatchSampler(PositiveFractionSampler(labels, 8, 0.25,
                                                          generator=torch.Generator().manual_seed(3)),
                                  rank=r, world_size=2) for r in range(2)]
    glued = [a + b for a, b in zip(*shards)]
    assert glued == list(whole) and len(glued) == len(shards[0]) == len(whole)
    assert all(sum(labels[i] for i in b) == 2 for b in glued)  # the composition: 2 of 8 positive
    assert all(len(b) == 4 for b in shards[1])


def test_a_sampler_seeded_per_epoch_draws_from_the_global_rng_as_it_would_alone():
    from nets.data import PositiveFractionSampler

    labels = np.r_[np.ones(4), np.zeros(12)]
    torch.manual_seed(7)
    whole = list(PositiveFractionSampler(labels, 4, 0.25))
    after_whole = torch.rand(1)
    torch.manual_seed(7)
    inner = PositiveFractionSampler(labels, 4, 0.25)
    shard = list(ShardedBatchSampler(inner, rank=0, world_size=2))
    assert shard == [b[:2] for b in whole]
    assert torch.equal(torch.rand(1), after_whole) and inner.generator is None


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(ValueError, match="a global batch of 5 does not split over 2 processes"):
        list(ShardedBatchSampler([[0, 1, 2, 3, 4]], rank=0, world_size=2))
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank 2 of 2"):
        ShardedBatchSampler([[0, 1]], rank=2, world_size=2)


def test_a_list_of_batches_is_sliced_and_a_dataloader_is_rebuilt_on_a_sharded_sampler():
    from nets.callbacks.distributed import _shard

    x, y = torch.arange(8.).reshape(4, 2), torch.arange(4.)
    assert [[t.tolist() for t in b] for b in _shard([(x, y)], 1, 2)] == [[[[4., 5.], [6., 7.]], [2., 3.]]]
    dl = _shard(DataLoader(TensorDataset(y), batch_size=4), 0, 2)
    assert isinstance(dl.batch_sampler, ShardedBatchSampler) and [b[0].tolist() for b in dl] == [[0., 1.]]
    with pytest.raises(ValueError, match="a global batch of 3 does not split over 2 processes"):
        list(_shard([(y[:3],)], 0, 2))


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    from nets.distributed import leave_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") is None and rank() == 0 and world_size() == 1
    leave_distributed()  # nothing to leave: no barrier to wait at
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an int; it is set by torchrun"):
        init_distributed("cpu")


@needs_gloo
def test_two_processes_give_the_single_process_loss_curve(tmp_path, one_thread):
    """torchrun, 2 CPU processes (gloo), each with 4 of every global batch of 8, against one
    process on the whole batches: the tiny CNN of :func:`_fit_tiny` has no BatchNorm and no
    dropout (see :func:`_tiny_model`) and no augmentation, so the per-step training losses,
    the per-epoch validation loss and AUC, and the final weights must agree to float rounding
    (``LOSS_ATOL``) over 30 steps.  Rank 1 writes no file; rank 0 writes the log and checkpoint.
    The same job checks :func:`nets.distributed.on_main_process` (:func:`_on_main_checks`).
    """
    single = _fit_tiny(tmp_path / "single")
    proc = _torchrun([__file__, str(tmp_path / "ddp")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["model_is_plain"] for r in ranks)
    assert len(single["losses"]) == len(ranks[0]["losses"]) == 30
    for r in ranks:  # every rank records the global batch's loss
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=0, atol=LOSS_ATOL)
        for a, b in zip(r["values"], single["values"]):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=0, atol=LOSS_ATOL)
        np.testing.assert_allclose(r["weights"], single["weights"], rtol=1e-4, atol=LOSS_ATOL)
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["weights"] == ranks[1]["weights"]
    assert set(single["local_batch_sizes"]) == {8}  # each rank computed its half, not all of it
    assert set(ranks[0]["local_batch_sizes"]) == set(ranks[1]["local_batch_sizes"]) == {4}
    assert single["losses"][-1] < single["losses"][0]  # it learns: the comparison is not of noise
    assert (tmp_path / "ddp" / "log.csv").is_file() and (tmp_path / "ddp" / "checkpoint.pt").is_file()
    assert not (tmp_path / "ddp" / "rank1").exists()
    assert [r["result_of_rank_0"] for r in ranks] == [{"rank": 0}, {"rank": 0}]
    assert [r["failure"] for r in ranks] == ["ValueError: no scans",
                                             "RuntimeError: rank 0 failed: ValueError: no scans"]
    # each rank left the job before exiting (leave_distributed): no gloo thread outlives it
    assert [json.loads((tmp_path / "ddp" / f"left-{r}.json").read_text()) for r in range(2)] == \
        [{"initialized": False}] * 2


def _tiny_cube_cache(path, size=16):
    """A cube cache as ``pipeline.training.build_cube_cache`` writes it, made up: 2 positives and
    6 negatives to train on (2 batches of 4), 4 cubes to validate on."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        h5.attrs.update({"size_mm": float(size), "spacing_mm": 1.0})
        for split, labels in (("train", [1, 1, 0, 0, 0, 0, 0, 0]), ("val", [1, 0, 0, 0])):
            g = h5.create_group(split)
            cubes = rng.integers(-1000, -700, (len(labels), size, size, size)).astype(np.int16)
            cubes[np.array(labels) > 0, 5:11, 5:11, 5:11] = 40  # a solid blob
            g.create_dataset("cubes", data=cubes)
            g.create_dataset("labels", data=np.array(labels, np.uint8))
            g.create_dataset("seriesuid", data=np.array([f"{split}{i % 2}" for i in range(len(labels))], "S"))
            g.create_dataset("centre_xyz_mm", data=np.zeros((len(labels), 3)))
    return path


@needs_gloo
def test_torchrun_trains_the_classifier_through_the_cli(tmp_path):
    """``torchrun --nproc_per_node 2 -m pipeline.training``: the real NoduleNet3D (with its
    BatchNorm, per rank on the CPU) trains 2 steps a process on a made-up cube cache; rank 0
    writes the weights, card, log and checkpoint, which load and are finite."""
    from nets.cnn3d import load_classifier

    cache = _tiny_cube_cache(tmp_path / "cubes.h5")
    out = tmp_path / "out"
    proc = _torchrun(["-m", "pipeline.training", "--from-cache", str(cache), "--out", str(out),
                      "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu",
                      "--widths", "8,16", "--no-progress"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("nodule_cnn3d.pt", "nodule_cnn3d.md", "train_log.csv", "checkpoint.pt"):
        assert (out / name).is_file(), name
    log = (out / "train_log.csv").read_text().splitlines()
    assert len(log) == 2 and np.isfinite(float(log[1].split(",")[1]))
    model = load_classifier(out / "nodule_cnn3d.pt", device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not list(out.glob("**/*.part")) and not list(out.glob("**/.*.part"))


def _on_main_checks() -> dict:
    """What :func:`nets.distributed.on_main_process` gives each rank: rank 0's result, and a
    failure on rank 0 raised on every rank (none left waiting)."""
    from nets.distributed import on_main_process

    def boom():
        raise ValueError("no scans")

    try:
        on_main_process(boom)
        failure = None
    except (ValueError, RuntimeError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    return {"result_of_rank_0": on_main_process(lambda: {"rank": rank()}), "failure": failure}


if __name__ == "__main__":  # a torchrun worker of the tests above
    from nets.distributed import leave_distributed

    result = {**_fit_tiny(sys.argv[1]), **_on_main_checks()}
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    Path(sys.argv[1], f"result-{result['rank']}.json").write_text(json.dumps(result))
    leave_distributed()
    Path(sys.argv[1], f"left-{result['rank']}.json").write_text(
        json.dumps({"initialized": torch.distributed.is_initialized()}))
