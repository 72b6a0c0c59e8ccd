"""What a consumer can put in a cached version that a path would walk into: a FIFO where a
bundled small file or a large file was (a read of it blocks forever), and a file system
mounted at the version's folder itself. Each is replaced or refused within the deadline,
`cache verify` reports it, and nothing on a mount is written or deleted."""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from chroma_snapshots import CachedStore, LocalDiskError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.stores.cache.inspect import entries, verify
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    small = {f"a/s{i}.txt": rng.randbytes(30) for i in range(4)}  # one bundle chunk
    return {"a/data.bin": rng.randbytes(8 * CHUNK), **small}


def _within(seconds: float, call: Callable[[], object]) -> object:
    """``call()``'s result; fails the test if it has not returned in ``seconds`` (it used
    to block forever on a FIFO: the thread is left behind, a daemon)."""
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    assert got, "the call raised (see the thread's traceback above)"
    return got[0]


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("patch_in_place", [True, False])
def test_a_fifo_in_a_cached_version_never_blocks(tmp_path: Path, patch_in_place: bool) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    v1_files, v2_files = _files(1), _files(1)
    v2_files["a/data.bin"] = v2_files["a/data.bin"][:100] + b"v2" + v2_files["a/data.bin"][102:]
    v1 = remote.publish("db", write_tree(tmp_path / "src1", v1_files)).version
    v2 = remote.publish("db", write_tree(tmp_path / "src2", v2_files)).version
    cached = CachedStore(remote, tmp_path / "cache", patch_in_place=patch_in_place)
    with cached.checkout("db", v1) as snap:
        tree = snap.path
    (tree / "a/s0.txt").write_bytes(b"changed")  # repaired by putting its bundle together
    _fifo(tree / "a/s3.txt")  # ... of which this member is now a FIFO
    _fifo(tree / "a/data.bin")

    (entry,) = entries(cached)
    problems = _within(10, lambda: verify(cached, entry))
    assert "a/s3.txt: not a regular file" in problems  # type: ignore[operator]
    assert "a/data.bin: not a regular file" in problems  # type: ignore[operator]

    def served(version: str, files: dict[str, bytes]) -> bool:
        with cached.checkout("db", version, deadline=5) as snap:
            return read_tree(snap.path) == files

    # v2 is built from v1's tree (patched, or read as local chunks) past its FIFOs
    assert _within(10, lambda: served(v2, v2_files))
    if not patch_in_place:  # v1 is still cached with its FIFOs: repaired
        assert _within(10, lambda: served(v1, v1_files))


@pytest.mark.parametrize("kind", ["tmpfs", "bind mount of a folder on the same disk"])
def test_a_file_system_mounted_at_a_cached_version_is_left_alone(tmp_path: Path, kind: str) -> None:
    # it was written into and deleted from: only mounts inside the version were refused
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    v1_files, v2_files = _files(1), _files(2)
    v1 = remote.publish("db", write_tree(tmp_path / "src1", v1_files)).version
    v2 = remote.publish("db", write_tree(tmp_path / "src2", v2_files)).version
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db", v1) as snap:
        version_dir = snap.path
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    how = ["-t", "tmpfs", "tmpfs"] if kind == "tmpfs" else ["--bind", str(theirs)]
    done = subprocess.run(["mount", *how, str(version_dir)], check=False)
    if done.returncode != 0:
        pytest.fail("this test needs root to mount a tmpfs (CI runs as root)")
    try:
        (version_dir / "keep.txt").write_bytes(b"keep")
        with pytest.raises(LocalDiskError, match="mounted inside the version's folder or at it"):
            cached.checkout("db", v1)
        with cached.checkout("db", v2) as snap:  # not patched from the mounted version
            assert read_tree(snap.path) == v2_files
        with pytest.raises(LocalDiskError, match="mounted at this cached version"):
            cached.evict("db", v1)  # what `cache rm` does
        assert read_tree(version_dir) == {"keep.txt": b"keep"}
    finally:
        subprocess.run(["umount", str(version_dir)], check=False)
    with cached.checkout("db", v1) as snap:  # unmounted: served exactly again
        assert read_tree(snap.path) == v1_files


def _planted(folder: Path, files: dict[str, bytes]) -> Path:
    """Another process's own folder with the version's file names and other bytes."""
    return write_tree(folder, {p: b"planted" for p in files})


