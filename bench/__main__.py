"""``make bench``: every benchmark, each in its own process (separate memory peaks), JSON under
``bench/``.  ``lungscreen bench --only cluster,train`` (or ``python -m bench ...``) runs a subset."""
from __future__ import annotations

import argparse
import subprocess
import sys

__all__ = ["add_arguments", "run_from_args", "main", "BENCHES"]

BENCHES = {"ingest": "bench.ingest", "cluster": "bench.cluster",
           "train": "bench.train", "batch": "bench.batch", "screen": "bench.screen",
           "real": "bench.real"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``parser`` (for ``lungscreen bench`` and ``python -m bench``).

    Returns ``parser``, extended.
    """
    parser.add_argument("--out", default="bench", help="folder of the JSON results (default: bench/)")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help="comma-separated: " + ",".join(BENCHES))
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmarks ``args.only`` names, each as ``python -m bench.<name> --out OUT``.

    ``args`` come from :func:`add_arguments`; returns the exit status: 0 all ran, 1 some failed, 2 an unknown benchmark name.
    """
    names = args.only.split(",")
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"error: unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHES)}",
              file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"== bench {name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", BENCHES[name], "--out", args.out])
        if rc:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    """``python -m bench [--out DIR] [--only NAMES]``; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m bench",
                                                   description=__doc__.splitlines()[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
