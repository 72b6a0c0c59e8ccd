"""The checkout data path's guarantees: a filling disk never yields wrong bytes or a raw
OSError, a timed-out call neither overruns its deadline nor starves the next one on the
same store, work abandoned at a deadline never writes into a descriptor it no longer
owns, and no buffer is sized from a declared length."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from late_steps import late_after

from chroma_snapshots import (
    CachedStore,
    CacheFullError,
    ConfigError,
    Deadline,
    IntegrityError,
    InvalidInputError,
    LocalDiskError,
    RemoteStore,
    SnapshotError,
    StorageTimeoutError,
)
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine import placer as placer_module
from chroma_snapshots.engine import ramp
from chroma_snapshots.engine.deadline import WorkerPool, wait_all
from chroma_snapshots.engine.placer import WRITE_BYTES, Placer
from chroma_snapshots.engine.progress import StatsRecorder
from chroma_snapshots.engine.transfer import DEFAULT_MAX_READ, LocalChunks, Placement, plan_reads
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.proxy import CountingProxy

MiB = 1 << 20
Mount = Callable[[str], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """Mounts a real tmpfs with the given options; every mount is undone afterwards."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"these tests need root to mount a tmpfs (CI runs as root): {done.stderr}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: even if busy


def _published(
    tmp_path: Path, files: dict[str, bytes], chunk_size: int = 64 << 10
) -> tuple[RemoteStore, Path]:
    src = write_tree(tmp_path / "src", files)
    store = RemoteStore(FileBackend(tmp_path / "store", fsync=False), chunk_size=chunk_size)
    store.publish("db", src)
    return store, src


def _random_files(sizes: dict[str, int]) -> dict[str, bytes]:
    return {name: os.urandom(size) for name, size in sizes.items()}


# A filling disk: the documented error, nothing at dest, nothing left behind.


def test_the_reported_repro_three_1mb_files_into_a_2mib_tmpfs(tmp_path: Path, tmpfs: Mount) -> None:
    mnt = tmpfs("size=2m")
    store, _ = _published(tmp_path, _random_files({f"f{i}.bin": 1_000_000 for i in range(3)}))
    with pytest.raises(CacheFullError) as err:
        store.checkout("db", dest=mnt / "out")
    assert isinstance(err.value, OSError)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value.filename).startswith(str(mnt))  # names the file being written
    assert "\n" not in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert os.listdir(mnt) == []  # no dest, no temp dir


FILL_POINTS = {
    "in the first file": {"a.bin": 3_000_000},
    "in a middle file": {"a.bin": 500_000, "b.bin": 3_000_000, "c.bin": 10_000},
    "at the last chunk": {"a.bin": MiB, "b.bin": MiB + 1},
}


@pytest.mark.parametrize("sizes", FILL_POINTS.values(), ids=FILL_POINTS.keys())
def test_disk_full_at_any_point_of_a_checkout(
    tmp_path: Path, tmpfs: Mount, sizes: dict[str, int]
) -> None:
    mnt = tmpfs("size=2m")
    store, _ = _published(tmp_path, _random_files(sizes))
    with pytest.raises(CacheFullError) as err:
        store.checkout("db", dest=mnt / "new" / "deeper" / "out")
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(mnt) == []  # nor the parents made for dest
    # the error names the file where the user asked for it, not the hidden work folder
    assert err.value.filename.startswith(f"{mnt / 'new' / 'deeper' / 'out'}/")
    assert "chroma-snapshots-work" not in str(err.value)
    # the cache on the same disk, its free-space check fooled: the real ENOSPC
    cached = CachedStore(store, mnt / "cache", min_free_bytes=-(1 << 40))
    with pytest.raises(CacheFullError):
        cached.checkout("db")
    assert cached.dirs("db").complete() == []
    assert list((cached.dirs("db").root / "tmp").iterdir()) == []


