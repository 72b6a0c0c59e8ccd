"""Shared output for the benchmark scripts: an aligned table and optional JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | None, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON to ``path`` (creating its folder), if a path was given."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2))
