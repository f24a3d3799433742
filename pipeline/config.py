"""Run settings: a YAML file whose ``stages:`` list names the steps and whose sections hold
each step's keyword arguments (read with ``yaml.safe_load``, never ``yaml.load``)."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

__all__ = ["load_config", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def load_config(path=None, overrides: dict | None = None) -> dict:
    """Read a run config; ``path=None`` gives ``configs/default.yaml``.

    Parameters
    ----------
    path : str or Path, optional
        YAML file with a ``stages`` list and one mapping per stage.  ``extends: other.yaml``
        (relative to the file) starts from that config and overrides section by section.
    overrides : dict, optional
        ``{"section": {"key": value}}`` merged over the file (used by tests and the CLI).

    Raises
    ------
    ValueError
        The file is missing, not a mapping, has no ``stages`` list, or names an unknown stage.
    """
    from pipeline.steps import get_step

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if isinstance(config, dict) and config.get("extends"):
        base = load_config(path.parent / config.pop("extends"))
        for section, values in config.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section] = {**base[section], **values}
            else:
                base[section] = values
        config = base
    if not isinstance(config, dict) or not isinstance(config.get("stages"), list):
        raise ValueError(f"{path}: a config needs a 'stages:' list, e.g. stages: [ingest, resample]")
    config = copy.deepcopy(config)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    if len(set(config["stages"])) != len(config["stages"]):
        raise ValueError(f"{path}: a stage is listed twice in stages: {config['stages']}")
    for name in config["stages"]:
        get_step(name)
        settings = config.get(name) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: section {name!r} must be a mapping of keyword arguments")
        config[name] = settings
    return config
