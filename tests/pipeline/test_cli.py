"""``lungscreen`` (pipeline.__main__): one command, a subcommand per task, each module giving
``add_arguments(parser)`` and ``run_from_args(args) -> int``."""
import argparse
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from pipeline import __main__ as cli
from pipeline import training
from pipeline.config import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"lungscreen \d+\.\d+\S*\n", capsys.readouterr().out)


def test_version_without_an_installed_package_is_pyprojects(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{cli.version()}"' in pyproject


@pytest.mark.parametrize("command, flag", [("run", "--config"), ("evaluate", "--annotations"),
                                           ("train", "--config"), ("train-lesions", "--lopo"),
                                           ("benchmark-data", "--n-scans"), ("luna16-tree", "--bench"),
                                           ("bench", "--only")])
def test_every_subcommand_has_help(capsys, command, flag):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lungscreen {command}") and flag in out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("run", "evaluate", "train", "train-lesions", "benchmark-data", "luna16-tree",
                                           "bench"))


@pytest.mark.parametrize("command, module", [("train", "pipeline.training"), ("bench", "bench.__main__")])
def test_an_import_error_in_a_subcommand_surfaces(monkeypatch, command, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError):
        cli.main([command, "--help"])


def test_each_subcommand_module_gives_the_protocol():
    for name in cli.COMMANDS:
        module = cli._module(name)
        parser = module.add_arguments(argparse.ArgumentParser())
        assert isinstance(parser, argparse.ArgumentParser) and callable(module.run_from_args), name


def test_makefile_targets_call_the_subcommands():
    makefile = (ROOT / "Makefile").read_text()
    called = re.findall(r"\$\(BIN\)/python -m (\S+)(?: (\S+))?", makefile)
    modules = {m for m, _ in called}
    assert modules == {"pip", "pipeline", "pytest"}, modules  # pip: the venv stamp
    subcommands = {sub for m, sub in called if m == "pipeline"}
    assert subcommands == {"run", "evaluate", "train", "train-lesions", "benchmark-data", "luna16-tree", "bench"}


# ----------------------------------------------------------------------------- train
def _fake_train(monkeypatch):
    """Replace train_classifier (signature kept) by one that records its arguments."""
    calls = []

    @functools.wraps(training.train_classifier)
    def fake(data, **kwargs):
        calls.append({"data": data, **kwargs})
        return {"weights": Path("w.pt"), "card": Path("c.md"), "log": Path("l.csv"),
                "counts": {}, "final": {"valid_loss": 0.5}}

    monkeypatch.setattr(training, "train_classifier", fake)
    return calls


def test_train_reads_its_config_and_flags_override_it(tmp_path, monkeypatch, capsys):
    calls = _fake_train(monkeypatch)
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 7\nbatch_size: 16\nlr: 5e-4\nwidths: [4, 8]\ndropout: 0.1\n")
    assert cli.main(["train", "--config", str(config), "--data", "DIR", "--epochs", "3",
                     "--no-progress"]) == 0
    (kw,) = calls
    assert kw["data"] == "DIR" and kw["epochs"] == 3 and kw["batch_size"] == 16
    assert kw["lr"] == 5e-4 and kw["widths"] == (4, 8) and kw["dropout"] == 0.1
    assert kw["progress"] is False
    assert kw["command"].startswith("lungscreen train --config") and "--epochs 3" in kw["command"]
    # what neither the file nor a flag sets is left to train_classifier's own default
    assert not {"pos_fraction", "max_neg_per_scan", "size_mm", "seed", "resume"} & set(kw)
    assert '"valid_loss": 0.5' in capsys.readouterr().out

    assert cli.main(["train", "--config", str(config), "--data", "DIR", "--lr", "auto",
                     "--widths", "2,4,8"]) == 0
    assert calls[-1]["lr"] is None and calls[-1]["widths"] == (2, 4, 8)


def test_train_refuses_a_misspelt_config_key_before_training(tmp_path, monkeypatch, capsys):
    calls = _fake_train(monkeypatch)
    config = tmp_path / "train.yaml"
    config.write_text("epoch: 3\n")
    assert cli.main(["train", "--config", str(config), "--data", "DIR"]) == 2
    assert capsys.readouterr().err == (f"error: {config}: unknown key 'epoch'; "
                                       "did you mean 'epochs'?\n")
    assert calls == []
    config.write_text("lr: fast\n")
    assert cli.main(["train", "--config", str(config), "--data", "DIR"]) == 2
    assert "lr must be a number, got 'fast'" in capsys.readouterr().err


