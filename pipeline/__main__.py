"""Command line: ``python -m pipeline run|evaluate ...`` (console script ``lungscreen``).

A thin adapter over the API: it parses arguments, calls :mod:`pipeline.batch` or
:mod:`pipeline.evaluate`, prints one line per failed scan and returns the exit status.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _add_run(sub) -> None:
    from pipeline.cache import CACHE_CHOICES, DEFAULT_CACHE
    from pipeline.run import PICTURES

    p = sub.add_parser("run", help="run the pipeline on one scan or a tree of scans")
    p.add_argument("scan_dir", nargs="?", help="DICOM folder, tree of scans, image file or list file")
    p.add_argument("--demo", action="store_true", help="run on the built-in demo scan")
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
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
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--no-progress", action="store_true",
                       help="no progress bar: one line per stage start and end, as off a terminal")
    shown.add_argument("--quiet", action="store_true", help="only the final summary and errors")


def _run(args) -> int:
    from pipeline.batch import discover_scans, run_many
    from pipeline.config import load_config
    from pipeline.progress import DEFAULT_MODE
    from stages.errors import ScanError

    if args.executor == "dask" and not args.scheduler:
        print("error: --executor dask needs --scheduler ADDRESS", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        if args.demo or not args.scan_dir:
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
    results = run_many(scans, args.out, config, workers=args.workers, force=args.force,
                       executor=args.executor, scheduler=args.scheduler, pictures=args.pictures,
                       progress=progress, cache=args.cache, save_ct=args.save_ct)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.source}: {r.error}", file=sys.stderr)
    done = len(results) - len(failed)
    print(f"{done} scan(s) done, {len(failed)} failed; outputs in {args.out} "
          f"(report.html, candidates.csv, errors.csv)")
    return 1 if failed else 0


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some scans failed, 2 bad usage)."""
    parser = argparse.ArgumentParser(prog="lungscreen", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    extra = {}
    for name, module in (("evaluate", "pipeline.evaluate"), ("train", "pipeline.training")):
        try:
            mod = __import__(module, fromlist=["add_arguments"])
        except ImportError:
            continue
        if hasattr(mod, "add_arguments"):
            p = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
            mod.add_arguments(p)
            extra[name] = mod.run_from_args
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        return _run(args)
    return int(extra[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
