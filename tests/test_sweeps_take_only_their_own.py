"""A clean-up of leftovers removes a folder only if it is the one the library made there.

A process killed mid-build leaves its work folder; the next process sweeps it. If another
process of the same user put a folder of its own under that name (and the builder died
before it could set it aside, or the set-aside rename itself failed on a full directory),
the sweep deleted the other process's folder. Each folder the library makes is now named
for itself once made (its inode number and birth time, engine/folders.new_folder), and a
sweep takes one at such a name only if it is still that folder: the cache's ``tmp/``, the
work folders beside a checkout's dest, the cache's private copies, and an eviction's trash.

The other process removes the library's folder first and makes its own with the same inode
number where it can (ext4 gives a freed number to the next folder made): a review found the
inode number alone taken for proof. While the library uses a folder it holds it open, so
the number cannot be given out; after a kill, the birth time in the name tells them apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kill_points import KillAt, run_to_step
from reused_numbers import fs_type

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.transfer import Placement
from chroma_snapshots.engine.treewalk import rename_new
from chroma_snapshots.errors import LocalDiskError
from chroma_snapshots.stores.cache import layout
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096
WORKER = str(Path(__file__).with_name("cache_worker.py"))
THEIRS = {"theirs.txt": b"another process's file", "deep/more.bin": b"x" * 5000}


def _theirs_at(path: Path, want: int | None = None) -> bool:
    """Another process's folder at ``path`` (old, as a killed build's would be), with the
    inode number ``want`` if the file system gives it out; True if it did."""
    probes, got = [], False
    try:
        for k in range(2000 if want is not None else 0):
            probe = path.with_name(f"probe{k}")
            probe.mkdir()
            probes.append(probe)
            if os.lstat(probe).st_ino == want:
                os.rename(probe, path)
                probes.pop()
                got = True
                break
    finally:
        for probe in probes:
            probe.rmdir()
    write_tree(path, THEIRS)
    old = time.time() - 3600
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old), follow_symlinks=False)
    return got


def _replace_with_theirs(path: Path) -> bool:
    """Remove the folder at ``path`` and make another process's there, with the same inode
    number where the file system gives it out again; True if it did."""
    ino = os.lstat(path).st_ino
    shutil.rmtree(path)
    return _theirs_at(path, ino)


def _taken_over(leftover: Callable[[], Path], tries: int = 4) -> list[Path]:
    """Leftovers of killed processes, each replaced by another process's folder, until one
    got its leftover's inode number back (ext4 gives it out again, but under load another
    folder may get it first: then another kill); on ext4 one must, or the attack did not
    run. Every one is another process's folder: all must survive."""
    taken = []
    for _ in range(tries):
        taken.append(leftover())
        if _replace_with_theirs(taken[-1]):
            return taken
    assert fs_type(taken[0]) != "ext4", "no freed inode number came back"
    return taken


def test_the_cache_tmp_sweep_keeps_a_folder_swapped_in_for_a_killed_build(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"db.sqlite3": os.urandom(200 * CHUNK), "a/b": b"b"})
    s3 = S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    remote = RemoteStore(s3, chunk_size=CHUNK, pack_target=16 * CHUNK)
    remote.publish("db", src)
    cache = tmp_path / "cache"
    cmd = [sys.executable, WORKER, moto_server.endpoint_url, s3_bucket, str(cache), "--steps"]
    seen: set[Path] = set()

    def killed_build() -> Path:
        assert run_to_step(cmd, KillAt("get packs", 2)).killed_at == "get packs"
        (tmp,) = cache.glob("*/db/tmp")
        (left,) = set(tmp.iterdir()) - seen  # the killed build's work folder
        seen.add(left)
        return left

    taken = _taken_over(killed_build)
    tmp = taken[0].parent
    staged_theirs = tmp / "v.1.0123abcd.new"  # a name as a folder has while it is being made
    write_tree(staged_theirs, THEIRS)
    staged_empty = tmp / "v.2.0123abcd.new"  # an empty one: what a kill at its making leaves
    staged_empty.mkdir()
    others = [tmp / "notes", tmp / f"v.3.0123abcd.i{os.lstat(staged_theirs).st_ino}-1"]
    for other in others:  # not names the cache gives, or not the folder its name says
        write_tree(other, THEIRS)
    store = CachedStore(RemoteStore(s3, chunk_size=CHUNK, pack_target=16 * CHUNK), cache)
    assert all(read_tree(left) == THEIRS for left in taken)  # not ours: kept, whole
    assert read_tree(staged_theirs) == THEIRS
    assert not staged_empty.exists()
    assert all(read_tree(other) == THEIRS for other in others)
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
    assert all(read_tree(left) == THEIRS for left in taken)  # (ours are swept: test_cache.py)