def test_train_yaml_is_the_default_and_holds_only_changes_from_the_function_defaults():
    args = training.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert Path(args.config) == training.TRAIN_CONFIG == ROOT / "configs" / "train.yaml"
    keys = training._config_keys()
    settings = load_settings(training.TRAIN_CONFIG, keys)
    defaults = {k: p.default for k, p in
                training.inspect.signature(training.train_classifier).parameters.items()}
    assert all(value != defaults[key] for key, value in settings.items()), settings
    header = training.TRAIN_CONFIG.read_text()
    assert all(re.search(rf"\b{key}\b", header) for key in keys), "train.yaml names every key"


# ----------------------------------------------------------------------------- the others
def test_bench_runs_each_benchmark_in_its_own_process(monkeypatch, tmp_path):
    import bench.__main__ as bench_main

    calls = []
    monkeypatch.setattr(bench_main.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["bench", "--only", "cluster,train", "--out", str(tmp_path)]) == 0
    assert calls == [[sys.executable, "-m", "bench.cluster", "--out", str(tmp_path)],
                     [sys.executable, "-m", "bench.train", "--out", str(tmp_path)]]
    assert cli.main(["bench", "--only", "clustr"]) == 2


def test_benchmark_data_dispatches_to_the_builder(monkeypatch, tmp_path, capsys):
    import synth.benchmark_data as bd

    seen = {}

    def fake_build(out, **kwargs):
        seen.update(out=out, **kwargs)
        return {"splits": {"test": {"n_scans": 3, "n_nodules": 4, "n_excluded": 0, "lidc_patients": []}},
                "build_seconds": 0.1}

    monkeypatch.setattr(bd, "build_benchmark", fake_build)
    assert cli.main(["benchmark-data", "--out", str(tmp_path), "--n-scans", "3"]) == 0
    assert seen["out"] == str(tmp_path) and seen["n_scans"] == 3
    assert "test: 3 scans, 4 nodules" in capsys.readouterr().out


def test_evaluate_reports_a_missing_table_as_an_error(tmp_path, capsys):
    assert cli.main(["evaluate", "--annotations", str(tmp_path / "a.csv"),
                     "--candidates", str(tmp_path / "c.csv")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_run_refuses_a_cuda_device_without_a_gpu_before_any_scan(tmp_path, capsys):
    import torch

    from pipeline.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", str(tmp_path / "nowhere"), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]
    assert not (tmp_path / "o").exists()


def test_set_changes_one_setting_and_names_the_nearest_key(tmp_path, capsys):
    assert cli.parse_settings(["classify.tta=false", "candidates.max_candidates=300",
                               "stages=[ingest, resample]"]) == {
        "classify": {"tta": False}, "candidates": {"max_candidates": 300}, "stages": ["ingest", "resample"]}
    for bad in ["classify", "classify.=1", "=3", "classify.tta=[1"]:
        with pytest.raises(ValueError, match=r"--set "):
            cli.parse_settings([bad])
    assert cli.main(["run", str(tmp_path), "--set", "classify.ttta=1"]) == 2
    assert "--set: unknown key 'ttta' in section 'classify'; did you mean 'tta'?" in capsys.readouterr().err


def test_set_reaches_the_run_and_run_json_records_the_device(tmp_path):
    import json

    from synth.phantom import write_phantom_scan

    write_phantom_scan(tmp_path / "scan", fmt="dicom", seed=2, shape_zyx=(20, 40, 40),
                       spacing_mm=(3.0, 4.0, 4.0), n_nodules=1)
    assert cli.main(["run", str(tmp_path / "scan"), "--out", str(tmp_path / "out"), "--quiet",
                     "--pictures", "0", "--device", "cpu", "--set", "stages=[ingest,resample]",
                     "--set", "resample.spacing_mm=[2,2,2]"]) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["stages"] == ["ingest", "resample"]
    assert run["config"]["resample"]["spacing_mm"] == [2, 2, 2] and run["device"] == "cpu"


def test_a_misspelt_option_names_the_nearest(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "x", "--pictres", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --pictres" in (err := capsys.readouterr().err)
    assert "did you mean --pictures?" in err


def test_run_without_a_path_is_an_error_that_suggests_demo(capsys):
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run needs a scan") and "--demo" in err


def test_the_lock_installs_from_the_standard_index():
    """No local version (``+cpu``): pip on any machine resolves every pin; torch takes the
    standard wheel (CUDA where pip offers it), here the CPU wheel on disk of the same version."""
    pins = [line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", p) for p in pins), \
        [p for p in pins if "+" in p or "==" not in p]
    assert "torch==2.13.0" in pins
