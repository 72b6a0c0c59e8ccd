"""Folders that must stay apart, compared as the kernel knows them (links and bind mounts
alike). A publish of a folder that holds the store's own folder or the cache's, or that
lies inside the store's folder, is refused before anything is read or written: each
publish would otherwise copy the store (every earlier version) into the new version,
doubling it, and read files the store's own clean-ups remove; the CLI refuses it before
opening the store (which would make its folder there), in ``status`` and ``--dry-run``
too. A cache whose folder is a store's, holds it or lies inside it is refused when it is
made: its clean-ups would take the store's files, or the store would list the cache's
folders as snapshots. A folder beside another, with a name that merely starts the same,
is fine."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from cli_inprocess import Run

from chroma_snapshots import CachedStore, FallbackStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.apart import STORE_MARKER
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.testing.conformance import read_tree, write_tree

pytestmark = pytest.mark.usefixtures("clean_env")
FILES = {"chroma.sqlite3": b"rows" * 1000, "seg/data.bin": b"v" * 5000}


def _refused(store: RemoteStore | CachedStore, src: Path, what: str) -> None:
    before = read_tree(src)
    with pytest.raises(InvalidInputError, match=what):
        store.publish("db", src)
    assert list(store.versions("db")) == []
    assert read_tree(src) == before  # nothing was written into the folder either


@pytest.mark.parametrize("where", ["store", "nested/deeper/store", "."])
def test_a_store_inside_the_published_folder_is_refused(tmp_path: Path, where: str) -> None:
    src = write_tree(tmp_path / "src", FILES)
    store = RemoteStore(FileBackend(src / where))
    _refused(store, src, "the store's folder")


def test_a_link_to_the_folder_holding_the_store_is_refused_too(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES)
    (tmp_path / "link").symlink_to(src)
    store = RemoteStore(FileBackend(src / "store"))
    _refused(store, tmp_path / "link", "the store's folder")


def test_a_cache_inside_the_published_folder_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES)
    cached = CachedStore(RemoteStore(FileBackend(tmp_path / "store")), src / ".cache")
    with pytest.raises(InvalidInputError, match="the cache's folder"):
        cached.publish("db", src)
    assert list(cached.versions("db")) == []


def test_a_store_beside_the_folder_with_a_name_it_starts_is_fine(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES)
    store = RemoteStore(FileBackend(tmp_path / "src-store"))
    store.publish("db", src)
    out = store.checkout("db", dest=tmp_path / "out")
    assert read_tree(out.path) == read_tree(src)


def test_the_cli_says_so_in_one_line_with_exit_2(tmp_path: Path, run: Run) -> None:
    src = write_tree(tmp_path / "src", FILES)
    code, _, err = run("--store", str(src / "store"), "publish", "db", str(src))
    assert code == 2, err
    assert err.startswith("error: ")
    assert "inside the folder being published" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run("--store", str(tmp_path / "store"), "--cache-dir", str(src / "c"),
                       "publish", "db", str(src))  # fmt: skip
    assert code == 2, err
    assert "the cache's folder" in err


@pytest.mark.parametrize("cache", [".", "cache", ".."])
def test_a_cache_overlapping_a_store_is_refused(tmp_path: Path, cache: str) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"))
    remote.publish("db", write_tree(tmp_path / "src", FILES))
    with pytest.raises(InvalidInputError, match="overlap"):
        CachedStore(remote, tmp_path / "store" / cache)
    other = RemoteStore(FileBackend(tmp_path / "other"))
    with pytest.raises(InvalidInputError, match="overlap"):  # any store of a fallback
        CachedStore(FallbackStore([other, remote]), tmp_path / "store" / cache)
    assert [v.version for v in remote.versions("db")]  # the store is as it was


def test_a_cache_beside_a_store_is_fine(tmp_path: Path) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"))
    src = write_tree(tmp_path / "src", FILES)
    remote.publish("db", src)
    with CachedStore(remote, tmp_path / "store-cache").checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_the_cli_refuses_a_store_folder_as_its_cache(tmp_path: Path, run: Run) -> None:
    store = str(tmp_path / "store")
    assert run("--store", store, "publish", "db", str(write_tree(tmp_path / "s", FILES)))[0] == 0
    code, _, err = run("--store", store, "--cache-dir", store, "checkout", "db")
    assert code == 2, err
    assert "overlap" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run("--store", store, "ls")
    assert (code, out.split()) == (0, ["db"]), err


def _everything(root: Path) -> list[str]:
    """Every file and folder below ``root``, empty folders too."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", [["publish"], ["publish", "--dry-run"], ["status"]])
