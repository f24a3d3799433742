"""Run settings: a YAML file whose ``stages:`` list names the steps and whose sections hold
each step's keyword arguments (read with ``yaml.safe_load``, never ``yaml.load``).

Every key is checked when the file is read, before any scan runs: a top-level key is
``stages``, ``extends``, ``outputs`` or the name of a registered step
(:data:`pipeline.steps.STEPS`), and a key inside a step's section is a setting of that step,
that is a keyword parameter with a default of the step's adapter (``pipeline.steps``) or of
the stage function the adapter forwards its ``**settings`` to (:data:`STAGE_FUNCTIONS`).  The
``outputs`` section holds settings of the scan's outputs, the keyword parameters with a
default of :data:`OUTPUT_FUNCTION` (``sr_min_probability``: the DICOM SR's findings).  A
misspelt key is refused with the nearest valid one::

    configs/x.yaml: unknown key 'max_candidate' in section 'candidates'; did you mean 'max_candidates'?
"""
from __future__ import annotations

import copy
import difflib
import importlib
import inspect
from pathlib import Path
from typing import Callable, Iterable

import yaml

__all__ = ["load_config", "load_settings", "stage_settings", "output_settings", "effective_settings",
           "DEFAULT_CONFIG", "STAGE_FUNCTIONS", "OUTPUT_SECTION", "OUTPUT_FUNCTION"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
#: The stage function each step's adapter in :mod:`pipeline.steps` forwards ``**settings`` to
#: (``"module:function"``): its keyword parameters are valid keys of the step's section.
STAGE_FUNCTIONS = {
    "ingest": "stages.ingest:read_scan",
    "resample": "stages.resample:resample",
    "lungmask": "stages.lungmask:segment_lungs",
    "candidates": "stages.candidates:find_candidates",
    "classify": "stages.classify:classify_candidates",
    "nodule_type": "stages.nodule_type:nodule_types",
    "embed": "stages.classify:embed_candidates",
}
#: Top-level keys that are not a step's section.
TOP_LEVEL_KEYS = ("stages", "extends")
#: The section of the outputs' settings, not a step's: its keys are the keyword parameters
#: with a default of :data:`OUTPUT_FUNCTION`, whose defaults are theirs.
OUTPUT_SECTION = "outputs"
OUTPUT_FUNCTION = "pipeline.dicom_outputs:write_dicom_outputs"
#: Keyword arguments the runner passes to a step, never read from a config.
RUNNER_ARGUMENTS = frozenset({"progress"})


def load_config(path=None, overrides: dict | None = None) -> dict:
    """Read a run config; ``path=None`` gives ``configs/default.yaml``.

    Parameters
    ----------
    path : str or Path, optional
        YAML file with a ``stages`` list and one mapping per stage.  ``extends: other.yaml``
        (relative to the file) starts from that config and overrides section by section.
    overrides : dict, optional
        ``{"section": {"key": value}}`` merged over the file (used by tests and the CLI).

    Returns
    -------
    dict
        ``stages`` (list of step names) and one dict of keyword arguments per listed step.

    Raises
    ------
    ValueError
        The file is missing, not valid YAML, not a mapping, has no ``stages`` list, lists a
        stage twice, names an unknown stage, or holds an unknown section or key (the message
        names the file, the key and the nearest valid one).

    See Also
    --------
    stage_settings : the valid keys of a step's section.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    config = _read_yaml(path)
    if isinstance(config, dict):
        _check_sections(path, config)
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
    if overrides:
        _check_sections("--set", overrides)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    if len(set(config["stages"])) != len(config["stages"]):
        raise ValueError(f"{path}: a stage is listed twice in stages: {config['stages']}")
    known = _known_steps()
    for name in config["stages"]:
        if name not in known:
            raise ValueError(_unknown(path, f"stage {name!r} in 'stages'", name, known))
        settings = config.get(name) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: section {name!r} must be a mapping of keyword arguments")
        config[name] = settings
    return config


def load_settings(path, valid: Iterable[str]) -> dict:
    """Read a flat YAML mapping of keyword arguments, refusing any key not in ``valid``.

    Used for ``configs/train.yaml`` (the keys of :func:`pipeline.training.train_classifier`).

    Parameters
    ----------
    path : str or Path
        YAML file holding one mapping (comments only, or empty: no settings).
    valid : iterable of str
        The accepted keys.

    Returns
    -------
    dict
        The settings as written in the file.

    Raises
    ------
    ValueError
        The file is missing, not valid YAML or not a mapping, or holds an unknown key (the
        message names the file, the key and the nearest valid one).
    """
    path = Path(path)
    settings = _read_yaml(path)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value), "
                         f"got {type(settings).__name__}")
    valid = sorted(valid)
    for key in settings:
        if key not in valid:
            raise ValueError(_unknown(path, f"key {key!r}", key, valid))
    return settings


def stage_settings(name: str) -> frozenset[str] | None:
    """The valid keys of step ``name``'s config section.

    They are the keyword parameters with a default of the step's adapter
    (``pipeline.steps.STEPS[name].fn``) and, when the adapter forwards ``**settings``, of the
    stage function :data:`STAGE_FUNCTIONS` maps ``name`` to.  What the adapter takes without
    a default comes from the runner, never from the config, even where the stage function has
    a default for it: the data the step reads (``ct``, ``ct_1mm``, ``lung_mask``, ``path``
    ...) and the run's ``device``.  Nor is :data:`RUNNER_ARGUMENTS` (``progress``) a setting.

    Parameters
    ----------
    name : str
        A registered step.

    Returns
    -------
    frozenset of str or None
        None when the adapter forwards ``**settings`` to a function this module does not
        know (a step added without a :data:`STAGE_FUNCTIONS` entry): its keys are not checked.

    Raises
    ------
    ValueError
        ``name`` is not a registered step.

    Examples
    --------
    >>> keys = stage_settings("resample")
    >>> "spacing_mm" in keys, "ct" in keys
    (True, False)
    """
    from pipeline.steps import get_step

    keys, given, forwards = _parameters(get_step(name).fn)
    if forwards:
        target = STAGE_FUNCTIONS.get(name)
        if target is None:
            return None
        module, function = target.split(":")
        more, _, _ = _parameters(getattr(importlib.import_module(module), function))
        keys |= more
    return frozenset(keys - given - RUNNER_ARGUMENTS)


def output_settings() -> dict:
    """The settings of the config's ``outputs`` section and their defaults: the keyword
    parameters with a default of :data:`OUTPUT_FUNCTION`.

    Examples
    --------
    >>> output_settings()
    {'sr_min_probability': 0.5}
    """
    module, function = OUTPUT_FUNCTION.split(":")
    fn = getattr(importlib.import_module(module), function)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


def effective_settings(config: dict) -> dict:
    """Every setting each listed stage runs with: its functions' keyword defaults, then the
    config's overrides (what ``run.json`` records, so a run can be repeated exactly); and
    the same for the ``outputs`` section.

    Examples
    --------
    >>> s = effective_settings(load_config())
    >>> s["candidates"]["max_candidates"], s["classify"]["tta_top"], s["outputs"]
    (1000, 100, {'sr_min_probability': 0.5})
    """
    from pipeline.steps import get_step

    out = {}
    for name in config["stages"]:
        fns = [get_step(name).fn]
        if name in STAGE_FUNCTIONS:
            module, function = STAGE_FUNCTIONS[name].split(":")
            fns.insert(0, getattr(importlib.import_module(module), function))
        keys = stage_settings(name) or frozenset()
        values = {}
        for fn in fns:  # the adapter's own defaults win over the stage function's
            values.update({p.name: p.default for p in inspect.signature(fn).parameters.values()
                           if p.name in keys and p.default is not p.empty})
        out[name] = {**dict(sorted(values.items())), **config.get(name, {})}
    out[OUTPUT_SECTION] = {**output_settings(), **(config.get(OUTPUT_SECTION) or {})}
    return out


def _parameters(fn: Callable) -> tuple[set[str], set[str], bool]:
    """``fn``'s keyword-passable parameters with a default, those without, and whether it
    takes ``**kwargs``."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    return ({p.name for p in named if p.default is not p.empty},
            {p.name for p in named if p.default is p.empty},
            len(named) < len(params))


def _known_steps() -> list[str]:
    from pipeline.steps import STEPS

    return list(STEPS)


def _check_sections(source, config: dict) -> None:
    """Refuse an unknown top-level key of ``config``, or an unknown key in a step's section."""
    known = _known_steps()
    for section, values in config.items():
        if section in TOP_LEVEL_KEYS:
            continue
        if section not in known and section != OUTPUT_SECTION:
            raise ValueError(_unknown(source, f"section {section!r}", section,
                                      [*TOP_LEVEL_KEYS, OUTPUT_SECTION, *known]))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping of keyword arguments")
        valid = set(output_settings()) if section == OUTPUT_SECTION else stage_settings(section)
        if valid is None:
            continue
        for key in values:
            if key not in valid:
                raise ValueError(_unknown(source, f"key {key!r} in section {section!r}", key,
                                          sorted(valid)))


def _unknown(source, what: str, name, valid: list[str]) -> str:
    """``"<source>: unknown <what>; did you mean '<nearest>'?"`` (or the valid names)."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
    return f"{source}: unknown {what}; {hint}"


def _read_yaml(path: Path):
    """The YAML document in ``path`` (``{}`` for an empty file); ValueError if unreadable."""
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
