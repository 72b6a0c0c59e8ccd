"""The cache's cap with several processes making room at once: each build and private copy
claims its room under the cache's room lock, so a second process counts the first's work at
every step of it (stores/cache/room.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import CachedStore, CacheFullError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.folders import new_folder
from chroma_snapshots.stores.base import LocalSnapshot
from chroma_snapshots.stores.cache import builds
from chroma_snapshots.stores.cache.room import claim_build, end_build, room_lock
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


# Hand damage in the cache's own folders (a review): a link is never followed, a file or a
# FIFO where a folder or a claim belongs neither hangs nor breaks a count or a checkout.

_FOLDERS = (".", "building", "building/V", "meta", "tmp", "locks", "pins/V", "copies",
            "copies/.pins", "refs", "versions")  # fmt: skip


def _decoy(tmp_path: Path, v: str) -> dict[str, bytes]:
    """Files a clean-up would take if it followed a link here: names of pins, meta files,
    work folders and temp files (and a version's)."""
    files = {"notes.txt": b"keep", f"{v}.manifest": b"m", "123-" + "a" * 32: b"pin",
             f"{v}.1.abcdef01/x": b"work", ".r.0.tmp": b"t", f"{v}/a": b"x"}  # fmt: skip
    write_tree(tmp_path / "decoy", files)
    for p in (tmp_path / "decoy").rglob("*"):
        os.utime(p, (1, 1))  # old: past any age a sweep waits for
    return files


@pytest.mark.parametrize("where", _FOLDERS)
def test_a_link_at_a_cache_folders_name_is_never_followed(tmp_path: Path, where: str) -> None:
    (v1, files1), (v2, files2) = _publish(tmp_path, 2)
    cap = 2 * SIZE + SIZE // 2
    cache = _cache(tmp_path, cap)
    cache.checkout("db", v1).release()
    cache.checkout("db", v2).release()  # every folder exists, pins and copies' too
    decoy = _decoy(tmp_path, v1)
    at = cache.dirs("db").root / where.replace("V", v1)
    if at.is_dir():
        shutil.rmtree(at)
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(tmp_path / "decoy")
    fresh = _cache(tmp_path, cap)  # its open sweeps what dead processes left
    assert fresh.usage() <= cap
    with fresh.checkout("db", v1) as a, _cache(tmp_path, cap).checkout("db", v1) as b:
        assert read_tree(a.path) == read_tree(b.path) == files1  # the shared one and a copy
        assert fresh.usage() <= cap
    with fresh.checkout("db", v2) as c:
        assert read_tree(c.path) == files2
    assert read_tree(tmp_path / "decoy") == decoy  # nothing removed or added there
    assert not at.is_symlink()


@pytest.mark.parametrize("what", ["building-file", "version-file", "claim-folder", "claim-fifo"])
def test_a_file_or_fifo_where_a_claim_belongs_neither_hangs_nor_breaks(
    tmp_path: Path, what: str
) -> None:
    (v1, files1), (v2, _) = _publish(tmp_path, 2)
    cache = _cache(tmp_path, 2 * SIZE)
    building = cache.dirs("db").root / "building"
    building.mkdir(parents=True)
    if what == "building-file":
        building.rmdir()
        building.write_bytes(b"x")
    elif what == "version-file":
        (building / v2).write_bytes(b"x")
    else:
        (building / v2).mkdir()
        claim = building / v2 / ("123-" + "a" * 32)
        claim.mkdir() if what == "claim-folder" else os.mkfifo(claim)
    done: list[object] = []
    worker = threading.Thread(
        target=lambda: done.append((cache.usage(), read_tree(cache.checkout("db", v1).path))),
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert done == [(0, files1)]  # no hang, nothing counted, served


@pytest.mark.parametrize("what", ["folder", "dangling-link", "read-only"])
def test_a_damaged_room_lock_is_replaced(tmp_path: Path, what: str) -> None:
    ((v1, files1),) = _publish(tmp_path, 1)
    cache = _cache(tmp_path, 2 * SIZE)
    lock = cache.root / ".room.lock"
    if what == "folder":
        (lock / "inside").mkdir(parents=True)
    elif what == "dangling-link":
        lock.symlink_to(tmp_path / "nowhere")
    else:
        lock.write_bytes(b"")
        lock.chmod(0o444)
    again = _cache(tmp_path, 2 * SIZE)  # opens (the folder is no snapshot name)
    with again.checkout("db", v1) as snap:
        assert read_tree(snap.path) == files1
    assert lock.is_file()
    assert not lock.is_symlink()
    assert lock.stat().st_mode & 0o600 == 0o600
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("same", [False, True], ids=["another-version", "the-same-version"])
def test_a_dead_builds_work_folder_is_swept_before_room_is_made(tmp_path: Path, same: bool) -> None:
    (v1, _), (v2, files2) = _publish(tmp_path, 2)
    cap = SIZE + SIZE // 2
    cache = _cache(tmp_path, cap)  # open before the leftover appears: its open sweeps none
    d = cache.dirs("db")
    left = new_folder(d.work_path(v2 if same else v1))  # as a killed build leaves its folder
    (left.path / "chroma.sqlite3").write_bytes(os.urandom(SIZE // 2 + 1))
    left.close()
    with cache.checkout("db", v2) as snap:  # (the same version: its lock is this build's)
        assert read_tree(snap.path) == files2
        assert d.names("tmp") == []  # swept when room was made: the disk holds the count
        assert _on_disk(cache) == cache.usage() == SIZE


_COPY_HOLDER = """
import sys
from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
store, cache, version = sys.argv[1:4]
c = CachedStore(RemoteStore(FileBackend(store), chunk_size=4096), cache, max_bytes=10**9,
                min_free_bytes=0)
snap = c.checkout("db", version)
print(snap.path, flush=True)
sys.stdin.read()
"""


def test_a_killed_holders_copy_is_swept_before_room_is_made(tmp_path: Path) -> None:
    (v1, files1), (v2, files2) = _publish(tmp_path, 2)
    cap = 2 * SIZE + SIZE // 2  # the shared v1, its copy, and not v2 besides
    cache = _cache(tmp_path, cap)
    with cache.checkout("db", v1) as held_v1:
        args = [str(tmp_path / "store"), str(tmp_path / "cache"), v1]
        with subprocess.Popen(
            [sys.executable, "-c", _COPY_HOLDER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as holder:
            assert holder.stdout is not None
            copy = Path(holder.stdout.readline().strip())
            assert copy.parent == cache.dirs("db").copies()  # a private copy
            assert read_tree(copy) == files1
            holder.kill()
        with cache.checkout("db", v2) as snap:  # the same store object: no open sweeps it
            assert read_tree(snap.path) == files2
        assert not copy.exists()
        assert read_tree(held_v1.path) == files1


def test_usage_waits_for_a_room_being_made(tmp_path: Path) -> None:
    (v1, _), (v2, _) = _publish(tmp_path, 2)
    cache = _cache(tmp_path, 2 * SIZE)
    cache.checkout("db", v1).release()
    d = cache.dirs("db")
    got: list[int] = []
    with room_lock(cache.root).acquire():  # another process making room: evict v1, claim v2
        counting = threading.Thread(target=lambda: got.append(cache.usage()), daemon=True)
        counting.start()
        counting.join(0.3)
        assert counting.is_alive()  # waits: never a count of half a change
        assert cache.evict("db", v1)
        claim = claim_build(d, v2, SIZE)
    counting.join(60)
    assert got == [SIZE]  # v2's claim, not v1 besides
    claim.unlink()


@pytest.mark.parametrize("what", ["link", "folder"])
def test_a_link_or_folder_at_a_version_lock_is_replaced(tmp_path: Path, what: str) -> None:
    ((v1, files1),) = _publish(tmp_path, 1)
    cache = _cache(tmp_path, 2 * SIZE)
    lock = cache.dirs("db").folder("locks") / f"{v1}.lock"
    decoy = write_tree(tmp_path / "decoy", {"f": b"keep"})
    if what == "link":
        lock.symlink_to(decoy / "f")
    else:
        (lock / "inside").mkdir(parents=True)
    again = _cache(tmp_path, 2 * SIZE)
    with again.checkout("db", v1) as snap:
        assert read_tree(snap.path) == files1
    assert lock.is_file()
    assert not lock.is_symlink()
    assert read_tree(decoy) == {"f": b"keep"}


def test_a_hard_link_at_the_room_lock_keeps_its_files_mode(tmp_path: Path) -> None:
    ((v1, files1),) = _publish(tmp_path, 1)
    cache = _cache(tmp_path, 2 * SIZE)
    other = write_tree(tmp_path / "other", {"f": b"theirs"}) / "f"
    other.chmod(0o400)
    os.link(other, cache.root / ".room.lock")
    with cache.checkout("db", v1) as snap:  # (root opens it whatever its mode)
        assert read_tree(snap.path) == files1
    assert other.stat().st_mode & 0o777 == 0o400  # not changed through the link
    assert other.read_bytes() == b"theirs"


def test_a_release_removes_its_own_pin_whatever_stands_at_its_folders_name(
    tmp_path: Path,
) -> None:
    ((v1, _),) = _publish(tmp_path, 1)
    cache = _cache(tmp_path, 2 * SIZE)
    snap = cache.checkout("db", v1)
    pins = cache.dirs("db").root / "pins" / v1
    (pin,) = os.listdir(pins)
    pins.rename(pins.with_name("aside"))  # the folder moved, a link put in its place
    decoy = write_tree(tmp_path / "decoy", {pin: b"not a pin", "other": b"x"})
    pins.symlink_to(decoy)
    snap.release()
    assert read_tree(decoy) == {pin: b"not a pin", "other": b"x"}
    assert os.listdir(pins.with_name("aside")) == []  # the pin made is the one removed


def test_a_builds_claim_folder_is_removed_only_below_the_caches_own_building_folder(
    tmp_path: Path,
) -> None:
    ((v1, _),) = _publish(tmp_path, 1)
    cache = _cache(tmp_path, 2 * SIZE)
    d = cache.dirs("db")
    claim = claim_build(d, v1, SIZE)
    building = d.root / "building"
    building.rename(building.with_name("aside"))  # the folder moved, a link put in its place
    decoy = tmp_path / "decoy"
    (decoy / v1).mkdir(parents=True)  # empty: what a removal by path would take
    building.symlink_to(decoy)
    end_build(d, claim)
    assert (decoy / v1).is_dir()
    assert os.listdir(building.with_name("aside") / v1) == []  # its own claim is given back


def test_a_build_folder_left_without_a_claim_is_swept(tmp_path: Path) -> None:
    (v1, files1), (v2, _) = _publish(tmp_path, 2)
    cache = _cache(tmp_path, 4 * SIZE)
    d = cache.dirs("db")
    claim_build(d, v2, SIZE).unlink()  # given back; the builder was interrupted before rmdir
    assert (d.root / "building" / v2).is_dir()
    with _cache(tmp_path, 4 * SIZE).checkout("db", v1) as snap:  # makes room: sweeps first
        assert read_tree(snap.path) == files1
    assert not (d.root / "building" / v2).exists()
