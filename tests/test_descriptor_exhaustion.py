"""Out of file descriptors (EMFILE) at every step: nothing leaks a descriptor, and a
failed checkout's work folder is removed once its own workers free theirs. Each case runs
in a process of its own (tests/fd_worker.py), which fills its descriptor table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.testing.conformance import read_tree, write_tree

WORKER = str(Path(__file__).with_name("fd_worker.py"))


def _worker(*args: object) -> dict[str, Any]:
    cmd = [sys.executable, WORKER, *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    said: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return said


def test_looking_above_a_folder_without_a_descriptor_leaks_none(tmp_path: Path) -> None:
    """With one descriptor free, a folder opens but the one above it cannot: the opening
    fails with the error, removing the folder leaves it (and raises nothing), and the
    descriptor is free again after both."""
    folder = write_tree(tmp_path / "f", {"a/b.bin": b"x"})
    said = _worker("looks", folder)
    assert said["beneath"] == "OSError"
    assert said["free_after"] is True
    assert said["folder_left"] is True
    assert said["leaked"] == []


def test_a_failed_builds_folder_is_removed_once_descriptors_are_free(tmp_path: Path) -> None:
    """Removing a failed build's folder with no descriptor free waits for some: the
    build's own workers free theirs as they end (here, 0.3 s later)."""
    folder = write_tree(tmp_path / "work", {f"d{i}/f{i}": b"x" for i in range(5)})
    said = _worker("waits", folder)
    assert said["folder_left"] is False
    assert said["leaked"] == []


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fds")
    files = {f"d{i % 5}/f{i}.bin": os.urandom(200_000 + i) for i in range(40)}
    src = write_tree(root / "src", files)
    store = RemoteStore(FileBackend(root / "store"))
    store.publish("db", src)
    store.close()
    return root / "store", src


@pytest.mark.parametrize("how", ["store", "drop", "cache", "cache-dest"])
@pytest.mark.parametrize("free", range(1, 17))
def test_a_checkout_out_of_descriptors_at_any_step_leaves_nothing(
    tmp_path: Path, published: tuple[Path, Path], free: int, how: str
) -> None:
    """A checkout with 1 to 16 descriptors free runs out at a different step each time
    (the work folder, the files, the packs, the threads' reads, a cache's claim and copy):
    it fails with a documented error or succeeds, and leaves no work folder beside dest or
    in the cache and no open descriptor, straight from the store (also dropping behind,
    which keeps finished files open for a last call) and through a cache."""
    store, src = published
    said = _worker("checkout", store, tmp_path / "out", free, how)
    assert said["cleaned_up"] is True
    assert said["leaked"] == []
    assert said["in_cache"] == [], said
    if said["result"] == "ok":
        assert said["beside"] == ([] if how == "cache" else ["out"])
        if how != "cache":
            assert read_tree(tmp_path / "out") == read_tree(src)
    else:
        assert said["result"] in ("LocalDiskError", "BackendUnavailableError"), said
        assert said["beside"] == [], said
