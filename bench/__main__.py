"""``make bench``: every benchmark, each in its own process (separate memory peaks), JSON under
``bench/``.  ``python -m bench --only cluster,train`` runs a subset."""
from __future__ import annotations

import argparse
import subprocess
import sys

BENCHES = {"ingest": "bench.ingest", "cluster": "bench.cluster",
           "train": "bench.train", "batch": "bench.batch", "screen": "bench.screen"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated: " + ",".join(BENCHES))
    args = p.parse_args(argv)
    failed = []
    for name in args.only.split(","):
        print(f"== bench {name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", BENCHES[name], "--out", args.out])
        if rc:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
