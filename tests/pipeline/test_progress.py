"""Progress of a run (issue 15): bars on a terminal, one line per stage off one, quiet."""
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.progress import LOG_EVERY_S, Reporter, resolve_mode

ROOT = Path(__file__).resolve().parents[2]
#: A small phantom: the four stages before classify take a few seconds.
PHANTOM = dict(shape_zyx=(36, 96, 96), spacing_mm=(3.0, 2.4, 2.4), n_nodules=2)
STAGES = ("ingest", "resample", "lungmask", "candidates")
#: ``HH:MM:SS scan: text``
LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<scan>\S+): (?P<text>.*)$")


def _lines(text: str) -> list[tuple[str, str]]:
    """``(scan, text)`` of every log line in ``text``."""
    return [(m["scan"], m["text"]) for m in map(LINE.match, text.splitlines()) if m]


def _config(tmp_path, stages=STAGES) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["stages"] = list(stages)
    path = tmp_path / f"config-{len(stages)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _phantom(tmp_path) -> Path:
    from synth.phantom import write_phantom_scan

    folder, _ = write_phantom_scan(tmp_path / "patient000", fmt="dicom", seed=5, **PHANTOM)
    return folder


def _cli(*args) -> subprocess.CompletedProcess:
    """``python -m pipeline ...`` with stdout and stderr piped (so not a terminal)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


class FakeClock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self):
        return self.now_s


def test_log_lines_name_each_stage_and_space_progress_lines():
    out, clock = io.StringIO(), FakeClock()
    rep = Reporter("log", stream=out, clock=clock)
    rep.stage_cached("lung1", "ingest")
    rep.stage_started("lung1", "classify")
    seen = []
    for done, t_s in [(100, 4.0), (200, 9.9), (250, 10.0), (400, 16.0), (500, 19.0), (600, 25.0),
                      (1000, 40.0)]:
        clock.now_s = t_s
        rep.stage_progress("lung1", "classify", done, 1000, unit="cubes")
        seen.append(len(out.getvalue().splitlines()))
    rep.stage_done("lung1", "classify", 40.04)
    assert _lines(out.getvalue()) == [
        ("lung1", "ingest loaded from cache"),
        ("lung1", "classify started"),
        ("lung1", "classify 250/1000 cubes, ETA 30 s"),  # 10 s for 250: 30 s for 750 more
        ("lung1", "classify 600/1000 cubes, ETA 17 s"),  # 15 s after the last line; 25/600*400
        ("lung1", "classify done in 40.0 s"),  # no progress line at 1000/1000: the end line follows
    ]
    assert seen == [2, 2, 3, 3, 3, 4, 4]  # at most one progress line every LOG_EVERY_S
    assert LOG_EVERY_S == 10.0


def test_progress_callback_restarts_its_eta_with_each_stage():
    out, clock = io.StringIO(), FakeClock()
    rep = Reporter("log", stream=out, clock=clock, every_s=1.0)
    rep.stage_started("a", "classify")
    clock.now_s = 100.0
    rep.stage_done("a", "classify", 100.0)
    rep.stage_started("b", "classify")
    clock.now_s = 102.0
    rep.progress_callback("b", "classify", "cubes")(1, 2)
    assert _lines(out.getvalue())[-1] == ("b", "classify 1/2 cubes, ETA 2 s")


def test_long_eta_in_minutes():
    out, clock = io.StringIO(), FakeClock()
    rep = Reporter("log", stream=out, clock=clock)
    rep.stage_started("a", "classify")
    clock.now_s = 60.0
    rep.stage_progress("a", "classify", 100, 1000)
    assert _lines(out.getvalue())[-1] == ("a", "classify 100/1000, ETA 9.0 min")


@pytest.mark.parametrize("mode", ["quiet", "bar"])
def test_quiet_and_bar_modes_write_no_lines(mode):
    out, clock = io.StringIO(), FakeClock()
    rep = Reporter(mode, stream=out, clock=clock)
    rep.scans_bar(1)
    rep.stage_started("a", "classify")
    for done in (10, 20):
        clock.now_s += 60.0
        rep.stage_progress("a", "classify", done, 20, unit="cubes")
    rep.stage_done("a", "classify", 120.0)
    rep.stage_cached("a", "ingest")
    rep.close()
    assert _lines(out.getvalue()) == []
    if mode == "quiet":
        assert out.getvalue() == ""


def test_resolve_mode():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_mode("auto", Tty()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "log"
    assert resolve_mode("quiet", Tty()) == "quiet"
    with pytest.raises(ValueError, match="progress must be one of auto, bar, log, quiet; got 'loud'"):
        resolve_mode("loud")


def test_classify_progress_is_passed_but_never_keyed(tmp_path, monkeypatch):
    """A stage with a progress unit gets ``progress=``; its cache key does not change."""
    import pandas as pd

    from pipeline import steps
    from pipeline.config import load_config
    from pipeline.run import process_scan

    calls = []

    def fake_candidates(ct_1mm, lung_mask, **settings):  # the real one takes seconds
        n = 40
        return {"candidates": pd.DataFrame({"seriesuid": ct_1mm.scan_id, "coordX": [0.0] * n,
                                            "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 5.0,
                                            "finding": "nodule", "score": 1.0})}

    def fake_classify(ct_1mm, candidates, *, progress=None, **settings):
        for done in range(len(candidates) + 1):
            calls.append((done, len(candidates)))
            if progress is not None:
                progress(done, len(candidates))
        return {"candidates": candidates.assign(probability=0.5)}

    for name, fn in (("candidates", fake_candidates), ("classify", fake_classify)):
        monkeypatch.setitem(steps.STEPS, name, dataclasses.replace(steps.STEPS[name], fn=fn))
    config = load_config(_config(tmp_path, STAGES + ("classify",)))
    scan = _phantom(tmp_path)

    class TickingClock(FakeClock):  # 3 s a call: a progress line every 4th call
        def __call__(self):
            self.now_s += 3.0
            return self.now_s

    out = io.StringIO()
    shown = process_scan(scan, tmp_path / "a", config, pictures=0,
                         reporter=Reporter("log", stream=out, clock=TickingClock()))
    plain = process_scan(scan, tmp_path / "b", config, pictures=0)
    assert calls[-1] == (40, 40) and len(calls) == 2 * 41
    progress = [t for _, t in _lines(out.getvalue()) if t.startswith("classify ") and "/" in t]
    assert len(progress) == 10
    assert all(re.fullmatch(r"classify \d+/40 cubes, ETA [\d.]+ (s|min)", t) for t in progress)
    keys = [json.loads((Path(r.out_dir) / "scan.json").read_text())["keys"] for r in (shown, plain)]
    assert keys[0] == keys[1]


def test_screen_off_a_terminal_logs_each_stage_as_it_starts_and_ends(tmp_path):
    scan = _phantom(tmp_path)
    config = _config(tmp_path)
    out = tmp_path / "out"
    run = _cli("run", scan, "--out", out, "--config", config, "--pictures", "0")
    assert run.returncode == 0, run.stderr
    lines = _lines(run.stderr)
    assert {s for s, _ in lines} == {"patient000"}
    events = [text for _, text in lines]
    expected = []
    for stage in STAGES + ("write",):
        expected += [f"{stage} started", f"{stage} done in"]
    got = [re.sub(r"(done in) [\d.]+ s$", r"\1", t) for t in events if "started" in t or "done in" in t]
    assert got == expected, run.stderr
    assert re.fullmatch(r"ok in [\d.]+ s, \d+ candidates \[1/1 scans\]", events[-1])
    assert "1 scan(s) done, 0 failed" in run.stdout

    # fewer stages: the scan is not done, lungmask comes from the cache, the CT is read again
    short = _config(tmp_path, STAGES[:3])
    rerun = _cli("run", scan, "--out", out, "--config", short, "--pictures", "0", "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    events = [text for _, text in _lines(rerun.stderr)]
    assert [t for t in events if not t.startswith("write")] == [
        "ingest started", events[1], "resample started", events[3], "lungmask loaded from cache",
        events[-1]]
    assert events[1].startswith("ingest done in") and events[3].startswith("resample done in")

    # --quiet: the summary line and nothing else
    quiet = _cli("run", scan, "--out", tmp_path / "quiet", "--config", short, "--pictures", "0",
                 "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("1 scan(s) done, 0 failed")
