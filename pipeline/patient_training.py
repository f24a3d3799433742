"""Train the patient model: screen a benchmark's patients once, cache what the models read.

Step 1, :func:`screen_patients`: every scan of a benchmark split goes through the screen
(:func:`pipeline.run.screen`, the default config: the shipped classifier), and one file per
scan is cached, ``CACHE/<split>/<seriesuid>.npz``: the candidates table (every column, as a
record array) and the HU cubes (int16, the classifier's 32 mm cube at 1 mm) of the
:data:`nets.rnn.MAX_CANDIDATES` most probable candidates.  The CNN embeddings
(:meth:`nets.cnn3d.NoduleNet3D.embed`) and the HU-profile types are computed from those cubes,
so they can be recomputed without screening again.  A scan already cached is skipped (the
step resumes after a kill).

Step 2, :func:`train_patient_model`: the three patient models, each trained once by the one
:class:`nets.train.Learner` (``fit_one_cycle``) with the settings of :data:`SETTINGS` and
seed 0, on the training patients (labels: ``patients.csv``,
:func:`synth.benchmark_data.write_patient_truth`):

* ``rnn``: :class:`nets.rnn.PatientRNN` over :func:`nets.rnn.rank_candidates` rows (the CNN
  embedding of each of the 32 most probable candidates and its probability), with
  :func:`nets.rnn.rnn_cbs`;
* ``noisy_or``: :class:`nets.patient.NoisyOR`, the leaky noisy-OR of the top 5 findings;
* ``size``: :class:`nets.patient.SizeRule`, the largest finding's diameter.

Then the validation patients are scored (:func:`pipeline.evaluate.patient_scores`) and
:data:`DECISION_RULE` picks the model `make run` ships.  The test patients are scored
only by ``--score-test``, once, after that choice.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["screen_patients", "load_screened", "load_split", "fit_patient_model", "SETTINGS",
           "DECISION_RULE", "KINDS"]

KINDS = ("rnn", "noisy_or", "size")
#: Training settings of each model, fixed before any validation score was computed.
SETTINGS = {
    "rnn": {"epochs": 40, "lr": 3e-3, "wd": 1e-2, "batch_size": 16, "hidden": 16, "dropout": 0.3},
    "noisy_or": {"epochs": 60, "lr": 5e-2, "wd": 0.0, "batch_size": 16},
    "size": {"epochs": 60, "lr": 5e-2, "wd": 0.0, "batch_size": 16},
}
#: Written before the validation patients were scored.
DECISION_RULE = ("Each model is trained once (SETTINGS, seed 0) on the training patients. On "
                 "the validation patients the RNN becomes the default if and only if its log "
                 "loss is lower than the noisy-OR's; otherwise the default is the baseline "
                 "(noisy-OR or size-only) with the lower validation log loss (a tie: the "
                 "noisy-OR). No setting is changed after the validation scores are seen; the "
                 "test patients are scored once, after the choice.")


def _split_scans(split_dir: Path) -> list[tuple[str, Path]]:
    uids = pd.read_csv(split_dir / "seriesuids.csv", header=None, dtype=str)[0].tolist()
    return [(uid, split_dir / f"{uid}.mhd") for uid in uids]


def screen_patients(split_dir, cache_dir, *, device="cpu", top: int | None = None,
                    reverse: bool = False, tta: int | None = None, start: int | None = None) -> list[Path]:
    """Screen every scan of ``split_dir`` (``seriesuids.csv`` + ``<uid>.mhd``) and cache it.

    Parameters
    ----------
    split_dir : str or Path
        A benchmark split folder (``data/bench96/train``).
    cache_dir : str or Path
        Where ``<uid>.npz`` go (made if missing); a scan whose file exists is skipped.
    device : str
        For the screen's stages.
    top : int, optional
        Cubes kept per scan, the most probable candidates; default
        :data:`nets.rnn.MAX_CANDIDATES`.
    reverse : bool
        Screen the scans last first (a second process can share the work: atomic writes, a
        scan cached by the other is skipped).
    tta : int, optional
        Override the classify stage's test-time augmentation (``classify: tta``; 1: none, a
        third of the CNN work); ``None``: the screen's default.  Recorded in each file
        (``tta``).
    start : int, optional
        Begin at this position of ``seriesuids.csv`` and wrap around (processes sharing a
        split start at different places; with ``reverse``, go down from it); default the
        first scan (the last with ``reverse``).

    Returns
    -------
    list of Path
        The cache file of every scan, in ``seriesuids.csv`` order.
    """
    from nets.rnn import MAX_CANDIDATES
    from pipeline.config import load_config
    from pipeline.io import atomic_path
    from pipeline.run import StageRunner, screen
    from stages.classify import _load_weights
    from stages.patches import extract_patches

    top = MAX_CANDIDATES if top is None else int(top)
    split_dir, cache_dir = Path(split_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(overrides={"classify": {"tta": int(tta)}} if tta is not None else None)
    tta_used = int(config.get("classify", {}).get("tta", 8))
    # the cubes the patient model reads are cut as the screen's embed stage cuts them
    classifier_pre = _load_weights((config.get("embed") or {}).get("weights"), "cpu").preprocessing
    scans = _split_scans(split_dir)
    files = [cache_dir / f"{uid}.npz" for uid, _ in scans]
    start = (len(scans) - 1 if reverse else 0) if start is None else int(start)
    k = start % max(len(scans), 1)
    order = scans[k:] + scans[:k] if not reverse else (scans[:k + 1][::-1] + scans[k + 1:][::-1])
    for uid, mhd in order:
        target = cache_dir / f"{uid}.npz"
        if target.is_file():
            continue
        t0 = time.perf_counter()
        runner = StageRunner(config, device=device)  # times each stage (runner.seconds)
        values = screen(mhd, config, stages=runner)
        cands = values["candidates"].reset_index(drop=True)
        best = cands.head(top)
        cubes = extract_patches(values["ct_1mm"], centres_xyz_mm=best[["coordX", "coordY", "coordZ"]].to_numpy(float),
                                size_mm=classifier_pre["size_mm"], spacing_mm=classifier_pre["spacing_mm"])
        cubes = np.clip(np.rint(cubes), -32768, 32767).astype(np.int16)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, candidates=_records(cands), cubes=cubes, tta=np.int64(tta_used))
        log.warning("%s %s: %d candidates, %.1f s %s", split_dir.name, uid, len(cands),
                    time.perf_counter() - t0, runner.seconds)
    return files


def _records(df: pd.DataFrame) -> np.ndarray:
    """A record array without object fields (text as fixed-width unicode): no pickle."""
    fields = []
    for c in df.columns:
        col = df[c]
        if col.dtype.kind in "biuf":
            fields.append((str(c), col.to_numpy()))
        else:
            text = col.astype(str).to_numpy(dtype=str)
            fields.append((str(c), text))
    return np.rec.fromarrays([a for _, a in fields], names=[n for n, _ in fields])


def load_screened(path) -> tuple[pd.DataFrame, np.ndarray]:
    """``(candidates, cubes_hu)`` of one cache file written by :func:`screen_patients`."""
    with np.load(path, allow_pickle=False) as z:
        cands = pd.DataFrame.from_records(z["candidates"])
        cubes = z["cubes"]
    for col in cands.columns:  # numpy unicode -> str
        if cands[col].dtype.kind == "U":
            cands[col] = cands[col].astype(str)
    return cands, cubes


def _embeddings(cubes: np.ndarray, classifier) -> np.ndarray:
    """The embeddings of cached cubes, by the screen's own forward pass."""
    from stages.classify import embed_cubes

    return embed_cubes(classifier, cubes)