def test_a_refused_cli_publish_leaves_nothing_in_the_folder(
    tmp_path: Path, run: Run, command: list[str]
) -> None:
    src = write_tree(tmp_path / "src", FILES)
    before = _everything(src)
    for flags in (
        ["--store", str(src / "store")],
        ["--store", f"file://{src}/a/b/store"],
        ["--store", str(tmp_path / "store"), "--cache-dir", str(src / "c")],
    ):
        code, _, err = run(*flags, *command, "db", str(src))
        assert code == 2, (flags, err)
        assert "inside the folder being published" in err
        assert _everything(src) == before, flags  # no store or cache folder made in it


@pytest.mark.parametrize("command", [["publish"], ["publish", "--dry-run"], ["status"]])
def test_a_cache_overlapping_the_store_is_refused_by_a_dry_run_too(
    tmp_path: Path, run: Run, command: list[str]
) -> None:
    # what the publish refuses when it makes the cache, its dry run and status say first
    src = write_tree(tmp_path / "src", FILES)
    store = tmp_path / "store"
    RemoteStore(FileBackend(store)).publish("db", write_tree(tmp_path / "v1", FILES))
    for cache in (store, store / "c"):
        code, _, err = run(
            "--store", str(store), "--cache-dir", str(cache), *command, "db", str(src)
        )
        assert code == 2, (cache, err)
        assert "overlap" in err
    assert len(list(RemoteStore(FileBackend(store)).versions("db"))) == 1
    assert sorted(os.listdir(store)) == [STORE_MARKER, "db"]  # no cache folder made in it


def test_a_folder_inside_the_store_is_refused(tmp_path: Path, run: Run) -> None:
    store = RemoteStore(FileBackend(tmp_path / "store"))
    inner = write_tree(tmp_path / "store" / "db", FILES)
    with pytest.raises(InvalidInputError, match="inside the store's folder"):
        store.publish("db", inner)
    code, _, err = run("--store", str(tmp_path / "store"), "publish", "db", str(inner))
    assert code == 2, err
    assert list(store.versions("db")) == []


@contextmanager
def _mount(what: list[str], at: Path) -> Iterator[Path]:
    """``mount WHAT... at`` (``at`` made, if missing), unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        if os.environ.get("CI"):
            pytest.fail("mounts are required in CI (root and mount(8))")
        pytest.skip("mounts need root")
    at.mkdir(exist_ok=True)
    subprocess.run(["mount", *what, str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


def _bind(folder: Path, at: Path) -> AbstractContextManager[Path]:
    """``folder`` bound over ``at`` (made): the same folder under another name."""
    return _mount(["--bind", str(folder)], at)


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``data`` (with files) and ``view``, the same folder bound over another name."""
    data = write_tree(tmp_path / "data", FILES)
    with _bind(data, tmp_path / "view") as view:
        yield data, view


def test_a_bind_mount_does_not_hide_a_store_or_cache_inside(
    bound: tuple[Path, Path], tmp_path: Path, run: Run
) -> None:
    data, view = bound
    store = RemoteStore(FileBackend(view / "store"))  # data/store under another name
    with pytest.raises(InvalidInputError, match="the store's folder"):
        store.publish("db", data)
    other = RemoteStore(FileBackend(tmp_path / "other"))
    with pytest.raises(InvalidInputError, match="the cache's folder"):
        CachedStore(other, view / "cache").publish("db", data)
    with pytest.raises(InvalidInputError, match="overlap"):
        CachedStore(RemoteStore(FileBackend(data / "s2")), view / "s2" / "cc")
    code, _, err = run("--store", str(view / "st"), "publish", "db", str(data))
    assert code == 2, err


