"""The cache's cap with several processes making room at once: each build and private copy
claims its room under the cache's room lock, so a second process counts the first's work at
every step of it (stores/cache/room.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import CachedStore, CacheFullError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.stores.base import LocalSnapshot
from chroma_snapshots.stores.cache import builds
from chroma_snapshots.testing.trees import read_tree, write_tree

CHUNK = 4096
SIZE = 40 * CHUNK  # of each version
# the steps of a cache's build of a new version, and where the competing checkout runs
STEPS = ("before", "claimed", "built", "landed", "returned")


def _publish(tmp_path: Path, n: int) -> list[tuple[str, dict[str, bytes]]]:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    out = []
    for i in range(n):
        files = {"chroma.sqlite3": os.urandom(SIZE)}
        out.append((remote.publish("db", write_tree(tmp_path / f"src{i}", files)).version, files))
    return out


def _cache(tmp_path: Path, cap: int) -> CachedStore:
    """A cache of its own over the shared folder: as another process would open it (its own
    locks, pins and memory; only the folder is shared)."""
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    return CachedStore(remote, tmp_path / "cache", max_bytes=cap, min_free_bytes=0)


def _on_disk(cache: CachedStore) -> int:
    """Bytes of files in the cache's versions, private copies and builds in progress (not
    the copies' pin files)."""
    d = cache.dirs("db").root
    return sum(
        p.stat().st_size
        for sub in ("versions", "copies", "tmp")
        for p in (d / sub).rglob("*")
        if p.is_file() and ".pins" not in p.parts
    )


def _try(fn: Callable[[], LocalSnapshot]) -> LocalSnapshot | CacheFullError:
    try:
        return fn()
    except CacheFullError as e:
        return e


def _wrap(
    monkeypatch: pytest.MonkeyPatch,
    owner: object,
    name: str,
    hook: Callable[[], None],
    *,
    after: bool,
) -> None:
    """Run ``hook`` once, before or after the first call of ``owner.name``."""
    real, fired = getattr(owner, name), list[int]()

    def step(*args: Any, **kw: Any) -> Any:
        first = not fired
        fired.append(1)
        if first and not after:
            hook()
        got = real(*args, **kw)
        if first and after:
            hook()
        return got

    monkeypatch.setattr(owner, name, step)


@pytest.mark.parametrize("step", STEPS)
def test_a_second_process_making_room_counts_a_build_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    (v1, files1), (v2, files2) = _publish(tmp_path, 2)
    cap = SIZE + SIZE // 2  # one version fits, not two
    a, b = _cache(tmp_path, cap), _cache(tmp_path, cap)
    got: dict[str, LocalSnapshot | CacheFullError] = {}

    def b_checks_out() -> None:
        got["b"] = _try(lambda: b.checkout("db", v2))
        assert a.usage() <= cap  # (A's build partly written, or not)
        assert _on_disk(a) <= cap

    if step == "claimed":  # A has claimed its room; its download is next
        _wrap(monkeypatch, a.inner, "materialize", b_checks_out, after=False)
    elif step == "built":  # A's files are all written in its work folder
        _wrap(monkeypatch, a.inner, "materialize", b_checks_out, after=True)
    elif step == "landed":  # A's tree is in place, its claim not yet given back
        _wrap(monkeypatch, builds, "landed", b_checks_out, after=True)
    if step == "before":
        b_checks_out()
    got["a"] = _try(lambda: a.checkout("db", v1))
    if step == "returned":
        b_checks_out()

    served = {k: v for k, v in got.items() if isinstance(v, LocalSnapshot)}
    assert len(served) == 1, got  # one fits: exactly one is served, the other refused
    for k, snap in served.items():
        assert read_tree(snap.path) == (files1 if k == "a" else files2)
    # both still holding what they were served: the cap holds on disk and in the count
    assert a.usage() <= cap
    assert _on_disk(a) <= cap
    for snap in served.values():
        snap.release()
    assert not list((a.dirs("db").root / "building").glob("*/*"))  # every claim given back


def test_a_private_copy_claims_its_room_before_its_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (v1, files1), (v2, _) = _publish(tmp_path, 2)
    cap = 2 * SIZE + SIZE // 2  # the shared folder and one copy fit, not a third version
    holder, second, other = (_cache(tmp_path, cap) for _ in range(3))
    first = holder.checkout("db", v1)  # the shared folder, held
    got: dict[str, LocalSnapshot | CacheFullError] = {}

    def other_checks_out() -> None:
        got["other"] = _try(lambda: other.checkout("db", v2))

    _wrap(monkeypatch, second.inner, "materialize", other_checks_out, after=False)
    copy = second.checkout("db", v1)  # a private copy: ``other`` runs before it is written
    assert isinstance(got["other"], CacheFullError)
    assert read_tree(copy.path) == files1
    assert holder.usage() == 2 * SIZE
    assert _on_disk(holder) == 2 * SIZE
    copy.release()
    assert holder.usage() == SIZE  # the copy's claim went with it
    first.release()


_CLAIMER = """
import sys
from pathlib import Path
from chroma_snapshots.stores.cache.layout import NameDirs
from chroma_snapshots.stores.cache.room import claim_build
claim_build(NameDirs(Path(sys.argv[1])), sys.argv[2], int(sys.argv[3]))
print("claimed", flush=True)
sys.stdin.read()
"""


def test_a_live_processs_claim_counts_and_a_killed_ones_does_not(tmp_path: Path) -> None:
    ((v1, files1),) = _publish(tmp_path, 1)
    cache = _cache(tmp_path, 3 * SIZE)
    d = cache.dirs("db")
    with subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, str(d.root), v1, str(2 * SIZE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as claimer:
        assert claimer.stdout is not None
        assert claimer.stdout.readline() == "claimed\n"
        assert cache.usage() == 2 * SIZE  # another process's build in progress
        with pytest.raises(CacheFullError):  # 2 + 1.5 versions would pass a cap of 3
            _cache(tmp_path, 3 * SIZE - SIZE // 2).checkout("db", v1)
        claimer.kill()
    assert cache.usage() == 0  # its holder died: the claim is dropped, and removed
    assert list((d.root / "building").glob("*/*")) == []
    with cache.checkout("db", v1) as snap:
        assert cache.usage() == SIZE
        assert read_tree(snap.path) == files1
