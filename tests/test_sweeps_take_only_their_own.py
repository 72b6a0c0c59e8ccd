"""A clean-up of leftovers removes a folder only if it is the one the library made there.

A process killed mid-build leaves its work folder; the next process sweeps it. If another
process of the same user swapped a folder of its own in under that name (and the builder
died before it could set it aside, or the set-aside rename itself failed on a full
directory), the sweep deleted the other process's folder. Each folder the library makes is
now named for its inode once made (engine/folders.new_folder), and a sweep takes one at
such a name only if it is still that folder: the cache's ``tmp/``, the work folders beside
a checkout's dest, the cache's private copies, and the trash of an eviction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kill_points import KillAt, run_to_step

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.treewalk import rename_new
from chroma_snapshots.stores.cache import layout
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096
WORKER = str(Path(__file__).with_name("cache_worker.py"))
THEIRS = {"theirs.txt": b"another process's file", "deep/more.bin": b"x" * 5000}


def _swap_in_theirs(path: Path, stash: Path) -> Path:
    """Move the folder at ``path`` out of the way and put another process's folder there
    (old, as a killed build's would be); returns where the moved one went."""
    aside = stash / "moved"
    stash.mkdir(parents=True, exist_ok=True)
    os.rename(path, aside)
    write_tree(path, THEIRS)
    old = time.time() - 3600
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old), follow_symlinks=False)
    return aside


def test_the_cache_tmp_sweep_keeps_a_folder_swapped_in_for_a_killed_build(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"db.sqlite3": os.urandom(200 * CHUNK), "a/b": b"b"})
    s3 = S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    remote = RemoteStore(s3, chunk_size=CHUNK, pack_target=16 * CHUNK)
    remote.publish("db", src)
    cache = tmp_path / "cache"
    cmd = [sys.executable, WORKER, moto_server.endpoint_url, s3_bucket, str(cache), "--steps"]
    assert run_to_step(cmd, KillAt("get packs", 2)).killed_at == "get packs"
    tmp = cache / "db" / "tmp"
    if not tmp.exists():  # the cache folder is keyed by the store's label
        (tmp,) = cache.glob("*/db/tmp")
    (left,) = list(tmp.iterdir())  # the killed build's work folder
    _swap_in_theirs(left, tmp_path / "stash")
    staged_theirs = tmp / "v.1.abc.new"  # a name as a folder has while it is being made
    write_tree(staged_theirs, THEIRS)
    staged_empty = tmp / "v.2.abc.new"  # an empty one: what a kill at its making leaves
    staged_empty.mkdir()
    store = CachedStore(RemoteStore(s3, chunk_size=CHUNK, pack_target=16 * CHUNK), cache)
    assert read_tree(left) == THEIRS  # not ours: kept, whole
    assert read_tree(staged_theirs) == THEIRS
    assert not staged_empty.exists()
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
    assert read_tree(left) == THEIRS  # (a killed build's own folder is swept: test_cache.py)


def _killed_in_work_dir(dest: Path) -> Path:
    """A process that made the work folder for a checkout to ``dest`` and was killed."""
    code = (
        "import os, sys; from pathlib import Path\n"
        "from chroma_snapshots.engine.localfs import work_dir\n"
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
    swapped, plain = _killed_in_work_dir(dest), _killed_in_work_dir(dest)
    old = time.time() - 3600
    for p in [plain, *plain.rglob("*")]:
        os.utime(p, (old, old))
    _swap_in_theirs(swapped, tmp_path / "stash")
    remote.checkout("db", dest=dest)  # sweeps the old work folders of the same dest first
    assert read_tree(dest) == read_tree(src)
    assert read_tree(swapped) == THEIRS  # another process's: kept
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
    out = subprocess.run([sys.executable, "-c", code, str(store_dir), str(cache)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 9, out.stderr
    copy = Path(out.stdout.strip())
    assert copy.parent.name == "copies"
    _swap_in_theirs(copy, tmp_path / "stash")
    store = CachedStore(RemoteStore(FileBackend(store_dir), chunk_size=CHUNK), cache)  # sweeps
    assert read_tree(copy) == THEIRS
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_an_eviction_removes_only_the_version_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder swapped in for a version between the eviction's look at it and its rename
    goes to ``tmp/`` with it and is not removed there, nor by a later sweep."""
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    version = remote.publish("db", write_tree(tmp_path / "src", {"a.bin": b"a" * 5000})).version
    store = CachedStore(remote, tmp_path / "cache")
    store.checkout("db").release()
    d = store.dirs("db")
    tree = d.tree(version)

    def swapped_first(src: Path, dst: Path) -> None:
        if src == tree:
            _swap_in_theirs(tree, tmp_path / "stash")
        rename_new(src, dst)

    monkeypatch.setattr(layout, "rename_new", swapped_first)
    assert store.evict("db", version)
    monkeypatch.undo()
    (moved,) = list((d.root / "tmp").iterdir())
    assert read_tree(moved) == THEIRS
    CachedStore(remote, tmp_path / "cache")  # the next opening's sweep
    assert read_tree(moved) == THEIRS
