"""Real-lesion benchmark: the screen on every real chest CT the project can have offline.

``python -m bench.real [--out bench] [--threads 2]`` screens, with the default config:

* ``lung1`` (pyradiomics; its ~14 mm nodule from ``lung1_label.nrrd``);
* ``pat_1`` .. ``pat_4`` (pycerr; each tumour's ``GTV-1`` contour from its RTSTRUCT:
  88, 23, 28 and 62 mm across, against the chest wall, the hilum or the mediastinum, in
  fields of view cropped to one lung);

and writes ``bench/real.json`` (under a key naming the device), per scan: the fraction of
the lesion's voxels inside the lung mask, the rank of the best finding that hits the lesion
(its centre inside the lesion, grown by ``HIT_MARGIN_MM``) and its probability, the number of
findings with probability >= 0.5 that hit no lesion (the acceptance of issue #17 allows 8), and
seconds.  These scans are development data: the model card says which ones trained it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import device_key, record

__all__ = ["real_scans", "score_scan", "run"]

#: A finding hits a lesion when its centre lies inside the lesion mask grown by this much.
HIT_MARGIN_MM = 2.0


def real_scans() -> dict:
    """``{name: (scan path, function ct -> lesion mask Volume on ct's grid)}`` for the real CTs here."""
    import numpy as np

    from stages.contours import read_rtstruct
    from stages.ingest import read_scan
    from synth.data import lung1_paths, pycerr_patients

    image, label = lung1_paths()

    def lung1_lesion(ct):
        lab = read_scan(label)
        return ct.with_array((lab.array > 0).astype(np.uint8))

    scans = {"lung1": (image, lung1_lesion)}
    for name, folder in pycerr_patients().items():
        (rs,) = sorted(folder.glob("DCM_RS_*.dcm"))
        scans[name] = (folder, lambda ct, rs=rs: read_rtstruct(rs, ct, names=["GTV-1"])["GTV-1"])
    return scans


def score_scan(values: dict, lesion) -> dict:
    """Quality of one screen (``pipeline.run.screen``'s values) against its lesion mask."""
    import numpy as np
    from scipy import ndimage as ndi

    from stages.resample import resample_like
    from stages.volume import xyz_to_zyx

    ct1, lung, cands = values["ct_1mm"], values["lung_mask"], values["candidates"]
    les = resample_like(lesion, ct1, order=0).array > 0
    grown = ndi.distance_transform_edt(~les, sampling=ct1.spacing_mm) <= HIT_MARGIN_MM
    idx = np.rint(ct1.world_to_index(xyz_to_zyx(cands[["coordX", "coordY", "coordZ"]].to_numpy(float))))
    idx = np.clip(idx.astype(int), 0, np.array(ct1.shape) - 1)
    hit = grown[tuple(idx.T)]
    prob = cands["probability"].to_numpy(float)
    first = np.flatnonzero(hit)
    return {"lesion_ml": round(float(les.sum() * np.prod(ct1.spacing_mm) / 1000), 1),
            "lesion_in_lung_mask": round(float((lung.array[les] > 0).mean()), 4),
            "lesion_rank": int(first[0]) + 1 if first.size else None,
            "lesion_probability": round(float(prob[first[0]]), 4) if first.size else None,
            "findings": len(cands),
            "false_marks_p50": int(((prob >= 0.5) & ~hit).sum()),
            "findings_on_lesion": int(hit.sum())}


def run(out_dir="bench", *, threads: int = 2) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.run import screen

    torch.set_num_threads(threads)
    config = load_config()
    result = {"date": time.strftime("%Y-%m-%d"), "torch_threads": threads, "scans": {}}
    for name, (path, lesion_of) in real_scans().items():
        print(f"bench real: {name}", flush=True)
        t0 = time.perf_counter()
        values = screen(path, config)
        secs = time.perf_counter() - t0
        result["scans"][name] = {**score_scan(values, lesion_of(values["ct"])), "seconds": round(secs, 1)}
        print(f"  {result['scans'][name]}", flush=True)
    record(Path(out_dir) / "real.json", device_key(threads), result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    run(args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
