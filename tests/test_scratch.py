"""Scratch folders under the temp directory (engine/scratch.py): what a killed process left
there is removed by the next process making one of the same kind, at once; a live one's,
one being made, and another user's are left alone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chroma_helpers import build, close_client

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.chroma import publish_client
from chroma_snapshots.engine import scratch
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.engine.scratch import discard_scratch, scratch_dir, sweep_scratch
from chroma_snapshots.engine.workdir import LEFTOVER_AGE
from chroma_snapshots.errors import LocalDiskError, StorageTimeoutError
from chroma_snapshots.testing.conformance import write_tree

PREFIX = "chroma-snapshots-publish-"
# makes a scratch folder, fills it, says where, then waits to be killed (a Lambda timeout)
HOLDER = """
import sys, time
from chroma_snapshots.engine.scratch import scratch_dir
with scratch_dir(sys.argv[1], "a test") as path:
    (path / "copy").mkdir()
    (path / "copy" / "chroma.sqlite3").write_bytes(b"x" * (1 << 20))
    print(path, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp directory of the test's own, for this process and the ones it starts."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture
def holder(tmp: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process holding a scratch folder, and that folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, PREFIX], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        assert path.parent == tmp
        yield proc, path
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_owners_folder_goes_at_the_next_make(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, left = holder
    proc.send_signal(signal.SIGKILL)  # no clean-up runs
    proc.wait()
    assert (left / "copy" / "chroma.sqlite3").exists()
    with scratch_dir(PREFIX, "a test") as mine:
        assert not left.exists()  # at once: no age to wait out
        assert mine.is_dir()
    assert not mine.exists()


def test_a_live_owners_folder_stays(holder: tuple[subprocess.Popen[str], Path]) -> None:
    _, held = holder
    assert sweep_scratch(PREFIX) == 0
    with scratch_dir(PREFIX, "a test"):
        pass
    assert (held / "copy" / "chroma.sqlite3").exists()


def test_one_being_made_stays_until_old_and_another_users_stays(tmp: Path) -> None:
    new = Path(tempfile.mkdtemp(prefix=PREFIX))  # made, its lock not yet taken
    theirs = Path(tempfile.mkdtemp(prefix=PREFIX))
    os.chown(theirs, 65534, 65534)  # the tests run as root (CI does)
    old = time.time() - LEFTOVER_AGE - 5
    os.utime(theirs, (old, old))
    assert sweep_scratch(PREFIX) == 0
    assert new.is_dir()
    assert theirs.is_dir()
    os.utime(new, (old, old))  # a process killed between the mkdir and the lock
    assert sweep_scratch(PREFIX) == 1
    assert not new.exists()
    assert theirs.is_dir()
    assert sweep_scratch("chroma-snapshots-compact-") == 0  # another kind: not looked at


def test_a_killed_publish_clients_copy_goes_with_the_next_publish(
    holder: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    proc, left = holder  # as publish_client's copy when its process was killed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = tmp_path / "db"
    close_client(build(db, {"receipts": 20}, dim=8))
    store = RemoteStore(FileBackend(tmp_path / "store"))
    assert left.is_dir()
    publish_client(store, "db", db)
    assert list(Path(tempfile.gettempdir()).iterdir()) == []  # neither its copy nor ours


def test_a_removal_cut_short_is_finished_at_once(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    """A removal renames the folder first and takes the marker last: killed part-way, the
    folder still has its marker and the next sweep finishes it; killed after the marker
    went, the empty folder goes at once instead of being taken for one just made."""
    proc, left = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = left.with_name(left.name + ".going")
    left.rename(cut)  # where a sweeper killed after its rename leaves it
    (cut / "copy" / "chroma.sqlite3").unlink()  # and its first removals
    assert sweep_scratch(PREFIX) == 1
    assert not cut.exists()
    end = Path(tempfile.mkdtemp(prefix=PREFIX, suffix=".going"))  # the marker gone: empty
    assert sweep_scratch(PREFIX) == 1
    assert not end.exists()


def test_an_unmarked_folder_is_only_ever_removed_empty(tmp: Path) -> None:
    """A folder at a scratch name without the marker (a user's, named like one; or one a
    removal's end would leave) is removed only if empty, whatever its name and age."""
    for suffix in ("", ".going"):
        theirs = Path(tempfile.mkdtemp(prefix=PREFIX, suffix=suffix))
        (theirs / "important").write_bytes(b"x")
        old = time.time() - LEFTOVER_AGE - 5
        os.utime(theirs, (old, old))
        assert sweep_scratch(PREFIX) == 0
        assert (theirs / "important").read_bytes() == b"x"


def test_a_folder_swapped_in_during_a_sweep_is_never_removed(
    holder: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the sweeper's lock on a dead owner's folder and its rename, another folder
    is put at the name: it keeps its name and contents, through this sweep and the next."""
    proc, left = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    real_rename = os.rename
    swapped: list[Path] = []

    def swap_first(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if not swapped and Path(src) == left:
            real_rename(left, left.with_name("moved-away"))
            left.mkdir()
            (left / "precious").write_bytes(b"p")
            swapped.append(left)
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", swap_first)
    sweep_scratch(PREFIX)
    monkeypatch.setattr(os, "rename", real_rename)
    assert swapped
    assert (left / "precious").read_bytes() == b"p"
    old = time.time() - LEFTOVER_AGE - 5
    os.utime(left, (old, old))
    assert sweep_scratch(PREFIX) == 0  # no marker: only ever removed empty
    assert (left / "precious").read_bytes() == b"p"
    assert not list(left.parent.glob("*.going"))


def test_a_forked_child_leaves_its_parents_folders_alone(tmp: Path) -> None:
    """A child that leaves the block (or exits in it) neither removes the parent's folder
    nor frees it for a sweep: the parent's lock holds."""
    with scratch_dir(PREFIX, "a test") as mine:
        pid = os.fork()
        if pid == 0:  # the child: leave the block, as a sys.exit inside it would
            try:
                discard_scratch(mine)
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert mine.is_dir()
        assert sweep_scratch(PREFIX) == 0
        assert mine.is_dir()
    assert not mine.exists()


def test_no_usable_temp_directory_is_a_local_disk_error(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only file system everywhere tempfile looks: the documented error, not
    tempfile's FileNotFoundError (which a caller would take for a missing snapshot)."""
    store = RemoteStore(FileBackend(tmp.parent / "store"))
    store.publish("db", write_tree(tmp.parent / "src", {"a": b"a"}))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp / "none")])
    with pytest.raises(LocalDiskError, match="making a folder for a test"):
        scratch_dir(PREFIX, "making a folder for a test").__enter__()
    with pytest.raises(LocalDiskError, match="No usable temporary directory"):
        store.checkout("db")


def test_a_removal_that_leaves_something_keeps_the_marker(
    holder: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    """What a sweep cannot remove (a mount inside; or it ran out of descriptors) keeps
    the folder marked: the next sweep, once it can, removes the rest, never an unmarked
    folder left for good."""
    proc, left = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    outside = tmp_path / "outside"
    (outside / "kept").mkdir(parents=True)
    (left / "copy" / "mnt").mkdir()
    mount = ["mount", "--bind", str(outside), str(left / "copy" / "mnt")]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"this test needs root to bind-mount (CI runs as root): {done.stderr}")
    try:
        sweep_scratch(PREFIX)
        going = left.with_name(left.name + ".going")
        assert (going / ".chroma-snapshots-held").exists()  # the mount point stays in it
        assert not (going / "copy" / "chroma.sqlite3").exists()
        assert (outside / "kept").is_dir()  # nothing on the mount was touched
        marker = going / ".chroma-snapshots-held"
        assert marker.read_bytes().split()[1:] == [b"stuck"]  # not tried at every sweep
        assert sweep_scratch(PREFIX) == 0
        assert marker.read_bytes().split()[1:] == [b"stuck"]
    finally:
        subprocess.run(["umount", str(left.with_name(left.name + ".going") / "copy" / "mnt")])
    old = time.time() - LEFTOVER_AGE - 5
    os.utime(marker, (old, old))  # a minute later
    assert sweep_scratch(PREFIX) == 1
    assert not going.exists()
    assert (outside / "kept").is_dir()


def test_a_folder_a_sweep_cannot_empty_costs_it_half_a_second_a_minute(
    holder: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead folder whose removal takes longer than a sweep may spend (many files, or
    files no one may remove) is removed bit by bit: each sweep spends at most its time,
    then leaves the folder alone for a while, so no later caller pays for it each time."""
    proc, left = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for i in range(300):
        (left / "copy" / f"f{i}").write_bytes(b"x")

    def out_of_time(path: Path, check: Any, **kwargs: Any) -> None:
        remove_tree(path, _out_of_time, **kwargs)  # the time runs out at its first check

    monkeypatch.setattr(scratch, "remove_tree", out_of_time)
    assert sweep_scratch(PREFIX) == 0
    going = left.with_name(left.name + ".going")
    assert (going / "copy").is_dir()
    monkeypatch.setattr(scratch, "remove_tree", _never)  # while it waits, never tried
    assert sweep_scratch(PREFIX) == 0
    monkeypatch.setattr(scratch, "remove_tree", remove_tree)
    old = time.time() - LEFTOVER_AGE - 5
    os.utime(going / ".chroma-snapshots-held", (old, old))
    assert sweep_scratch(PREFIX) == 1
    assert not going.exists()


def _out_of_time() -> None:
    raise StorageTimeoutError("deadline exceeded during a sweep of scratch folders")


def _never(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a folder a sweep could not empty a moment ago was tried again")


def test_a_copy_of_a_scratch_folder_is_not_a_dead_owners(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    """A user's copy of a checkout's folder (``cp -a``, the marker with it) at a name of
    the same kind is another folder: its marker names the folder it was made in."""
    proc, left = holder
    copy = left.with_name(left.name + "-mine")
    shutil.copytree(left, copy, symlinks=True)
    assert (copy / ".chroma-snapshots-held").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    old = time.time() - LEFTOVER_AGE - 5
    os.utime(copy, (old, old))
    assert sweep_scratch(PREFIX) == 1  # the dead owner's own
    assert not left.exists()
    assert (copy / "copy" / "chroma.sqlite3").exists()
