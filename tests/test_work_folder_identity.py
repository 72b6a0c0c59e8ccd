"""A folder the library makes to build in (the cache's work folder, the work folder beside
a dest, a held copy) is known by its device and inode from the moment it is made: a folder
another process swaps in under its name, at any step before the tree is served, is neither
written into, served nor removed. A file bind-mounted over a cached file, or a file system
mounted inside a work folder before its rename, is never written through or served.
Each test makes the swap or the mount at one step, by wrapping the call that step makes."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reused_numbers import fs_type

from chroma_snapshots import CachedStore, LocalDiskError, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import localfs, workdir
from chroma_snapshots.engine.placer import Placer
from chroma_snapshots.stores.cache.layout import NameDirs
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096
PLANTED = {"chroma.sqlite3": b"OTHER PROCESS FILE", "mine.txt": b"mine"}


def _files(seed: int) -> dict[str, bytes]:
    return {"chroma.sqlite3": bytes([seed]) * (3 * CHUNK), "a/b.txt": b"b" * seed}


@pytest.fixture
def remote(tmp_path: Path) -> RemoteStore:
    return RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at the end, whatever happened."""
    made: list[Path] = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", str(m)], check=False, capture_output=True)


def _bind(source: Path, target: Path, mounts: list[Path]) -> None:
    if subprocess.run(["mount", "--bind", str(source), str(target)], check=False).returncode:
        pytest.fail("this test needs root to bind-mount (CI runs as root)")
    mounts.append(target)


def _swapper(tmp_path: Path) -> tuple[Callable[[Path], None], list[Path]]:
    """A swap of the folder at a path for a planted one of another process's (the one
    swapped out goes aside); the list records the paths swapped."""
    swapped: list[Path] = []

    def swap(path: Path) -> None:
        planted = write_tree(tmp_path / f"planted{len(swapped)}", PLANTED)
        os.rename(path, tmp_path / f"aside{len(swapped)}")
        os.rename(planted, path)
        swapped.append(path)

    return swap, swapped


def _around(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    before: Callable[[Placer], None] = lambda _: None,
    after: Callable[[Placer], None] = lambda _: None,
) -> None:
    """Run ``before`` and ``after`` around ``Placer.<method>`` (a racing process's step)."""
    real = getattr(Placer, method)

    def wrapped(placer: Placer, check: Callable[[], None] = lambda: None) -> None:
        before(placer)
        real(placer, check)
        after(placer)

    monkeypatch.setattr(Placer, method, wrapped)


def _set_aside(path: Path) -> Path:
    """The planted folder once the library set it aside beside ``path``, intact: neither
    written into nor removed, nor left under a name a clean-up takes for a leftover."""
    (aside,) = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.replaced-")]
    assert not path.exists()
    assert read_tree(aside) == PLANTED
    return aside


def test_a_file_bind_mounted_over_a_cached_file_is_never_written(
    tmp_path: Path, remote: RemoteStore, mounts: list[Path]
) -> None:
    # a repair truncated, overwrote and re-moded the file mounted over the cached one
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    v2 = remote.publish("db", write_tree(tmp_path / "src2", _files(2))).version
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"PRECIOUS\n")
    victim.chmod(0o600)
    cached = CachedStore(remote, tmp_path / "cache")
    with cached.checkout("db", v1) as snap:
        _bind(victim, snap.path / "chroma.sqlite3", mounts)
    with pytest.raises(LocalDiskError, match="mounted"):
        cached.checkout("db", v1)
    with cached.checkout("db", v2) as snap:  # not patched from the version with the mount
        assert read_tree(snap.path) == _files(2)
    assert victim.read_bytes() == b"PRECIOUS\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_a_file_bind_mounted_over_a_work_file_while_it_is_built(
    tmp_path: Path, remote: RemoteStore, mounts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # between the creation of the files and the writes into them, which open them again
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"PRECIOUS\n")
    victim.chmod(0o600)
    _around(
        monkeypatch,
        "create_files",
        after=lambda p: _bind(victim, p.root / "chroma.sqlite3", mounts),
    )
    checkouts: list[Callable[[], object]] = [
        lambda: CachedStore(remote, tmp_path / "cache").checkout("db", v1),
        lambda: remote.checkout("db", v1, tmp_path / "out" / "db"),
    ]
    for checkout in checkouts:
        with pytest.raises(LocalDiskError, match="mounted"):
            checkout()
        assert victim.read_bytes() == b"PRECIOUS\n"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not (tmp_path / "out" / "db").exists()


