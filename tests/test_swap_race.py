"""A process of the same user swaps a published folder of a cached version for a link to
its own files, at every step of a repair and of a patch (before each file system call the
cache makes, one call at a time): nothing outside the cache is ever written, truncated,
re-moded or deleted, and once the folder is put back the next checkout is exact.

A review reproduced writes through such a link in 13 of 30 racing rounds when repairs
resolved files by path; engine/beneath.py resolves them through folder descriptors.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.localfs import remove_tree
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096
# every os function a repair, a patch or the placer reaches a file or folder with
_CALLS = ("open", "stat", "lstat", "fstat", "unlink", "rmdir", "mkdir", "rename", "replace",
          "chmod", "fchmod", "truncate", "ftruncate", "pwritev", "pread", "scandir",
          "listdir", "copy_file_range")  # fmt: skip


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "a/data.bin": rng.randbytes(16 * CHUNK),
        "a/seg/x.bin": rng.randbytes(2 * CHUNK + 100),
        "top.bin": rng.randbytes(CHUNK - 1),
    }


def _outside(root: Path) -> Path:
    """The consumer's own files, named as the cache's are (and as its extras are)."""
    names = ["data.bin", "seg/x.bin", "extra.txt", "seg/junk", "x.bin", "junk"]
    return write_tree(root, {n: f"mine: {n}".encode() * 50 for n in names})


def _state(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry below ``root`` (and root): its bytes (files) and its mode."""
    out: dict[str, tuple[bytes | None, int]] = {".": (None, os.lstat(root).st_mode)}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[p.relative_to(root).as_posix()] = (data, st.st_mode)
    return out


def _damage(tree: Path) -> None:
    """What a consumer left: a changed file, a truncated one, extra files."""
    os.chmod(tree / "a/data.bin", 0o644)
    with open(tree / "a/data.bin", "r+b") as f:
        f.seek(5000)
        f.write(b"consumer")
    os.chmod(tree / "a/seg/x.bin", 0o644)
    os.truncate(tree / "a/seg/x.bin", 100)
    (tree / "a/extra.txt").write_bytes(b"wal")
    (tree / "a/seg/junk").write_bytes(b"scratch")


class SwapAt:
    """Before the ``k``-th call of the os functions a checkout makes, move ``folder`` out
    of the tree and put a link to ``outside`` in its place (at most once)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, outside: Path, k: int):
        self.folder, self.outside, self.k = folder, outside, k
        self.hidden = folder.with_name(f".{folder.name}.real")
        self.calls, self.swapped = 0, False
        self.real = {name: getattr(os, name) for name in _CALLS}
        for name in _CALLS:
            monkeypatch.setattr(os, name, self._counting(name))

    def _counting(self, name: str) -> Callable[..., Any]:
        real = self.real[name]

        def call(*args: Any, **kw: Any) -> Any:
            if self.calls == self.k and not self.swapped:
                self.swapped = True
                self.real["rename"](self.folder, self.hidden)
                os.symlink(self.outside, self.folder)
            self.calls += 1
            return real(*args, **kw)

        return call

    def put_back(self) -> None:
        """The consumer undoes its swap (a folder the cache made meanwhile goes)."""
        if self.hidden.exists():
            if os.path.islink(self.folder):
                os.unlink(self.folder)
            else:
                remove_tree(self.folder)
            os.rename(self.hidden, self.folder)


@contextmanager
def _attack(
    monkeypatch: pytest.MonkeyPatch, folder: Path, outside: Path, k: int
) -> Iterator[SwapAt]:
    swap = SwapAt(monkeypatch, folder, outside, k)
    try:
        yield swap
    finally:
        monkeypatch.undo()
        swap.put_back()


def _checkout_under(attack: SwapAt, cached: CachedStore, version: str) -> str:
    """A checkout while the attack runs: served, or a documented error (never another)."""
    try:
        with cached.checkout("db", version):
            return "served"
    except SnapshotError as e:
        return type(e).__name__


def _sweep(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    relfolder: str,
    ready: Callable[[], tuple[Path, str, dict[str, bytes]]],
    cached: CachedStore,
    patch: bool = False,
) -> dict[str, int]:
    """Run the attack at every call boundary of the checkout ``ready()`` sets up: its
    cached tree, the version to check out and that version's files."""
    outside = _outside(tmp_path / "outside")
    before = _state(outside)
    tree, version, files = ready()
    with _attack(monkeypatch, tree / relfolder, outside, 10**9) as dry:  # no swap: counts
        assert _checkout_under(dry, cached, version) == "served"
    assert tree.exists() != patch  # a patch took the old tree; a repair kept it
    outcomes: dict[str, int] = {}
    for k in range(dry.calls):
        tree, version, files = ready()
        with _attack(monkeypatch, tree / relfolder, outside, k) as attack:
            got = _checkout_under(attack, cached, version)
        assert attack.swapped, f"call {k} of {dry.calls}"
        outcomes[got] = outcomes.get(got, 0) + 1
        assert _state(outside) == before, f"outside changed with the swap before call {k}"
        with cached.checkout("db", version) as snap:  # put back: the next one is exact
            assert read_tree(snap.path) == files, f"swap before call {k}"
    assert dry.calls > 50  # the sweep reached the repair's and the placer's steps
    return outcomes


@pytest.mark.parametrize("relfolder", ["a", "a/seg"])
def test_a_folder_swapped_for_a_link_at_every_step_of_a_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relfolder: str
) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    files = _files(1)
    version = remote.publish("db", write_tree(tmp_path / "src", files)).version
    cached = CachedStore(remote, tmp_path / "cache")

    def ready() -> tuple[Path, str, dict[str, bytes]]:
        with cached.checkout("db", version) as snap:
            tree = snap.path
        _damage(tree)
        return tree, version, files

    outcomes = _sweep(tmp_path, monkeypatch, relfolder, ready, cached)
    assert outcomes.get("served", 0) > 0  # swaps before and after the repair's steps


def test_a_folder_swapped_for_a_link_at_every_step_of_a_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    trees = [_files(1), _files(1)]
    trees[1]["a/data.bin"] = trees[1]["a/data.bin"][:9000] + b"v2" + trees[1]["a/data.bin"][9002:]
    trees[1]["a/seg/new.bin"] = b"new" * 100
    versions = [
        remote.publish("db", write_tree(tmp_path / f"src{i}", t)).version
        for i, t in enumerate(trees)
    ]
    cached = CachedStore(remote, tmp_path / "cache")

    def ready() -> tuple[Path, str, dict[str, bytes]]:
        """v1 cached and damaged, v2 not: v2 is patched from it."""
        with cached.checkout("db", versions[0]) as snap:  # itself patched from v2
            tree = snap.path
        cached.evict("db", versions[1])
        _damage(tree)
        return tree, versions[1], trees[1]

    outcomes = _sweep(tmp_path, monkeypatch, "a", ready, cached, patch=True)
    assert outcomes.get("served", 0) > 0
