"""The cache owns its files and folders: a consumer's chmod (a read-only file or folder),
a published read-only file, or a checkout folder swapped for a symlink never makes a
checkout fail for good, never leaks a work folder and never writes outside the cache.

Permission bits do not stop root, and the suite runs as root in CI: the tests marked
``unprivileged`` run themselves again in a child pytest without the capabilities that
bypass them (as Lambda's non-root user runs), and pass or fail with it.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from small_stores import CHUNK

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.engine.folders import remove_tree
from chroma_snapshots.testing.conformance import read_tree, write_tree

_INSIDE = "CHROMA_SNAPSHOTS_TEST_UNPRIVILEGED"
_DROP = "--bounding-set=-dac_override,-dac_read_search,-fowner"


def unprivileged(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test`` where permission bits apply: as is for a non-root user, else again in a
    child pytest under ``setpriv`` without the capabilities that bypass them."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        if os.geteuid() != 0 or os.environ.get(_INSIDE):
            test(*args, **kwargs)
            return
        if shutil.which("setpriv") is None:
            if os.environ.get("CI"):
                pytest.fail("setpriv is needed to run this test without root's bypass")
            pytest.skip("setpriv is not installed")
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        cmd = [
            *("setpriv", _DROP, sys.executable, "-m", "pytest"),
            *("-q", "--tb=short", "-p", "no:cacheprovider", "-n", "0"),  # one test: no workers
        ]
        done = subprocess.run(
            [*cmd, "--rootdir", str(Path(__file__).parent.parent), node],
            env={**os.environ, _INSIDE: "1"},
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"without root's bypass:\n{done.stdout[-3000:]}{done.stderr}"

    return run


def _v1(cached: CachedStore, tmp_path: Path, ro: str | None = None) -> tuple[Path, Path, str]:
    """Publish and cache v1 (``ro``: a file published read-only); returns its source tree,
    its cached tree and its version."""
    rng = random.Random(7)
    src = write_tree(
        tmp_path / "src",
        {
            "db.sqlite3": rng.randbytes(16 * CHUNK),
            "seg/data.bin": rng.randbytes(8 * CHUNK),
            "seg/deep/more.bin": rng.randbytes(3 * CHUNK + 5),
        },
    )
    if ro is not None:
        os.chmod(src / ro, 0o444)
    with cached.checkout("db", cached.publish("db", src).version) as snap:
        return src, snap.path, snap.info.version


def _change(src: Path, path: str = "seg/data.bin", *, shrink: bool = False) -> None:
    """Change one chunk of ``path`` (or cut its last chunk off), keeping its mode."""
    target = src / path
    mode = target.stat().st_mode & 0o777
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:
        if shrink:
            f.truncate(target.stat().st_size - CHUNK)
        else:
            f.seek(2 * CHUNK)
            f.write(random.Random(8).randbytes(CHUNK))
    os.chmod(target, mode)


def _modes(root: Path) -> dict[str, int]:
    """Each file's mode (a manifest's); every folder must be its owner's to use (a
    manifest records no folder modes)."""
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            assert p.stat().st_mode & 0o700 == 0o700, p
    return {
        p.relative_to(root).as_posix(): p.stat().st_mode & 0o777
        for p in root.rglob("*")
        if p.is_file()
    }


def _no_work_left(cached: CachedStore) -> None:
    tmp = cached.dirs("db").root / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())


@unprivileged
def test_a_read_only_file_is_repaired_on_every_warm_checkout(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, v1 = _v1(cached, tmp_path)
    os.chmod(old / "seg/data.bin", 0o400)
    for _ in range(2):
        with cached.checkout("db", v1) as snap:
            assert read_tree(snap.path) == read_tree(src)
            assert _modes(snap.path) == _modes(src)


def _refresh_patches(cached: CachedStore, src: Path) -> None:
    """Publish ``src`` and refresh: exact bytes and modes, built by patching the old copy
    (it is the only version left, not lost), no work folder left over."""
    v2 = cached.publish("db", src).version
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
        assert _modes(snap.path) == _modes(src)
    assert cached.dirs("db").complete() == [v2]
    _no_work_left(cached)


@unprivileged
def test_a_read_only_file_in_the_old_copy_is_patched(cached: CachedStore, tmp_path: Path) -> None:
    src, old, _ = _v1(cached, tmp_path)
    os.chmod(old / "seg/data.bin", 0o400)
    os.chmod(old / "db.sqlite3", 0o000)
    _change(src)
    _refresh_patches(cached, src)


@unprivileged
def test_read_only_folders_are_repaired_on_a_warm_checkout(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, v1 = _v1(cached, tmp_path)
    (old / "seg/scratch.tmp").write_text("wal")
    (old / "seg/deep/scratch.tmp").write_text("wal")
    os.chmod(old / "seg/deep", 0o000)
    os.chmod(old / "seg", 0o555)
    os.chmod(old, 0o555)
    for _ in range(2):
        with cached.checkout("db", v1) as snap:
            assert read_tree(snap.path) == read_tree(src)
            assert _modes(snap.path) == _modes(src)


@unprivileged
def test_read_only_folders_in_the_old_copy_are_patched(cached: CachedStore, tmp_path: Path) -> None:
    src, old, _ = _v1(cached, tmp_path)
    (old / "seg/scratch.tmp").write_text("wal")
    os.chmod(old / "seg/deep", 0o500)
    os.chmod(old / "seg", 0o555)
    os.chmod(old, 0o555)  # renaming a folder needs write permission on it
    _change(src, "seg/deep/more.bin")
    _refresh_patches(cached, src)


@unprivileged
@pytest.mark.parametrize("shrink", [False, True])
def test_a_published_read_only_file_is_patched(
    cached: CachedStore, tmp_path: Path, shrink: bool
) -> None:
    """A changed chunk is written, or the file cut at a chunk boundary (nothing written),
    then the mode is set: 0444 before the writes would refuse them."""
    src, _, _ = _v1(cached, tmp_path, ro="seg/data.bin")
    _change(src, shrink=shrink)
    v2 = cached.publish("db", src).version
    with cached.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
        assert (snap.path / "seg/data.bin").stat().st_mode & 0o777 == 0o444
    assert cached.dirs("db").complete() == [v2]
    with cached.checkout("db", v2) as warm:  # stamped with its final mode: served as is
        assert warm.stats.bytes_downloaded == 0


@unprivileged
def test_a_changed_published_read_only_file_is_repaired(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, v1 = _v1(cached, tmp_path, ro="seg/data.bin")
    os.chmod(old / "seg/data.bin", 0o644)
    with open(old / "seg/data.bin", "r+b") as f:
        f.write(b"consumer")
    os.chmod(old / "seg/data.bin", 0o444)
    with cached.checkout("db", v1) as snap:
        assert read_tree(snap.path) == read_tree(src)
        assert (snap.path / "seg/data.bin").stat().st_mode & 0o777 == 0o444


@unprivileged
def test_work_folders_a_consumer_made_read_only_are_removed(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"a/b/c.bin": b"c", "a/d.bin": b"d", "e/f.bin": b"f"})
    os.chmod(tree / "a/b", 0o000)
    os.chmod(tree / "a", 0o555)
    os.chmod(tree / "e", 0o300)  # not listable
    remove_tree(tree)
    assert not tree.exists()


@unprivileged
def test_clean_leftovers_removes_a_read_only_work_folder(
    cached: CachedStore, remote: RemoteStore, tmp_path: Path
) -> None:
    _, old, v1 = _v1(cached, tmp_path)
    work = cached.dirs("db").root / "tmp" / f"{v1}.999999999.0badc0de"
    shutil.copytree(old, work)
    os.chmod(work / "seg", 0o555)
    CachedStore(remote, tmp_path / "cache")  # opening the cache cleans what dead ones left
    _no_work_left(cached)


def _swap_for_link(folder: Path, tmp_path: Path) -> Path:
    """Replace ``folder`` by a symlink to a folder of the consumer's own."""
    own = write_tree(tmp_path / "consumer", {"precious.txt": b"consumer data"})
    shutil.rmtree(folder)
    os.symlink(own, folder)
    return own