def _linked_with_its_number(victim_dir: Path, path: Path) -> bool:
    """Remove the work file ``path`` and link in its place a file of another process's
    with the same inode number (ext4 gives a freed one out again); True if it could get
    that number. The candidates are made beside ``path`` and the winner moved to
    ``victim_dir``: ext4 takes a new file's inode from its folder's block group, and two
    folders of a busy parent are often in different groups."""
    ino = os.lstat(path).st_ino
    path.unlink()
    made = []
    try:
        for k in range(2000):
            probe = path.parent / f".probe{k}"
            probe.write_bytes(b"PRECIOUS\n")
            made.append(probe)
            if os.lstat(probe).st_ino == ino:
                os.link(probe, path)
                made.pop()
                probe.rename(victim_dir / "victim.txt")
                return True
    finally:
        for probe in made:
            probe.unlink()
    (victim_dir / "victim.txt").write_bytes(b"PRECIOUS\n")
    os.link(victim_dir / "victim.txt", path)
    return False


def test_a_work_file_replaced_by_a_link_with_its_inode_number_is_not_written(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the creation of the files and the writes, another process removes a work
    file and links one of its own in its place with the same inode number: the file made
    is known by its birth time too, so the link gets every check and is refused."""
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    victims = tmp_path / "victims"
    victims.mkdir()
    reused: list[bool] = []

    def relink(p: Placer) -> None:
        reused.append(_linked_with_its_number(victims, p.root / "chroma.sqlite3"))

    _around(monkeypatch, "create_files", after=relink)
    with pytest.raises(LocalDiskError, match="another link"):
        remote.checkout("db", v1, tmp_path / "out" / "db")
    assert (victims / "victim.txt").read_bytes() == b"PRECIOUS\n"
    assert reused == [True] or fs_type(tmp_path) != "ext4"  # the attack really ran
    assert not (tmp_path / "out" / "db").exists()


@pytest.mark.parametrize("same_number", [True, False])
def test_a_work_file_replaced_after_it_was_written_is_not_delivered(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch, same_number: bool
) -> None:
    """Once every chunk is written, another process puts a hard link to its own file in
    place of a work file (with the freed inode number or another): the checkout fails, its
    file is untouched, nothing is delivered (a checkout to dest succeeded with its bytes)."""
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    victims = tmp_path / "victims"
    victims.mkdir()
    real = Placer.finish

    def relinked_first(p: Placer, check: Callable[[], None] = lambda: None) -> None:
        target = p.root / "chroma.sqlite3"
        if same_number:
            _linked_with_its_number(victims, target)
        else:
            target.unlink()
            (victims / "victim.txt").write_bytes(b"PRECIOUS\n")
            os.link(victims / "victim.txt", target)
        real(p, check)

    monkeypatch.setattr(Placer, "finish", relinked_first)
    checkouts: list[Callable[[], object]] = [
        lambda: remote.checkout("db", v1, tmp_path / "out" / "db"),
        lambda: CachedStore(remote, tmp_path / "cache").checkout("db", v1),
    ]
    for checkout in checkouts:
        with pytest.raises(LocalDiskError, match="not the file written"):
            checkout()
        assert (victims / "victim.txt").read_bytes() == b"PRECIOUS\n"
    assert not (tmp_path / "out" / "db").exists()
    monkeypatch.undo()
    with CachedStore(remote, tmp_path / "cache").checkout("db", v1) as snap:
        assert read_tree(snap.path) == _files(1)


@pytest.mark.parametrize("how", ["hard link", "moved in"])
@pytest.mark.parametrize("build", ["cold", "patch"])
def test_a_work_file_replaced_before_the_stamps_is_never_trusted(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch, how: str, build: str
) -> None:
    """After the last write and before the cache records the stamps (which later warm
    checkouts trust), another process replaces a work file: by a hard link to its own file,
    or by a file of its own moved in. The build fails, nothing is recorded or served; the
    other process's file is untouched; the next checkout is exact."""
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    files2 = {**_files(1), "chroma.sqlite3": b"v2" * 30000}
    v2 = remote.publish("db", write_tree(tmp_path / "src2", files2)).version
    cache = CachedStore(remote, tmp_path / "cache")
    if build == "patch":
        cache.checkout("db", v1).release()  # retired, then patched into v2
    victims = tmp_path / "victims"
    victims.mkdir()
    real = NameDirs.write_meta

    def replaced_first(d: NameDirs, version: str, root: Path, *a: object, **k: object) -> None:
        target = root / "chroma.sqlite3"
        mine = victims / "victim.txt"
        mine.write_bytes(b"x" * target.stat().st_size)
        target.unlink()
        if how == "hard link":
            os.link(mine, target)
        else:
            os.rename(mine, target)
        real(d, version, root, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(NameDirs, "write_meta", replaced_first)
    with pytest.raises(LocalDiskError, match="not the file written"):
        cache.checkout("db", v2)
    monkeypatch.undo()
    if how == "hard link":
        assert (victims / "victim.txt").read_bytes() == b"x" * 60000
    assert v2 not in cache.dirs("db").complete()
    with cache.checkout("db", v2) as snap:
        assert read_tree(snap.path) == files2


@pytest.mark.parametrize("step", ["after the mkdir", "before the files are made"])
def test_a_folder_swapped_for_the_cache_work_folder(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    # swapped right after the mkdir, the other process's folder was served as the version
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    swap, swapped = _swapper(tmp_path)
    if step == "after the mkdir":
        real_mkdir = Path.mkdir

        def mkdir_then_swap(path: Path, *args: object, **kwargs: object) -> None:
            real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]
            if path.parent.name == "tmp" and not swapped:
                swap(path)

        monkeypatch.setattr(Path, "mkdir", mkdir_then_swap)
    else:
        _around(monkeypatch, "create_files", before=lambda p: swap(p.root))
    with pytest.raises(LocalDiskError, match="work folder was replaced"):
        CachedStore(remote, tmp_path / "cache").checkout("db", v1)
    monkeypatch.undo()
    aside = _set_aside(swapped[0])
    with CachedStore(remote, tmp_path / "cache").checkout("db", v1) as snap:  # sweeps tmp/
        assert read_tree(snap.path) == _files(1)
    assert read_tree(aside) == PLANTED


def test_a_folder_swapped_for_the_dest_work_folder_before_the_files_are_made(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the placer opened the work folder again by path and wrote into the swapped-in one
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    swap, swapped = _swapper(tmp_path)
    _around(monkeypatch, "create_files", before=lambda p: swap(p.root))
    cached = CachedStore(remote, tmp_path / "cache")
    checkouts: list[Callable[[Path], object]] = [
        lambda dest: remote.checkout("db", v1, dest),
        lambda dest: cached.checkout("db", v1, dest),  # cold: through the cache
        lambda dest: cached.checkout("db", v1, dest),  # warm: a copy out of it
    ]
    for n, checkout in enumerate(checkouts):
        if n == 2:
            monkeypatch.undo()
            cached.checkout("db", v1).release()  # cached now
            _around(monkeypatch, "create_files", before=lambda p: swap(p.root))
        dest = tmp_path / f"out{n}" / "db"
        with pytest.raises(LocalDiskError, match="work folder was replaced"):
            checkout(dest)
        assert not dest.exists()
        aside = _set_aside(swapped[-1])
    monkeypatch.undo()
    old = time.time() - 2 * workdir.LEFTOVER_AGE
    os.utime(aside, (old, old))
    with remote.checkout("db", v1, tmp_path / "out2" / "db"):  # sweeps old work folders
        assert read_tree(aside) == PLANTED


def test_a_folder_swapped_for_a_held_copy_is_not_served_nor_removed(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the other process's folder was served as the copy, then deleted at the release
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    swap, swapped = _swapper(tmp_path)

    def swap_a_copy(placer: Placer) -> None:
        if "copies" in placer.root.parts:
            swap(placer.root)

    first = CachedStore(remote, tmp_path / "cache")
    with first.checkout("db", v1) as held:
        for meta in (held.path.parent.parent / "meta").iterdir():
            meta.unlink()  # a second checkout gets a copy of its own
        _around(monkeypatch, "finish", after=swap_a_copy)
        with pytest.raises(LocalDiskError, match="work folder was replaced"):
            CachedStore(remote, tmp_path / "cache").checkout("db", v1)
        monkeypatch.undo()
        aside = _set_aside(swapped[0])
        assert read_tree(held.path) == _files(1)
    CachedStore(remote, tmp_path / "cache")  # opening sweeps copies whose holder is gone
    assert read_tree(aside) == PLANTED


def test_a_mount_inside_a_work_folder_before_its_rename_is_not_served(
    tmp_path: Path, remote: RemoteStore, mounts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # it moved into place with the rename and was served beside the verified files; then
    # the tree built, set aside like another process's folder, stayed for good
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    theirs = write_tree(tmp_path / "theirs", {"marker": b"theirs"})
    real_meta, real_move = NameDirs.write_meta, localfs.move_into_place

    def mount_in(work: Path) -> None:
        (work / "mnt").mkdir()
        _bind(theirs, work / "mnt", mounts)

    def meta_then_mount(d: NameDirs, v: str, work: Path, *a: object) -> None:
        real_meta(d, v, work, *a)  # type: ignore[arg-type]
        mount_in(work)

    def mount_then_move(work: Path, final: Path) -> None:
        mount_in(work)
        real_move(work, final)

    monkeypatch.setattr(NameDirs, "write_meta", meta_then_mount)
    monkeypatch.setattr(localfs, "move_into_place", mount_then_move)
    cache, dest = tmp_path / "cache", tmp_path / "out" / "db"
    checkouts: list[Callable[[], object]] = [
        lambda: CachedStore(remote, cache).checkout("db", v1),
        lambda: remote.checkout("db", v1, dest),
    ]
    for checkout in checkouts:
        with pytest.raises(LocalDiskError, match="mounted inside the work folder"):
            checkout()
        assert read_tree(mounts[-1]) == {"marker": b"theirs"}  # back at its work folder
        assert read_tree(mounts[-1].parent) == {"mnt/marker": b"theirs"}  # ours removed
    assert not dest.exists()
    monkeypatch.undo()
    for m in mounts:
        subprocess.run(["umount", str(m)], check=True)
    mounts.clear()
    with CachedStore(remote, cache).checkout("db", v1) as snap:  # sweeps the leftover
        assert read_tree(snap.path) == _files(1)
    assert [p.name for p in snap.path.parent.iterdir()] == [snap.path.name]  # none aside
    assert read_tree(theirs) == {"marker": b"theirs"}


def test_a_retired_version_is_renamed_onto_nothing(
    tmp_path: Path, remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the work folder was made first and the retired version renamed over it: an empty
    # folder of another process's swapped in meanwhile (45 of 228 positions) was destroyed
    from chroma_snapshots.stores.cache import builds as store_module
    from chroma_snapshots.stores.cache.patch import take_retired as real_take

    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    v2 = remote.publish("db", write_tree(tmp_path / "src2", _files(2))).version
    cached = CachedStore(remote, tmp_path / "cache")
    cached.checkout("db", v1).release()
    seen: list[bool] = []

    def take(d: NameDirs, exclude: str, work: Path) -> object:
        seen.append(os.path.lexists(work))
        return real_take(d, exclude, work)

    monkeypatch.setattr(store_module, "take_retired", take)
    with cached.checkout("db", v2) as snap:
        assert read_tree(snap.path) == _files(2)
    assert seen == [False]
    assert v1 not in cached.dirs("db").complete()  # it was the one patched


def test_the_sweep_beside_a_dest_leaves_another_users_folder(
    tmp_path: Path, remote: RemoteStore
) -> None:
    # root's checkout removed a two-hour-old work-named folder of uid 65534's
    v1 = remote.publish("db", write_tree(tmp_path / "src1", _files(1))).version
    dest = tmp_path / "out" / "db"
    prefix, _, _ = workdir.work_names(dest.name)
    theirs = write_tree(dest.parent / f"{prefix}abcd1234.tmp", {"f.txt": b"theirs"})
    os.chown(theirs, 65534, 65534)
    old = time.time() - 2 * workdir.LEFTOVER_AGE
    os.utime(theirs, (old, old))
    with remote.checkout("db", v1, dest) as snap:
        assert read_tree(snap.path) == _files(1)
    assert read_tree(theirs) == {"f.txt": b"theirs"}