def test_a_dest_name_as_long_as_a_folder_name_may_be(tmp_path: Path) -> None:
    # the work folder beside dest adds ~40 characters to dest's name: it must still fit
    store, src = _published(tmp_path, _random_files({"a.bin": 10_000}))
    for name in ("a" * 255, "\u00e9" * 127):  # 255 bytes, and 254 in two-byte characters
        snap = store.checkout("db", dest=tmp_path / name)
        assert read_tree(snap.path) == read_tree(src)


def test_the_working_directory_is_not_a_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # renaming the checkout over it would leave this process in a deleted folder
    store, _ = _published(tmp_path, _random_files({"a.bin": 10}))
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for target in (store, CachedStore(store, tmp_path / "cache")):
        with pytest.raises(InvalidInputError, match="working directory"):
            target.checkout("db", dest=".")
    assert (tmp_path / "here").samefile(".")


_CHECKOUT = (
    "import os, sys\n"
    "from chroma_snapshots import CachedStore, RemoteStore\n"
    "from chroma_snapshots.backends.file import FileBackend\n"
    "os.umask(int(sys.argv[1], 8))\n"
    "store = RemoteStore(FileBackend(sys.argv[2]))\n"
    "if sys.argv[4:]:\n"
    "    store = CachedStore(store, sys.argv[4])\n"
    "store.checkout('db', dest=None if sys.argv[3] == '-' else sys.argv[3])\n"
)


def _checkout_under(umask: int, store: Path, dest: Path | None, cache: Path | None) -> None:
    """A checkout in a process of its own whose umask is ``umask``."""
    args = [oct(umask), str(store), str(dest or "-"), *([str(cache)] if cache else [])]
    subprocess.run([sys.executable, "-c", _CHECKOUT, *args], check=True)


