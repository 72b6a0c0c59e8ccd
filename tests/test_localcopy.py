"""Incremental checkouts copy unchanged runs from intact cached files (engine/localcopy.py)
and fall back to verified reads whenever a source is not provably intact."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from chroma_snapshots import CachedStore, CacheFullError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import localcopy, placer, transfer
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096


@pytest.fixture
def cached(tmp_path: Path) -> CachedStore:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK, pack_target=16 * CHUNK)
    # the copying path (an older version kept, e.g. pinned); patching: test_cache_patch.py
    return CachedStore(remote, tmp_path / "cache", patch_in_place=False)


@pytest.fixture
def verified_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Digests read back from local copies through the hash-checking path."""
    seen: list[str] = []
    read = transfer.LocalChunks.read

    def counting(self: transfer.LocalChunks, digest: str) -> bytes | None:
        seen.append(digest)
        return read(self, digest)

    monkeypatch.setattr(transfer.LocalChunks, "read", counting)
    return seen


def _two_versions(cached: CachedStore, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Publish and cache v1, then publish v2 (two chunks of one file changed); returns
    v1's cached tree and v2's files."""
    rng = random.Random(7)
    src = write_tree(
        tmp_path / "src",
        {"db.sqlite3": rng.randbytes(64 * CHUNK), "seg/data.bin": rng.randbytes(32 * CHUNK)},
    )
    cached.publish("db", src)
    with cached.checkout("db") as snap:
        v1 = snap.path
    with open(src / "db.sqlite3", "r+b") as f:
        for page in (3, 40):
            f.seek(page * CHUNK)
            f.write(rng.randbytes(CHUNK))
    cached.publish("db", src)
    return v1, read_tree(src)


def test_unchanged_runs_are_copied_not_reread(
    cached: CachedStore, tmp_path: Path, verified_reads: list[str]
) -> None:
    _, want = _two_versions(cached, tmp_path)
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == want
        assert snap.stats.bytes_downloaded > 0  # the two changed chunks
    # every unchanged chunk came by copy_file_range; what was read back and hashed is at
    # most the bases of the two changed chunks (stored as deltas against them)
    assert len(verified_reads) <= 2


def test_a_consumer_write_to_the_old_copy_is_not_copied(
    cached: CachedStore, tmp_path: Path, verified_reads: list[str]
) -> None:
    v1, want = _two_versions(cached, tmp_path)
    path = v1 / "seg/data.bin"
    st = os.stat(path)
    with open(path, "r+b") as f:  # a consumer writes in place and puts the mtime back
        f.seek(5 * CHUNK)
        f.write(b"\0" * CHUNK)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == want
    assert len(verified_reads) > 2  # that file went through the hash-checked path


def test_a_source_written_during_the_copy_is_redone_verified(
    cached: CachedStore,
    tmp_path: Path,
    verified_reads: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1, want = _two_versions(cached, tmp_path)
    real = localcopy.copy_runs

    def scribble_then_copy(src: int, dst: int, runs: list[tuple[int, int, int]], cs: int) -> None:
        # a consumer writes after the source was found intact, before its bytes are copied
        for name in ("db.sqlite3", "seg/data.bin"):
            with open(v1 / name, "r+b") as f:
                f.write(b"\xff" * 16)
        real(src, dst, runs, cs)

    monkeypatch.setattr(placer, "copy_runs", scribble_then_copy)
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == want
    assert len(verified_reads) > 2


def test_a_filesystem_that_cannot_copy_falls_back(
    cached: CachedStore,
    tmp_path: Path,
    verified_reads: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, want = _two_versions(cached, tmp_path)

    def refuse(*args: int) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == want
    assert len(verified_reads) > 2


def test_a_full_disk_during_the_copy_is_cache_full(
    cached: CachedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_versions(cached, tmp_path)

    def full(*args: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(CacheFullError):
        cached.checkout("db")
    assert not list((cached.dirs("db").root / "tmp").iterdir())  # nothing half-written left
