"""A dead hang-guard worker is never reused, and FallbackStore moves on from what it documents.

The workers are real processes killed with SIGKILL; ``os.getpid`` and ``time.sleep``
run in a worker (``guard.run(fn, "__call__", ...)``) say which process served a call
and make one that is killed mid-call.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_hang

from chroma_snapshots import (
    BackendUnavailableError,
    ConflictError,
    FallbackStore,
    IntegrityError,
    InvalidInputError,
    RemoteStore,
    StorageTimeoutError,
)
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.deadline import Deadline, within
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.engine.mountworker import Worker
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faultfs import FaultyMount


@pytest.fixture
def guard() -> Iterator[MountGuard]:
    g = MountGuard("test", op_timeout=30.0, workers=2)
    yield g
    g.close()


def _worker_pid(guard: MountGuard) -> int:
    pid: int = guard.run(os.getpid, "__call__")
    return pid


def _kill_idle(guard: MountGuard) -> int:
    """SIGKILL the idle worker the next call would take, and wait until it is dead."""
    worker = guard._idle[-1]
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    return worker.proc.pid


def test_a_worker_killed_while_idle_is_replaced(guard: MountGuard) -> None:
    first = _worker_pid(guard)
    assert _kill_idle(guard) == first
    second = _worker_pid(guard)  # a fresh worker answers; no BrokenPipeError
    assert second != first
    assert guard.stats().died == 1
    assert [w.proc.pid for w in guard._idle] == [second]
    assert guard.stats().healthy


def test_a_death_not_yet_noticed_is_retried_because_the_call_never_ran(
    guard: MountGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race poll() cannot see: the worker is dead but looks alive, so the request goes
    # into a broken pipe. Without the worker's acknowledgement the call provably never ran.
    first = _worker_pid(guard)
    _kill_idle(guard)
    monkeypatch.setattr(Worker, "alive", lambda self: True)
    assert _worker_pid(guard) != first
    assert guard.stats().died == 1


def test_a_write_whose_worker_died_before_taking_it_lands_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = MountGuard("efs", op_timeout=30.0)
    store = RemoteStore(FileBackend(tmp_path / "efs", guard=guard), chunk_size=4096)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(20_000)})
    v1 = store.publish("db", src).version
    _kill_idle(guard)
    monkeypatch.setattr(Worker, "alive", lambda self: True)
    (src / "a.bin").write_bytes(b"second")
    v2 = store.publish("db", src).version  # CAS writes retried once: no ConflictError
    assert sorted(i.version for i in store.versions("db")) == sorted([v1, v2])
    assert store.resolve("db").version == v2
    assert guard.stats().died >= 1
    store.close()


def test_a_worker_killed_mid_call_raises_the_documented_error(guard: MountGuard) -> None:
    pid = _worker_pid(guard)
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(BackendUnavailableError) as err:
        guard.run(time.sleep, "__call__", 20.0)  # the worker took it: never retried
    killer.join()
    assert isinstance(err.value, ConnectionError)
    assert "during the call" in str(err.value)
    assert guard.stats().died == 1
    assert guard._idle == []  # the dead worker did not go back to the pool
    assert _worker_pid(guard) != pid  # and the next call gets a live one
    assert guard.stats().healthy  # a death is not a hung mount: the breaker stays closed


def test_a_worker_that_cannot_start_is_the_documented_error(
    guard: MountGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fds(self: Worker, preload: str) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Worker, "__init__", no_fds)
    with pytest.raises(BackendUnavailableError, match="cannot start") as err:
        _worker_pid(guard)
    assert isinstance(err.value.__cause__, OSError)


# At most max_abandoned workers stuck in a hung mount (a real FUSE mount that stops answering).

fuse_mount = test_hang.mount  # the FUSE fixture: skips without FUSE, fails in CI


class _Clock:
    """The breaker's clock, moved by hand past each cool-down."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _children() -> set[int]:
    """Live child processes of this process (guard workers, stuck or not, and the mount)."""
    me, found = str(os.getpid()), set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue  # not a process, or it exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _hung_backend(
    mount: FaultyMount, clock: _Clock, workers: int = 4
) -> tuple[FileBackend, MountGuard]:
    # 3 s: a fresh worker must start (import Python) within the budget on a loaded machine
    guard = MountGuard("efs", op_timeout=3.0, cooldown=30.0, clock=clock, workers=workers)
    backend = FileBackend(mount.mountpoint, create=False, guard=guard)
    mount.set_mode("hang")
    return backend, guard