def test_a_store_folder_bound_elsewhere_is_found_inside_the_source(
    tmp_path: Path, run: Run
) -> None:
    # the store is data/store, opened as s (a bind of that folder alone): its spelled path
    # has other parents, but its place in the filesystem is inside data
    data = write_tree(tmp_path / "data", FILES)
    (data / "store").mkdir()
    with _bind(data / "store", tmp_path / "s") as s:
        store = RemoteStore(FileBackend(s))
        with pytest.raises(InvalidInputError, match=r"the store's folder .* is inside"):
            store.publish("db", data)
        code, _, err = run("--store", str(s), "publish", "db", str(data))
        assert code == 2, err
        assert list(store.versions("db")) == []


def test_a_folder_inside_a_store_bound_elsewhere_is_inside_it(tmp_path: Path, run: Run) -> None:
    # "x y" is store/inner under another name: the folders above it are tmp_path's, never the
    # store's, so only where x is in its filesystem tells that it lies inside the store
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "v1", FILES))
    inner = write_tree(tmp_path / "store" / "inner", FILES)
    with _bind(inner, tmp_path / "x y") as x:  # mountinfo writes the space as \040
        with pytest.raises(InvalidInputError, match="inside the store's folder"):
            store.publish("db", x)
        code, _, err = run("--store", str(tmp_path / "store"), "publish", "db", str(x))
        assert code == 2, err
        with pytest.raises(InvalidInputError, match="overlap"):
            CachedStore(store, x / "cache")  # a cache inside the store, by another name
    assert len(list(store.versions("db"))) == 1


def test_a_filesystem_mounted_inside_a_store_is_inside_it_under_any_name(
    tmp_path: Path, run: Run
) -> None:
    # a tmpfs at store/t: its folder src, bound at elsewhere, has no folder of the store
    # above it and another device; a mount below the store's folder shows it
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "v1", FILES))
    with _mount(["-t", "tmpfs", "tmpfs"], tmp_path / "store" / "t") as t:
        inner = write_tree(t / "src", FILES)
        with _bind(inner, tmp_path / "elsewhere") as elsewhere:
            with pytest.raises(InvalidInputError, match="inside the store's folder"):
                store.publish("db", elsewhere)
            code, _, err = run("--store", str(tmp_path / "store"), "publish", "db", str(elsewhere))
            assert code == 2, err
            with pytest.raises(InvalidInputError, match="overlap"):
                CachedStore(store, elsewhere / "cache")
    assert len(list(store.versions("db"))) == 1


def test_a_source_holding_a_mount_of_a_folder_inside_the_store_is_refused(
    tmp_path: Path, run: Run
) -> None:
    # src/sub shows the store's db/: each publish would copy the store into itself
    store = RemoteStore(FileBackend(tmp_path / "store"))
    src = write_tree(tmp_path / "src", FILES)
    store.publish("db", src)
    with _bind(tmp_path / "store" / "db", src / "sub"):
        with pytest.raises(InvalidInputError, match="is mounted in the folder being published"):
            store.publish("db", src)
        code, _, err = run("--store", str(tmp_path / "store"), "publish", "db", str(src))
        assert code == 2, err
    assert len(list(store.versions("db"))) == 1


def test_a_source_holding_other_mounts_is_published(tmp_path: Path) -> None:
    # a tmpfs and a bind of a folder outside the store, inside the source: nothing refused
    store = RemoteStore(FileBackend(tmp_path / "store"))
    src = write_tree(tmp_path / "src", FILES)
    other = write_tree(tmp_path / "store2", FILES)  # a name the store's starts
    with _mount(["-t", "tmpfs", "tmpfs"], src / "t"), _bind(other, src / "b"):
        (src / "t" / "f").write_bytes(b"on the tmpfs")
        store.publish("db", src)
    assert len(list(store.versions("db"))) == 1


