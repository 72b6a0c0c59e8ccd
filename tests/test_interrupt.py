"""An interrupted call (Ctrl-C: KeyboardInterrupt in the waiting thread) calls its deadline
off: its workers stop at their next check instead of running on to the deadline, and what
it wrote is removed (engine/deadline.py, Deadline.call_off)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.cleanup import interrupts_held
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.errors import StorageTimeoutError
from chroma_snapshots.testing.conformance import write_tree

WORKER = Path(__file__).with_name("interrupt_worker.py")
PACKS = 200  # one read each: ~10 s of reads at the worker's pace with 4 workers


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal() -> Iterator[None]:
    """A run a shell started in the background (``cmd &``) inherits SIGINT ignored: no
    Ctrl-C then reaches this process or the workers it starts, which keep that disposition.
    Give both the one a terminal gives (a Python handler becomes the default at exec)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _publish(tmp_path: Path) -> None:
    files = {f"f{i:03d}.bin": os.urandom(64 << 10) for i in range(PACKS)}
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096, pack_target=64 << 10)
    remote.publish("db", write_tree(tmp_path / "src", files))


def _interrupted(
    tmp_path: Path, through: str, read_time: float, then: str, signals: int = 1
) -> str:
    where = tmp_path / ("out/db" if through == "store" else "cache")
    args = [str(tmp_path / "store"), through, str(where), str(read_time), then]
    proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "reading"
    time.sleep(0.2)  # the call waits for its reads by now, several of them under way
    for _ in range(signals):  # a user pressing Ctrl-C again and again, 5 ms apart
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=120)
    if signals == 1:
        assert proc.returncode == (0 if then == "wait" else 130), out
    else:  # a program that does not handle interrupts may die of a later one: its choice
        assert proc.returncode in (130, -signal.SIGINT), out
    return out


def _nothing_left(tmp_path: Path, through: str) -> None:
    if through == "store":  # no tree, no work folder, not even the parent it made
        assert not (tmp_path / "out").exists()
    else:  # no version, no work folder, no claim on the room, not its folder
        d = next((tmp_path / "cache").glob("*/db"))
        for sub in ("versions", "tmp", "building"):
            assert not (d / sub).exists() or list((d / sub).iterdir()) == [], sub


@pytest.mark.parametrize("through", ["store", "cache"])
def test_an_interrupted_checkout_stops_reading_and_leaves_nothing(
    tmp_path: Path, through: str
) -> None:
    _publish(tmp_path)
    got = json.loads(_interrupted(tmp_path, through, 0.05, "wait"))
    assert got["interrupted"]
    assert got["reads_after"] <= 4, got  # the reads already under way, one a worker
    assert got["reads"] < PACKS, got
    _nothing_left(tmp_path, through)


@pytest.mark.parametrize("through", ["store", "cache"])
def test_an_interrupted_process_that_exits_at_once_leaves_nothing_behind_slow_reads(
    tmp_path: Path, through: str
) -> None:
    # Reads of 1 s each are under way when the interrupt comes: the call's work notices its
    # deadline called off while it waits for them, removes what it wrote, and the call
    # raises once that is done (before: its wait ended with the slowest read, after the
    # call had given up waiting and the process had exited, leaving the work folder).
    _publish(tmp_path)
    _interrupted(tmp_path, through, 1.0, "exit")
    _nothing_left(tmp_path, through)


def test_an_interrupted_wait_calls_its_deadline_off() -> None:
    deadline, never = Deadline(60), Future[None]()
    main = threading.main_thread().ident
    assert main is not None
    # a real Ctrl-C: kill(pid) lands on the main thread, where wait_all waits
    threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        wait_all([never], deadline, "reading")
    assert never.cancelled()
    assert deadline.remaining() == 0  # for the threads still checking it too
    with pytest.raises(StorageTimeoutError, match="interrupted during reading packs"):
        deadline.check("reading packs")


@pytest.mark.parametrize("through", ["store", "cache"])
def test_interrupts_in_a_burst_do_not_cut_the_clean_up_short(tmp_path: Path, through: str) -> None:
    # the second and third land while the call waits for its clean-up: that wait runs to
    # its end (a cache build's work folder was left in 6 of 6 runs of a review before)
    _publish(tmp_path)
    _interrupted(tmp_path, through, 2.0, "exit", signals=3)
    _nothing_left(tmp_path, through)


