"""How many pack reads a checkout runs at once (engine/ramp.py): the policy driven by a
fake clock, the gate with real threads, reads that wait for a slot never starting once
their call has ended, and a checkout behind a paced S3 that opens every stream."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.deadline import Deadline, WorkerPool
from chroma_snapshots.engine.ramp import WINDOW_BYTES, Ramp
from chroma_snapshots.engine.transfer import Read, run_phases
from chroma_snapshots.errors import IntegrityError, StorageTimeoutError
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.proxy import CountingProxy

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _window(ramp: Ramp, clock: Clock, mb_per_s: float) -> None:
    """One second at ``ramp``'s level, carrying ``mb_per_s`` (at least a window's bytes)."""
    with ramp.slot():
        clock.now += 1
        ramp.add(int(mb_per_s * 1e6))


def test_streams_double_while_each_level_carries_more() -> None:
    clock = Clock()
    ramp = Ramp(8, start=2, clock=clock)
    assert (ramp.limit, ramp.settled) == (2, False)
    _window(ramp, clock, 100)
    assert ramp.limit == 4
    _window(ramp, clock, 190)  # +90%
    assert ramp.limit == 8
    _window(ramp, clock, 300)
    assert (ramp.limit, ramp.peak, ramp.settled) == (8, 8, True)


def test_a_level_that_adds_too_little_goes_back_down_and_stays() -> None:
    clock = Clock()
    ramp = Ramp(8, start=2, clock=clock)
    _window(ramp, clock, 400)
    _window(ramp, clock, 440)  # +10% for twice the threads: not worth them
    assert (ramp.limit, ramp.peak, ramp.settled) == (2, 4, True)
    _window(ramp, clock, 10)  # settled: later rates change nothing
    assert ramp.limit == 2


def test_a_link_that_slows_per_stream_starts_the_doubling_again() -> None:
    clock = Clock()
    ramp = Ramp(8, start=2, clock=clock)
    _window(ramp, clock, 400)
    _window(ramp, clock, 420)  # settles at 2, carrying 400
    assert (ramp.limit, ramp.settled) == (2, True)
    _window(ramp, clock, 390)  # noise: nothing
    _window(ramp, clock, 100)  # one window short: a pause, perhaps
    _window(ramp, clock, 380)
    assert (ramp.limit, ramp.settled) == (2, True)
    _window(ramp, clock, 100)
    _window(ramp, clock, 100)  # two in a row: each stream carries less now
    assert (ramp.limit, ramp.settled) == (4, False)
    _window(ramp, clock, 200)  # twice the streams, twice the bytes
    assert ramp.limit == 8
    _window(ramp, clock, 390)
    assert (ramp.limit, ramp.peak, ramp.settled) == (8, 8, True)


def test_a_window_is_judged_only_after_its_time_and_its_bytes() -> None:
    clock = Clock()
    ramp = Ramp(8, start=2, clock=clock)
    with ramp.slot():
        ramp.add(100 * WINDOW_BYTES)  # bytes, but no time yet
        assert ramp.limit == 2
        clock.now += 10
        ramp.add(1)
        assert ramp.limit == 4
        clock.now += 10  # time, but too few bytes for four streams
        ramp.add(WINDOW_BYTES)
        assert ramp.limit == 4


def test_one_worker_is_one_stream_and_nothing_to_try() -> None:
    ramp = Ramp(1)
    assert (ramp.limit, ramp.settled, ramp.peak) == (1, True, 1)


def test_no_more_reads_than_slots_run_at_once() -> None:
    ramp, lock = Ramp(8, start=2), threading.Lock()
    running, most, release = [0], [0], threading.Event()

    def read() -> None:
        with ramp.slot():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(5)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert most[0] == 2  # four are waiting for a slot
    release.set()
    for t in threads:
        t.join(5)
    assert most[0] == 2
    assert running[0] == 0


def test_closing_the_gate_turns_waiting_reads_away() -> None:
    ramp, hold = Ramp(8, start=2), threading.Event()
    outcomes: list[str] = []

    def read() -> None:
        with ramp.slot() as granted:
            if granted:
                hold.wait(5)
            outcomes.append("ran" if granted else "turned away")

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    ramp.close()
    hold.set()
    for t in threads:
        t.join(5)
    assert sorted(outcomes) == ["ran", "ran", "turned away", "turned away"]


def _reads(n: int) -> list[Read]:
    return [Read("p" * 64, i, i + 1, ()) for i in range(n)]


@pytest.mark.parametrize("ending", ["error", "deadline"])
def test_reads_waiting_for_a_slot_never_start_after_the_call_ends(ending: str) -> None:
    started: list[int] = []
    hold, lock = threading.Event(), threading.Lock()

    def run(r: Read) -> None:
        with lock:
            started.append(r.start)
            first = len(started) == 1
        if ending == "error" and first:
            time.sleep(0.1)  # the other slot is taken meanwhile
            raise IntegrityError("bad pack")
        hold.wait(5)

    dl = Deadline(1.0 if ending == "deadline" else 30)
    with WorkerPool(8) as pool:
        expected = IntegrityError if ending == "error" else StorageTimeoutError
        with pytest.raises(expected):
            run_phases(run, [_reads(8)], pool, dl, Ramp(8, start=2))
        hold.set()
        time.sleep(0.3)  # a read turned away would have started by now
    assert len(started) == 2  # the two holding slots; the six waiting never ran
    # and the error raised is the one that ended the reads (never a turned-away read's)


def test_a_checkout_behind_paced_streams_opens_every_stream(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    # 24 MB/s a connection, as S3 gives a fraction of the link to each: two streams
    # carry 48 MB/s, four 96; the checkout goes to all eight and is exact.
    with CountingProxy(moto_server.endpoint_url, stream_mbps=24) as proxy:
        backend = S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=proxy.url))
        store = RemoteStore(backend, pack_target=4 * MiB)
        src = write_tree(tmp_path / "src", {f"seg/{i}.bin": os.urandom(8 * MiB) for i in range(8)})
        store.publish("db", src)
        with store.checkout("db", dest=tmp_path / "out") as snap:
            assert read_tree(snap.path) == read_tree(src)
            assert snap.stats.streams == 8