def _refused_without_a_new_worker(backend: FileBackend, guard: MountGuard) -> None:
    before = _children()
    with pytest.raises(StorageTimeoutError, match="still stuck"):
        backend.head("db/refs/latest")
    assert _children() <= before  # refused before starting a worker
    assert guard.stats().abandoned == guard.max_abandoned


def test_at_most_four_workers_stay_stuck_then_the_guard_refuses(fuse_mount: FaultyMount) -> None:
    mount, clock = fuse_mount, _Clock()
    backend, guard = _hung_backend(mount, clock)
    for stuck in range(1, guard.max_abandoned + 1):
        # the first call times out; each later one after the cool-down is the breaker's probe
        with pytest.raises(StorageTimeoutError, match="did not return"):
            backend.head("db/refs/latest")
        assert guard.stats().abandoned == stuck
        clock.now += guard.cooldown + 1
    stuck_pids = {p.pid for p in guard._abandoned}
    assert stuck_pids <= _children()  # killed, yet still blocked in the mount
    for _ in range(3):  # neither a probe after the cool-down nor a plain call starts a fifth
        _refused_without_a_new_worker(backend, guard)
        clock.now += guard.cooldown + 1
    mount.set_mode("ok")  # the mount answers again: the stuck workers exit and are reaped
    end = time.monotonic() + 30
    while guard.stats().abandoned and time.monotonic() < end:
        time.sleep(0.05)
    assert guard.stats().abandoned == 0
    assert not stuck_pids & _children()
    with pytest.raises(FileNotFoundError):  # the probe closes the breaker; the call runs
        backend.head("db/refs/latest")
    assert guard.stats().healthy
    backend.close()


def test_concurrent_callers_cannot_strand_more_than_four_workers(
    fuse_mount: FaultyMount,
) -> None:
    mount = fuse_mount
    # more worker slots than stuck workers allowed: all 8 callers get past the slots at once
    backend, guard = _hung_backend(mount, _Clock(), workers=8)
    errors: list[BaseException | None] = [None] * 8

    def call(i: int) -> None:
        try:
            backend.head("db/refs/latest")
        except BaseException as e:  # every thread's outcome is checked below
            errors[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(e, StorageTimeoutError) for e in errors), errors
    assert guard.stats().abandoned == guard.max_abandoned
    assert {p.pid for p in guard._abandoned} <= _children()
    assert sum("did not return" in str(e) for e in errors) == guard.max_abandoned
    assert sum("refusing to start more" in str(e) for e in errors) == 8 - guard.max_abandoned
    mount.set_mode("ok")
    backend.close()


# FallbackStore: which errors of the first store move on to the next.


@pytest.fixture
def pair(tmp_path: Path) -> tuple[RemoteStore, RemoteStore, FallbackStore, Path, str]:
    efs = RemoteStore(FileBackend(tmp_path / "efs"), chunk_size=4096, label="efs")
    s3 = RemoteStore(FileBackend(tmp_path / "s3"), chunk_size=4096, label="s3")
    both = FallbackStore([efs, s3], mirror=True)
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(30_000), "s/h": b"h"})
    version = both.publish("db", src).version
    assert efs.resolve("db").version == version  # mirrored
    return efs, s3, both, src, version


