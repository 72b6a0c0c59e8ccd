"""A checkout whose destination is on a slow or hung disk returns at its deadline: the
building and removal of its half-built work folder go on in the background, and nothing of
it is left once the disk lets them finish (engine/cleanup.py)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import test_hang

from chroma_snapshots import (
    CachedStore,
    InvalidInputError,
    RemoteStore,
    StorageTimeoutError,
    wait_for_cleanups,
)
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import cleanup
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faultfs import FaultyMount

fuse_mount = test_hang.mount  # the FUSE fixture: skips without FUSE, fails in CI
DEADLINE = 2.0
SLACK = 1.0  # the grace, then a loaded machine's scheduling (the removal took 4-5 s before)


def _published(tmp_path: Path) -> tuple[RemoteStore, Path]:
    files = {f"d{i % 7}/f{i:03d}.bin": os.urandom(8192) for i in range(300)}
    src = write_tree(tmp_path / "src", files)
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    store.publish("db", src)
    return store, src


def _timed_out(call: Callable[[], object]) -> float:
    t = time.monotonic()
    with pytest.raises(StorageTimeoutError):
        call()
    return time.monotonic() - t


@pytest.mark.parametrize("through", ["store", "cache"])
def test_a_timeout_on_a_slow_dest_returns_at_the_deadline_and_leaves_nothing(
    fuse_mount: FaultyMount, tmp_path: Path, through: str
) -> None:
    store, src = _published(tmp_path)
    source = CachedStore(store, tmp_path / "cache") if through == "cache" else store
    if through == "cache":
        source.checkout("db").release()  # cached: the copy to dest is all that is slow
    dest = fuse_mount.mountpoint / "out" / "db"
    fuse_mount.set_mode("latency 0.03")
    took = _timed_out(lambda: source.checkout("db", dest=dest, deadline=DEADLINE))
    assert took < DEADLINE + SLACK, took
    assert wait_for_cleanups(timeout=120)
    fuse_mount.set_mode("ok")
    assert os.listdir(fuse_mount.mountpoint) == []  # no work folder, not even the parents made
    with source.checkout("db", dest=dest) as snap:  # the next call on the same dest
        assert read_tree(snap.path) == read_tree(src)


SHARDS = 8  # steps run at once, each on a mount of its own: a hang is a wait, not work


def test_a_dest_that_hangs_at_any_step_costs_the_deadline_and_is_cleaned_after(
    fuse_mount: FaultyMount, tmp_path: Path
) -> None:
    # The mount passes n calls, then hangs: for every n from 0 (the first look at dest)
    # past the last call of a healthy checkout (the rename into place and after). Each
    # time the call ends by its deadline; once the mount answers again, either the whole
    # tree is at dest (it finished in time) or nothing is anywhere on the mount. The steps
    # are dealt to SHARDS mounts in rounds (n = round + shard), each shard with a store
    # object of its own that it keeps using after every step.
    files = {"chroma.sqlite3": os.urandom(20_000), "seg/a.bin": os.urandom(5000), "b": b"b"}
    src = write_tree(tmp_path / "src", files)
    RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096).publish("db", src)
    stores = [RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096) for _ in range(SHARDS)]
    dest = fuse_mount.mountpoint / "out" / "db"
    before = sum(fuse_mount.op_counts().values())
    assert read_tree(stores[0].checkout("db", dest=dest).path) == files  # healthy: its calls
    calls = sum(fuse_mount.op_counts().values()) - before
    shutil.rmtree(fuse_mount.mountpoint / "out")
    with ExitStack() as stack:
        mounts = [fuse_mount] + [
            _another_mount(tmp_path / f"m{k}", stack) for k in range(1, SHARDS)
        ]
        outcomes = _steps_in_shards(mounts, stores, calls + 2, files)
    assert outcomes == {"delivered", "timed out"}  # both ends were reached


def _another_mount(folder: Path, stack: ExitStack) -> FaultyMount:
    (folder / "backing").mkdir(parents=True)
    return stack.enter_context(FaultyMount(folder / "backing", folder / "mnt", state_dir=folder))


def _steps_in_shards(
    mounts: list[FaultyMount], stores: list[RemoteStore], steps: int, files: dict[str, bytes]
) -> set[str]:
    """Every step n < ``steps``, with and without a retry, on mount n % SHARDS; all shards
    wait for the cleanups together (no shard hangs meanwhile: cleanup's wait is global)."""
    together = threading.Barrier(SHARDS, timeout=120)
    outcomes: set[str] = set()

    def shard(k: int) -> None:
        m, store = mounts[k], stores[k]
        dest = m.mountpoint / "out" / "db"
        try:
            for first in range(0, steps, SHARDS):
                for retry in (False, True):  # then, once the mount answers: wait, or retry
                    n = first + k
                    if n < steps:
                        outcomes.add(_hang_after(m, store, dest, n, retry, files))
                    together.wait()
                    if k == 0:
                        assert wait_for_cleanups(timeout=60), n
                    together.wait()
                    if n < steps:
                        _whole_or_nothing(m, dest, files, n)
            with store.checkout("db", dest=dest) as snap:  # and the store object still works
                assert read_tree(snap.path) == files
        except BaseException:
            together.abort()  # the other shards stop at their next wait
            raise

    with ThreadPoolExecutor(SHARDS) as pool:
        done = [pool.submit(shard, k) for k in range(SHARDS)]
    errors = [e for f in done if (e := f.exception()) is not None]
    if errors:  # the first failure, not a shard stopped by it
        raise next(
            (e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0]
        )
    return outcomes


def _hang_after(
    m: FaultyMount, store: RemoteStore, dest: Path, n: int, retry: bool, files: dict[str, bytes]
) -> str:
    m.set_mode(f"hang-after {n} {n}-{retry}")
    took = time.monotonic()
    try:
        store.checkout("db", dest=dest, deadline=0.5)
        outcome = "delivered"
    except StorageTimeoutError:
        outcome = "timed out"
    took = time.monotonic() - took
    assert took < 0.5 + SLACK, (n, took)
    m.set_mode("ok")
    if retry and not dest.exists():  # the same store and dest, the work left running
        assert read_tree(store.checkout("db", dest=dest, deadline=20).path) == files, n
    return outcome


def _whole_or_nothing(m: FaultyMount, dest: Path, files: dict[str, bytes], n: int) -> None:
    out = dest.parent
    if dest.exists():  # delivered, by the call or by the retry: whole, and alone
        assert read_tree(dest) == files, n
        assert os.listdir(out) == ["db"], n
        shutil.rmtree(out)
    assert os.listdir(m.mountpoint) == [], n  # nothing else, parents neither


def test_a_cleanup_waits_at_most_its_time_then_goes_on_and_logs_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate, ran = threading.Event(), threading.Event()

    def job() -> None:
        gate.wait(60)
        ran.set()
        raise OSError(5, "Input/output error")

    cleanup.clean_up(job, within=0.0)  # waits the grace, then returns: the job still runs
    assert not ran.is_set()
    assert not wait_for_cleanups(timeout=0)
    with caplog.at_level(logging.WARNING, logger="chroma_snapshots.engine.cleanup"):
        gate.set()
        assert wait_for_cleanups(timeout=60)
    assert ran.is_set()
    assert "Input/output error" in caplog.text  # logged, not raised at the caller


def test_a_cleanup_runs_even_if_its_thread_starts_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a loaded machine a new thread may wait longer than the grace for the interpreter.
    # The clean-up was then cancelled as a call past its deadline is, and a failed
    # checkout's work folder stayed beside dest until a sweep a minute later (in CI, once).
    go, ran = threading.Event(), []

    class Late(threading.Thread):
        def run(self) -> None:
            go.wait(60)
            super().run()

    monkeypatch.setattr(threading, "Thread", Late)
    cleanup.clean_up(lambda: ran.append(1), within=0.0)  # returns after the grace
    monkeypatch.undo()
    assert ran == []
    assert not wait_for_cleanups(timeout=0)  # on record while its thread has not started
    go.set()
    assert wait_for_cleanups(timeout=60)
    assert ran == [1]


def test_a_cleanup_runs_in_place_when_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[int] = []

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    cleanup.clean_up(lambda: done.append(1), within=0.0)
    assert done == [1]
    assert wait_for_cleanups(timeout=0)


def test_exactly_one_side_decides_whether_a_late_tree_is_delivered(tmp_path: Path) -> None:
    taken: list[str] = []
    kept_first = cleanup.Handoff()
    # the build put its tree in place first:
    assert kept_first.keep(tmp_path / "a", lambda: taken.append("a"))
    assert not kept_first.give_up()  # the caller returns it
    assert kept_first.final == tmp_path / "a"
    gave_up_first = cleanup.Handoff()
    assert gave_up_first.give_up()  # the caller raised first:
    # the build takes its tree back itself: the caller has nothing to take back
    assert not gave_up_first.keep(tmp_path / "b", lambda: taken.append("b"))
    assert gave_up_first.give_up()  # (and asking again does not change the answer)
    gave_up_first.take_back()
    kept_first.take_back()  # the caller failed after it had the tree: taken back, once
    kept_first.take_back()
    assert taken == ["a"]


def test_a_tree_in_place_after_the_caller_gave_up_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the rename into place finishes after the caller's wait ended: the caller has raised,
    # so the tree goes back under its work name and is removed, never left at dest
    store, _ = _published(tmp_path)
    from chroma_snapshots.engine import localfs

    real_move, gate = localfs.move_into_place, threading.Event()

    def slow_move(work: Path, final: Path) -> None:
        gate.wait(60)  # released only once the caller has given up
        real_move(work, final)

    monkeypatch.setattr(localfs, "move_into_place", slow_move)
    dest = tmp_path / "out"
    with pytest.raises(StorageTimeoutError):
        store.checkout("db", dest=dest, deadline=1.0)
    gate.set()
    assert wait_for_cleanups(timeout=60)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -float("inf"), 1e10, True, "1"])
