"""benchmarks/live_copy.py runs end to end at a tiny size and measures what it says.

The README's live-writer figure comes from that script; this keeps it from rotting. How many
plain copies break is luck (where the writer is in its transaction), so only what must hold
is checked: every round is counted once, and every publish_client round validates.
"""

from __future__ import annotations

from pathlib import Path

from test_benchmarks import _run


def test_live_copy_smoke(tmp_path: Path) -> None:
    rows = _run("live_copy.py", "--copies", "2", "--records", "5", tmp=tmp_path)
    by = {str(r["approach"]): r for r in rows}
    assert set(by) == {"shutil.copytree + validate", "publish_client + checkout + validate"}
    for r in rows:
        assert r["rounds"] == 2
        assert r["passed"] + r["failed"] == 2
        assert sum(r["failures"].values()) == r["failed"]
    safe = by["publish_client + checkout + validate"]
    assert safe["passed"] == 2, safe["failures"]
    assert 2 <= safe["copies_taken"] <= 2 * 5  # up to 5 takes a round
    assert by["shutil.copytree + validate"]["copies_taken"] == 2