HOSTILE = {
    "garbage": b"\x00\xffnot json",
    "wrong shape": b'{"version": [1, 2, 3]}',
    "nested": b"[" * 200_000,
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=list(HOSTILE))
def test_fallback_moves_on_from_a_hostile_ref(
    pair: tuple[RemoteStore, RemoteStore, FallbackStore, Path, str],
    tmp_path: Path,
    content: bytes,
) -> None:
    efs, s3, both, src, version = pair
    # Refs are read from the source of truth (s3) first: a hostile ref there moves the
    # reader on to the mirror's; a hostile ref on the mirror is never read while s3 answers.
    for hostile, other in ((s3, efs), (efs, s3)):
        ref = tmp_path / hostile.label / "db" / "refs" / "latest"
        good = ref.read_bytes()
        ref.write_bytes(content)
        with pytest.raises(IntegrityError):
            hostile.checkout("db", dest=tmp_path / "direct")
        with both.checkout("db") as snap:
            assert snap.info.version == version
            assert read_tree(snap.path) == read_tree(src)
        ref.write_bytes(good)
        assert other.resolve("db").version == version


def test_fallback_moves_on_from_a_damaged_manifest(
    pair: tuple[RemoteStore, RemoteStore, FallbackStore, Path, str], tmp_path: Path
) -> None:
    _, s3, both, src, version = pair
    manifests = [p for p in (tmp_path / "efs" / "db").rglob("*") if version in p.name]
    assert manifests
    for p in manifests:
        p.write_bytes(p.read_bytes()[:-7])  # truncated: unparseable
    snap = both.checkout("db", dest=tmp_path / "out")
    assert snap.source == s3.label
    assert read_tree(snap.path) == read_tree(src)


def test_fallback_moves_on_from_a_dead_store_but_not_from_bad_input(
    pair: tuple[RemoteStore, RemoteStore, FallbackStore, Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    efs, s3, both, _, _ = pair
    for err in (BackendUnavailableError("down"), StorageTimeoutError("slow")):

        def fail(*a: object, _e: Exception = err, **k: object) -> None:
            raise _e

        monkeypatch.setattr(efs, "load_manifest", fail)  # the fast store dies mid-checkout
        assert both.checkout("db", dest=tmp_path / type(err).__name__).source == s3.label
        monkeypatch.setattr(s3, "read_ref", fail)  # the source of truth cannot give the ref
        assert both.current_version("db")[0] == efs.current_version("db")[0]
        monkeypatch.undo()
    # Errors that would be the same on every store propagate at once.
    with pytest.raises(InvalidInputError):
        both.checkout("not a name!")
    calls: list[str] = []

    def conflict(*a: object, **k: object) -> None:
        calls.append("s3")
        raise ConflictError("lost")

    monkeypatch.setattr(s3, "read_ref", conflict)  # refs come from the source of truth first
    with pytest.raises(ConflictError):
        both.checkout("db", dest=tmp_path / "c")
    assert calls == ["s3"]


def test_the_probe_after_a_cool_down_keeps_the_callers_deadline(fuse_mount: FaultyMount) -> None:
    # The mount still hangs when the cool-down ends: the breaker's probe is the next call's
    # first step, and that call must still end by its own deadline, not the guard's timeout.
    clock = _Clock()
    backend, guard = _hung_backend(fuse_mount, clock)
    with pytest.raises(StorageTimeoutError, match="did not return"):
        backend.head("db/refs/latest")  # the whole op_timeout: the breaker opens
    clock.now += guard.cooldown + 1
    t = time.monotonic()
    with pytest.raises(StorageTimeoutError):
        within(Deadline(1.0), lambda: backend.head("db/refs/latest"))
    assert time.monotonic() - t < 1.0 + 0.5
    fuse_mount.set_mode("ok")
    end = time.monotonic() + 30
    while guard.stats().abandoned and time.monotonic() < end:
        time.sleep(0.05)
    clock.now += guard.cooldown + 1
    with pytest.raises(FileNotFoundError):  # answering again: the probe closes the breaker
        backend.head("db/refs/latest")
    backend.close()