def _folder_modes(root: Path) -> set[int]:
    return {p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")] if p.is_dir()}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
@pytest.mark.parametrize("cached", [False, True])
def test_dest_folders_follow_the_umask(tmp_path: Path, umask: int, mode: int, cached: bool) -> None:
    _published(tmp_path, _random_files({"a.bin": 10, "sub/b.bin": 10}))
    cache = tmp_path / "cache" if cached else None
    if cache is not None:  # filled by a process whose folders anyone could write
        _checkout_under(0o000, tmp_path / "store", None, cache)
    _checkout_under(umask, tmp_path / "store", tmp_path / "out", cache)
    assert _folder_modes(tmp_path / "out") == {mode}


class _BytesPath:
    def __fspath__(self) -> bytes:
        return b"/tmp/x"


@pytest.mark.parametrize("dest", [b"/tmp/x", "out\0x", 42, _BytesPath(), "new/.."])
def test_a_dest_that_is_not_a_path_is_invalid_input(tmp_path: Path, dest: object) -> None:
    store, _ = _published(tmp_path, _random_files({"a.bin": 10}))
    for target in (store, CachedStore(store, tmp_path / "cache")):
        with pytest.raises(InvalidInputError, match=r"not a path|ends in '\.\.'"):
            target.checkout("db", dest=dest)  # type: ignore[arg-type]


def test_creating_many_files_stops_at_the_deadline(tmp_path: Path) -> None:
    # 20,000 small files take seconds to create: the deadline is checked while they are
    store, _ = _published(tmp_path, {f"d/f{i:04d}": b"x" for i in range(500)})
    manifest = store.load_manifest("db", store.current_version("db")[0])
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise StorageTimeoutError("deadline exceeded during creating the checkout's files")

    (tmp_path / "out").mkdir()
    with pytest.raises(StorageTimeoutError):
        Placer(tmp_path / "out", manifest).create_files(check)
    assert 0 < len(list((tmp_path / "out").rglob("f*"))) < 500


def test_a_copy_out_of_the_cache_stops_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a warm checkout to dest copies the cached tree: a large one takes seconds, and its
    # time counts against the deadline like a download's (time jumps once copying starts)
    store, _ = _published(tmp_path, {f"f{i:03d}": bytes([i]) * 5000 for i in range(50)})
    cached = CachedStore(store, tmp_path / "cache")
    cached.checkout("db").release()
    now = [0.0]
    real_copy = Placer.copy_from

    def copy_and_age(self: Placer, *args: Any) -> None:
        now[0] += 100.0
        real_copy(self, *args)

    monkeypatch.setattr(Placer, "copy_from", copy_and_age)
    with pytest.raises(StorageTimeoutError):
        cached.checkout("db", dest=tmp_path / "out", deadline=Deadline(60, clock=lambda: now[0]))
    assert now[0] > 0  # the copy ran (in the kernel, from the cached files' intact runs)
    assert not (tmp_path / "out").exists()


def test_setting_file_modes_stops_at_the_deadline(tmp_path: Path) -> None:
    # the tail after the downloads (a chmod per file) checks the deadline as it goes
    store, _ = _published(tmp_path, {f"f{i:04d}": b"x" for i in range(300)})
    manifest = store.load_manifest("db", store.current_version("db")[0])
    placer = Placer(tmp_path / "out", manifest)
    (tmp_path / "out").mkdir()
    placer.create_files()
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise StorageTimeoutError("deadline exceeded during setting the checkout's modes")

    with pytest.raises(StorageTimeoutError):
        placer.finish(check)
    assert len(calls) == 3  # one check per 64 files: it stopped after 128 of 300


def test_a_tree_finished_after_the_deadline_is_not_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every download is in, then the time is up: the checkout raises and leaves nothing,
    # rather than succeeding late (and a copy out of a cache likewise)
    store, _ = _published(tmp_path, {f"f{i:03d}": b"y" * 100 for i in range(20)})
    now = [0.0]
    late_after(monkeypatch, RemoteStore, "materialize", now)
    dl = Deadline(60, clock=lambda: now[0])
    with pytest.raises(StorageTimeoutError, match="writing the checkout"):
        store.checkout("db", dest=tmp_path / "out", deadline=dl)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()

    cached = CachedStore(store, tmp_path / "cache")
    cached.checkout("db").release()
    late_after(monkeypatch, RemoteStore, "materialize", now)  # the copy's, out of the cache
    with pytest.raises(StorageTimeoutError, match="copying to dest"):
        cached.checkout("db", dest=tmp_path / "out", deadline=Deadline(60, clock=lambda: now[0]))
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert read_tree(cached.checkout("db", dest=tmp_path / "out").path) == read_tree(
        store.checkout("db").path
    )


def _aged(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (time.time() - 600, time.time() - 600))


def test_the_sweep_beside_dest_takes_only_its_own_work_folders(tmp_path: Path) -> None:
    store, src = _published(tmp_path, _random_files({"a.bin": 10}))
    mark = "chroma-snapshots-work-"
    other = tmp_path / f".a.{mark}q.{mark}71tvrrc_.tmp"  # dest "a.<mark>q" was killed
    killed = tmp_path / f".a.{mark}71tvrrc_.tmp"  # dest "a" was killed
    for folder in (other, killed):
        folder.mkdir()
        (folder / "part").write_bytes(b"x")
        _aged(folder)
    snap = store.checkout("db", dest=tmp_path / "a")
    assert read_tree(snap.path) == read_tree(src)
    assert other.exists()
    assert not killed.exists()


def test_long_dest_names_sharing_their_beginning_do_not_share_leftovers(
    tmp_path: Path,
) -> None:
    # work folder names are cut to fit NAME_MAX: two dests alike for 240 bytes must still
    # not take each other's leftovers (what a kill -9 of a checkout leaves) for their own
    from chroma_snapshots.engine.workdir import _short_name

    store, src = _published(tmp_path, _random_files({"a.bin": 10}))
    first, second = "a" * 240 + "1", "a" * 240 + "2"
    left = {
        name: tmp_path / f".{_short_name(name)}.chroma-snapshots-work-abcd_123.tmp"
        for name in (first, second)
    }
    for folder in left.values():
        folder.mkdir()
        _aged(folder)
    snap = store.checkout("db", dest=tmp_path / second)
    assert read_tree(snap.path) == read_tree(src)
    assert not left[second].exists()  # its own leftover went
    assert left[first].exists()  # the other dest's stays


def test_a_parent_removed_by_a_siblings_failed_checkout_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two checkouts to new/a and new/b both make "new"; the one that fails removes it while
    # empty, which can be between the other's mkdir and its work folder
    import tempfile

    store, src = _published(tmp_path, _random_files({"a.bin": 10}))
    real, calls = tempfile.mkdtemp, [0]

    def sibling_failed_first(suffix: str, prefix: str, dir: str) -> str:
        if calls[0] == 0:
            (tmp_path / "new").rmdir()
        calls[0] += 1
        return real(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", sibling_failed_first)
    snap = store.checkout("db", dest=tmp_path / "new" / "b")
    assert read_tree(snap.path) == read_tree(src)


# makes a temporary checkout (no dest) of the store in argv[1], says where, then waits to
# be killed with it open (a Lambda timeout while a client reads it)
HOLD_CHECKOUT = """
import sys, time
from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
snap = RemoteStore(FileBackend(sys.argv[1])).checkout("db")
print(snap.path, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("stage", ["while building", "while open"])
def test_a_killed_checkout_without_dest_is_swept_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    # a Lambda timeout kills the process; /tmp outlives it into the next invocation
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    store, src = _published(tmp_path, _random_files({"a.bin": 10, "b.bin": 200_000}))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_CHECKOUT, str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        held = Path(proc.stdout.readline().strip())
        assert read_tree(held) == read_tree(src)
        if stage == "while building":  # its finished tree back to a work folder's state
            held.rename(held.with_name(".snapshot.chroma-snapshots-work-abcd_123.tmp"))
        with store.checkout("db") as live:  # the holder alive: its folder is left alone
            assert held.parent.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert not live.path.parent.exists()  # released: gone
    assert held.parent.is_dir()
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
        assert not held.parent.exists()  # at once: its owner is dead
        snap.release()  # twice: the second does nothing
    assert list(tmp.iterdir()) == []


def test_a_temporary_checkout_is_its_callers_until_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left unreleased (a caller that keeps only the path), a checkout stays for the
    process's life, whatever other checkouts sweep; one made but not locked yet is left
    alone until old, and another user's for good."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    store, src = _published(tmp_path, _random_files({"a.bin": 10}))
    fresh = Path(tempfile.mkdtemp(prefix="chroma-snapshot-"))  # its lock not yet taken
    others = Path(tempfile.mkdtemp(prefix="chroma-snapshot-"))
    (others / "snapshot").mkdir()
    os.chown(others, 65534, 65534)  # the tests run as root (CI does)
    _aged(others)
    path = store.checkout("db").path  # never released
    for _ in range(2):
        store.checkout("db").release()
    assert read_tree(path) == read_tree(src)
    assert fresh.is_dir()
    assert others.is_dir()
    _aged(fresh)  # its owner killed between its mkdir and its lock
    store.checkout("db").release()
    assert not fresh.exists()
    assert sorted(tmp.iterdir()) == sorted([path.parent, others])


def test_a_checkout_that_just_fits_is_exact(tmp_path: Path, tmpfs: Mount) -> None:
    """The control for the matrix above: the same disk takes a checkout that fits."""
    mnt = tmpfs("size=2m")
    store, src = _published(tmp_path, _random_files({"a.bin": MiB, "b.bin": MiB - 64 * 1024}))
    snap = store.checkout("db", dest=mnt / "out")
    assert read_tree(snap.path) == read_tree(src)


def test_no_inode_left_while_creating_files(tmp_path: Path, tmpfs: Mount) -> None:
    mnt = tmpfs("size=8m,nr_inodes=8")
    store, _ = _published(tmp_path, _random_files({f"s/f{i:02d}": 100 for i in range(12)}))
    with pytest.raises(CacheFullError) as err:
        store.checkout("db", dest=mnt / "out")
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(mnt) == []


def test_other_local_failures_are_a_local_disk_error(tmp_path: Path, tmpfs: Mount) -> None:
    mnt = tmpfs("size=2m,ro")
    store, _ = _published(tmp_path, _random_files({"a.bin": 10_000}))
    with pytest.raises(LocalDiskError) as err:
        store.checkout("db", dest=mnt / "out")
    assert err.value.errno == errno.EROFS
    assert not isinstance(err.value, CacheFullError)
    assert str(mnt) in str(err.value)


@pytest.mark.parametrize("named", ["by the environment", "by the caller"])
def test_a_read_only_cache_folder_says_where_it_was_named(
    tmp_path: Path, tmpfs: Mount, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """The folder alone sends an operator looking through code and flags: the variable
    that named it is said too (a Lambda's CHROMA_SNAPSHOTS_CACHE_DIR on a read-only disk)."""
    from chroma_snapshots import open_store

    cache = tmpfs("size=1m,ro") / "c"
    _published(tmp_path, _random_files({"a.bin": 10}))
    url = str(tmp_path / "store")
    if named == "by the environment":
        monkeypatch.setenv("CHROMA_SNAPSHOTS_CACHE_DIR", str(cache))
    with pytest.raises(LocalDiskError) as err:
        open_store(url, cache_dir=None if named == "by the environment" else str(cache))
    assert err.value.errno == errno.EROFS
    assert err.value.filename == str(cache)
    said = "(the folder CHROMA_SNAPSHOTS_CACHE_DIR names)" in str(err.value)
    assert said == (named == "by the environment")


def test_an_untrusted_cache_folder_says_where_it_was_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chroma_snapshots import open_store

    cache = tmp_path / "c"
    cache.mkdir()
    cache.chmod(0o777)  # anyone may write into it: no cache of ours
    _published(tmp_path, _random_files({"a.bin": 10}))
    monkeypatch.setenv("CHROMA_SNAPSHOTS_CACHE_DIR", str(cache))
    with pytest.raises(ConfigError, match=r"\(the folder CHROMA_SNAPSHOTS_CACHE_DIR names\)"):
        open_store(str(tmp_path / "store"))


# Short writes.


def _shortened(limits: Sequence[int], calls: list[tuple[int, int]]) -> Callable[..., int]:
    """os.pwritev that writes at most the next of ``limits`` bytes, as a filling disk may."""
    real = os.pwritev

    def pwritev(fd: int, bufs: Sequence[bytes | memoryview], offset: int) -> int:
        limit, taken = limits[len(calls) % len(limits)], []
        for b in bufs:
            if limit <= 0:
                break
            taken.append(memoryview(b)[:limit])
            limit -= len(taken[-1])
        n = real(fd, taken, offset)
        calls.append((sum(len(b) for b in bufs), n))
        return n

    return pwritev


def test_short_writes_are_continued_until_every_byte_is_placed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _random_files({"a.bin": 300_000, "seg/b.bin": 70_001, "seg/c.bin": 4096})
    store, src = _published(tmp_path, files, chunk_size=4096)
    calls: list[tuple[int, int]] = []
    # splits inside a buffer, exactly at a buffer's end and one past it
    monkeypatch.setattr(os, "pwritev", _shortened([7, 4095, 4096, 4097, 10_000], calls))
    snap = store.checkout("db", dest=tmp_path / "out")
    monkeypatch.undo()
    assert read_tree(snap.path) == read_tree(src)
    assert sum(n < asked for asked, n in calls) > 10  # the writes really were short


@pytest.mark.parametrize("chunk_size", [4096, 256 << 10])
def test_no_write_hands_the_kernel_more_than_write_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_size: int
) -> None:
    """Checkouts and a file store's puts write at most WRITE_BYTES a call (larger writes
    cost several times the system time: engine/placer.py), whatever the chunk size, and
    still every byte, when the kernel also writes less than asked."""
    files = _random_files({"a.bin": 1_000_003, "seg/b.bin": 70_001, "seg/c.bin": 4096})
    asked: list[int] = []
    short = _shortened([WRITE_BYTES, WRITE_BYTES - 1, 5_000, WRITE_BYTES], [])

    def recording(fd: int, bufs: Sequence[bytes | memoryview], offset: int) -> int:
        asked.append(sum(len(b) for b in bufs))
        return short(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", recording)
    store, src = _published(tmp_path, files, chunk_size=chunk_size)  # packs: pwrite_all
    snap = store.checkout("db", dest=tmp_path / "out")
    monkeypatch.undo()
    assert read_tree(snap.path) == read_tree(src)
    assert max(asked) == WRITE_BYTES  # bigger runs and chunks were split, not refused
    assert sum(asked) > 2 * 1_074_100  # both the packs and the checkout went through it


@pytest.mark.parametrize("short", [False, True])
def test_a_run_of_buffers_is_written_in_whole_calls_of_write_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    """A run of adjacent chunks (the placer writes one per file and batch) goes out in
    calls of exactly WRITE_BYTES but the last, small buffers sharing a call and large
    ones cut: every byte lands at its offset, also when the kernel writes less."""
    sizes = [0, 100, WRITE_BYTES - 100, 2 * WRITE_BYTES, 7, WRITE_BYTES + 3, 5_000, 0, 1]
    bufs = [os.urandom(n) for n in sizes]
    asked: list[int] = []
    limit = _shortened([WRITE_BYTES - 1, 4095, 10_000], []) if short else os.pwritev

    def recording(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> int:
        asked.append(sum(len(b) for b in parts))
        return limit(fd, parts, offset)

    path = tmp_path / "run.bin"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_WRONLY)
    monkeypatch.setattr(os, "pwritev", recording)
    try:
        placer_module.pwrite_all(fd, bufs, 1000, sum(sizes))
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert path.read_bytes() == b"x" * 1000 + b"".join(bufs)
    assert max(asked) == WRITE_BYTES
    if not short:  # whole calls: the bytes need no more of them
        assert len(asked) == -(-sum(sizes) // WRITE_BYTES)
        assert asked[:-1] == [WRITE_BYTES] * (len(asked) - 1)


@pytest.mark.parametrize("where", ["file", "s3"])
def test_at_most_the_placing_threads_verify_and_place_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, where: str
) -> None:
    """Eight workers receive, but only ``placing_threads()`` of them verify and place at
    once (more only take turns at the GIL and a shared file's inode lock), through whole
    reads (file store) and streamed ones (S3); every byte still arrives."""
    monkeypatch.setattr(placer_module, "placing_threads", lambda: 2)
    if where == "s3":
        server: MotoServer = request.getfixturevalue("moto_server")
        settings = S3Settings(endpoint_url=server.endpoint_url)
        backend: Any = S3Backend(request.getfixturevalue("s3_bucket"), "snaps", settings=settings)
    else:
        backend = FileBackend(tmp_path / "store", fsync=False)
    store = RemoteStore(backend, chunk_size=4096, pack_target=16 << 10, workers=8)
    src = write_tree(tmp_path / "src", _random_files({f"f{i}.bin": 96_000 for i in range(4)}))
    store.publish("db", src)
    inside, most, lock = [0], [0], threading.Lock()
    place_many = Placer.place_many

    def slow(self: Placer, chunks: Sequence[tuple[str, bytes | memoryview]]) -> int:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)  # long enough that eight workers would overlap
        try:
            return place_many(self, chunks)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(Placer, "place_many", slow)
    snap = store.checkout("db", dest=tmp_path / "out")
    assert read_tree(snap.path) == read_tree(src)
    assert most[0] == 2  # never more, and the two did overlap


def test_a_write_that_makes_no_progress_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = _published(tmp_path, _random_files({"a.bin": 50_000}))
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: 0)
    with pytest.raises(LocalDiskError) as err:
        store.checkout("db", dest=tmp_path / "out" / "snap")
    assert err.value.errno == errno.EIO
    assert not (tmp_path / "out").exists()  # nor the parent made for dest


# Declared sizes.


def test_a_chunk_declaring_more_than_a_read_is_refused_without_allocating(
    tmp_path: Path,
) -> None:
    store, _ = _published(tmp_path, _random_files({"a.bin": 20_000}), chunk_size=4096)
    version = store.resolve("db").version
    m = store.load_manifest("db", version)
    digest, chunk = next(iter(m.chunks.items()))
    huge = replace(chunk, length=3 << 29, codec="zstd")  # 1.5 GiB "compressed"
    hostile = replace(m, chunks={**m.chunks, digest: huge})
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="more than a read"):
            store.materialize(
                "db", Placement(tmp_path / "w", hostile), Deadline(10), StatsRecorder()
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB
    # the limit is the read size itself: a chunk of exactly max_read is still planned
    assert len(plan_reads([replace(chunk, length=DEFAULT_MAX_READ)])) == 1


# Deadlines, and what a timed-out call leaves behind.


def test_wait_all_fails_fast_and_cancels_what_has_not_started() -> None:
    release = threading.Event()

    def boom() -> None:
        raise IntegrityError("boom")

    def blocked(event: threading.Event) -> None:
        event.wait(30)

    with WorkerPool(2) as pool:
        slow = pool.submit(blocked, release)
        failing = pool.submit(boom)
        t = time.monotonic()
        with pytest.raises(IntegrityError, match="boom"):
            wait_all([slow, failing], Deadline(30), "test")
        assert time.monotonic() - t < 5  # not after the slow call submitted before it
        release.set()
    stuck = threading.Event()
    with WorkerPool(1) as pool:
        running = pool.submit(blocked, stuck)
        queued = pool.submit(boom)
        t = time.monotonic()
        with pytest.raises(StorageTimeoutError, match="waiting"):
            wait_all([running, queued], Deadline(0.3), "waiting")
        assert time.monotonic() - t < 3
        assert queued.cancelled()  # never starts after its caller gave up
        stuck.set()


class _StallingBackend(FileBackend):
    """Reads of one pack wait until released (a stalled body that comes back late)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self.pack = ""
        self.reader: threading.Thread | None = None
        self.release = threading.Event()

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        if self.pack and self.pack in key:
            self.reader = threading.current_thread()
            self.release.wait(30)
        return super().get_into(key, byte_range, buf)


def test_a_read_released_after_the_deadline_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tree(tmp_path / "src", _random_files({"a.bin": 8 * 4096}))
    backend = _StallingBackend(tmp_path / "store")
    store = RemoteStore(backend, chunk_size=4096, pack_target=4 * 4096, compression_level=None)
    store.publish("db", src)
    m = store.load_manifest("db", store.resolve("db").version)
    first, last = (m.chunks[m.files[0].chunks[i]].pack for i in (0, -1))
    assert first != last  # a.bin is half placed (its file open) when the second pack stalls
    backend.pack = last
    writes: list[tuple[int, bool]] = []  # (fd, after the checkout failed)
    failed = threading.Event()
    real = os.pwritev

    def recording(fd: int, bufs: Sequence[bytes | memoryview], offset: int) -> int:
        writes.append((fd, failed.is_set()))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", recording)
    with pytest.raises(StorageTimeoutError):
        store.materialize("db", Placement(tmp_path / "w", m), Deadline(1.0), StatsRecorder())
    failed.set()
    # The process goes on opening files: they get the numbers the checkout closed.
    others = {}
    for i in range(8):
        fd = os.open(tmp_path / f"other{i}", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"x" * 64 * 1024)
        others[fd] = tmp_path / f"other{i}"
    try:
        assert {fd for fd, _ in writes} & set(others)  # a late write would hit one of them
        backend.release.set()
        assert backend.reader is not None
        backend.reader.join(10)  # the pool was left: the worker ends after its last task
    finally:
        for fd in others:
            os.close(fd)
    assert [w for w in writes if w[1]] == []
    for path in others.values():
        assert path.read_bytes() == b"x" * 64 * 1024
    assert not backend.reader.is_alive()  # so the checks above saw everything it did


def _fd_names(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return ""


def test_closing_during_a_write_leaves_the_descriptor_to_that_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, src = _published(tmp_path, _random_files({"a.bin": 3 * 4096}), chunk_size=4096)
    m = store.load_manifest("db", store.resolve("db").version)
    data = (src / "a.bin").read_bytes()
    placer = Placer(tmp_path / "w", m)
    placer.create_files()
    entered, release, used = threading.Event(), threading.Event(), []
    real = os.pwritev

    def slow(fd: int, bufs: Sequence[bytes | memoryview], offset: int) -> int:
        used.append(fd)
        entered.set()
        release.wait(30)
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", slow)
    writer = threading.Thread(target=placer.place, args=(m.files[0].chunks[0], data[:4096]))
    writer.start()
    assert entered.wait(10)
    placer.close()  # returns at once; the write in progress keeps its descriptor
    target = str(tmp_path / "w" / "a.bin")
    assert _fd_names(used[0]) == target
    with pytest.raises(SnapshotError, match="ended"):
        placer.place(m.files[0].chunks[1], data[4096:8192])
    release.set()
    writer.join(10)
    assert not writer.is_alive()
    assert _fd_names(used[0]) != target  # closed by the write that finished last
    assert used == used[:1]  # the refused chunk was never written
    assert (tmp_path / "w" / "a.bin").read_bytes()[:4096] == data[:4096]


def test_a_local_read_after_close_opens_nothing(tmp_path: Path) -> None:
    store, src = _published(tmp_path, _random_files({"a.bin": 3 * 4096}), chunk_size=4096)
    m = store.load_manifest("db", store.resolve("db").version)
    local = LocalChunks()
    local.add_tree(src, m)
    digest = m.files[0].chunks[0]
    assert local.read(digest) == (src / "a.bin").read_bytes()[:4096]
    local.close()
    assert local.read(m.files[0].chunks[1]) is None  # an abandoned slice finds nothing
    assert str(src / "a.bin") not in {_fd_names(int(fd)) for fd in os.listdir("/proc/self/fd")}


WORKERS = 4


def _s3_store(proxy: CountingProxy, bucket: str) -> RemoteStore:
    # read_timeout 30 s: only the deadline can end a stalled body
    settings = S3Settings(endpoint_url=proxy.url, connect_timeout=1, read_timeout=30.0)
    backend = S3Backend(bucket, "snaps", settings=settings)
    return RemoteStore(backend, chunk_size=4096, pack_target=64 << 10, workers=WORKERS)


def test_a_timed_out_checkout_does_not_starve_the_next_calls(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", _random_files({"a.bin": MiB}))  # 16 packs
    with CountingProxy(moto_server.endpoint_url) as proxy:
        store = _s3_store(proxy, s3_bucket)
        store.publish("db", src)
        # every stream the checkout opens stuck (it starts with ramp.START, and grows
        # only on reads that finish)
        proxy.stall("/packs/", count=ramp.START, after_bytes=100)
        t = time.monotonic()
        with pytest.raises(StorageTimeoutError):
            store.checkout("db", dest=tmp_path / "late", deadline=3)
        assert time.monotonic() - t < 3 + 1.5
        assert not (tmp_path / "late").exists()
        # The stalled bodies are still held open; the proxy answers everything else.
        t = time.monotonic()
        snap = store.checkout("db", dest=tmp_path / "next", deadline=8)
        assert time.monotonic() - t < 8
        assert read_tree(snap.path) == read_tree(src)
        (src / "b.bin").write_bytes(os.urandom(200_000))
        t = time.monotonic()
        store.publish("db", src, deadline=8)
        assert time.monotonic() - t < 8
        assert read_tree(store.checkout("db", dest=tmp_path / "v2", deadline=8).path) == (
            read_tree(src)
        )
