"""A process of the same user races a repair and a patch of a cached version, at every step
(before each file system call the cache makes, one call at a time, one run per call):
- it swaps a published folder for a link to its own files and leaves it there;
- it swaps the folder for a link to its own exact copy of those files for the length of
  one call, then puts it back;
- it puts a hard link to its own file in place of a cached file for the length of one
  call, then puts the cache's file back.
Nothing outside the cache is ever written, truncated, re-moded or deleted, every failure
is a documented error, and once everything is put back the next checkout is exact.

A review reproduced writes through such links when repairs resolved files by path, then
again (a hard link held for one call, a bundle read by path) after they used folder
descriptors; engine/beneath.py resolves everything through descriptors and checks that a
file it changes is the one its name still leads to.
"""

from __future__ import annotations

import builtins
import io
import os
import random
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.stores.base import LocalSnapshot
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096
# every os function a repair, a patch or the placer reaches a file or folder with
_CALLS = ("open", "stat", "lstat", "fstat", "unlink", "rmdir", "mkdir", "rename", "replace",
          "chmod", "fchmod", "truncate", "ftruncate", "pwritev", "pread", "read", "scandir",
          "listdir", "copy_file_range")  # fmt: skip
_OPENS = ((builtins, "open"), (io, "open"))  # buffered opens: pathlib's and the builtin


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    small = {f"a/s{i}.txt": rng.randbytes(30) for i in range(4)}  # one bundle chunk
    return {
        "a/data.bin": rng.randbytes(16 * CHUNK),
        "a/seg/x.bin": rng.randbytes(2 * CHUNK + 100),
        "top.bin": rng.randbytes(CHUNK - 1),
        **small,
    }


def _outside(root: Path, copy_of: dict[str, bytes] | None = None) -> Path:
    """The other process's own files: named as the cache's folder ``a`` has them (and as
    its extras), with other bytes, or with the same bytes (``copy_of``: its own copy)."""
    names = ["data.bin", "seg/x.bin", "extra.txt", "seg/junk", "s2.txt", "junk"]
    files = {n: f"mine: {n}".encode() * 50 for n in names}
    for path, data in (copy_of or {}).items():
        if path.startswith("a/"):
            files[path[2:]] = data
    tree = write_tree(root, files)
    os.chmod(tree / "data.bin", 0o600)
    return tree


