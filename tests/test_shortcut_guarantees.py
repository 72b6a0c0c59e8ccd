"""The data path's shortcuts keep the guarantees of the slow path (found by an independent
review): the cache's stamps tell a file moved to another path, a consumer's removed empty
folder comes back, and a publish trusting its stamp index refuses a folder written to
during the publish as a publish reading every file does."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import CachedStore, RemoteStore, open_backend
from chroma_snapshots.engine import bundles, chunking, source, stampindex
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.stores import remote
from chroma_snapshots.stores.cache import inspect
from chroma_snapshots.testing.conformance import read_tree


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _two_folders(src: Path) -> None:
    """Two folders of files of the same names and sizes: a build writes them in one clock
    tick, so their stamps but the inode are the same."""
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        for name, size in (("x", 100), ("y", 100_000)):
            (src / d / name).write_bytes(os.urandom(size))


def _swap(root: Path) -> None:
    os.rename(root / "a", root / "t")
    os.rename(root / "b", root / "a")
    os.rename(root / "t", root / "b")


@pytest.mark.parametrize("patch_in_place", [True, False])
def test_folders_a_consumer_swapped_in_a_cached_copy_are_repaired(
    tmp_path: Path, patch_in_place: bool
) -> None:
    """Renaming a folder changes no ctime of its files: the warm checkout, the refresh to
    a newer version and the copy to a dest served the swapped files."""
    src = tmp_path / "src"
    _two_folders(src)
    remote_store = RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))
    remote_store.publish("n", src)
    want = _digests(src)
    cache = CachedStore(remote_store, tmp_path / "cache", patch_in_place=patch_in_place)
    with cache.checkout("n") as snap:
        _swap(snap.path)
    with cache.checkout("n") as snap:
        assert _digests(snap.path) == want  # the warm checkout
        _swap(snap.path)
    (src / "new").write_bytes(b"n")
    remote_store.publish("n", src)  # a/ and b/ unchanged: the refresh reuses them
    with cache.checkout("n") as snap:
        assert _digests(snap.path) == _digests(src)
        _swap(snap.path)
    cache.checkout("n", dest=tmp_path / "dest")
    assert _digests(tmp_path / "dest") == _digests(src)


@pytest.mark.parametrize("how", ["removed", "a file", "a link", "nested removed"])
def test_an_empty_folder_a_consumer_removed_is_put_back(tmp_path: Path, how: str) -> None:
    """The manifest's empty folders were not checked: the warm checkout left one out, and
    the cache's verify said ok."""
    src = tmp_path / "src"
    (src / "e" / "deeper").mkdir(parents=True)
    (src / "a").write_bytes(b"a" * 100)
    remote_store = RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))
    remote_store.publish("n", src)
    cache = CachedStore(remote_store, tmp_path / "cache")
    with cache.checkout("n") as snap:
        path = snap.path
    gone = path / "e" / "deeper"
    shutil.rmtree(path / "e") if how == "nested removed" else gone.rmdir()
    if how == "a file":
        gone.write_bytes(b"intruder")
    elif how == "a link":
        gone.symlink_to(tmp_path)
    [entry] = inspect.entries(cache)
    assert "e/deeper/: an empty folder of the version, missing" in inspect.verify(cache, entry)
    with cache.checkout("n") as snap:
        assert (snap.path / "e" / "deeper").is_dir()
        assert not (snap.path / "e" / "deeper").is_symlink()
        assert not any((snap.path / "e" / "deeper").iterdir())
        assert read_tree(snap.path) == read_tree(src)
    assert inspect.verify(cache, entry) == []


@pytest.fixture
def past_racy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Files written just now are trusted by the stamp index as if long written (ctime
    cannot be set back), and the index lives in this test's folder."""
    monkeypatch.setattr(stampindex, "default_dir", lambda: tmp_path / "stamps")
    real = stampindex.stamp_of

    def later(st: os.stat_result, scanned_ns: int) -> stampindex.Stamp | None:
        return real(st, scanned_ns + 3 * stampindex.RACY_NS)

    monkeypatch.setattr(source, "stamp_of", later)


def _after_scan(monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]) -> None:
    real = remote.scan_source  # type: ignore[attr-defined]

    def scan(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        then()
        return found

    monkeypatch.setattr(remote, "scan_source", scan)


@pytest.mark.usefixtures("past_racy")
@pytest.mark.parametrize("stamps", [True, False])
@pytest.mark.parametrize("size", [100, 100_000])  # bundled, and a file of its own chunks
@pytest.mark.parametrize("change", ["rewrite", "replace", "remove", "chmod"])
def test_a_file_changed_after_the_scan_passed_it_refuses_the_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stamps: bool, size: int, change: str
) -> None:
    """A file the index let the publish skip was never checked again: a writer that
    changed it after the scan, then a file the scan had not reached, had the publish
    record a mix of its states that was never on disk (a publish reading every file
    refused it)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("p", "q"):
        (src / name).write_bytes(b"1" * size)
    store = RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))
    first = store.publish("n", src).version

    def write() -> None:
        p = src / "p"
        if change == "rewrite":
            p.write_bytes(b"2" * size)
        elif change == "replace":
            (src / "p.new").write_bytes(b"2" * size)
            os.replace(src / "p.new", p)
        elif change == "remove":
            p.unlink()
        else:
            p.chmod(0o600)

    _after_scan(monkeypatch, write)
    with pytest.raises(InvalidInputError, match="p: changed while"):
        store.publish("n", src, stamps=stamps)
    assert store.resolve("n").version == first  # nothing published


@pytest.mark.usefixtures("past_racy")
def test_an_unchanged_folder_still_publishes_from_its_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check re-reads no file: a publish with nothing changed opens none."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(20):  # f0 is bundled (1 byte), the others have chunks of their own
        (src / f"f{k}").write_bytes(bytes([k]) * (k * 10_000 + 1))
    opened: list[str] = []
    for module, name in ((chunking, "open_source"), (bundles, "open_in")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, _counted(real, opened))
    store = RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))
    store.publish("n", src)
    assert len(opened) == 20  # the first publish opens every file
    opened.clear()
    store.publish("n", src, allow_empty=True)
    assert opened == []


def _counted(real: Callable[..., int], opened: list[str]) -> Callable[..., int]:
    def call(path: str | Path, *args: Any) -> int:
        opened.append(str(path))
        return real(path, *args)

    return call
