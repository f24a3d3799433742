"""Throughput of the 3D CNN classifier: training and inference samples per second.

``python -m bench.train [--device cpu|cuda|all] [--out bench]`` writes (merges into)
``<out>/train.json``, one entry per device.  Training is timed through the real
:class:`nets.train.Learner` (one-cycle schedule, recorder, mixed precision on CUDA) on
synthetic 32 mm cubes already in memory, so the number is the model + loop cost, not disk.
Inference is ``model(x)`` in eval mode without gradients (autocast fp16 on CUDA), and TTA is
:func:`nets.cnn3d.predict_tta` with its 8 flips.  Needs only numpy and torch.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from nets.cnn3d import CUBE_SIZE_MM, CUBE_SPACING_MM, NoduleNet3D, predict_tta
from nets.callbacks import MixedPrecision
from nets.train import DataLoaders, Learner, set_seed

__all__ = ["bench_device", "main"]

#: (train batch, inference batch, timed train batches, timed inference batches) per device type.
SIZES = {"cpu": (16, 64, 4, 3), "cuda": (128, 512, 40, 30)}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="all", choices=["all", "cpu", "cuda"],
                   help="all: the CPU, and CUDA when torch sees a GPU")
    p.add_argument("--out", default="bench", help="folder for train.json (merged with what is there)")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    devices = ([args.device] if args.device != "all"
               else ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    path = Path(args.out) / "train.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("cnn3d", {})
    for dev in devices:
        res = bench_device(dev, amp=not args.no_amp)
        results["cnn3d"][dev] = res
        print(json.dumps(res), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