def _state(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every entry below ``root`` (and root): its bytes (files), mode and links."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(p)
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[p.relative_to(root).as_posix()] = (data, st.st_mode, st.st_nlink)
    return out


def _damage(tree: Path) -> None:
    """What a consumer left: a changed file, a truncated one, a bundled file changed,
    extra files."""
    os.chmod(tree / "a/data.bin", 0o644)
    with open(tree / "a/data.bin", "r+b") as f:
        f.seek(5000)
        f.write(b"consumer")
    os.chmod(tree / "a/seg/x.bin", 0o644)
    os.truncate(tree / "a/seg/x.bin", 100)
    os.chmod(tree / "a/s2.txt", 0o644)
    (tree / "a/s2.txt").write_bytes(b"zz")
    (tree / "a/extra.txt").write_bytes(b"wal")
    (tree / "a/seg/junk").write_bytes(b"scratch")


class RaceAt:
    """Around the ``k``-th file system call a checkout makes: ``attack()`` before it, and
    (``during``) ``undo()`` right after it; else ``undo()`` at :meth:`put_back`."""

    def __init__(self, k: int, attack: Callable[[], None], undo: Callable[[], None], during: bool):
        self.k, self.attack, self.undo, self.during = k, attack, undo, during
        self.calls, self.hit, self.undone, self.busy = 0, False, False, False
        self.failed: OSError | None = None
        self.lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in _CALLS:
            monkeypatch.setattr(os, name, self._counting(getattr(os, name)))
        for owner, name in _OPENS:
            monkeypatch.setattr(owner, name, self._counting(getattr(owner, name)))

    def _counting(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            if self.busy:  # the racing process's own calls
                return real(*args, **kw)
            with self.lock:  # the placer's worker threads call too
                hit = self.calls == self.k
                self.calls += 1
            if hit:
                self._as_racer(self.attack)
                self.hit = True
            try:
                return real(*args, **kw)
            finally:
                if hit and self.during:
                    self.put_back()

        return call

    def _as_racer(self, step: Callable[[], None]) -> None:
        self.busy = True
        try:
            step()
        except OSError as e:  # the racer's own failure: a test bug, never the cache's
            self.failed = e
        finally:
            self.busy = False

    def put_back(self) -> None:
        if self.hit and not self.undone:
            self.undone = True
            self._as_racer(self.undo)


def _where(tree: Path) -> Path:
    """Where a cached version's tree is now: a patch moves it into the cache's ``tmp/``
    and then publishes it as the new version (the racer follows it)."""
    for top in [tree, *sorted((tree.parent.parent / "tmp").glob("*")), *tree.parent.glob("*")]:
        if top.is_dir() and os.path.lexists(top / "a"):
            return top
    return tree


def _replace(
    tree: Path, rel: str, stash: Path, put: Callable[[Path], None]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Move ``rel`` of ``tree`` aside (into ``stash``, out of the cache) and ``put(path)``
    something of the racer's in its place; and put the cache's back (whatever the cache
    left at the name meanwhile goes). A patch may move the tree on: the racer follows."""
    hidden = stash / "aside"

    def attack() -> None:
        target = _where(tree) / rel
        if os.path.lexists(target):  # (not while a patch renames the tree)
            os.rename(target, hidden)
            put(target)

    def undo() -> None:
        target = _where(tree) / rel
        if not hidden.exists() or not target.parent.exists():  # nowhere to put it back
            return
        if os.path.lexists(target):
            remove_tree(target)
        with suppress(FileNotFoundError):  # a worker thread moved the tree on meanwhile
            os.rename(hidden, target)

    return attack, undo


def _link_to(outside: Path) -> Callable[[Path], None]:
    return lambda path: os.symlink(outside, path)


def _hard_link_to(victim: Path) -> Callable[[Path], None]:
    return lambda path: os.link(victim, path)


Attack = Callable[[Path, Path, Path], tuple[Callable[[], None], Callable[[], None]]]
ATTACKS: dict[str, tuple[Attack, bool, bool]] = {  # how, during one call only, exact copy
    "folder -> link, left": (lambda t, o, s: _replace(t, "a", s, _link_to(o)), False, False),
    "nested folder -> link, left":
        (lambda t, o, s: _replace(t, "a/seg", s, _link_to(o / "seg")), False, False),
    "folder -> link, one call": (lambda t, o, s: _replace(t, "a", s, _link_to(o)), True, False),
    "folder -> link to a copy, one call":
        (lambda t, o, s: _replace(t, "a", s, _link_to(o)), True, True),
    "file -> hard link, one call":
        (lambda t, o, s: _replace(t, "a/data.bin", s, _hard_link_to(o / "data.bin")), True, False),
}  # fmt: skip


@contextmanager
def _racing(monkeypatch: pytest.MonkeyPatch, race: RaceAt) -> Iterator[RaceAt]:
    race.install(monkeypatch)
    try:
        yield race
    finally:
        monkeypatch.undo()
        race.put_back()


def _checkout(cached: CachedStore, version: str, dest: Path | None) -> LocalSnapshot | str:
    """A checkout: served (held), or the name of a documented error (never another)."""
    try:
        return cached.checkout("db", version, dest)
    except SnapshotError as e:
        return type(e).__name__


def _sweep(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    attack: str,
    ready: Callable[[], tuple[Path, str, dict[str, bytes]]],
    cached: CachedStore,
    patch: bool = False,
    dest: Path | None = None,
) -> dict[str, int]:
    """Run ``attack`` at every call boundary of the checkout ``ready()`` sets up (it
    returns the tree to attack, the version to check out and that version's files);
    ``dest``: a private copy there. The store places with one worker thread, so the calls
    come in the same order every run and each run's attack lands at its own call."""
    how, during, copy = ATTACKS[attack]
    tree, version, files = ready()
    outside = _outside(tmp_path / "outside", files if copy else None)
    before = _state(outside)
    with _racing(monkeypatch, RaceAt(10**9, lambda: None, lambda: None, False)) as dry:
        served = _checkout(cached, version, dest)  # no race: counts the calls
    assert isinstance(served, LocalSnapshot)
    served.release()
    remove_tree(dest) if dest else None
    assert dest or tree.exists() != patch  # a patch took the old tree; a repair kept it
    outcomes: dict[str, int] = {}
    misses = 0
    for k in range(dry.calls):
        tree, version, files = ready()
        stash = tmp_path / "stash" / str(k)  # what the racer moved aside this round
        stash.mkdir(parents=True)
        with _racing(monkeypatch, RaceAt(k, *how(tree, outside, stash), during)) as race:
            served = _checkout(cached, version, dest)
        got = "served" if isinstance(served, LocalSnapshot) else served
        if isinstance(served, LocalSnapshot):
            with served as snap:  # a race over at once: what was served is exact
                assert not during or read_tree(snap.path) == files, f"{attack}: at call {k}"
        remove_tree(dest) if dest else None
        misses += not race.hit  # none: one worker thread, so every run takes the dry run's path
        assert race.failed is None, f"the race itself failed at call {k}: {race.failed}"
        outcomes[got] = outcomes.get(got, 0) + 1
        assert _state(outside) == before, f"{attack}: outside changed at call {k}"
        with cached.checkout("db", version) as snap:  # put back: the next one is exact
            assert read_tree(snap.path) == files, f"{attack}: after the race at call {k}"
    assert dry.calls > 50  # the sweep reached the repair's and the placer's steps
    assert misses == 0, f"{misses} of {dry.calls} runs ended before their race"
    return outcomes


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_race_at_every_step_of_a_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack: str
) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK, workers=1)
    files = _files(1)
    version = remote.publish("db", write_tree(tmp_path / "src", files)).version
    cached = CachedStore(remote, tmp_path / "cache")

    def ready() -> tuple[Path, str, dict[str, bytes]]:
        with cached.checkout("db", version) as snap:
            tree = snap.path
        _damage(tree)
        return tree, version, files

    outcomes = _sweep(tmp_path, monkeypatch, attack, ready, cached)
    assert outcomes.get("served", 0) > 0  # races before and after the repair's steps


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_race_at_every_step_of_a_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack: str
) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK, workers=1)
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

    outcomes = _sweep(tmp_path, monkeypatch, attack, ready, cached, patch=True)
    assert outcomes.get("served", 0) > 0


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("target", ["cached version", "work folder beside dest"])
def test_a_race_at_every_step_of_a_private_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack: str, target: str
) -> None:
    # the copy to dest went by path: through a link in its work folder it wrote outside,
    # and through one in the cached version it copied the other process's bytes
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK, workers=1)
    files = _files(1)
    version = remote.publish("db", write_tree(tmp_path / "src", files)).version
    cached = CachedStore(remote, tmp_path / "cache")
    dest = tmp_path / "out" / "copy"

    def ready() -> tuple[Path, str, dict[str, bytes]]:
        with cached.checkout("db", version) as snap:
            tree = snap.path
        return (tree if target == "cached version" else dest), version, files

    _sweep(tmp_path, monkeypatch, attack, ready, cached, dest=dest)
