"""The README's "Using the stages from your own code" example is `make run`'s screen."""
import re
from pathlib import Path

import numpy as np
import pandas as pd

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Using the stages from your own code"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_gives_the_cli_candidates(tmp_path, one_thread):
    from pipeline.__main__ import main
    from synth.phantom import write_phantom_scan

    scan, _ = write_phantom_scan(tmp_path / "scan", fmt="nrrd", shape_zyx=(40, 96, 96),
                                 spacing_mm=(4.0, 2.6, 2.6), seed=5, n_nodules=3)
    code = _api_example()
    assert '"/data/patient1"' in code and "classify_candidates" in code
    namespace = {}
    exec(compile(code.replace('"/data/patient1"', repr(str(scan))), "README.md", "exec"), namespace)
    api = namespace["cands"]
    assert main(["run", str(scan), "--out", str(tmp_path / "out"), "--quiet", "--pictures", "0"]) == 0
    cli = pd.read_csv(tmp_path / "out" / "candidates.csv", dtype={"seriesuid": str})
    assert len(api) > 3 and list(api.columns) == list(cli.columns)
    pd.testing.assert_frame_equal(api.round(4).reset_index(drop=True), cli, check_dtype=False, atol=1e-4)
    assert np.isfinite(cli["probability"]).all()