def load_split(cache_dir, truth_csv, *, classifier=None, skip_missing: bool = False) -> dict:
    """The patients of one split as padded arrays.

    Parameters
    ----------
    cache_dir : path
        :func:`screen_patients`' files of the split.
    truth_csv : path
        ``patients.csv`` (``id, cancer``); every id needs a cache file.
    classifier : NoduleNet3D, optional
        For the embeddings (default: the shipped classifier, on the CPU).
    skip_missing : bool
        Leave out the patients not screened yet (else a missing file is an error).

    Returns
    -------
    dict
        ``ids`` (list), ``y`` (N,), ``lengths`` (N,), ``findings`` (N, T, 2: probability,
        diameter_mm), ``sequences`` (N, T, D + 1: embedding, probability), ``tta`` (N,).
    """
    from nets.cnn3d import load_classifier
    from nets.rnn import MAX_CANDIDATES, rank_candidates
    from pipeline.patients import findings_tensor
    from stages.classify import DEFAULT_WEIGHTS

    classifier = classifier if classifier is not None else load_classifier(DEFAULT_WEIGHTS, device="cpu")
    truth = pd.read_csv(truth_csv, dtype={"id": str})
    if skip_missing:
        truth = truth[[(Path(cache_dir) / f"{pid}.npz").is_file() for pid in truth["id"]]]
    ids, y, finds, seqs, ttas = [], [], [], [], []
    for pid, cancer in zip(truth["id"], truth["cancer"]):
        cands, cubes = load_screened(Path(cache_dir) / f"{pid}.npz")
        with np.load(Path(cache_dir) / f"{pid}.npz") as z:
            ttas.append(int(z["tta"]) if "tta" in z.files else 8)
        f = findings_tensor(cands, top=MAX_CANDIDATES)
        emb = _embeddings(cubes, classifier)
        seqs.append(rank_candidates(emb, cands["probability"].to_numpy(float)[:len(emb)]))
        finds.append(f)
        ids.append(pid)
        y.append(float(cancer))
    T = max(1, max(len(f) for f in finds))
    D = seqs[0].shape[1] if seqs else classifier.embed_dim + 1
    F = np.zeros((len(ids), T, 2), np.float32)
    S = np.zeros((len(ids), T, D), np.float32)
    lengths = np.array([len(f) for f in finds], np.int64)
    for i, (f, q) in enumerate(zip(finds, seqs)):
        F[i, :len(f)], S[i, :len(q)] = f, q
    return {"ids": ids, "y": np.array(y, np.float32), "lengths": lengths, "findings": F,
            "sequences": S, "tta": np.array(ttas)}


