"""A process at its limit of threads (RLIMIT_NPROC, a container's pids limit): every
operation that needs a thread and cannot start one fails with ProcessLimitError, the
documented error, leaving nothing at its destination and latest as it was. An independent
review ran the CLI under `prlimit --nproc=2` and got Python's RuntimeError as a traceback.
The limit is simulated by making ``Thread.start`` fail as CPython does past it, after the
first ``allowed`` starts, for every ``allowed`` a checkout or publish reaches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_inprocess import Run

from chroma_snapshots import (
    BackendUnavailableError,
    LockError,
    ProcessLimitError,
    RemoteStore,
    open_backend,
)
from chroma_snapshots.engine.cleanup import wait_for_cleanups
from chroma_snapshots.locking import Lease, ObjectLeaseLock
from chroma_snapshots.testing.conformance import read_tree, write_tree

pytestmark = pytest.mark.usefixtures("clean_env")
FILES = {f"seg/{i}.bin": bytes([i]) * 70_000 for i in range(6)} | {"chroma.sqlite3": b"s" * 9}


@contextmanager
def thread_limit(allowed: int, named: str = "") -> Iterator[list[int]]:
    """``Thread.start`` succeeds ``allowed`` times, then fails as at the limit (only for
    threads whose name starts with ``named``); yields the count of refused starts (a list
    of one)."""
    real, refused, lock = threading.Thread.start, [0], threading.Lock()
    left = [allowed]

    def start(self: threading.Thread) -> None:
        with lock:
            ok = left[0] > 0 or not self.name.startswith(named)
            left[0] -= ok and self.name.startswith(named)
            refused[0] += not ok
        if not ok:
            raise RuntimeError("can't start new thread")
        real(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield refused
    finally:
        threading.Thread.start = real  # type: ignore[method-assign]


def _store(tmp_path: Path) -> RemoteStore:
    (tmp_path / "store").mkdir(exist_ok=True)
    return RemoteStore(open_backend(f"file://{tmp_path / 'store'}"), pack_target=100_000)


@pytest.mark.parametrize("allowed", range(6))
def test_a_checkout_at_the_thread_limit_fails_documented_and_leaves_nothing(
    tmp_path: Path, allowed: int
) -> None:
    store = _store(tmp_path)
    store.publish("db", write_tree(tmp_path / "src", FILES))
    dest = tmp_path / "out" / "db"
    with thread_limit(allowed) as refused:
        try:
            store.checkout("db", dest=dest, deadline=20)
            delivered = True
        except ProcessLimitError:  # the documented error; any other fails the test
            delivered = False
    assert wait_for_cleanups(timeout=30)
    assert delivered or allowed > 0 or refused[0] > 0
    if allowed == 0:  # the build's own thread is refused: never a checkout without one
        assert not delivered
    if delivered:
        assert read_tree(dest) == FILES
    else:
        assert refused[0] > 0
        assert not dest.exists()
    with store.checkout("db", dest=tmp_path / "again") as snap:  # and it works once allowed
        assert read_tree(snap.path) == FILES


@pytest.mark.parametrize("allowed", range(4))
def test_a_publish_at_the_thread_limit_fails_documented_and_moves_nothing(
    tmp_path: Path, allowed: int
) -> None:
    store = _store(tmp_path)
    first = store.publish("db", write_tree(tmp_path / "src", FILES))
    changed = write_tree(tmp_path / "src2", {**FILES, "chroma.sqlite3": b"t" * 9})
    with thread_limit(allowed) as refused:
        try:
            store.publish("db", changed, deadline=20)
            published = True
        except ProcessLimitError:
            published = False
    found = store.read_ref("db")
    assert found is not None
    if allowed == 0:
        assert not published
    if not published:
        assert refused[0] > 0
        assert found[0].version == first.version
    assert store.verify("db", found[0].version).ok


def test_the_cli_at_the_thread_limit_prints_one_line(tmp_path: Path, run: Run) -> None:
    _store(tmp_path).publish("db", write_tree(tmp_path / "src", FILES))
    url = f"file://{tmp_path / 'store'}"
    with thread_limit(0):
        code, _, err = run("--store", url, "checkout", "db", "--dest", str(tmp_path / "o"))
    assert code == 1
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err
    assert "limit of threads" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("release_fails", [False, True])
def test_a_lease_kept_at_the_thread_limit_is_given_back_and_the_limit_reported(
    tmp_path: Path, release_fails: bool
) -> None:
    """The keeper's thread cannot start: the lease is released (a release that fails is
    logged, the lease lapses) and the error raised is ProcessLimitError either way. Only
    the keeper is refused: the release's own threads start."""
    backend = open_backend(f"file://{tmp_path}")
    lock = ObjectLeaseLock(backend, "locks/db", ttl=30)
    lease = lock.acquire(timeout=0)
    if release_fails:

        def refuse(lease: Lease, **_: object) -> None:
            raise BackendUnavailableError("the store is gone")

        lock.release = refuse  # type: ignore[method-assign]
    refused = thread_limit(0, named="lease-heartbeat")
    with refused, pytest.raises(ProcessLimitError), lock.kept(lease):
        pytest.fail("the block ran without its keeper")
    again = ObjectLeaseLock(backend, "locks/db", ttl=30)
    if release_fails:  # still held until it lapses
        with pytest.raises(LockError):
            again.acquire(timeout=0)
    else:  # given back: a second holder takes it at once
        assert again.acquire(timeout=0).generation > lease.generation
