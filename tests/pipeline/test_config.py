"""pipeline.config: every key of a run config is checked when it is read, before any scan runs."""
import inspect
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.config import DEFAULT_CONFIG, load_config, load_settings, stage_settings
from pipeline.steps import STEPS

CONFIGS = DEFAULT_CONFIG.parent


def _config(tmp_path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"extends: {DEFAULT_CONFIG}\n{text}")
    return path


@pytest.mark.parametrize("name", ["default.yaml", "luna16.yaml", "dsb2017.yaml"])
def test_every_key_of_the_shipped_configs_is_valid(name):
    config = load_config(CONFIGS / name)
    assert config["stages"]
    for stage in config["stages"]:
        assert set(config[stage]) <= stage_settings(stage), stage


def test_a_misspelt_key_names_the_file_the_key_and_the_nearest_one(tmp_path):
    path = _config(tmp_path, "candidates:\n  max_candidate: 5\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: unknown key 'max_candidate' in section 'candidates'; "
                               "did you mean 'max_candidates'?")


@pytest.mark.parametrize("text, message", [
    ("candidate:\n  max_candidates: 5\n", r"x\.yaml: unknown section 'candidate'; did you mean 'candidates'\?"),
    ("lungmask:\n  zzz: 1\n", r"unknown key 'zzz' in section 'lungmask'; valid: .*air_threshold_hu"),
])
def test_a_misspelt_section_or_a_far_off_key_is_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_config(tmp_path, text))


def test_a_misspelt_stage_in_the_list_names_the_nearest_one(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("stages: [ingest, resampel]\n")
    with pytest.raises(ValueError, match="unknown stage 'resampel' in 'stages'; did you mean 'resample'"):
        load_config(path)


def test_the_error_names_the_file_that_holds_the_key(tmp_path):
    base = _config(tmp_path, "classify:\n  tta_topp: 10\n", name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\n")
    with pytest.raises(ValueError, match=r"base\.yaml: unknown key 'tta_topp'.*did you mean 'tta_top'"):
        load_config(child)
    assert base.is_file()


def test_overrides_are_checked_too():
    with pytest.raises(ValueError, match="--set: unknown key 'bandwith'.*'bandwidth'"):
        load_config(overrides={"candidates": {"bandwith": 2.0}})
    assert load_config(overrides={"candidates": {"bandwidth": 2.0}})["candidates"]["bandwidth"] == 2.0


def test_a_section_of_a_known_stage_not_listed_is_accepted(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("stages: [ingest, resample]\nclassify:\n  tta: 1\ncandidates:\n")
    config = load_config(path)
    assert config["stages"] == ["ingest", "resample"] and config["classify"] == {"tta": 1}


def test_section_keys_are_the_settings_of_adapter_and_stage_function():
    assert {"series_uid", "clip_hu"} <= stage_settings("ingest")
    assert {"spacing_mm", "order", "method"} <= stage_settings("resample")
    assert {"max_candidates", "bandwidth", "seed"} <= stage_settings("candidates")
    assert {"weights", "tta", "merge_mm"} <= stage_settings("classify")
    data = {"path", "ct", "ct_1mm", "lung_mask", "candidates", "vol", "mask", "progress"}
    for name, step in STEPS.items():
        keys = stage_settings(name)
        assert not data & keys, name
        # what the adapter takes without a default (data, the run's device) comes from the runner
        given = {p.name for p in inspect.signature(step.fn).parameters.values()
                 if p.default is p.empty and p.kind is not p.VAR_KEYWORD}
        assert not given & keys, name
    with pytest.raises(ValueError, match="unknown stage"):
        stage_settings("nope")


@pytest.mark.parametrize("text, expected", [
    ("candidates:\n  max_candidate: 5\n", "unknown key 'max_candidate' in section 'candidates'; "
                                          "did you mean 'max_candidates'?"),
    ("candidate:\n  max_candidates: 5\n", "unknown section 'candidate'; did you mean 'candidates'?"),
])
def test_cli_refuses_the_config_before_any_scan_runs(tmp_path, capsys, text, expected):
    """The scan folder does not exist: an error naming the config proves it was read first."""
    path = _config(tmp_path, text)
    assert main(["run", str(tmp_path / "no_such_scans"), "--out", str(tmp_path / "out"),
                 "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: {expected}\n"
    assert not (tmp_path / "out").exists()


def test_load_settings_refuses_an_unknown_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"s\.yaml: unknown key 'epoch'; did you mean 'epochs'\?"):
        load_settings(path, ["epochs", "lr"])
    path.write_text("# comments only\n")
    assert load_settings(path, ["epochs"]) == {}
    path.write_text("- epochs\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_settings(path, ["epochs"])
    with pytest.raises(ValueError, match="config file not found"):
        load_settings(tmp_path / "missing.yaml", ["epochs"])


def test_effective_settings_are_the_function_defaults_then_the_overrides(tmp_path):
    from pipeline.config import effective_settings
    from stages.candidates import MAX_CANDIDATES, WALL_PASS_HU

    settings = effective_settings(load_config(_config(tmp_path, "candidates:\n  max_candidates: 7\n")))
    assert settings["candidates"]["max_candidates"] == 7 != MAX_CANDIDATES
    assert settings["candidates"]["wall_pass_hu"] == WALL_PASS_HU
    assert settings["resample"]["spacing_mm"] == (1.0, 1.0, 1.0)
    assert "device" not in settings["classify"] and "progress" not in settings["classify"]