def _inputs(kind: str, data: dict):
    import torch

    x = data["sequences"] if kind == "rnn" else data["findings"]
    return (torch.from_numpy(x), torch.from_numpy(np.maximum(data["lengths"], 1)),
            torch.from_numpy(data["y"]))


def _make(kind: str, in_features: int, s: dict):
    from nets.patient import NoisyOR, SizeRule
    from nets.rnn import PatientRNN
    from pipeline.patients import FINDING_PROBABILITY

    if kind == "rnn":
        return PatientRNN(in_features, hidden=s["hidden"], dropout=s["dropout"])
    if kind == "noisy_or":
        return NoisyOR()
    if kind == "size":
        return SizeRule(FINDING_PROBABILITY)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def fit_patient_model(kind: str, train: dict, *, seed: int = 0, settings: dict | None = None):
    """Train one patient model with the shared :class:`nets.train.Learner`.

    Parameters
    ----------
    kind : {"rnn", "noisy_or", "size"}
    train : dict
        :func:`load_split`'s arrays of the training patients.
    seed : int
    settings : dict, optional
        ``epochs, lr, wd, batch_size`` (and ``hidden, dropout`` for the RNN); default
        :data:`SETTINGS` of ``kind``.

    Returns
    -------
    (model, learner)
        The model in eval mode on the CPU; the Learner's recorder holds the losses.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from nets.patient import patient_loss
    from nets.rnn import rnn_cbs
    from nets.train import DataLoaders, Learner, set_seed

    s = {**SETTINGS[kind], **(settings or {})}
    set_seed(seed)
    x, lengths, y = _inputs(kind, train)
    model = _make(kind, x.shape[-1], s)
    dl = DataLoader(TensorDataset(x, lengths, y), batch_size=int(s["batch_size"]), shuffle=True,
                    generator=torch.Generator().manual_seed(seed))
    learn = Learner(model, DataLoaders(dl), patient_loss, lr=float(s["lr"]), wd=float(s["wd"]),
                    cbs=rnn_cbs() if kind == "rnn" else None, device="cpu", n_inp=2, progress=False)
    learn.fit_one_cycle(int(s["epochs"]), float(s["lr"]))
    return model.eval(), learn


def predict(model, kind: str, data: dict) -> np.ndarray:
    """Cancer probability of each patient of ``data`` (:func:`load_split`)."""
    import torch

    x, lengths, _ = _inputs(kind, data)
    with torch.no_grad():
        out = model(x, lengths)
    logits = out[0] if isinstance(out, tuple) else out
    return torch.sigmoid(logits).numpy().astype(float)


def _score(kind_models: dict, data: dict, *, seed: int = 0) -> dict:
    from pipeline.evaluate import patient_scores

    truth = pd.DataFrame({"id": data["ids"], "cancer": data["y"].astype(int)})
    return {kind: patient_scores(truth, pd.DataFrame({"id": data["ids"], "cancer": predict(m, kind, data)}),
                                 seed=seed)
            for kind, m in kind_models.items()}


def choose(val: dict) -> str:
    """:data:`DECISION_RULE` on the validation scores ``{kind: patient_scores(...)}``."""
    if val["rnn"]["log_loss"] < val["noisy_or"]["log_loss"]:
        return "rnn"
    return "size" if val["size"]["log_loss"] < val["noisy_or"]["log_loss"] else "noisy_or"


def _fmt(r: dict) -> str:
    return (f"{r['log_loss']:.3f} ({r['log_loss_ci95'][0]:.3f}-{r['log_loss_ci95'][1]:.3f}) | "
            f"{r['auc']:.3f} ({r['auc_ci95'][0]:.3f}-{r['auc_ci95'][1]:.3f})")


def train_patient_model(cache_dir, truth_dir, models_dir, out, *, seed: int = 0) -> dict:
    """Train the three models on ``train``, score ``val``, ship the one :func:`choose` picks.

    Writes ``models_dir/<kind>.pt`` (all three), ``models_dir/val.json`` and ``out`` (the
    chosen model, e.g. ``models/patient_model.pt``).  Returns ``{"chosen", "val", ...}``.
    """
    from nets.patient import save_patient_model
    from pipeline.io import write_json

    cache_dir, truth_dir, models_dir = Path(cache_dir), Path(truth_dir), Path(models_dir)
    train = load_split(cache_dir / "train", truth_dir / "train" / "patients.csv", skip_missing=True)
    val = load_split(cache_dir / "val", truth_dir / "val" / "patients.csv")
    models, curves = {}, {}
    for kind in KINDS:
        t0 = time.perf_counter()
        models[kind], learn = fit_patient_model(kind, train, seed=seed)
        curves[kind] = {"train_loss": [round(v["train_loss"], 4) for v in learn.recorder.values],
                        "seconds": round(time.perf_counter() - t0, 1)}
    prevalence = float(train["y"].mean())
    n_listed = len(pd.read_csv(truth_dir / "train" / "patients.csv"))
    info = {"seed": seed, "train_patients": len(train["ids"]), "train_listed": n_listed, "train_cancer": int(train["y"].sum()),
            "train_prevalence": prevalence, "cache": str(cache_dir), "truth": str(truth_dir)}
    for kind, m in models.items():
        save_patient_model(m, models_dir / f"{kind}.pt", info={**info, "kind": kind})
    val_scores = _score(models, val, seed=seed)
    chosen = choose(val_scores)
    save_patient_model(models[chosen], out, info={**info, "kind": chosen,
                                                  "val_log_loss": val_scores[chosen]["log_loss"]})
    result = {"chosen": chosen, "rule": DECISION_RULE, "settings": SETTINGS, "info": info,
              "train_tta": sorted(set(train["tta"].tolist())), "val_tta": sorted(set(val["tta"].tolist())),
              "val": val_scores, "curves": curves}
    write_json(result, models_dir / "val.json")
    return result


def score_test(cache_dir, truth_dir, models_dir, *, seed: int = 0) -> dict:
    """Score the test patients with the three saved models, once (``models_dir/test.json``;
    refuses to run again when that file exists)."""
    from nets.patient import load_patient_model
    from pipeline.io import write_json

    models_dir = Path(models_dir)
    target = models_dir / "test.json"
    if target.exists():
        raise FileExistsError(f"{target} exists: the test patients were already scored")
    test = load_split(Path(cache_dir) / "test", Path(truth_dir) / "test" / "patients.csv")
    models = {kind: load_patient_model(models_dir / f"{kind}.pt") for kind in KINDS}
    scores = _score(models, test, seed=seed)
    write_json({"test": scores, "test_tta": sorted(set(test["tta"].tolist()))}, target)
    return scores


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``lungscreen train-patients`` (``python -m pipeline.patient_training``)."""
    parser.add_argument("--cache", required=True, help="screen cache folder (one subfolder per split)")
    parser.add_argument("--screen", nargs="+", metavar="SPLIT_DIR", help="benchmark split folders to screen")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", type=int, default=None, help="classify: tta override (default: the screen's)")
    parser.add_argument("--reverse", action="store_true", help="screen each split's scans last first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--start", type=int, default=None, help="begin at this scan of the split (wraps around)")
    parser.add_argument("--truth", default=None, help="folder with <split>/patients.csv (train, val, test)")
    parser.add_argument("--models", default=None, help="folder for the three models and their scores")
    parser.add_argument("--train", action="store_true", help="train the three models, choose on val")
    parser.add_argument("--out", default="models/patient_model.pt", help="the chosen model's file")
    parser.add_argument("--score-test", action="store_true", help="score the test patients (once)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Screen, train and/or score as ``args`` say; returns the exit status."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for split in args.screen or []:
        split = Path(split)
        screen_patients(split, Path(args.cache) / split.name, device=args.device, reverse=args.reverse,
                        tta=args.tta, start=args.start)
    if (args.train or args.score_test) and not (args.truth and args.models):
        print("error: --train and --score-test need --truth and --models", file=sys.stderr)
        return 2
    if args.train:
        res = train_patient_model(args.cache, args.truth, args.models, args.out, seed=args.seed)
        print("validation (log loss (95% CI) | ROC AUC (95% CI)):")
        for kind in KINDS:
            print(f"  {kind}: {_fmt(res['val'][kind])}")
        print(f"chosen: {res['chosen']} -> {args.out}")
    if args.score_test:
        for kind, r in score_test(args.cache, args.truth, args.models, seed=args.seed).items():
            print(f"test {kind}: {_fmt(r)}")
    return 0


def main(argv=None) -> int:
    """``python -m pipeline.patient_training --cache C [--screen SPLIT ...] [--train] [--score-test]``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = add_arguments(argparse.ArgumentParser(prog="python -m pipeline.patient_training",
                                                   description="train the patient model"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
