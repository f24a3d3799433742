"""Train the lesion net (:mod:`nets.lesionnet`) and measure it patient by patient.

``lungscreen train-lesions --out models/lesion_net.pt`` (= ``python -m pipeline.lesion_training``)
trains the shipped weights
on every background; ``--hold-out pat_2`` leaves one patient out (its scan is never seen)
and scores it.  ``--lopo`` does that for each real patient in turn (lung1, pat_1..4), then
trains the final model on all, and writes the per-patient numbers to ``OUT.json``; every
model is also scored on two synthetic chests no model trains on (all it adds there is false).

Data (all offline, made here)
-----------------------------
Backgrounds: the real chest CTs the project can have (``lung1``; pycerr ``pat_1..pat_4``,
whose own tumours are positives) and synthetic chests (:func:`synth.phantom.make_phantom`,
no lesion).  Each background gives ``variants`` copies: itself, and copies with one or two
masses inserted by :func:`synth.masses.insert_mass` (20-90 mm, on the chest wall, at the
hilum or anywhere on the lung border).  The net's inputs use the *classical* lung mask of
each copy (``segment_lungs(..., lesions=None)``), the targets are the lesion voxels (the
tumour contours, the inserted masses) at 2 mm.  Slices: every one holding a lesion, and a
random sample of the others that hold lung (the heart, the hilum and the diaphragm are the
negatives that matter).

Training: ``nets.train.Learner.fit_one_cycle`` (the project's one loop), AdamW, loss binary
cross-entropy plus soft Dice, random 128 x 128 mm crops (64 pixels) of the 2 mm slices, left-right
flips, HU offset (+-40) and scale (0.9-1.1) and noise for the HU channels.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from nets.lesionnet import IN_PLANE_FACTOR, LesionNet, _pool, load_lesion_net, slice_inputs
from nets.train import DataLoaders, Learner, set_seed

log = logging.getLogger(__name__)

__all__ = ["backgrounds", "examples_of", "all_examples", "train", "score_patient", "add_arguments",
           "run_from_args", "main"]

PHANTOM_SEEDS = (11, 12, 13)


def backgrounds(names=None) -> dict:
    """``{name: (ct_1mm Volume, lesion bool array)}`` of the training backgrounds."""
    from stages.contours import read_rtstruct
    from stages.ingest import read_scan
    from stages.resample import resample, resample_like
    from synth.data import lung1_paths, pycerr_patients
    from synth.phantom import make_phantom

    out = {}
    want = (lambda n: True) if names is None else (lambda n: n in names)
    if want("lung1"):
        image, label = lung1_paths()
        ct = read_scan(image)
        ct1 = resample(ct)
        out["lung1"] = (ct1, resample_like(read_scan(label), ct1, order=0).array > 0)
    for name, folder in pycerr_patients().items():
        if not want(name):
            continue
        ct = read_scan(folder)
        (rs,) = sorted(folder.glob("DCM_RS_*.dcm"))
        gtv = read_rtstruct(rs, ct, names=["GTV-1"])["GTV-1"]
        ct1 = resample(ct)
        out[name] = (ct1, resample_like(gtv, ct1, order=0).array > 0)
    for seed in PHANTOM_SEEDS:
        name = f"phantom-{seed}"
        if want(name):
            vol = make_phantom((150, 230, 230), (1.5, 1.3, 1.3), seed=seed, n_nodules=3)[0]
            ct1 = resample(vol)
            out[name] = (ct1, np.zeros(ct1.shape, bool))
    return out


def examples_of(ct, lesion, *, variants: int = 5, seed: int = 0, max_negative: int = 30):
    """Inputs ``(n, 4, H, W)`` float16 and targets ``(n, H, W)`` bool of one background."""
    from stages.lungmask import segment_lungs
    from synth.masses import SITES, insert_mass

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    base_lung = segment_lungs(ct, lesions=None)
    for v in range(variants + 1):
        vol, les = ct, lesion.copy()
        for _ in range(0 if v == 0 else int(rng.integers(1, 3))):
            vol, mass = insert_mass(vol, base_lung, diameter_mm=float(rng.uniform(20, 90)),
                                    site=SITES[int(rng.integers(len(SITES)))],
                                    seed=int(rng.integers(1 << 30)))
            les |= mass
        lung = segment_lungs(vol, lesions=None).array
        has_lung = np.flatnonzero(lung.any(axis=(1, 2)))
        has_les = np.flatnonzero(les.any(axis=(1, 2)))
        others = np.setdiff1d(has_lung, has_les)
        pick = rng.choice(others, min(max_negative, len(others)), replace=False) if len(others) else []
        zs = np.unique(np.concatenate([has_les[::2], np.asarray(pick, int)])).astype(int)
        if not len(zs):
            continue
        xs.append(slice_inputs(vol.array, lung, zs).astype(np.float16))
        y = _pool(les[zs].astype(np.float32), IN_PLANE_FACTOR) > 0.5
        y = np.pad(y, ((0, 0), (0, xs[-1].shape[2] - y.shape[1]), (0, xs[-1].shape[3] - y.shape[2])))
        ys.append(y)
    return xs, ys


class _Crops(torch.utils.data.Dataset):
    """Random ``size`` x ``size`` crops (zero-padded where a slice is smaller), with augmentation."""

    def __init__(self, xs, ys, size: int, augment: bool, seed: int):
        self.items = [(x[i], y[i]) for x, y in zip(xs, ys) for i in range(len(x))]
        self.size, self.augment = size, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        x = x.astype(np.float32)
        s = self.size
        ph, pw = max(0, s - x.shape[1]), max(0, s - x.shape[2])
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
            y = np.pad(y, ((0, ph), (0, pw)))
        rng = self.rng if self.augment else np.random.default_rng(i)
        # centre the crop on the lung or the lesion most of the time
        fg = np.argwhere((x[3] > 0) | y)
        if len(fg) and rng.random() < 0.9:
            cy, cx = fg[rng.integers(len(fg))]
        else:
            cy, cx = rng.integers(x.shape[1]), rng.integers(x.shape[2])
        y0 = int(np.clip(cy - s // 2, 0, x.shape[1] - s))
        x0 = int(np.clip(cx - s // 2, 0, x.shape[2] - s))
        x, y = x[:, y0:y0 + s, x0:x0 + s].copy(), y[y0:y0 + s, x0:x0 + s].copy()
        if self.augment:
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1].copy(), y[:, ::-1].copy()
            span = 1400.0
            x[:3] = x[:3] * rng.uniform(0.9, 1.1) + rng.uniform(-40, 40) / span
            x[:3] += rng.normal(0, rng.uniform(0, 15) / span, size=x[:3].shape).astype(np.float32)
            x[:3] = np.clip(x[:3], 0, 1)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


def _loss(pred, target):
    logits = pred[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def all_examples(names, *, variants: int = 5, seed: int = 0) -> dict:
    """``{name: (inputs, targets)}`` of :func:`examples_of` for each background in ``names``."""
    out = {}
    for i, (name, (ct, les)) in enumerate(sorted(backgrounds(names).items())):
        t0 = time.perf_counter()
        out[name] = examples_of(ct, les, variants=variants, seed=seed * 1000 + i)
        log.info("lesion training: %s gave %d slices in %.0f s", name,
                 sum(len(a) for a in out[name][0]), time.perf_counter() - t0)
    return out


def train(examples: dict, names, *, epochs: int = 6, lr: float = 3e-3, seed: int = 0,
          base: int = 12, crop_mm: int = 128, batch: int = 16, device="cpu", progress=None) -> LesionNet:
    """Train a :class:`LesionNet` on the examples of the backgrounds ``names``."""
    set_seed(seed)
    xs = [x for n in names for x in examples[n][0]]
    ys = [y for n in names for y in examples[n][1]]
    ds = _Crops(xs, ys, crop_mm // IN_PLANE_FACTOR, True, seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                     generator=torch.Generator().manual_seed(seed))
    model = LesionNet(base=base)
    learn = Learner(model, DataLoaders(dl), _loss, lr=lr, wd=1e-4, device=device, progress=progress)
    learn.fit_one_cycle(epochs, lr)
    return learn.model.cpu().eval()


def save(model: LesionNet, path, meta: dict) -> None:
    from pipeline.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"config": model.config, "model": model.state_dict(), "meta": meta}, tmp)


def score_patient(name: str, weights) -> dict:
    """Fraction of the patient's lesion inside the lung mask, classical and with the net, and
    what the net added beyond the lesion (mL)."""
    from stages.lungmask import segment_lungs

    if name.startswith("unseen-phantom-"):
        from stages.resample import resample
        from synth.phantom import make_phantom

        vol = make_phantom((150, 230, 230), (1.5, 1.3, 1.3), seed=int(name.rsplit("-", 1)[1]), n_nodules=3)[0]
        ct = resample(vol)
        les = np.zeros(ct.shape, bool)
    else:
        ct, les = backgrounds([name])[name]
    classical = segment_lungs(ct, lesions=None).array > 0
    with_net = segment_lungs(ct, lesions=str(weights)).array > 0
    return {"lesion_ml": round(float(les.sum()) / 1000, 1),
            "in_mask_classical": round(float(classical[les].mean()), 4) if les.any() else None,
            "in_mask_with_net": round(float(with_net[les].mean()), 4) if les.any() else None,
            "added_ml": round(float((with_net & ~classical).sum()) / 1000, 1),
            "added_outside_lesion_ml": round(float((with_net & ~classical & ~les).sum()) / 1000, 1)}


#: Synthetic chests no model trains on: what the net adds there is all false.
UNSEEN = ["unseen-phantom-1", "unseen-phantom-3"]
ALL = ("lung1", "pat_1", "pat_2", "pat_3", "pat_4") + tuple(f"phantom-{s}" for s in PHANTOM_SEEDS)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train-lesions`` options to ``parser``; returns it."""
    parser.add_argument("--out", default="models/lesion_net.pt", help="weights file (and OUT.json)")
    parser.add_argument("--hold-out", nargs="*", default=[], help="patients left out of training (scored)")
    parser.add_argument("--lopo", action="store_true",
                        help="leave each real patient out in turn (lung1, pat_1..4), then train on all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=int, default=6, help="copies with inserted masses per background")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Train (and with ``--lopo``/``--hold-out`` score) as ``args`` say; returns 0."""
    from pipeline.io import write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = {"command": getattr(args, "command_line", "lungscreen train-lesions"),
              "seed": args.seed, "epochs": args.epochs, "variants": args.variants, "folds": {}}
    folds = [[n] for n in ("lung1", "pat_1", "pat_2", "pat_3", "pat_4")] if args.lopo else []
    folds.append(list(args.hold_out))
    t0 = time.perf_counter()
    examples = all_examples(ALL, variants=args.variants, seed=args.seed)
    report["examples_seconds"] = round(time.perf_counter() - t0, 1)
    for held in folds:
        t0 = time.perf_counter()
        names = [n for n in ALL if n not in held]
        model = train(examples, names, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
        path = out if not held or not args.lopo else out.with_name(f"{out.stem}-without-{'-'.join(held)}.pt")
        save(model, path, {"trained_on": names, "held_out": held, "seed": args.seed,
                           "epochs": args.epochs, "seconds": round(time.perf_counter() - t0, 1)})
        key = "without " + ",".join(held) if held else "all"
        report["folds"][key] = {"trained_on": names, "seconds": round(time.perf_counter() - t0, 1),
                                "weights": str(path),
                                "held_out": {n: score_patient(n, path) for n in held + UNSEEN}}
        log.info("lesion training: %s", json.dumps(report["folds"][key]))
        write_json(report, out.with_suffix(".json"))
    return 0


def main(argv=None) -> int:
    """``python -m pipeline.lesion_training ...`` (= ``lungscreen train-lesions ...``)."""
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    args.command_line = "python -m pipeline.lesion_training " + " ".join(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
