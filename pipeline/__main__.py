"""Command line: ``lungscreen COMMAND ...`` (= ``python -m pipeline COMMAND ...``).

========================  ===================================================================
``run``                   screen one scan or a tree of scans (this module)
``evaluate``              LUNA16 FROC / CPM of a run's marks (:mod:`pipeline.evaluate`)
``train``                 train the 3D CNN classifier (:mod:`pipeline.training`,
                          settings in ``configs/train.yaml``)
``train-lesions``         train the lung mask's lesion net (:mod:`pipeline.lesion_training`)
``benchmark-data``        build the LIDC-shape benchmark (:mod:`synth.benchmark_data`)
``luna16-tree``           write a benchmark in LUNA16's layout (:mod:`synth.luna16_tree`)
``bench``                 run the benchmarks (:mod:`bench.__main__`)
========================  ===================================================================

Every command's module gives the same protocol: ``add_arguments(parser)`` adds its options
to an :class:`argparse.ArgumentParser`, and ``run_from_args(args) -> int`` runs it and
returns the exit status (0 ok, 1 some scans failed, 2 bad usage or input).  The parsed
``args`` also carry ``command_line``, the command as typed (a training run's model card
records it).  Only the chosen command's module is imported, and an ImportError in it is
raised, never hidden.  ``lungscreen --version`` prints the installed version.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import logging
import re
import shlex
import signal
import sys
from pathlib import Path

__all__ = ["main", "version", "add_arguments", "run_from_args", "COMMANDS"]

#: ``name: (module, help line, log level without -v)``; module None is this one.  Training
#: and the benchmark builder report their long runs in INFO lines, as they always have.
COMMANDS = {
    "run": (None, "screen one scan or a tree of scans", logging.WARNING),
    "evaluate": ("pipeline.evaluate", "LUNA16 FROC / CPM of a run's candidates.csv, or of a "
                 "cross-validation's folds pooled (--folds)", logging.WARNING),
    "train": ("pipeline.training", "train the 3D CNN classifier (settings: configs/train.yaml)",
              logging.INFO),
    "train-lesions": ("pipeline.lesion_training", "train the lung mask's lesion net (leave-one-"
                      "patient-out with --lopo)", logging.INFO),
    "train-patients": ("pipeline.patient_training", "screen a benchmark's patients, train the "
                       "patient models (RNN, noisy-OR, size), choose on validation", logging.WARNING),
    "benchmark-data": ("synth.benchmark_data", "build the LIDC-shape benchmark (real nodule "
                       "outlines in CT backgrounds)", logging.INFO),
    "luna16-tree": ("synth.luna16_tree", "write a benchmark in LUNA16's layout (subset0..9, "
                    "annotations, candidates_V2, seriesuids)", logging.WARNING),
    "bench": ("bench.__main__", "run the benchmarks (JSON under bench/)", logging.WARNING),
}


def version() -> str:
    """lungscreen's version: the installed package's, else ``pyproject.toml``'s.

    Returns
    -------
    str
        e.g. ``"0.1.0"``; ``"unknown"`` when neither is found.
    """
    try:
        return importlib.metadata.version("lungscreen")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = (re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
                 if pyproject.is_file() else None)
        return found.group(1) if found else "unknown"


# ----------------------------------------------------------------------------- run
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``run`` options to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``run`` subcommand's parser.

    Returns
    -------
    argparse.ArgumentParser
        ``parser``.
    """
    from pipeline.cache import CACHE_CHOICES, DEFAULT_CACHE
    from pipeline.outputs import DEFAULT_VOLUME_FORMAT, VOLUME_FORMATS
    from pipeline.run import PICTURES

    p = parser
    p.add_argument("scan_dir", nargs="?", help="DICOM folder, tree of scans, image file or list file")
    p.add_argument("--demo", action="store_true", help="run on the built-in demo scan")
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="settings",
                   help="change one config setting (repeatable; VALUE is YAML), e.g. "
                        "--set classify.tta=false --set candidates.max_candidates=300 "
                        "--set stages=[ingest,resample,lungmask]")
    p.add_argument("--workers", type=int, default=1, help="scans processed at once (process pool)")
    p.add_argument("--executor", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address, with --executor dask")
    p.add_argument("--force", action="store_true", help="recompute every stage, ignoring the cache")
    p.add_argument("--limit", type=int, default=None, help="process only the first N scans found")
    p.add_argument("--only", action="append", default=None,
                   help="process only scans whose path contains this text (repeatable)")
    p.add_argument("--pictures", type=int, default=PICTURES,
                   help=f"PNG pictures of the top N candidates (default: {PICTURES})")
    p.add_argument("--cache", choices=CACHE_CHOICES, default=DEFAULT_CACHE,
                   help="what each scan's scan.h5 keeps: none (no file), stages (every stage result "
                        "but the CT volumes, so a resumed run recomputes only ingest and resample) "
                        f"or all (the CT too, about 100 MB more a scan) (default: {DEFAULT_CACHE})")
    p.add_argument("--save-ct", action="store_true",
                   help="also write ct_1mm.nrrd (int16 HU at 1 mm, about 40 MB a scan)")
    p.add_argument("--format", dest="volume_format", choices=list(VOLUME_FORMATS),
                   default=DEFAULT_VOLUME_FORMAT,
                   help="file format of the volumes (lung_mask, lung_mask_native, ct_1mm): nrrd or "
                        "nifti (.nii.gz, qform/sform in scanner RAS); candidates.mrk.json and "
                        f"lung_mask.seg.nrrd are 3D Slicer's and written with either (default: "
                        f"{DEFAULT_VOLUME_FORMAT})")
    p.add_argument("--device", default=None,
                   help="where resampling, clustering and the CNN run: auto, cpu, cuda or cuda:N "
                        "(default: auto, CUDA when torch sees a GPU, else the CPU)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--no-progress", action="store_true",
                       help="no progress bar: one line per stage start and end, as off a terminal")
    shown.add_argument("--quiet", action="store_true", help="only the final summary and errors")
    return parser


#: Exit status of a run stopped by Ctrl-C or SIGTERM (the shell's 128 + SIGINT).
INTERRUPTED = 130
#: Exit status of a run stopped because its output folder is full (or read-only).
OUTPUT_FULL = 3


def parse_settings(items: list[str]) -> dict:
    """``["classify.tta=false", "stages=[ingest,resample]"]`` -> ``{"classify": {"tta": False},
    "stages": ["ingest", "resample"]}``: each ``--set`` as a :func:`pipeline.config.load_config`
    override (values read as YAML; unknown sections and keys are refused there, with the
    nearest valid name).

    Raises
    ------
    ValueError
        An item is not ``SECTION.KEY=VALUE`` (or ``stages=[...]``), or its value is not YAML.
    """
    import yaml

    overrides: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not section or (dot and not key) or (not dot and section != "stages"):
            raise ValueError(f"--set {item}: expected SECTION.KEY=VALUE (e.g. classify.tta=false) "
                             "or stages=[...]")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--set {item}: the value {text!r} is not valid YAML") from None
        if dot:
            overrides.setdefault(section, {})[key] = value
        else:
            overrides[section] = value
    return overrides


def run_from_args(args: argparse.Namespace) -> int:
    """Screen the scans the parsed ``run`` options name; print one line per failed scan.

    Ctrl-C or SIGTERM stops the run cleanly: the finished scans and the run's CSVs for them
    are kept, one line says so, and the exit status is :data:`INTERRUPTED` (130).

    The config is read (and every key checked) before any scan is looked for.

    ``args`` come from :func:`add_arguments`; returns the exit status: 0 all scans done, 1 some
    failed, 2 bad usage, config or input, 3 the output folder is full or read-only (the run
    stops; a rerun resumes), 130 interrupted.
    """
    from pipeline import batch
    from pipeline.batch import OutputFull, discover_scans, run_many
    from pipeline.config import load_config
    from pipeline.progress import DEFAULT_MODE
    from stages.device import pick_device
    from stages.errors import ScanError

    if args.executor == "dask" and not args.scheduler:
        print("error: --executor dask needs --scheduler ADDRESS", file=sys.stderr)
        return 2
    if not args.demo and not args.scan_dir:
        print("error: run needs a scan: lungscreen run PATH (a DICOM folder, a tree of scans, an "
              "image file or a list file), or lungscreen run --demo for the built-in demo scan",
              file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, parse_settings(args.settings))
        pick_device(args.device)  # a CUDA device asked for where torch sees none: refused here
        if args.demo:
            from synth.demo import demo_scan

            source = demo_scan()
        else:
            source = Path(args.scan_dir)
        scans = discover_scans(source, limit=args.limit, only=args.only)
    except (ScanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not scans:
        print(f"error: {source}: no scans found", file=sys.stderr)
        return 2
    progress = "quiet" if args.quiet else "log" if args.no_progress else DEFAULT_MODE
    batch._INTERRUPT_PENDING = False
    previous = {sig: signal.signal(sig, batch.interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, batch._ignore_stop_in_finalizers
    try:  # a batch job's kill (SIGTERM) stops the run as Ctrl-C does
        results = run_many(scans, args.out, config, workers=args.workers, force=args.force,
                           executor=args.executor, scheduler=args.scheduler, pictures=args.pictures,
                           progress=progress, cache=args.cache, save_ct=args.save_ct, device=args.device,
                           volume_format=args.volume_format)
    except KeyboardInterrupt as exc:
        finished = len(getattr(exc, "results", []))
        print(f"\ninterrupted: {finished} of {len(scans)} scan(s) finished, kept in {args.out}; "
              "the same command again resumes", file=sys.stderr)
        return INTERRUPTED
    except OutputFull as exc:
        finished = sum(r.status != "failed" for r in exc.results)
        advice = ("make room" if "space" in exc.reason or "quota" in exc.reason
                  else "make it a writable folder (or choose another --out)")
        print(f"\nerror: {exc.out_dir}: {exc.reason}; stopped after {finished} of {len(scans)} "
              f"scan(s), whose outputs are complete; {advice} and run the same command again to "
              "resume", file=sys.stderr)
        return OUTPUT_FULL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.source}: {r.error}", file=sys.stderr)
    for r in results:
        for flag in r.flags:
            print(f"flagged: {r.source}: {flag}", file=sys.stderr)
    done = len(results) - len(failed)
    print(f"{done} scan(s) done, {len(failed)} failed; outputs in {args.out} "
          f"(report.html, candidates.csv, patients.csv, errors.csv)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- dispatch
def _module(name: str):
    """The module of command ``name`` (imported now; an ImportError propagates)."""
    module = COMMANDS[name][0]
    return sys.modules[__name__] if module is None else importlib.import_module(module)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" error names the nearest valid option
    (``--pictres`` -> did you mean ``--pictures``?)."""

    def error(self, message):
        bad = re.match(r"unrecognized arguments: (.*)", message)
        if bad:
            options = {o for p in [self, *self._subparsers_seen()] for a in p._actions
                       for o in a.option_strings}
            for word in bad.group(1).split():
                close = difflib.get_close_matches(word.split("=", 1)[0], sorted(options), n=1) \
                    if word.startswith("-") else []
                if close:
                    message += f"; did you mean {close[0]}?"
                    break
        super().error(message)

    def _subparsers_seen(self):
        return [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                for p in a.choices.values()]


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The ``lungscreen`` parser; only ``command``'s subparser gets its options (and module)."""
    parser = _Parser(prog="lungscreen", description="Lung nodule screening for chest "
                     "CT; `lungscreen COMMAND --help` gives a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_line, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name == command:
            _module(name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    """Entry point of ``lungscreen`` / ``python -m pipeline``.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The command's exit status: 0 ok, 1 some scans failed, 2 bad usage or input.

    Raises
    ------
    SystemExit
        From argparse: 0 after ``--help`` or ``--version``, 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # the top-level options take no value: the first other word is the command
    command = next((a for a in argv if not a.startswith("-")), None)
    args = _parser(command if command in COMMANDS else None).parse_args(argv)
    args.command_line = "lungscreen " + shlex.join(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else COMMANDS[args.command][2],
                        format="%(levelname)s %(name)s: %(message)s")
    return int(_module(args.command).run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