def _overlay(
    tmp_path: Path, at: Path, lower: Path, upper: Path | None = None
) -> AbstractContextManager[Path]:
    """An overlay at ``at`` of ``lower`` (and ``upper``, written through; a read-only
    overlay without), beside a second lower folder whose name holds a colon."""
    other = write_tree(tmp_path / "a:b c", {"o": b"other"})
    layers = f"lowerdir={lower}:{str(other).replace(':', chr(92) + ':')}"
    if upper is not None:
        upper.mkdir(exist_ok=True)
        (tmp_path / "work").mkdir(exist_ok=True)
        layers += f",upperdir={upper},workdir={tmp_path / 'work'}"
    return _mount(["-t", "overlay", "overlay", "-o", layers], at)


@pytest.mark.parametrize(
    ("layer", "shown", "source", "what"),
    [
        ("lower", "store", "ov", "the store's folder .* is inside the folder being published"),
        ("lower", "store/db", "ov", "a folder inside the store's folder .* is mounted"),
        ("lower", "store", "ov/db", "inside the store's folder"),
        ("upper", "store/db", "src", "a folder inside the store's folder .* is mounted"),
        ("upper", "store", "src/ov", "the store's folder .* is inside the folder being published"),
    ],
)
def test_an_overlay_showing_the_store_is_refused(
    tmp_path: Path, run: Run, layer: str, shown: str, source: str, what: str
) -> None:
    # the mount table shows an overlay as the root of a device of its own: only its options
    # name the folders it shows, and a publish of it would copy the store into itself
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "src", FILES))
    ov = tmp_path / ("src/ov" if source.startswith("src") else "ov")
    lower, upper = (
        (tmp_path / shown, None) if layer == "lower" else (tmp_path / "lo", tmp_path / shown)
    )
    (tmp_path / "lo").mkdir()
    with _overlay(tmp_path, ov, lower, upper):
        with pytest.raises(InvalidInputError, match=what):
            store.publish("db", tmp_path / source)
        code, _, err = run(
            "--store", str(tmp_path / "store"), "publish", "db", str(tmp_path / source)
        )
        assert code == 2, err
        if source != "src":  # a cache beside the overlay is apart from the store
            with pytest.raises(InvalidInputError, match="overlap"):
                CachedStore(store, tmp_path / source / "cache")
    assert len(list(store.versions("db"))) == 1


def test_an_overlay_of_other_folders_is_published(tmp_path: Path) -> None:
    # lower and upper folders outside the store (one a name the store's starts): published
    store = RemoteStore(FileBackend(tmp_path / "store"))
    lower = write_tree(tmp_path / "store2", FILES)
    with _overlay(tmp_path, tmp_path / "ov", lower, tmp_path / "up") as ov:
        (ov / "new").write_bytes(b"written through")
        v = store.publish("db", ov)
        assert read_tree(store.checkout("db", v.version, tmp_path / "out").path) == {
            **FILES,
            "o": b"other",
            "new": b"written through",
        }


def test_a_mirror_inside_the_source_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", FILES)
    mirror = RemoteStore(FileBackend(src / "mirror"))
    truth = RemoteStore(FileBackend(tmp_path / "truth"))
    both = FallbackStore([mirror, truth], mirror=True)
    with pytest.raises(InvalidInputError, match="inside the folder being published"):
        both.publish("db", src)
    assert list(truth.versions("db")) == []


def test_a_chroma_database_holding_the_store_is_refused(tmp_path: Path) -> None:
    from chroma_helpers import build

    from chroma_snapshots.chroma import publish_client

    db = tmp_path / "db"
    build(db, {"docs": 20})
    store = RemoteStore(FileBackend(db / "store"))
    with pytest.raises(InvalidInputError, match="inside the folder being published"):
        publish_client(store, "db", db)
    assert list(store.versions("db")) == []