def test_a_work_folder_swapped_before_it_lands_is_never_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a folder swapped in under the work folder's name between the last write and the
    # rename became the cached version, served (stamps and all) for good; at a dest, the
    # checkout delivered it
    from chroma_snapshots.engine import localfs
    from chroma_snapshots.stores.cache.layout import NameDirs

    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    files = _files(1)
    version = remote.publish("db", write_tree(tmp_path / "src", files)).version
    cached = CachedStore(remote, tmp_path / "cache")
    mine = _planted(tmp_path / "mine", files)
    real_meta, real_move = NameDirs.write_meta, localfs.move_into_place

    def swap(work: Path) -> None:
        os.rename(work, tmp_path / f"aside-{work.name}")
        os.rename(mine, work)

    def swap_then_meta(d: NameDirs, v: str, work: Path, *a: object) -> None:
        swap(work)
        real_meta(d, v, work, *a)  # type: ignore[arg-type]

    def swap_then_move(work: Path, final: Path) -> None:
        swap(work)
        real_move(work, final)

    def moved_aside(err: pytest.ExceptionInfo[LocalDiskError]) -> Path:
        """Where the error says the swapped-in folder went: beside the target, intact."""
        aside = Path(str(err.value.strerror).rsplit("it was moved to ", 1)[1])
        assert aside.name.startswith(".")
        assert ".replaced-" in aside.name
        assert read_tree(aside) == {p: b"planted" for p in files}  # theirs: not deleted
        return aside

    monkeypatch.setattr(NameDirs, "write_meta", swap_then_meta)
    with pytest.raises(LocalDiskError, match="not the file written"):  # its files are not
        cached.checkout("db", version)  # the ones written: no stamp of them is recorded
    (aside,) = (cached.dirs("db").root / "tmp").glob("*.replaced-*")  # set aside, whole
    assert read_tree(aside) == {p: b"planted" for p in files}
    monkeypatch.undo()
    for _ in range(2):  # the race is over: the version is built again, and stays exact
        with CachedStore(remote, tmp_path / "cache").checkout("db", version) as snap:
            assert read_tree(snap.path) == files

    mine = _planted(tmp_path / "mine", files)
    monkeypatch.setattr(localfs, "move_into_place", swap_then_move)
    dest = tmp_path / "out" / "copy"
    with pytest.raises(LocalDiskError, match="work folder was replaced") as err:
        cached.checkout("db", version, dest)
    assert not dest.exists()
    assert moved_aside(err).parent == dest.parent
    monkeypatch.undo()
    with cached.checkout("db", version, dest) as snap:  # what was set aside is in no one's way
        assert read_tree(snap.path) == files


def test_a_held_version_whose_meta_is_gone_is_not_replaced(tmp_path: Path) -> None:
    # a second checkout discarded the held folder and served a new one at the same path:
    # the holder's open files lost their links and its path led to another tree
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    files = _files(1)
    version = remote.publish("db", write_tree(tmp_path / "src", files)).version
    first = CachedStore(remote, tmp_path / "cache")
    with first.checkout("db", version) as held:
        opened = open(held.path / "a/data.bin", "rb")  # noqa: SIM115 (held across the call)
        for meta in (held.path.parent.parent / "meta").iterdir():
            meta.unlink()
        with CachedStore(remote, tmp_path / "cache").checkout("db", version) as second:
            assert second.path != held.path  # a copy of its own
            assert read_tree(second.path) == files
        assert os.fstat(opened.fileno()).st_nlink == 1
        assert read_tree(held.path) == files
        opened.close()


@pytest.mark.parametrize("which", ["manifest", "stamps"])
def test_a_folder_at_a_meta_file_name_does_not_fail_a_checkout(tmp_path: Path, which: str) -> None:
    # the rename of the new meta file over the folder failed the next checkout
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    files = _files(1)
    version = remote.publish("db", write_tree(tmp_path / "src", files)).version
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db", version):
        pass
    d = cached.dirs("db")
    meta = d.manifest_file(version) if which == "manifest" else d.stamps_file(version)
    meta.unlink()
    write_tree(meta, {"x/y.txt": b"planted"})
    with CachedStore(remote, tmp_path / "cache").checkout("db", version) as snap:
        assert read_tree(snap.path) == files
    assert meta.is_file()


@pytest.mark.parametrize("damage", ["no stamps", "no manifest", "garbage manifest"])
def test_a_version_whose_meta_was_damaged_by_hand_is_swept_not_kept_uncounted(
    tmp_path: Path, damage: str
) -> None:
    # Nothing listed, counted or evicted such a tree: it held its bytes outside max_bytes
    # for good (`cache ls` said empty, `cache clear` evicted nothing).
    remote = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    old = remote.publish("db", write_tree(tmp_path / "src", _files(1))).version
    new = remote.publish("db", write_tree(tmp_path / "src2", _files(2))).version
    cached = CachedStore(remote, tmp_path / "cache")
    cached.checkout("db", old).release()
    d = cached.dirs("db")
    if damage == "garbage manifest":
        d.manifest_file(old).write_bytes(b"not a manifest")
    else:
        (d.stamps_file(old) if damage == "no stamps" else d.manifest_file(old)).unlink()
    reopened = CachedStore(remote, tmp_path / "cache")  # (what every `cache` command does)
    assert not d.tree(old).exists()
    with reopened.checkout("db", new) as snap:
        assert read_tree(snap.path) == _files(2)
        assert os.listdir(d.root / "versions") == [new]
        assert [e.version for e in entries(reopened)] == [new]
