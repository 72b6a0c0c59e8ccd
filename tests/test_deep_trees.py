"""Folder trees deeper than Python's recursion limit, as a consumer can make inside a cached
version: walked, repaired, verified and removed without RecursionError, links never followed."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chroma_snapshots import CachedStore, RemoteStore, StorageTimeoutError
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.engine.treewalk import walk
from chroma_snapshots.stores.cache.inspect import entries, verify
from chroma_snapshots.testing.conformance import read_tree, write_tree


def _chain(top: Path, depth: int, leaf: bytes = b"deep") -> None:
    """``top``/x/x/.../x (``depth`` folders) with a file at the bottom, made through dir
    fds: the path is longer than PATH_MAX from about 2,000 levels."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("x", dir_fd=fd)
            nxt = os.open("x", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        f = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, leaf)
        os.close(f)
    finally:
        os.close(fd)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """This module's own temp folder, removed with the library's removal even if a test
    fails: pytest's clean-up of old temp folders recurses, so a deep tree left in one
    would crash the end of a later test session."""
    path = Path(tempfile.mkdtemp(prefix="deep-trees-"))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-R", str(path)], capture_output=True, check=False)
        remove_tree(path)


def _late_at(n: int) -> Callable[[], None]:
    """A deadline check that raises at its ``n``-th call."""
    calls = [0]

    def check() -> None:
        calls[0] += 1
        if calls[0] >= n:
            raise StorageTimeoutError("deadline exceeded during checking the cached files")

    return check


@pytest.mark.parametrize("depth", [1200, 3000])
def test_a_deep_folder_chain_in_a_cached_version_is_removed(tmp_path: Path, depth: int) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"))
    files = {"a.bin": b"a" * 1000, "d/b.bin": b"b" * 10}
    remote.publish("db", write_tree(tmp_path / "src", files))
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db") as snap:
        _chain(snap.path, depth)
        _chain(snap.path / "d", depth)
    entry = entries(cached)[0]
    assert any("not in the manifest" in p for p in verify(cached, entry))
    with cached.checkout("db") as snap:  # repaired: the chains are gone
        assert read_tree(snap.path) == files
    assert verify(cached, entry) == []
    with cached.checkout("db") as snap:  # and removing a whole deep version works too
        _chain(snap.path, depth)
    assert cached.evict("db", entry.version)
    assert not any("leaf" in fs for _, _, fs in walk(tmp_path / "cache"))
    CachedStore(remote, tmp_path / "cache")  # opening the cache again sweeps nothing deep


def test_removal_never_follows_a_link_and_takes_any_depth(tmp_path: Path) -> None:
    outside = write_tree(tmp_path / "outside", {"keep.txt": b"keep", "sub/also.txt": b"also"})
    tree = tmp_path / "tree"
    tree.mkdir()
    _chain(tree, 2500)
    (tree / "link-dir").symlink_to(outside)
    (tree / "link-file").symlink_to(outside / "keep.txt")
    (tree / "locked").mkdir()
    (tree / "locked" / "f").write_bytes(b"x")
    (tree / "locked").chmod(0)
    remove_tree(tree)
    assert not os.path.lexists(tree)
    assert read_tree(outside) == {"keep.txt": b"keep", "sub/also.txt": b"also"}


def test_removal_checks_its_deadline_and_the_next_call_goes_on(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "junk").mkdir(parents=True)
    for i in range(1000):
        (tree / "junk" / f"f{i}").write_bytes(b"")
    with pytest.raises(StorageTimeoutError):
        remove_tree(tree, _late_at(5))
    left = len(os.listdir(tree / "junk"))
    assert 0 < left < 1000  # stopped part way, having removed some
    remove_tree(tree)
    assert not tree.exists()


def test_walk_is_os_walk_without_recursion(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"a": b"", "d/b": b"", "d/e/c": b"", "f/g": b""})
    (tree / "d" / "to-f").symlink_to(tree / "f")  # listed among folders, not entered
    (tree / "to-a").symlink_to(tree / "a")

    def listed(rows: object) -> list[tuple[str, list[str], list[str]]]:
        return sorted((p, sorted(ds), sorted(fs)) for p, ds, fs in rows)  # type: ignore[attr-defined]

    assert listed(walk(tree)) == listed(os.walk(tree))
    deep = tmp_path / "deep"
    deep.mkdir()
    _chain(deep, 1500)
    assert sum(len(fs) for _, _, fs in walk(deep)) == 1
    remove_tree(deep)  # pytest's own clean-up of old temp folders recurses


def test_removing_a_consumers_extra_files_checks_the_deadline(tmp_path: Path) -> None:
    # 300,000 files a consumer added made a timed-out repair raise 1.2 s late
    from chroma_snapshots.engine.beneath import Beneath
    from chroma_snapshots.stores.cache.repair import remove_extras

    remote = RemoteStore(FileBackend(tmp_path / "store"))
    files = {"a.bin": b"a" * 100}
    remote.publish("db", write_tree(tmp_path / "src", files))
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db") as snap:
        for i in range(1000):
            (snap.path / f"junk{i}").write_bytes(b"")
        tree, manifest = snap.path, remote.load_manifest("db", snap.info.version)
    with pytest.raises(StorageTimeoutError), Beneath(tree) as t:
        remove_extras(t, manifest, _late_at(4))
    assert 1 + 100 < len(os.listdir(tree)) < 1 + 1000  # stopped part way
    with cached.checkout("db") as snap:  # the next call goes on from there
        assert read_tree(snap.path) == files


@pytest.mark.parametrize("kind", ["tmpfs", "bind mount of a folder on the same disk"])
def test_nothing_on_a_file_system_mounted_inside_a_cached_version_is_touched(
    tmp_path: Path, kind: str
) -> None:
    # a consumer (or an operator) mounted something inside a cached version: the cache
    # neither deletes from it nor writes into it, and says why it cannot serve the version
    from chroma_snapshots import LocalDiskError

    remote = RemoteStore(FileBackend(tmp_path / "store"))
    files = {"a.bin": b"a" * 100, "sub/b.bin": b"b" * 10}
    remote.publish("db", write_tree(tmp_path / "src", files))
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db") as snap:
        version_dir = snap.path
    mounts = [version_dir / "extra", version_dir / "sub"]  # a stray folder, and a published one
    mounts[0].mkdir()
    try:
        for i, mnt in enumerate(mounts):
            # a bind mount has the device of what it covers: only its mount id differs
            source = tmp_path / f"theirs{i}"
            source.mkdir()
            how = ["-t", "tmpfs", "tmpfs"] if kind == "tmpfs" else ["--bind", str(source)]
            done = subprocess.run(["mount", *how, str(mnt)], check=False)
            if done.returncode != 0:
                pytest.fail("this test needs root to mount a tmpfs (CI runs as root)")
            (mnt / "keep.txt").write_bytes(b"keep")
            (mnt / "d").mkdir()
            (mnt / "d" / "x").write_bytes(b"x")
        with pytest.raises(LocalDiskError, match="mounted inside the version's folder"):
            cached.checkout("db")
        remove_tree(version_dir)  # what an eviction or `cache rm` does
        for mnt in mounts:
            assert read_tree(mnt) == {"keep.txt": b"keep", "d/x": b"x"}
    finally:
        for mnt in mounts:
            subprocess.run(["umount", str(mnt)], check=False)
    with cached.checkout("db") as snap:  # unmounted: served exactly again
        assert read_tree(snap.path) == files
