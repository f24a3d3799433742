"""Benchmarks, beside the JSON they write (``make bench``, ``python -m bench``): speed and
memory live here, never in timed tests."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["device_key", "record"]


def device_key(threads: int) -> str:
    """Key of a result in a benchmark's JSON: ``cuda-<name>`` on a GPU, else ``cpu-<n>-threads``."""
    import torch

    if torch.cuda.is_available():
        return "cuda-" + torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{threads}-threads"


def record(path, key: str, result: dict) -> None:
    """Put ``result`` under ``key`` in the JSON file ``path``, keeping the other keys (machines)."""
    from pipeline.io import write_json

    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    old[key] = result
    write_json(old, path)
