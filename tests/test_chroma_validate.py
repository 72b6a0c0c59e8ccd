"""validate() runs chroma in a child Python: a damaged vector index (one that crashes
chroma's native code included) is IntegrityError for a caller that goes on; a deadline, a
call-off or Ctrl-C ends the child with the call, and so does the caller's death."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chroma_helpers import build, close_client

from chroma_snapshots import IntegrityError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.chroma import publish_client, validate
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.errors import StorageTimeoutError

RECORDS = 3000  # past chroma's sync threshold: the HNSW index is on disk


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sound") / "db"
    close_client(build(path, {"receipts": RECORDS}, dim=16))
    return path


def _segment(db: Path) -> Path:
    (folder,) = [p for p in db.iterdir() if p.is_dir()]
    return folder


def _layout(db: Path) -> tuple[Path, int, int, int, int]:
    """The segment folder, then from chroma's hnswlib header (a format version, then
    offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset,
    offsetData): elements, bytes per element, where the label and the vector start."""
    seg = _segment(db)
    fields = struct.unpack_from("<I6Q", (seg / "header.bin").read_bytes())
    count, per_element, label_at, vector_at = fields[3:7]
    assert count == RECORDS
    return seg, count, per_element, label_at, vector_at


def _level0(db: Path, change: Callable[[bytearray, int, int, int], None]) -> None:
    seg, _count, per_element, label_at, vector_at = _layout(db)
    level0 = bytearray((seg / "data_level0.bin").read_bytes())
    change(level0, per_element, label_at, vector_at)
    (seg / "data_level0.bin").write_bytes(bytes(level0))


def _cut_short(db: Path) -> None:
    """data_level0.bin cut to half, as a copy torn by a writer leaves it."""
    seg = _layout(db)[0]
    with open(seg / "data_level0.bin", "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size // 2)


def _label_changed(db: Path) -> None:
    """One element's label points at no record."""
    _level0(db, lambda b, size, label, _: struct.pack_into("<Q", b, 999 * size + label, 10**9))


def _vector_not_finite(db: Path) -> None:
    """One stored vector is NaN: chroma refuses to store one."""
    _level0(
        db, lambda b, size, _, vector: struct.pack_into("<f", b, 20 * size + vector, float("nan"))
    )


@pytest.mark.parametrize("damage", [_cut_short, _label_changed, _vector_not_finite])
def test_damage_anywhere_in_the_vector_segment_is_found(
    sound: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """Not only the one vector the index is probed with: every record's embedding is
    read back (the review found these three validated)."""
    db = tmp_path / "db"
    shutil.copytree(sound, db)
    damage(db)
    with pytest.raises(IntegrityError, match=r"collection receipts|chroma failed reading it"):
        validate(db)


def test_a_collection_name_that_is_not_text_is_an_integrity_error(
    sound: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    shutil.copytree(sound, db)
    with sqlite3.connect(db / "chroma.sqlite3") as conn:
        conn.execute("UPDATE collections SET name = x'6162ff'")
    with pytest.raises(IntegrityError, match="not text"):
        validate(db)  # was a raw TypeError from sorting the names


def _neighbours_out_of_range(db: Path) -> None:
    """Every level-0 neighbour id of the HNSW graph points far past its elements: hnswlib
    follows them without a bounds check (SIGSEGV on the first query)."""

    def links(b: bytearray, size: int, _label: int, _vector: int) -> None:
        for at in range(0, RECORDS * size, size):
            struct.pack_into("<I", b, at + 4, 0x7FFFFFFF)  # after the link count

    _level0(db, links)


def _header_pointer_garbage(db: Path) -> None:
    """A header torn across offsetLevel0's high half and max_elements' low half: hnswlib
    frees a pointer it never allocated, and glibc aborts (SIGABRT)."""
    header = _segment(db) / "header.bin"
    raw = bytearray(header.read_bytes())
    struct.pack_into("<Q", raw, 8, 2**40)  # after the format version (4) and 4 bytes
    header.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_neighbours_out_of_range, _header_pointer_garbage])
def test_a_crash_of_chroma_is_an_integrity_error_and_the_caller_lives(
    sound: Path, tmp_path: Path, damage: object
) -> None:
    db = tmp_path / "db"
    shutil.copytree(sound, db)
    assert validate(db).collections == {"receipts": RECORDS}  # sound before the damage
    assert callable(damage)
    damage(db)
    with pytest.raises(IntegrityError, match=r"chroma crashed \(SIG(SEGV|ABRT)\) reading it"):
        validate(db)
    assert validate(sound).records == RECORDS  # this process goes on, and so does chroma