def _killed_in_work_dir(dest: Path) -> Path:
    """A process that made the work folder for a checkout to ``dest`` and was killed."""
    code = (
        "import os, sys; from pathlib import Path\n"
        "from chroma_snapshots.engine.workdir import work_dir\n"
        "cm = work_dir(Path(sys.argv[1])); work, _ = cm.__enter__()\n"
        "(work / 'half.bin').write_bytes(b'h' * 100); print(work, flush=True); os._exit(9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True)
    assert out.returncode == 9, out.stderr
    return Path(out.stdout.strip())


def test_the_dest_sweep_keeps_a_folder_swapped_in_for_a_killed_checkout(tmp_path: Path) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(3 * CHUNK)})
    remote.publish("db", src)
    dest = tmp_path / "out" / "db"
    dest.parent.mkdir()
    taken = _taken_over(lambda: _killed_in_work_dir(dest))
    plain = _killed_in_work_dir(dest)
    old = time.time() - 3600
    for p in [plain, *plain.rglob("*")]:
        os.utime(p, (old, old))
    remote.checkout("db", dest=dest)  # sweeps the old work folders of the same dest first
    assert read_tree(dest) == read_tree(src)
    assert all(read_tree(swapped) == THEIRS for swapped in taken)  # another process's: kept
    assert not plain.exists()  # the killed checkout's own: swept


def test_the_copies_sweep_keeps_a_folder_swapped_in_for_a_killed_holder(tmp_path: Path) -> None:
    store_dir, cache = tmp_path / "store", tmp_path / "cache"
    remote = RemoteStore(FileBackend(store_dir), chunk_size=CHUNK)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(3 * CHUNK)})
    remote.publish("db", src)
    code = (
        "import os, sys\n"
        "from chroma_snapshots import CachedStore, RemoteStore\n"
        "from chroma_snapshots.backends.file import FileBackend\n"
        "s = CachedStore(RemoteStore(FileBackend(sys.argv[1])), sys.argv[2])\n"
        "one = s.checkout('db'); two = s.checkout('db')\n"  # the second: a private copy
        "print(two.path, flush=True); os._exit(9)\n"
    )

    def killed_holder() -> Path:
        out = subprocess.run([sys.executable, "-c", code, str(store_dir), str(cache)],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 9, out.stderr
        copy = Path(out.stdout.strip())
        assert copy.parent.name == "copies"
        return copy

    taken = _taken_over(killed_holder)
    store = CachedStore(RemoteStore(FileBackend(store_dir), chunk_size=CHUNK), cache)  # sweeps
    assert all(read_tree(copy) == THEIRS for copy in taken)
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_an_eviction_removes_only_the_version_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder put in place of a version between the eviction's look at it and its rename
    (the version's removed first: its inode number is held, so not given out) goes to
    ``tmp/`` and is not removed there, nor by a later sweep."""
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    version = remote.publish("db", write_tree(tmp_path / "src", {"a.bin": b"a" * 5000})).version
    store = CachedStore(remote, tmp_path / "cache")
    store.checkout("db").release()
    d = store.dirs("db")
    tree = d.tree(version)

    reused: list[bool] = []

    def swapped_first(src: Path, dst: Path) -> None:
        if src == tree:
            reused.append(_replace_with_theirs(tree))
        rename_new(src, dst)

    monkeypatch.setattr(layout, "rename_new", swapped_first)
    assert store.evict("db", version)
    monkeypatch.undo()
    assert reused == [False]  # held open: its number was not given to the other folder
    (moved,) = list((d.root / "tmp").iterdir())
    assert read_tree(moved) == THEIRS
    CachedStore(remote, tmp_path / "cache")  # the next opening's sweep
    assert read_tree(moved) == THEIRS


def test_a_folder_put_in_place_of_a_live_work_folder_is_never_written_or_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the making of the cache's work folder and the build, another process
    removes it and makes its own there: the inode number is not given out (held open), the
    checkout fails, nothing of the other folder is written, served or removed."""
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(5 * CHUNK), "b/c": b"c"})
    remote.publish("db", src)
    store = CachedStore(remote, tmp_path / "cache", patch_in_place=False)
    real, reused = RemoteStore.materialize, []

    def after_a_swap(self: RemoteStore, name: str, job: Placement, *a: object, **k: object) -> str:
        reused.append(_replace_with_theirs(job.root))
        return real(self, name, job, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(RemoteStore, "materialize", after_a_swap)
    with pytest.raises(LocalDiskError):
        store.checkout("db")
    monkeypatch.undo()
    assert reused == [False]
    kept = [p for p in (store.dirs("db").root / "tmp").iterdir() if read_tree(p) == THEIRS]
    assert len(kept) == 1  # set aside or where it was: whole, never written into
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_a_held_copy_put_in_place_of_is_not_removed_at_release(tmp_path: Path) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    remote.publish("db", write_tree(tmp_path / "src", {"a.bin": os.urandom(3 * CHUNK)}))
    store = CachedStore(remote, tmp_path / "cache")
    with store.checkout("db") as shared:
        copy = store.checkout("db")
        assert copy.path != shared.path
        reused = _replace_with_theirs(copy.path)
        copy.release()
    assert not reused  # held open while it lives
    copies = store.dirs("db").root / "copies"
    kept = [p for p in copies.iterdir() if p.name != ".pins" and read_tree(p) == THEIRS]
    assert len(kept) == 1
