"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, result: dict) -> None:
    """Write ``result`` to ``path`` (folders created) and print it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
