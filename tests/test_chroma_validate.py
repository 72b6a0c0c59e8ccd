"""validate() on folders whose vector index crashes chroma's native code: the crash is the
child's, the caller gets IntegrityError and goes on."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from chroma_helpers import build, close_client

from chroma_snapshots import IntegrityError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.chroma import publish_client, validate
from chroma_snapshots.engine.deadline import Deadline
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


def _neighbours_out_of_range(db: Path) -> None:
    """Every level-0 neighbour id of the HNSW graph points far past its elements: hnswlib
    follows them without a bounds check (SIGSEGV on the first query)."""
    seg = _segment(db)
    # chroma's hnswlib header: a format version, then offsetLevel0, max_elements,
    # cur_element_count, size_data_per_element
    _, _, _, count, per_element = struct.unpack_from("<I4Q", (seg / "header.bin").read_bytes())
    assert count == RECORDS
    level0 = bytearray((seg / "data_level0.bin").read_bytes())
    for at in range(0, count * per_element, per_element):
        struct.pack_into("<I", level0, at + 4, 0x7FFFFFFF)  # after the link count
    (seg / "data_level0.bin").write_bytes(bytes(level0))


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
    assert _children() == children_before  # killed and reaped, not left running
    assert validate(sound, deadline=120).records == RECORDS


def _children() -> set[int]:
    task = Path(f"/proc/{os.getpid()}/task")
    kids: set[int] = set()
    for t in task.iterdir():
        text = (t / "children").read_text() if (t / "children").exists() else ""
        kids |= {int(pid) for pid in text.split()}
    return kids