def test_interrupts_held_during_a_clean_up_are_raised_after_it() -> None:
    """A Ctrl-C inside the block does not cut it short: it is raised once the block is
    done, and Python's handler is back; a host program's own handler is left alone."""
    steps: list[str] = []

    def clean_up() -> None:
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)  # runs the handler at once, in this thread
            signal.raise_signal(signal.SIGINT)
            steps.append("the clean-up ran to its end")

    with pytest.raises(KeyboardInterrupt):
        clean_up()
    assert steps == ["the clean-up ran to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    mine: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: mine.append(signum))
    with interrupts_held():
        signal.raise_signal(signal.SIGINT)
    assert mine == [signal.SIGINT]  # the host's handler saw it, and nothing was held


def test_an_interrupted_command_run_in_process_gives_ctrl_c_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI ignores a second Ctrl-C while it cleans up; once ``main`` returns, Python's
    handler is back: a program that ran it in-process, and what it starts after, can be
    interrupted again (an ignored SIGINT is inherited by every child process)."""
    import importlib

    import click

    cli_main = importlib.import_module("chroma_snapshots.cli.main")  # the module, not main()

    @click.command()
    def interrupted() -> None:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C during the command
        signal.raise_signal(signal.SIGINT)  # and a second one, ignored

    monkeypatch.setattr(cli_main, "_build", lambda: interrupted)
    assert cli_main.main([]) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    show = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True)
    assert child.stdout == "True\n"


@pytest.mark.parametrize("deadline", [60.0, None], ids=["deadline", "no-deadline"])
@pytest.mark.parametrize("to_dest", [False, True], ids=["temporary", "dest"])
def test_a_ctrl_c_as_the_checkout_lands_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to_dest: bool, deadline: float | None
) -> None:
    """Ctrl-C just after the checkout's tree was renamed into place, before the caller has
    the snapshot: no one could release a temporary copy, so it goes, and its lock with it
    (it stayed, held, until the process ended); a tree at dest goes too, so that the
    retry finds dest as it was (it failed: "exists and is not empty")."""
    import tempfile

    from chroma_snapshots.engine import cleanup, scratch

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    _publish(tmp_path)
    store = RemoteStore(FileBackend(tmp_path / "store"))
    main, keep = threading.main_thread().ident, cleanup.Handoff.keep
    assert main is not None

    def keep_then_interrupt(self: cleanup.Handoff, final: Path, take: Callable[[], None]) -> bool:
        kept = keep(self, final, take)
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.5)  # the caller takes it while it still waits for the build
        return kept

    monkeypatch.setattr(cleanup.Handoff, "keep", keep_then_interrupt)
    held = len(scratch._held)
    dest = tmp_path / "out" / "db" if to_dest else None
    with pytest.raises(KeyboardInterrupt):
        store.checkout("db", dest=dest, deadline=deadline)
    assert list(tmp.iterdir()) == []
    assert len(scratch._held) == held
    assert not (tmp_path / "out").exists()  # nor the parent the checkout made for dest
    monkeypatch.undo()
    if to_dest:  # the retry: as if the first had never run
        assert store.checkout("db", dest=dest).path == dest


@pytest.mark.parametrize("to_dest", [False, True], ids=["temporary", "dest"])
@pytest.mark.parametrize("through", ["store", "cache"])
def test_a_ctrl_c_as_the_checkout_returns_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to_dest: bool, through: str
) -> None:
    """The same Ctrl-C one step later: the tree is in place and the checkout is making the
    snapshot it returns (the interrupt raised there). Through a cache, the cached version
    stays, unpinned (a pin no one releases kept it from eviction)."""
    import tempfile

    from chroma_snapshots import CachedStore
    from chroma_snapshots.engine import scratch
    from chroma_snapshots.engine.models import SnapshotInfo

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    _publish(tmp_path)
    remote = RemoteStore(FileBackend(tmp_path / "store"))
    cached = CachedStore(remote, tmp_path / "cache")
    store = cached if through == "cache" else remote
    version = remote.current_version("db")[0]
    (tmp_path / "out").mkdir()  # dest's parent is the user's: it stays

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(SnapshotInfo, "from_manifest", interrupted)
    held = len(scratch._held)
    dest = tmp_path / "out" / "db" if to_dest else None
    with pytest.raises(KeyboardInterrupt):
        store.checkout("db", dest=dest)
    assert list(tmp.iterdir()) == []
    assert len(scratch._held) == held
    assert list((tmp_path / "out").iterdir()) == []  # no tree, no work folder
    if through == "cache":
        assert cached.cached_manifest("db", version) is not None
        assert not cached.dirs("db").pinned(version)


def test_a_ctrl_c_as_the_checkout_returns_gives_back_the_users_empty_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree replaced an empty folder the user had made at dest: taken back, it left
    no folder there at all."""
    from chroma_snapshots.engine.models import SnapshotInfo

    _publish(tmp_path)
    store = RemoteStore(FileBackend(tmp_path / "store"))
    dest = tmp_path / "dest"
    dest.mkdir()
    dest.chmod(0o750)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(SnapshotInfo, "from_manifest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.checkout("db", dest=dest)
    assert dest.is_dir()
    assert list(dest.iterdir()) == []
    assert dest.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src", "store"]
    assert store.checkout("db", dest=dest).path == dest  # the retry