def test_wait_for_cleanups_refuses_a_timeout_that_is_not_seconds(timeout: object) -> None:
    # NaN waited as long as None (over 110 s on a hung mount), inf and 1e10 raised a bare
    # OverflowError from threading, only while work was pending (an independent review)
    gate = threading.Event()

    def pending() -> None:
        gate.wait(60)

    cleanup.clean_up(pending, within=0.0)  # still running while the timeouts are tried
    try:
        with pytest.raises(InvalidInputError):
            wait_for_cleanups(timeout)  # type: ignore[arg-type]
        assert not wait_for_cleanups(-1)  # a past time: no wait
    finally:
        gate.set()
    assert wait_for_cleanups(timeout=60)


def test_a_call_that_times_out_on_a_disk_that_answers_returns_with_nothing_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build notices the deadline at its next check and removes its work folder and
    # the parents it made; the caller waits for that (at most cleanup.GRACE, here made
    # long so that a loaded machine cannot fail the test). Before, the call returned at
    # once and a process exiting right after it (the CLI) killed the removal half done.
    monkeypatch.setattr(cleanup, "GRACE", 60.0)
    files = {f"d{i % 3}/f{i:02d}.bin": os.urandom(256 << 10) for i in range(24)}
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    store.publish("db", write_tree(tmp_path / "src", files))
    timed_out = 0
    for seconds in (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1):
        dest = tmp_path / "out" / "a" / "db"
        try:
            store.checkout("db", dest=dest, deadline=seconds)
        except StorageTimeoutError:
            timed_out += 1
            assert not (tmp_path / "out").exists(), seconds  # no work folder, no parents
        else:
            assert read_tree(dest) == files
            shutil.rmtree(tmp_path / "out")
    assert timed_out >= 3