def test_a_checkout_folder_swapped_for_a_link_is_rebuilt_not_followed(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, v1 = _v1(cached, tmp_path)
    own = _swap_for_link(old, tmp_path)
    for _ in range(2):
        with cached.checkout("db", v1) as snap:
            assert not snap.path.is_symlink()
            assert read_tree(snap.path) == read_tree(src)
    assert read_tree(own) == {"precious.txt": b"consumer data"}
    _no_work_left(cached)


def test_an_old_copy_swapped_for_a_link_is_never_patched(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, _ = _v1(cached, tmp_path)
    own = _swap_for_link(old, tmp_path)
    _change(src)
    v2 = cached.publish("db", src).version
    for _ in range(2):
        with cached.checkout("db") as snap:
            assert snap.info.version == v2
            assert not snap.path.is_symlink()
            assert read_tree(snap.path) == read_tree(src)
    assert read_tree(own) == {"precious.txt": b"consumer data"}
    d = cached.dirs("db")
    assert d.complete() == [v2]
    assert os.listdir(d.root / "versions") == [v2]  # the link went, not what it led to
    assert sorted(os.listdir(d.root / "meta")) == [f"{v2}.manifest", f"{v2}.stamps"]
    _no_work_left(cached)


def test_a_folder_inside_the_old_copy_swapped_for_a_link_is_not_followed(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, v1 = _v1(cached, tmp_path)
    own = _swap_for_link(old / "seg", tmp_path)
    _change(src)
    with cached.checkout("db", cached.publish("db", src).version) as snap:
        assert read_tree(snap.path) == read_tree(src)
    assert read_tree(own) == {"precious.txt": b"consumer data"}
    assert v1 not in cached.dirs("db").complete()


@unprivileged
def test_cache_verify_reports_what_a_consumer_made_unreadable_or_special(
    cached: CachedStore, tmp_path: Path
) -> None:
    # it stopped with a traceback (exit 1) at a folder of mode 000
    from chroma_snapshots.stores.cache.inspect import entries, verify

    src, old, _ = _v1(cached, tmp_path)
    os.chmod(old / "seg/deep", 0o000)
    os.chmod(old / "db.sqlite3", 0o000)
    (old / "seg/data.bin").unlink()
    os.mkfifo(old / "seg/data.bin")  # never opened: a read would block
    (entry,) = entries(cached)
    assert verify(cached, entry) == [
        "db.sqlite3: cannot be read (Permission denied)",
        "seg/data.bin: not a regular file",
        "seg/deep/more.bin: cannot be read (Permission denied)",
    ]
    with cached.checkout("db", entry.version) as snap:  # repaired, modes included
        assert read_tree(snap.path) == read_tree(src)
        assert _modes(snap.path) == _modes(src)
    assert verify(cached, entry) == []
