"""A file system mounted exactly over a folder the library is about to remove (a work
folder before its rename, a held copy before its release, a leftover swept at open) is
left alone with everything on it. It was emptied: the removal took the mount it found at
the folder as the one to stay on. Each test bind-mounts another folder there, at the step
the removal follows, and checks that folder's files afterwards. A cached version with a
mount inside it is not evicted either (it was moved to tmp/ and reported evicted, freeing
none of the mount's space): eviction for room takes the next one, `cache rm` the others."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_inprocess import Run

from chroma_snapshots import CachedStore, LocalDiskError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import localfs, workdir
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.opening import open_store
from chroma_snapshots.stores.cache.inspect import entries
from chroma_snapshots.stores.cache.layout import NameDirs
from chroma_snapshots.testing.conformance import read_tree, write_tree

THEIRS = {"keep.txt": b"keep", "sub/deep.txt": b"deep"}


@contextmanager
def _bound(source: Path, target: Path) -> Iterator[None]:
    """``source`` bind-mounted at ``target`` while the block runs (and unmounted after)."""
    target.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "--bind", str(source), str(target)], check=False).returncode:
        pytest.fail("this test needs root to bind-mount a folder (CI runs as root)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.fixture
def theirs(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "theirs", THEIRS)


@pytest.fixture
def remote(tmp_path: Path) -> RemoteStore:
    return RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)


def _version(remote: RemoteStore, tmp_path: Path, seed: int = 1) -> str:
    files = {"a/data.bin": os.urandom(3 * 4096 + seed), "b.txt": b"b" * seed}
    return remote.publish("db", write_tree(tmp_path / f"src{seed}", files)).version


def test_a_mount_over_the_cache_work_folder_before_its_rename(
    tmp_path: Path, theirs: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _version(remote, tmp_path)
    cached = CachedStore(remote, tmp_path / "cache")
    real_meta = NameDirs.write_meta
    mounted: list[Path] = []

    def meta_then_mount(d: NameDirs, v: str, work: Path, *a: object) -> None:
        real_meta(d, v, work, *a)  # type: ignore[arg-type]
        subprocess.run(["mount", "--bind", str(theirs), str(work)], check=True)
        mounted.append(work)

    monkeypatch.setattr(NameDirs, "write_meta", meta_then_mount)
    try:
        with pytest.raises(LocalDiskError):  # the rename of a mount point: EBUSY
            cached.checkout("db", version)
        assert read_tree(mounted[0]) == THEIRS
    finally:
        for m in mounted:
            subprocess.run(["umount", str(m)], check=False)
    assert read_tree(theirs) == THEIRS
    monkeypatch.undo()
    with CachedStore(remote, tmp_path / "cache").checkout("db", version) as snap:
        assert (snap.path / "b.txt").read_bytes() == b"b"


def test_a_mount_over_the_dest_work_folder_before_its_rename(
    tmp_path: Path, theirs: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _version(remote, tmp_path)
    real_move = localfs.move_into_place
    mounted: list[Path] = []

    def mount_then_move(work: Path, final: Path) -> None:
        subprocess.run(["mount", "--bind", str(theirs), str(work)], check=True)
        mounted.append(work)
        real_move(work, final)

    monkeypatch.setattr(localfs, "move_into_place", mount_then_move)
    dest = tmp_path / "out" / "db"
    try:
        with pytest.raises(LocalDiskError):
            remote.checkout("db", version, dest)
        assert read_tree(mounted[0]) == THEIRS
    finally:
        for m in mounted:
            subprocess.run(["umount", str(m)], check=False)
    assert read_tree(theirs) == THEIRS
    assert not dest.exists()


def test_a_mount_over_a_held_copy_before_its_release(
    tmp_path: Path, theirs: Path, remote: RemoteStore
) -> None:
    version = _version(remote, tmp_path)
    first = CachedStore(remote, tmp_path / "cache")
    with first.checkout("db", version) as held:
        for meta in (held.path.parent.parent / "meta").iterdir():
            meta.unlink()  # a second checkout now gets a copy of its own
        second = CachedStore(remote, tmp_path / "cache").checkout("db", version)
        assert "copies" in second.path.parts
        with _bound(theirs, second.path):
            second.release()  # removes the copy's folder
            assert read_tree(second.path) == THEIRS
    assert read_tree(theirs) == THEIRS


@pytest.mark.parametrize("where", ["tmp", "copies"])
def test_a_mount_over_a_leftover_swept_at_open(
    tmp_path: Path, theirs: Path, remote: RemoteStore, where: str
) -> None:
    version = _version(remote, tmp_path)
    with CachedStore(remote, tmp_path / "cache").checkout("db", version) as snap:
        root = snap.path.parent.parent
    # a killed materializer's work folder; a copy whose holder is gone (its pin is free)
    leftover = root / where / (f"{version}.1.deadbeef" if where == "tmp" else f"{version}.1-x")
    with _bound(theirs, leftover):
        CachedStore(remote, tmp_path / "cache")  # opening sweeps leftovers
        assert read_tree(leftover) == THEIRS
    assert read_tree(theirs) == THEIRS
    remove_tree(leftover)  # unmounted: an ordinary leftover again, and removable
    assert not leftover.exists()


def test_a_mount_over_an_old_dest_work_folder_swept_by_the_next_checkout(
    tmp_path: Path, theirs: Path, remote: RemoteStore
) -> None:
    version = _version(remote, tmp_path)
    dest = tmp_path / "out" / "db"
    prefix, _, _ = workdir.work_names(dest.name)
    leftover = dest.parent / f"{prefix}abcd1234.tmp"  # a killed checkout's, by its name
    with _bound(theirs, leftover):
        old = time.time() - 2 * workdir.LEFTOVER_AGE
        os.utime(leftover, (old, old))
        with remote.checkout("db", version, dest) as snap:
            assert (snap.path / "b.txt").read_bytes() == b"b"
        assert read_tree(leftover) == THEIRS
    assert read_tree(theirs) == THEIRS


@pytest.mark.usefixtures("clean_env")
def test_a_version_with_a_mount_inside_is_not_evicted_and_the_others_are(
    tmp_path: Path, theirs: Path, run: Run
) -> None:
    base = ["--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    v1, v2, v3 = (_version(remote, tmp_path, seed) for seed in (1, 2, 3))
    cache = open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    assert isinstance(cache, CachedStore)
    with cache.checkout("db", v1) as snap, cache.checkout("db", v2):  # both stay cached
        mount = snap.path / "a" / "mnt"
    with _bound(theirs, mount):
        with pytest.raises(LocalDiskError, match="mounted at this cached version or inside"):
            cache.evict("db", v1)
        assert [e.version for e in entries(cache)] == [v1, v2]  # still complete, still listed
        # room for v3 is made by evicting v2, the next least recently used
        small = CachedStore(cache.inner, tmp_path / "cache", max_bytes=32768, patch_in_place=False)
        with small.checkout("db", v3) as snap3:
            assert (snap3.path / "b.txt").read_bytes() == b"bbb"
        assert sorted(e.version for e in entries(cache)) == sorted([v1, v3])
        code, out, err = run(*base, "cache", "rm", "db")
        assert code == 1
        assert f"evicted db/{v3}" in out
        assert f"kept db/{v1}: a file system is mounted" in out
        assert f"not evicted: db/{v1}" in err
        assert read_tree(mount) == THEIRS
    assert read_tree(theirs) == THEIRS
    code, out, _ = run(*base, "cache", "rm", "db")  # unmounted: it goes
    assert code == 0
    assert f"evicted db/{v1}" in out
    assert entries(cache) == []


def test_a_file_system_at_the_cache_tmp_folder_is_named_in_the_error(
    tmp_path: Path, theirs: Path, remote: RemoteStore
) -> None:
    # it was a raw EXDEV, then "mounted at this cached version", naming a version with none
    version = _version(remote, tmp_path)
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db", version) as snap:
        tmp = snap.path.parent.parent / "tmp"
    with _bound(theirs, tmp):
        with pytest.raises(LocalDiskError, match="mounted at the cache's tmp/ or versions/"):
            cached.evict("db", version)
        assert read_tree(theirs) == THEIRS
    assert cached.evict("db", version)  # unmounted: it goes
