"""A hung EFS-like mount (a FUSE filesystem that stops answering) costs seconds, not the run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from chroma_snapshots import (
    CachedStore,
    FallbackStore,
    RemoteStore,
    StorageTimeoutError,
)
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faultfs import FaultyMount

T = TypeVar("T")
BUDGET = 3.0  # room for starting a worker process on a loaded machine
ROOT_CACHED = 1.5  # the kernel answers a stat of a FUSE mount's root from its cache for 1 s


def _fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[FaultyMount]:
    if not _fuse_available():
        if os.environ.get("CI"):
            pytest.fail("FUSE is required in CI: /dev/fuse and fusermount must exist")
        pytest.skip("no FUSE on this machine")
    (tmp_path / "backing").mkdir()
    with FaultyMount(tmp_path / "backing", tmp_path / "mnt", state_dir=tmp_path) as m:
        yield m


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _efs_store(
    mount: FaultyMount, clock: Clock | None = None, op_timeout: float = 5.0
) -> RemoteStore:
    guard = MountGuard(
        str(mount.mountpoint), op_timeout=op_timeout, cooldown=30.0, clock=clock or time.monotonic
    )
    return RemoteStore(
        FileBackend(mount.mountpoint, create=False, guard=guard),
        chunk_size=4096,
        label=f"efs://{mount.mountpoint}",
    )


def _publish_direct(mount: FaultyMount, tmp_path: Path) -> tuple[Path, str]:
    """Publish through the backing directory (not the mount), as another host would."""
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(100_000), "seg/h.bin": b"h"})
    store = RemoteStore(FileBackend(mount.source), chunk_size=4096)
    return src, store.publish("db", src).version


def _timed(fn: object) -> tuple[float, BaseException | None]:
    t = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except BaseException as e:
        return time.monotonic() - t, e
    return time.monotonic() - t, None


def test_every_operation_on_a_hung_mount_times_out_in_budget(
    mount: FaultyMount, tmp_path: Path
) -> None:
    src, version = _publish_direct(mount, tmp_path)
    clock = Clock()
    store = _efs_store(mount, clock, op_timeout=BUDGET - 1)  # the guard's own timeouts
    assert store.resolve("db").version == version  # healthy first
    mount.set_mode("hang")
    calls = {
        "resolve": lambda: store.resolve("db", deadline=BUDGET),
        "checkout": lambda: store.checkout("db", dest=tmp_path / "out", deadline=BUDGET),
        "versions": lambda: list(store.versions("db", deadline=BUDGET)),
        "publish": lambda: store.publish("db", src, deadline=BUDGET),
    }
    guard = store.backend.guard  # type: ignore[attr-defined]
    for what, call in calls.items():
        guard._open_until = (
            None  # re-arm: each operation must meet its own budget against the mount
        )
        seconds, err = _timed(call)
        assert isinstance(err, StorageTimeoutError), (what, err)
        assert isinstance(err, TimeoutError)
        assert seconds < BUDGET + 1.0, (what, seconds)
    assert not (tmp_path / "out").exists()
    # Telling folders apart touches no mount: a cache over the hung store is made at once
    # (its folder checked against the store's, known since the store opened)
    made = threading.Thread(target=CachedStore, args=(store, tmp_path / "cache"), daemon=True)
    made.start()
    made.join(2.0)  # a thread: one stuck in the mount must fail this test, not hang it
    assert not made.is_alive()
    # The breaker is open now: calls fail fast instead of feeding more workers to the mount.
    seconds, err = _timed(lambda: store.resolve("db", deadline=BUDGET))
    assert isinstance(err, StorageTimeoutError)
    assert "unhealthy" in str(err)
    # well inside the budget the mount would have had (benchmarks/breaker.py measures the
    # latency against its < 50 ms target)
    assert seconds < BUDGET / 3
    assert guard.stats().abandoned <= guard.max_abandoned
    # The process is still usable: a local store works meanwhile.
    local = RemoteStore(FileBackend(tmp_path / "local"))
    local.publish("x", src)
    assert read_tree(local.checkout("x", dest=tmp_path / "lx").path) == read_tree(src)
    # The mount recovers; after the cool-down a probe closes the breaker again.
    mount.set_mode("ok")
    _reaped(guard)
    clock.now += 31
    assert store.resolve("db", deadline=5).version == version
    assert guard.stats().healthy
    assert read_tree(store.checkout("db", dest=tmp_path / "again").path) == read_tree(src)


def _efs_then_s3(
    mount: FaultyMount, moto_server: MotoServer, s3_bucket: str
) -> tuple[RemoteStore, RemoteStore, FallbackStore]:
    """An EFS store on the FUSE mount, an S3 store on moto, and EFS-then-S3 with a mirror."""
    s3 = RemoteStore(
        S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url)),
        chunk_size=4096,
        label=f"s3://{s3_bucket}/snaps",
    )
    efs = _efs_store(mount)
    return efs, s3, FallbackStore([efs, s3], mirror=True)


def test_fallback_serves_from_s3_when_efs_hangs(
    mount: FaultyMount, moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    efs, s3, both = _efs_then_s3(mount, moto_server, s3_bucket)
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(50_000)})
    version = both.publish("db", src).version  # to S3, mirrored to EFS
    assert efs.resolve("db").version == version
    healthy = both.checkout("db", dest=tmp_path / "a", deadline=10)
    assert healthy.source == efs.label
    mount.set_mode("hang")
    t = time.monotonic()
    snap = both.checkout("db", dest=tmp_path / "b", deadline=8)  # EFS gets half of it
    assert time.monotonic() - t < 8.0
    assert snap.source == s3.label
    assert read_tree(snap.path) == read_tree(src)
    # Publishing still works: the mirror fails (and says so), the publish stands.
    (src / "more").write_bytes(b"more")
    t = time.monotonic()
    v2 = both.publish("db", src, deadline=Deadline(6))
    assert s3.resolve("db").version == v2.version
    assert time.monotonic() - t < 7.0


def test_fallback_serves_from_s3_when_the_efs_worker_dies(
    mount: FaultyMount, moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    efs, s3, both = _efs_then_s3(mount, moto_server, s3_bucket)
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(50_000)})
    both.publish("db", src)
    guard = efs.backend.guard  # type: ignore[attr-defined]
    # Killed while idle: replaced, EFS keeps serving.
    idle = guard._idle[-1].proc
    os.kill(idle.pid, signal.SIGKILL)
    idle.wait(timeout=10)
    assert both.checkout("db", dest=tmp_path / "a", deadline=20).source == efs.label
    # Killed during a call (slowed by the mount, so the kill lands inside it): the call
    # ends in BackendUnavailableError and the checkout moves on to S3.
    mount.set_mode("latency 1.5")
    busy = guard._idle[-1].proc  # the worker the next call takes
    threading.Timer(0.5, os.kill, (busy.pid, signal.SIGKILL)).start()
    snap = both.checkout("db", dest=tmp_path / "b", deadline=20)
    assert snap.source == s3.label
    assert read_tree(snap.path) == read_tree(src)
    assert busy.wait(timeout=10) == -signal.SIGKILL
    assert guard.stats().died == 2
    assert all(w.proc.poll() is None for w in guard._idle)
    mount.set_mode("ok")
    assert efs.checkout("db", dest=tmp_path / "c", deadline=20).source == efs.label


def _cli_on_hung_mount(mount: FaultyMount, efs_timeout: str, *args: str) -> tuple[float, str]:
    mount.set_mode("hang")
    env = {
        **os.environ,
        "CHROMA_SNAPSHOTS_URL": f"efs://{mount.mountpoint}",
        "CHROMA_SNAPSHOTS_EFS_TIMEOUT": efs_timeout,
    }
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "chroma_snapshots.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return time.monotonic() - t, f"exit {out.returncode}\n{out.stdout}{out.stderr}"


def test_cli_against_a_hung_mount_exits(mount: FaultyMount, tmp_path: Path) -> None:
    _publish_direct(mount, tmp_path)
    seconds, out = _cli_on_hung_mount(mount, "1.5", "ls", "db")
    assert out.startswith("exit 6"), out  # StorageTimeoutError
    assert "did not return within" in out
    assert seconds < 10


def test_the_clis_timeout_bounds_opening_a_hung_mount_too(
    mount: FaultyMount, tmp_path: Path
) -> None:
    # --timeout is the whole command's: the opening's wait for the mount is part of it
    _publish_direct(mount, tmp_path)
    local = f"file://{mount.source}"  # the same store where nothing hangs: the start-up
    t = time.monotonic()
    cli = [sys.executable, "-m", "chroma_snapshots.cli"]
    subprocess.run([*cli, "--store", local, "ls", "db"], check=True, capture_output=True)
    start_up = time.monotonic() - t
    time.sleep(ROOT_CACHED)  # the root, stat-ed when mounted: its cached attributes expire
    seconds, out = _cli_on_hung_mount(mount, "10", "--timeout", "0.5", "ls", "db")
    assert out.startswith("exit 6"), out
    assert seconds < start_up + 0.5 + 1.0, (seconds, start_up)  # not + OPEN_SECONDS


def test_doctor_reports_a_hung_mount_quickly(mount: FaultyMount) -> None:
    seconds, out = _cli_on_hung_mount(mount, "1", "doctor", "--budget", "2")
    assert out.startswith("exit 1"), out
    assert "FAIL" in out
    assert "unhealthy" in out or "did not return" in out
    assert seconds < 15


def test_a_callers_short_deadline_does_not_mark_a_healthy_mount_unhealthy(
    mount: FaultyMount, tmp_path: Path
) -> None:
    # A slow mount and a caller in a hurry: the call times out by its own deadline. The
    # breaker opens only on the guard's own op_timeout, so the same store object serves
    # the next call at once (it failed fast for the 30 s cool-down).
    src, version = _publish_direct(mount, tmp_path)
    store = _efs_store(mount)
    mount.set_mode("latency 0.2")
    seconds, err = _timed(lambda: store.checkout("db", dest=tmp_path / "hurried", deadline=0.5))
    assert isinstance(err, StorageTimeoutError), err
    assert seconds < 0.5 + 1.0, seconds
    mount.set_mode("ok")
    assert store.backend.guard.stats().healthy  # type: ignore[attr-defined]
    snap = store.checkout("db", dest=tmp_path / "next", deadline=20)
    assert snap.info.version == version
    assert read_tree(snap.path) == read_tree(src)


def test_store_objects_on_one_hung_mount_strand_at_most_four_workers_together(
    mount: FaultyMount, tmp_path: Path
) -> None:
    # A store opened per request must not strand four more workers each: the guard, its
    # cap and its breaker belong to the mount (and budget), once per process.
    from chroma_snapshots import open_remote, open_store

    _publish_direct(mount, tmp_path)
    stores = [open_remote(f"efs://{mount.mountpoint}") for _ in range(3)]
    stores.append(open_store(f"efs://{mount.mountpoint}/"))  # type: ignore[arg-type]
    guards = {id(s.backend.guard) for s in stores}  # type: ignore[attr-defined]
    assert len(guards) == 1
    guard = stores[0].backend.guard  # type: ignore[attr-defined]
    mount.set_mode("hang")
    refused = 0
    for s in stores:
        for _ in range(3):
            seconds, err = _timed(lambda s=s: s.checkout("db", deadline=1.0))
            assert isinstance(err, StorageTimeoutError), err
            assert seconds < 1.0 + 1.0, seconds
            refused += "refusing to start more" in str(err)
    assert guard.stats().abandoned == guard.max_abandoned  # not 4 per store object
    assert refused == 3 * len(stores) - guard.max_abandoned
    mount.set_mode("ok")
    _reaped(guard)
    assert guard.stats().abandoned == 0
    assert stores[1].resolve("db", deadline=20).version


def _hang(mount: FaultyMount) -> None:
    """Hang the mount, past the kernel's cache of its root's attributes."""
    mount.set_mode("hang")
    time.sleep(ROOT_CACHED)


def _reaped(*guards: MountGuard) -> None:
    """Wait (30 s at most) until the workers stuck in the mount have exited and are reaped:
    they do once it answers."""
    end = time.monotonic() + 30
    while any(g.stats().abandoned for g in guards) and time.monotonic() < end:
        time.sleep(0.05)


def _opened_in_time(open_it: Callable[[], T], seconds: float) -> T:
    """What ``open_it()`` returns, made on a thread: one stuck in the mount fails the test
    instead of hanging it; the opening must take less than ``seconds``."""
    made: list[T] = []
    t = time.monotonic()
    thread = threading.Thread(target=lambda: made.append(open_it()), daemon=True)
    thread.start()
    thread.join(seconds + 5)
    assert made, "the store did not open"
    assert time.monotonic() - t < seconds, time.monotonic() - t
    return made[0]


def test_a_fallback_opens_and_serves_while_its_efs_mount_hangs(
    mount: FaultyMount, moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    # A Lambda's init opens EFS-then-S3 (and its cache) from configuration while the mount
    # hangs: it opens in seconds, not the mount's whole timeout (init has 10 s), and reads
    # and publishes go to S3 within their deadlines.
    from chroma_snapshots import StoreConfig, open_store
    from chroma_snapshots.backends.file import OPEN_SECONDS

    _efs, s3, both = _efs_then_s3(mount, moto_server, s3_bucket)
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(50_000)})
    version = both.publish("db", src).version
    _hang(mount)
    cfg = StoreConfig(
        url=f"efs://{mount.mountpoint}",
        fallback_url=f"s3://{s3_bucket}/snaps",
        s3_endpoint_url=moto_server.endpoint_url,
        efs_timeout=8.0,  # longer than the opening may take
        cache_dir=str(tmp_path / "cache"),
    )
    store = _opened_in_time(lambda: open_store(cfg), OPEN_SECONDS + 2.0)
    assert store.inner.folders == ()  # type: ignore[attr-defined]  # EFS: not asked yet
    t = time.monotonic()
    snap = store.checkout("db", deadline=8)
    assert time.monotonic() - t < 8.0
    assert snap.info.version == version
    assert read_tree(snap.path) == read_tree(src)
    (src / "more").write_bytes(b"more")
    t = time.monotonic()
    v2 = store.publish("db", src, deadline=Deadline(6))  # to S3; the mirror to EFS fails
    assert time.monotonic() - t < 7.0
    assert s3.resolve("db").version == v2.version
    mount.set_mode("ok")


def test_a_store_opened_on_a_hung_mount_learns_its_folder_once_it_answers(
    mount: FaultyMount, tmp_path: Path
) -> None:
    from chroma_snapshots import StoreNotFoundError
    from chroma_snapshots.backends.file import OPEN_SECONDS

    src, version = _publish_direct(mount, tmp_path)
    healthy = _efs_store(mount)
    _hang(mount)
    clock = Clock()
    store = _opened_in_time(lambda: _efs_store(mount, clock), OPEN_SECONDS + 2.0)
    guard = store.backend.guard  # type: ignore[attr-defined]
    assert store.folders == ()  # not known yet, and nothing asked for it
    cache = _opened_in_time(lambda: CachedStore(store, tmp_path / "cache"), 2.0)
    # a publish asks for the folder (a source inside the store is refused), within its deadline
    seconds, err = _timed(lambda: store.publish("db", src, deadline=2.0))
    assert isinstance(err, StorageTimeoutError), err
    assert seconds < 3.0, seconds
    # A store whose folder is missing opens too while the mount hangs, but once the mount
    # answers it is a missing store, never an empty one.
    gone_guard = MountGuard(str(mount.mountpoint), op_timeout=5.0, clock=clock)
    gone = _opened_in_time(
        lambda: RemoteStore(
            FileBackend(mount.mountpoint / "not-there", create=False, guard=gone_guard)
        ),
        OPEN_SECONDS + 2.0,
    )
    mount.set_mode("ok")
    _reaped(guard, gone_guard)
    clock.now += 31  # past any cool-down
    assert store.resolve("db", deadline=10).version == version
    assert store.folders == healthy.folders != ()
    assert read_tree(cache.checkout("db", deadline=10).path) == read_tree(src)
    with pytest.raises(StoreNotFoundError):
        gone.read_ref("db", deadline=10)


def test_a_mirror_opened_on_a_hung_mount_keeps_a_source_inside_it_out(
    mount: FaultyMount, tmp_path: Path
) -> None:
    # Opened while the mount hangs (within the caller's deadline, sooner than OPEN_SECONDS),
    # the mirror's folder is not known; once the mount answers, a publish asks for it
    # before it reads the source: a source inside the mirror is refused, not copied into it.
    from chroma_snapshots import InvalidInputError
    from chroma_snapshots.engine.deadline import within

    _hang(mount)
    efs = _opened_in_time(lambda: within(Deadline(0.5), lambda: _efs_store(mount)), 1.5)
    assert efs.folders == ()
    main = RemoteStore(FileBackend(tmp_path / "main"), chunk_size=4096)
    both = FallbackStore([efs, main], mirror=True)
    mount.set_mode("ok")
    guard = efs.backend.guard  # type: ignore[attr-defined]
    _reaped(guard)
    inside = write_tree(mount.source / "inside", {"a.bin": b"a" * 5000})
    with pytest.raises(InvalidInputError, match="inside the store"):
        both.publish("db", mount.mountpoint / "inside", deadline=10)
    assert inside.exists()
    assert efs.read_ref("db", deadline=10) is None
    src = write_tree(tmp_path / "src", {"a.bin": b"b" * 5000})
    version = both.publish("db", src, deadline=10).version
    assert efs.resolve("db", deadline=10).version == version  # mirrored


def test_opening_a_hung_mount_never_opens_the_breaker(mount: FaultyMount, tmp_path: Path) -> None:
    # Whatever the guard's budget, even shorter than the opening's own wait: the mount that
    # answers again right after serves at once, not after a 30 s cool-down.
    _src, version = _publish_direct(mount, tmp_path)
    _hang(mount)
    store = _opened_in_time(lambda: _efs_store(mount, op_timeout=1.0), 3.0)
    guard = store.backend.guard  # type: ignore[attr-defined]
    mount.set_mode("ok")
    _reaped(guard)
    assert guard.stats().healthy
    assert store.resolve("db", deadline=10).version == version


def test_a_publish_loses_at_most_the_opening_wait_to_a_mirror_still_hung(
    mount: FaultyMount, tmp_path: Path
) -> None:
    # The publish asks each mirror for its folder before it reads the source: a mirror that
    # hung since it opened costs OPEN_SECONDS of the publish's time, not half of it.
    from chroma_snapshots.backends.file import OPEN_SECONDS

    _hang(mount)
    efs = _opened_in_time(lambda: _efs_store(mount, op_timeout=8.0), OPEN_SECONDS + 2.0)
    main = RemoteStore(FileBackend(tmp_path / "main"), chunk_size=4096)
    both = FallbackStore([efs, main], mirror=True)
    src = write_tree(tmp_path / "src", {"a.bin": b"c" * 5000})
    t = time.monotonic()
    version = both.publish("db", src, deadline=20).version
    assert time.monotonic() - t < OPEN_SECONDS + 1.5
    assert main.resolve("db").version == version
    mount.set_mode("ok")
    _reaped(efs.backend.guard)  # type: ignore[attr-defined]
