"""A source file written while a publish reads the folder (an SQLite journal between its
truncate and its write) is refused, never recorded as a manifest whose chunks do not add up
to its sizes: such a manifest, once latest, made every read and publish of the name fail."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import chunking
from chroma_snapshots.engine.source import scan_source
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.stores import remote
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 16384


@pytest.mark.parametrize(
    ("before", "after"),
    # the last two: small files, read into a bundle (engine.bundles)
    [(0, 100), (0, 40_000), (40_000, 50_000), (40_000, 10_000), (CS, 0), (100, 101), (100, 99)],
)
def test_a_file_that_changes_size_after_the_scan_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: int, after: int
) -> None:
    src = write_tree(tmp_path / "src", {"keep": b"k" * 5000, "wal": os.urandom(before)})
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CS)
    first = store.publish("db", src).version
    (src / "keep").write_bytes(b"K" * 5000)  # a change: the next publish makes a version
    scan: Callable[..., object] = scan_source

    def scan_then_write(root: Path, *more: object) -> object:
        found = scan(root, *more)
        (src / "wal").write_bytes(os.urandom(after))  # right after the scan saw its size
        return found

    monkeypatch.setattr(remote, "scan_source", scan_then_write)
    with pytest.raises(InvalidInputError, match="changed while it was being published"):
        store.publish("db", src)
    monkeypatch.undo()
    assert store.current_version("db")[0] == first  # latest untouched, and still readable
    assert read_tree(store.checkout("db", dest=tmp_path / "out").path)["keep"] == b"k" * 5000
    again = store.publish("db", src)  # the next publish sees the file as it is now
    assert read_tree(store.checkout("db", again.version, tmp_path / "out2").path) == read_tree(src)


def _swap(path: Path, kind: str, outside: Path) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # nobody ever writes: a blocking open would wait forever
    elif kind == "symlink":
        path.symlink_to(outside)
    elif kind == "dir":
        path.mkdir()


@pytest.mark.parametrize("kind", ["deleted", "fifo", "symlink", "dir"])
@pytest.mark.parametrize("size", [100, 40_000])  # bundled, and read in chunks
def test_a_file_swapped_after_the_scan_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, size: int
) -> None:
    src = write_tree(tmp_path / "src", {"keep": b"k" * 5000, "wal": os.urandom(size)})
    outside = write_tree(tmp_path / "outside", {"secret": b"s" * size}) / "secret"
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CS)
    scan: Callable[..., object] = scan_source

    def scan_then_swap(root: Path, *more: object) -> object:
        found = scan(root, *more)
        _swap(src / "wal", kind, outside)
        return found

    monkeypatch.setattr(remote, "scan_source", scan_then_swap)
    with pytest.raises(InvalidInputError, match="wal: changed while it was being published"):
        store.publish("db", src, deadline=30)
    assert store.read_ref("db") is None  # nothing was published


@pytest.mark.parametrize("inner", ["", "deeper/"])  # the file's own folder, or one above it
@pytest.mark.parametrize("size", [100, 40_000])
def test_a_folder_swapped_for_a_link_after_the_scan_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, inner: str
) -> None:
    """O_NOFOLLOW covers a path's last component only: a folder on the path swapped for a
    link to a folder outside, holding a file of the same name and size, must not be read."""
    src = write_tree(tmp_path / "src", {"keep": b"k", f"sub/{inner}z.bin": b"z" * size})
    outside = write_tree(tmp_path / "outside", {f"{inner}z.bin": b"S" * size})
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CS)
    scan: Callable[..., object] = scan_source

    def scan_then_swap(root: Path, *more: object) -> object:
        found = scan(root, *more)
        (src / "sub").rename(tmp_path / "moved")
        (src / "sub").symlink_to(outside)
        return found

    monkeypatch.setattr(remote, "scan_source", scan_then_swap)
    with pytest.raises(InvalidInputError, match="a folder on its path was swapped for a link"):
        store.publish("db", src)
    assert store.read_ref("db") is None


def test_a_source_over_the_manifest_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # A sparse file of 2^23 chunks and one byte more (32 GiB at 4 KiB chunks) would read
    # as zeros until the deadline; the bound is known from the sizes alone.
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge.bin", "wb") as f:
        f.truncate((1 << 23) * 4096 + 1)
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    with pytest.raises(InvalidInputError, match="a manifest holds at most 8,388,608"):
        store.publish("db", src, deadline=60)
    assert not list(store.backend.list("db/packs/"))


@pytest.mark.parametrize(
    "paths",
    [("a", "A"), ("s", "\u017f"), ("ss", "\u00df"), ("\u03c3", "\u03c2"), ("a", "A/b")],
)
def test_paths_that_readers_refuse_are_refused_at_publish(
    tmp_path: Path, paths: tuple[str, str]
) -> None:
    # Readers refuse paths that clash once case-folded (and a path inside a file); a
    # publish that wrote them would leave latest unreadable for everyone.
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    first = store.publish("db", write_tree(tmp_path / "ok", {"x": b"x"})).version
    src = write_tree(tmp_path / "src", {p: p.encode() for p in paths})
    with pytest.raises(InvalidInputError, match="cannot be published"):
        store.publish("db", src)
    assert store.resolve("db").version == first
    assert store.verify("db", first).ok


def test_an_unreadable_source_file_says_so_not_that_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tree(tmp_path / "src", {"secret.bin": b"s", "ok.bin": b"o"})
    real = os.open

    def denied(path: str, *args: int, **kwargs: int) -> int:
        # as for another user's 0600 file (small files are opened in their folder)
        if str(path).endswith("/src/secret.bin") or str(path) == "secret.bin":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    with pytest.raises(
        InvalidInputError, match=r"secret.bin: cannot be read \(Permission denied\)"
    ):
        store.publish("db", src)


@pytest.mark.parametrize("size", [100, 3 * CS + 5])  # bundled, and read in chunks
def test_a_same_size_rewrite_after_the_scan_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A file rewritten in place at the same size after the scan saw it: no size check
    sees it; its ctime does (each write sets it to the clock). Before, the rewrite was
    published as read, mixed with the scan's view of every other file."""
    src = write_tree(tmp_path / "src", {"keep": b"k" * 5000, "db": b"A" * size})
    time.sleep(0.05)  # past the clock tick of the files' writes: the rewrite gets its own
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CS)
    scan: Callable[..., object] = scan_source

    def scan_then_rewrite(root: Path, *more: object) -> object:
        found = scan(root, *more)
        with open(src / "db", "r+b") as f:
            f.write(b"B" * size)
        return found

    monkeypatch.setattr(remote, "scan_source", scan_then_rewrite)
    with pytest.raises(InvalidInputError, match="db: changed while it was being published"):
        store.publish("db", src)
    assert store.read_ref("db") is None


def test_a_rewrite_while_a_file_is_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's torn publish, made deterministic: the rest of a file rewritten in place
    after its first chunk was read. Its chunks would mix two writes: A then B."""
    src = write_tree(tmp_path / "src", {"db": b"A" * (4 * CS)})
    time.sleep(0.05)  # past the clock tick of the file's write
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CS)
    real, reads = chunking.read_full, [0]

    def read_then_rewrite(fd: int, n: int) -> bytes:
        block = real(fd, n)
        reads[0] += 1
        if reads[0] == 1:
            os.pwrite(fd_w := os.open(src / "db", os.O_WRONLY), b"B" * (3 * CS), CS)
            os.close(fd_w)
        return block

    monkeypatch.setattr(chunking, "read_full", read_then_rewrite)
    with pytest.raises(InvalidInputError, match="written to as it was read"):
        store.publish("db", src)
    assert store.read_ref("db") is None
    monkeypatch.undo()
    published = store.publish("db", src)  # once the writer is done, the file as it is
    got = read_tree(store.checkout("db", published.version, tmp_path / "out").path)
    assert got["db"] == b"A" * CS + b"B" * (3 * CS)
