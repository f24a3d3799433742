"""Throughput of the 3D CNN classifier: training and inference samples per second.

``python -m bench.train [--device cpu|cuda|all] [--out bench]`` writes (merges into)
``<out>/train.json``, one entry per device.  Training is timed through the real
:class:`nets.train.Learner` (one-cycle schedule, recorder, mixed precision on CUDA) on
synthetic 32 mm cubes already in memory, so the number is the model + loop cost, not disk.
Inference is ``model(x)`` in eval mode without gradients (autocast fp16 on CUDA), and TTA is
:func:`nets.cnn3d.predict_tta` with its 8 flips.  Needs only numpy and torch.

``ddp`` (keyed by :func:`bench.device_key`): training samples per second of the same
Learner with :class:`nets.callbacks.DistributedTrainer` in 1 and 2 processes
(``torchrun --nproc_per_node 2``; gloo on the CPU, NCCL on GPUs) at the same global batch, each
run in its own process.  On the CPU the cores are shared out: 1 process x ``T`` threads against
2 processes x ``T/2`` threads (``T`` = the cores torch sees), so the comparison is of the
parallelisation, not of more hardware, with 1 process x 1 thread as a reference (one core's
worth); on CUDA one process per GPU (2 processes need 2 GPUs).  The load average before each
run is recorded beside it; each configuration runs ``DDP_REPEATS`` times, interleaved, and the
best run is kept as ``best_samples_per_s`` under ``"<processes>x<threads>"``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nets.cnn3d import CUBE_SIZE_MM, CUBE_SPACING_MM, NoduleNet3D, predict_tta
from nets.callbacks import MixedPrecision
from nets.train import DataLoaders, Learner, set_seed

__all__ = ["bench_device", "bench_ddp", "main"]

#: (train batch, inference batch, timed train batches, timed inference batches) per device type.
SIZES = {"cpu": (16, 64, 4, 3), "cuda": (128, 512, 40, 30)}
#: (global train batch, timed train batches) of the 1- vs 2-process comparison per device type.
DDP_SIZES = {"cpu": (16, 4), "cuda": (128, 40)}
#: Runs of each process count, interleaved (1, 2, 1, 2 ...): the shared CPU's load varies.
DDP_REPEATS = {"cpu": 3, "cuda": 1}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_device(device: str, *, widths=(16, 32, 64, 128), amp: bool = True) -> dict:
    """Samples per second for training and inference of :class:`NoduleNet3D` on ``device``."""
    dev = torch.device(device)
    train_bs, infer_bs, n_train, n_infer = SIZES[dev.type]
    n = int(round(CUBE_SIZE_MM / CUBE_SPACING_MM))
    set_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(train_bs, 1, n, n, n, generator=gen).to(dev)
    y = (torch.rand(train_bs, generator=gen) < 0.25).float().to(dev)
    batches = [(x, y)] * n_train
    model = NoduleNet3D(widths)
    cbs = [MixedPrecision()] if amp else []
    learn = Learner(model, DataLoaders(batches[:3]), torch.nn.functional.binary_cross_entropy_with_logits,
                    lr=1e-3, cbs=cbs, device=dev, progress=False)
    learn.fit(1)  # warm-up: cuDNN algorithm choice, allocator
    learn.dls = DataLoaders(batches)
    _sync(dev)
    t0 = time.perf_counter()
    learn.fit_one_cycle(1, 1e-3)
    _sync(dev)
    train_s = time.perf_counter() - t0

    model = learn.model.eval()
    xi = torch.rand(infer_bs, 1, n, n, n, generator=gen).to(dev)
    use_amp = amp and dev.type == "cuda"

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            return model(xi)
    infer()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_infer):
        infer()
    _sync(dev)
    infer_s = time.perf_counter() - t0

    tta_cubes = xi[: max(infer_bs // 4, 8)]
    predict_tta(model, tta_cubes, n=8, batch_size=len(tta_cubes))
    _sync(dev)
    t0 = time.perf_counter()
    predict_tta(model, tta_cubes, n=8, batch_size=len(tta_cubes))
    _sync(dev)
    tta_s = time.perf_counter() - t0

    out = {
        "device": dev.type,
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "mixed_precision": use_amp,
        "input": [1, n, n, n],
        "widths": list(widths),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_batch": train_bs,
        "train_samples_per_s": round(n_train * train_bs / train_s, 1),
        "infer_batch": infer_bs,
        "infer_samples_per_s": round(n_infer * infer_bs / infer_s, 1),
        "tta8_samples_per_s": round(len(tta_cubes) / tta_s, 1),
        "torch": torch.__version__,
    }
    if dev.type == "cuda":
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def _ddp_worker(out_json: str, device: str, *, widths=(16, 32, 64, 128), sizes=None,
                amp: bool = True) -> None:
    """One process of :func:`bench_ddp` (alone, or a rank under torchrun): time
    ``Learner.fit`` over in-memory synthetic cubes; rank 0 writes the result to ``out_json``."""
    from torch.utils.data import DataLoader, TensorDataset

    from nets.callbacks import DistributedTrainer
    from nets.distributed import (barrier, init_distributed, is_main_process, leave_distributed,
                                  world_size)

    ctx = init_distributed(device)
    dev = ctx.device if ctx else torch.device(device)
    batch, steps = sizes or DDP_SIZES[dev.type]
    n = int(round(CUBE_SIZE_MM / CUBE_SPACING_MM))
    set_seed(0)
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(batch * steps, 1, n, n, n, generator=gen),
                       (torch.rand(batch * steps, generator=gen) < 0.25).float())
    cbs = [DistributedTrainer()] + ([MixedPrecision()] if amp else [])
    warm_up = DataLoader(torch.utils.data.Subset(ds, range(2 * batch)), batch_size=batch)
    learn = Learner(NoduleNet3D(widths), DataLoaders(warm_up),
                    torch.nn.functional.binary_cross_entropy_with_logits, lr=1e-3, cbs=cbs,
                    device=dev, progress=False)
    learn.fit(1)  # warm-up: DDP buckets, allocator, cuDNN
    learn.dls = DataLoaders(DataLoader(ds, batch_size=batch))
    barrier()
    _sync(dev)
    t0 = time.perf_counter()
    learn.fit(1)
    _sync(dev)
    barrier()
    seconds = time.perf_counter() - t0
    if is_main_process():
        Path(out_json).write_text(json.dumps({
            "processes": world_size(), "threads_per_process": torch.get_num_threads(),
            "backend": ctx.backend if ctx else None, "global_batch": batch, "steps": steps,
            "seconds": round(seconds, 3), "train_samples_per_s": round(batch * steps / seconds, 1)}))
    leave_distributed()


def bench_ddp(device: str, processes=(1, 2), *, widths=(16, 32, 64, 128), sizes=None,
              repeats: int | None = None) -> dict:
    """Training samples per second in 1 and 2 processes at the same global batch (see module
    docstring); every run in fresh processes, the 2-process ones under ``torchrun``.

    ``sizes``: (global batch, timed batches), default :data:`DDP_SIZES`; ``repeats``: runs of
    each process count, default :data:`DDP_REPEATS`.  Returns every run and, per process count,
    the best (``best_samples_per_s``: the run least slowed by other work on the machine).
    """
    dev = torch.device(device)
    cores = torch.get_num_threads()
    configs = [(n, max(1, cores // n) if dev.type == "cpu" else cores) for n in processes]
    if dev.type == "cpu" and cores > 1:
        configs.append((1, 1))  # the reference: one core's worth
    runs = []
    for n_proc, threads in configs * (repeats or DDP_REPEATS[dev.type]):
        if dev.type == "cuda" and n_proc > torch.cuda.device_count():
            runs.append({"processes": n_proc, "skipped": f"needs {n_proc} GPUs, torch sees "
                                                         f"{torch.cuda.device_count()}"})
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("WORLD_SIZE", None)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            worker = ["-m", "bench.train", "--ddp-worker", str(out), "--device", dev.type,
                      "--ddp-widths", ",".join(map(str, widths)),
                      "--ddp-sizes", ",".join(map(str, sizes or DDP_SIZES[dev.type]))]
            cmd = ([sys.executable, *worker] if n_proc == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(n_proc), *worker])
            load = [round(v, 2) for v in os.getloadavg()]
            subprocess.run(cmd, env=env, check=True)
            runs.append({**json.loads(out.read_text()), "loadavg_before": load})
    best = {}
    for run in runs:
        if "train_samples_per_s" in run:
            key = f"{run['processes']}x{run['threads_per_process']}"
            best[key] = max(best.get(key, 0.0), run["train_samples_per_s"])
    return {"device": dev.type,
            "device_name": (torch.cuda.get_device_name(0) if dev.type == "cuda"
                            else platform.processor() or platform.machine()),
            "threads_in_all": cores, "widths": list(widths), "best_samples_per_s": best,
            "runs": runs, "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"],
                   help="all: the CPU, and CUDA when torch sees a GPU")
    p.add_argument("--out", default="bench", help="folder for train.json (merged with what is there)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    p.add_argument("--only", default="cnn3d,ddp",
                   help="comma-separated parts: cnn3d (one process), ddp (1 vs 2 processes)")
    p.add_argument("--ddp-worker", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--ddp-widths", default="16,32,64,128", help=argparse.SUPPRESS)
    p.add_argument("--ddp-sizes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        _ddp_worker(args.ddp_worker, args.device, amp=not args.no_amp,
                    widths=tuple(int(w) for w in args.ddp_widths.split(",")),
                    sizes=tuple(int(v) for v in args.ddp_sizes.split(",")) if args.ddp_sizes else None)
        return 0
    parts = args.only.split(",")
    if set(parts) - {"cnn3d", "ddp"}:
        print(f"error: --only takes cnn3d and ddp, got {args.only!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    devices = ([args.device] if args.device != "all"
               else ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    path = Path(args.out) / "train.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("cnn3d", {})
    for dev in devices:
        if "cnn3d" in parts:
            res = bench_device(dev, amp=not args.no_amp)
            results["cnn3d"][dev] = res
            print(json.dumps(res), flush=True)
        if "ddp" in parts:
            from bench import device_key

            res = bench_ddp(dev)
            threads = torch.get_num_threads()
            key = device_key(threads) if dev == "cuda" else f"cpu-{threads}-threads"
            results.setdefault("ddp", {})[key] = res
            print(json.dumps(res), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
