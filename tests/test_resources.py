"""Resource exhaustion: a low open-file limit, and memory that stays bounded however large
the snapshot (ENOSPC in /tmp is tests/test_cache.py::test_enospc_on_a_small_tmpfs)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from reliability import record

from chroma_snapshots.testing.conformance import read_tree

WORKER = str(Path(__file__).with_name("resource_worker.py"))
MiB = 1 << 20


def _run(op: str, store: Path, tree: Path, nofile: int = 1024) -> int:
    cmd = [sys.executable, WORKER, op, str(store), str(tree), str(nofile)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def _big_tree(root: Path, size: int, files: int) -> Path:
    root.mkdir(parents=True)
    rng = random.Random(size)
    for i in range(files):
        with open(root / f"f{i:03d}.bin", "wb") as f:
            for _ in range(size // files // MiB):
                f.write(rng.randbytes(MiB))  # incompressible, every chunk distinct
    return root


def test_many_files_under_a_low_open_file_limit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):  # more files, and folders, than the limit allows open at once
        path = src / f"d{i % 100:02d}" / f"seg{i:03d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(3000) + bytes([i % 256]))
    _run("publish", tmp_path / "store", src, nofile=64)
    _run("checkout", tmp_path / "store", tmp_path / "out", nofile=64)
    assert read_tree(tmp_path / "out") == read_tree(src)
    # from a cache to dest: the copies of intact files held every file open (EMFILE)
    _run("cached", tmp_path / "store", tmp_path / "copy", nofile=64)
    assert read_tree(tmp_path / "copy") == read_tree(src)


def test_peak_memory_does_not_grow_with_snapshot_size(tmp_path: Path) -> None:
    peaks: dict[str, int] = {}
    # Memory is reads in flight (8 workers x up to 8 MiB), the allocator's arenas and the
    # interpreter: bounded by the concurrency, not by the snapshot (3 GiB figures in RESULTS.md).
    for size in (256 * MiB, 768 * MiB):
        label = f"{size // MiB} MiB"
        src = _big_tree(tmp_path / f"src{label}", size, files=4)
        store = tmp_path / f"store{label}"
        peaks[f"publish {label}"] = _run("publish", store, src)
        peaks[f"checkout {label}"] = _run("checkout", store, tmp_path / f"out{label}")
    record("peak-rss-mib", peaks)
    for op in ("publish", "checkout"):
        assert peaks[f"{op} 768 MiB"] < 300, peaks  # the bound
        assert peaks[f"{op} 768 MiB"] < 768 / 2, peaks  # streamed, never held whole