def test_publish_client_refuses_a_folder_that_crashes_chroma(sound: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    shutil.copytree(sound, db)
    _neighbours_out_of_range(db)
    store = RemoteStore(FileBackend(tmp_path / "remote"))
    with pytest.raises(IntegrityError, match=r"refusing to publish .*crashed"):
        publish_client(store, "db", db, attempts=1)
    assert list(store.names()) == []
    # force publishes what failed validation (the copy is taken; chroma's crash is not ours)
    info = publish_client(store, "db", db, attempts=1, force=True)
    assert [v.version for v in store.versions("db")] == [info.version]


def test_a_deadline_kills_the_child_and_the_next_call_is_unharmed(
    sound: Path, tmp_path: Path
) -> None:
    children_before = _children()
    with pytest.raises(StorageTimeoutError, match="validating"):
        validate(sound, deadline=Deadline(0.05))
    assert _children() <= children_before  # killed and reaped, not left running
    assert validate(sound, deadline=120).records == RECORDS


def _children(pid: int | None = None) -> set[int]:
    task = Path(f"/proc/{pid or os.getpid()}/task")
    kids: set[int] = set()
    for t in task.iterdir():
        text = (t / "children").read_text() if (t / "children").exists() else ""
        kids |= {int(pid) for pid in text.split()}
    return kids


def _hanging(sound: Path, tmp_path: Path) -> Path:
    """A database whose vector segment is a FIFO nobody writes: chroma's child hangs."""
    db = tmp_path / "hangs"
    shutil.copytree(sound, db)
    level0 = _segment(db) / "data_level0.bin"
    level0.unlink()
    os.mkfifo(level0)
    return db


def test_a_call_off_ends_the_child_at_once(sound: Path, tmp_path: Path) -> None:
    db = _hanging(sound, tmp_path)
    dl = Deadline(120)
    before = _children()  # the suite's own (a local S3 server)
    threading.Timer(2.0, dl.call_off).start()
    t0 = time.monotonic()
    with pytest.raises(StorageTimeoutError, match="interrupted"):
        validate(db, deadline=dl)
    assert time.monotonic() - t0 < 60  # not the 120 s deadline
    assert _children() <= before  # killed and reaped


# validates argv[1] with a long deadline, printing how it ended
CALLER = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1)  # where it is, should it not end (the test asks)
from chroma_snapshots.chroma import validate
t0 = time.monotonic()
print("started", flush=True)
try:
    validate(sys.argv[1], deadline=120)
except BaseException as e:
    print(type(e).__name__, round(time.monotonic() - t0), flush=True)
"""


def _caller(db: Path) -> tuple[subprocess.Popen[str], int]:
    """A process validating ``db``, and the pid of its chroma child once it runs."""
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert caller.stdout is not None
    assert caller.stdout.readline() == "started\n"
    for _ in range(600):
        kids = _children(caller.pid)
        if kids:
            time.sleep(2.0)  # chroma is imported and waiting on the FIFO
            return caller, kids.pop()
        time.sleep(0.05)
    raise AssertionError("no child started")


def test_ctrl_c_ends_validate_and_its_child(sound: Path, tmp_path: Path) -> None:
    caller, child = _caller(_hanging(sound, tmp_path))
    caller.send_signal(signal.SIGINT)
    try:
        out, _ = caller.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        caller.send_signal(signal.SIGUSR1)  # its stack, to say where it hangs
        time.sleep(1.0)
        caller.kill()
        out, err = caller.communicate()
        pytest.fail(f"Ctrl-C did not end validate within 60 s: {out!r}\n{err}\n{_state(child)}")
    assert out.split()[0] == "KeyboardInterrupt", out
    assert not Path(f"/proc/{child}").exists()


def _state(pid: int) -> str:
    """What a process is doing: its state and where in the kernel it sleeps."""
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return f"process {pid}: gone"
    state = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State"))
    return f"process {pid}: {state}, waiting in {(proc / 'wchan').read_text()}"


def test_the_child_dies_with_its_caller(sound: Path, tmp_path: Path) -> None:
    caller, child = _caller(_hanging(sound, tmp_path))
    caller.kill()
    caller.wait()
    for _ in range(100):
        if not Path(f"/proc/{child}").exists() or _zombie(child):
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or _zombie(child)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_children_start_whatever_the_folder_and_the_path_hold(
    sound: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A json.py in the current folder was imported by the child's start-up instead of
    the standard library's; a sys.path longer than one command-line argument may be
    (128 KiB) stopped the child from starting (the review found both)."""
    (tmp_path / "json.py").write_text("raise ImportError('not the json module')\n")
    monkeypatch.chdir(tmp_path)
    long = [str(tmp_path / f"{'x' * 100}{n}") for n in range(2000)]
    monkeypatch.setattr(sys, "path", [*sys.path, *long])
    assert validate(sound).collections == {"receipts": RECORDS}
    guarded = RemoteStore(FileBackend(tmp_path / "store", guard=MountGuard("a mount")))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    assert [v.version for v in guarded.versions("db")] == []
    assert guarded.publish("db", src).version
