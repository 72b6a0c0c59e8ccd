"""Knobs shared by the reliability tests: how many runs, and where the figures go.

CI runs a small fixed subset. ``nox -s reliability`` sets CHROMA_SNAPSHOTS_RELIABILITY=long
for the full counts and CHROMA_SNAPSHOTS_FIGURES=DIR to write each test's outcome counts
as JSON (docs/RELIABILITY.md is written from them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

LONG = os.environ.get("CHROMA_SNAPSHOTS_RELIABILITY") == "long"


def runs(ci: int, long: int) -> int:
    """How many runs a reliability test makes in this mode."""
    return long if LONG else ci


def record(figure: str, outcomes: Mapping[str, object]) -> None:
    """Write ``outcomes`` as the JSON figure ``figure`` if a figures folder is set."""
    folder = os.environ.get("CHROMA_SNAPSHOTS_FIGURES")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        data = dict(sorted(outcomes.items()))
        (Path(folder) / f"{figure}.json").write_text(json.dumps(data, indent=2, default=str))
