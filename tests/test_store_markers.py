"""A store's folder and a cache's are recognised by what they hold, not only by their names:
each holds a marker file (engine/apart.py), and the walk of a source refuses one wherever
it meets it. These are the views of a store the mount table cannot name: an overlay whose
layer was renamed after it was mounted, a FUSE file system passing the store's folder
through, an overlay mounted after the publish's folder check, a copy."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_inprocess import Run
from test_overlapping_folders import _overlay

from chroma_snapshots import CachedStore, FallbackStore, RemoteStore, open_store
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.apart import CACHE_MARKER, STORE_MARKER
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faultfs import FaultyMount

pytestmark = pytest.mark.usefixtures("clean_env")
FILES = {"chroma.sqlite3": b"rows" * 1000, "seg/data.bin": b"v" * 5000}


def _published(tmp_path: Path) -> tuple[RemoteStore, Path]:
    """A store at ``store`` with one version, and a folder ``src`` to publish."""
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "v1", FILES))
    return store, write_tree(tmp_path / "src", FILES)


def _objects(store: RemoteStore) -> dict[str, bytes]:
    """The store's files but its marker (which a publish may put back)."""
    tree = read_tree(store.backend.root)  # type: ignore[attr-defined]
    return {k: v for k, v in tree.items() if k != STORE_MARKER}


def _refused(store: RemoteStore, src: Path, what: str, run: Run | None = None) -> None:
    before = _objects(store)
    with pytest.raises(InvalidInputError, match=what):
        store.publish("db", src)
    if run is not None:
        root = str(store.backend.root)  # type: ignore[attr-defined]
        code, _, err = run("--store", root, "publish", "db", str(src))
        assert code == 2, err
        assert "inside the folder being published" in err
    assert _objects(store) == before


def test_a_store_folder_is_marked_when_opened_and_at_each_publish(tmp_path: Path) -> None:
    store = RemoteStore(FileBackend(tmp_path / "store"))
    assert (tmp_path / "store" / STORE_MARKER).is_file()
    store.publish("db", write_tree(tmp_path / "src", FILES))
    assert list(store.names()) == ["db"]  # the marker is no snapshot
    # a store made before markers: any opening that may write its folder marks it
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "store", old)
    (old / STORE_MARKER).unlink()
    RemoteStore(FileBackend(old, create=False))
    assert (old / STORE_MARKER).is_file()
    # removed after the store opened: the next publish puts it back before it reads
    (tmp_path / "store" / STORE_MARKER).unlink()
    store.publish("db", write_tree(tmp_path / "src2", {"x": b"1"}))
    assert (tmp_path / "store" / STORE_MARKER).is_file()


@pytest.mark.parametrize("url", ["efs", "file"])
def test_a_store_opened_by_url_is_marked(tmp_path: Path, url: str) -> None:
    (tmp_path / "store").mkdir()  # efs:// insists that the mount's folder exists
    store = open_store(f"{url}://{tmp_path / 'store'}")
    assert (tmp_path / "store" / STORE_MARKER).is_file()
    store.close()


def test_a_read_only_store_without_its_marker_still_opens(tmp_path: Path) -> None:
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "src", FILES))
    (tmp_path / "store" / STORE_MARKER).unlink()
    os.mkfifo(tmp_path / "store" / STORE_MARKER)  # not writable without a reader: no hang
    again = RemoteStore(FileBackend(tmp_path / "store"))
    assert read_tree(again.checkout("db", dest=tmp_path / "out").path) == FILES


@pytest.mark.parametrize(
    ("hidden", "what"),
    [
        (False, "a store's folder is inside the folder being published"),
        (True, "a store's name folder is inside the folder being published"),
    ],
)
def test_an_overlay_whose_layer_was_renamed_is_refused_by_what_it_shows(
    tmp_path: Path, run: Run, hidden: bool, what: str
) -> None:
    # The mount table names the layer by the name it had when the overlay was mounted:
    # renamed since, that name leads nowhere, and only what the overlay shows tells the
    # store: its marker, or (``hidden`` by a whiteout in the upper layer, as a view that
    # leaves out dot files would) the name's folder with its manifests, packs and refs.
    (tmp_path / "a").mkdir()
    RemoteStore(FileBackend(tmp_path / "a" / "store")).publish(
        "db", write_tree(tmp_path / "v1", FILES)
    )
    src = write_tree(tmp_path / "src", FILES)
    upper = tmp_path / "upper"
    upper.mkdir()
    if hidden:
        os.mknod(upper / STORE_MARKER, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    with _overlay(tmp_path, src / "ov", tmp_path / "a" / "store", upper):
        os.rename(tmp_path / "a", tmp_path / "b")
        store = RemoteStore(FileBackend(tmp_path / "b" / "store"))
        assert os.path.lexists(src / "ov" / STORE_MARKER) != hidden
        _refused(store, src, what, run)
    assert len(list(store.versions("db"))) == 1


def test_a_fuse_pass_through_of_the_store_is_refused(tmp_path: Path, run: Run) -> None:
    # a FUSE file system showing the store's folder: a device of its own, no folder named
    store, src = _published(tmp_path)
    with FaultyMount(tmp_path / "store", src / "view", state_dir=tmp_path):
        _refused(store, src, "a store's folder is inside", run)
        _refused(store, src / "view", "a store's folder is inside")  # the view itself
    assert len(list(store.versions("db"))) == 1


def test_an_overlay_mounted_after_the_folder_check_is_refused_by_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder check reads the mount table once; a mount made after it and before the
    # walk is met by the walk, which reads every folder it publishes.
    import chroma_snapshots.stores.remote as remote

    store, src = _published(tmp_path)
    real: Callable[..., object] = remote.check_apart  # type: ignore[attr-defined]
    mounted = []

    def then_mount(*args: object) -> object:
        checked = real(*args)
        mounted.append(_overlay(tmp_path, src / "ov", tmp_path / "store"))
        mounted[0].__enter__()
        return checked

    monkeypatch.setattr(remote, "check_apart", then_mount)
    try:
        _refused(store, src, "a store's folder is inside")
    finally:
        mounted[0].__exit__(None, None, None)
    assert len(list(store.versions("db"))) == 1


@pytest.mark.parametrize("what", ["store", "cache"])
def test_a_copy_of_a_store_or_a_cache_inside_the_source_is_refused(
    tmp_path: Path, what: str
) -> None:
    store, src = _published(tmp_path)
    if what == "store":
        shutil.copytree(tmp_path / "store", src / "backup" / "store")
    else:
        cached = CachedStore(store, tmp_path / "cache")
        cached.checkout("db").release()
        assert any(p.name == CACHE_MARKER for p in (tmp_path / "cache").rglob("*"))
        shutil.copytree(tmp_path / "cache", src / "backup" / "cache")
    _refused(store, src, f"a {what}'s folder is inside the folder being published")


def test_a_file_named_as_a_marker_is_refused_with_its_name(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {**FILES, f"d/{STORE_MARKER}": b""})
    store = RemoteStore(FileBackend(tmp_path / "store"))
    _refused(store, src, STORE_MARKER)


def test_views_of_a_store_whose_marker_was_removed_or_replaced_are_refused(
    tmp_path: Path, run: Run
) -> None:
    store, src = _published(tmp_path)
    marker = tmp_path / "store" / STORE_MARKER
    with FaultyMount(tmp_path / "store", src / "view", state_dir=tmp_path):
        marker.unlink()  # after the store opened: the publish puts it back first
        _refused(store, src, "a store's folder is inside")
        marker.unlink()  # a dry run and status open the store, and so mark it
        for command in (["publish", "--dry-run"], ["status"]):
            code, _, err = run("--store", str(tmp_path / "store"), *command, "db", str(src))
            assert code == 2, (command, err)
            assert "a store's folder is inside" in err
        marker.unlink()
        marker.mkdir()  # an entry of the marker's name of any kind is refused
        _refused(store, src, "a store's folder is inside")
    assert len(list(store.versions("db"))) == 1


def test_a_view_of_an_efs_mirror_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mirror").mkdir()
    mirror = open_store(f"efs://{tmp_path / 'mirror'}")
    truth = RemoteStore(FileBackend(tmp_path / "truth"))
    assert isinstance(mirror, RemoteStore)
    both = FallbackStore([truth, mirror], mirror=True)
    both.publish("db", write_tree(tmp_path / "v1", FILES))
    (tmp_path / "mirror" / STORE_MARKER).unlink()  # put back by the next publish
    src = write_tree(tmp_path / "src", FILES)
    with (
        FaultyMount(tmp_path / "mirror", src / "view", state_dir=tmp_path),
        pytest.raises(InvalidInputError, match="a store's folder is inside"),
    ):
        both.publish("db", src)
    assert len(list(truth.versions("db"))) == 1
    assert len(list(mirror.versions("db"))) == 1
    both.close()


def test_a_mirror_whose_marker_cannot_be_written_is_left_out_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror on a read-only mount, its marker gone: the publish goes to the truth and
    leaves that mirror out, saying why (not "its folder is not known": it is)."""
    (tmp_path / "mirror").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "mirror"), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        mirror = RemoteStore(FileBackend(ro))
        truth = RemoteStore(FileBackend(tmp_path / "truth"))
        both = FallbackStore([mirror, truth], mirror=True)  # the last is the truth
        with caplog.at_level("WARNING", logger="chroma_snapshots"):
            both.publish("db", write_tree(tmp_path / "v1", FILES))
        said = [r.getMessage() for r in caplog.records if "not mirroring" in r.getMessage()]
        assert len(said) == 1, said
        assert "its marker cannot be written" in said[0]
        assert len(list(truth.versions("db"))) == 1
        assert list(mirror.versions("db")) == []
        both.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_copy_of_a_name_folder_without_the_marker_is_refused(tmp_path: Path) -> None:
    store, src = _published(tmp_path)
    shutil.copytree(tmp_path / "store" / "db", src / "backup" / "db")  # `cp -a store/*`
    _refused(store, src, "a store's name folder is inside")


def test_a_publisher_that_cannot_put_the_marker_back_fails(tmp_path: Path) -> None:
    # The store's top folder is another user's and not the publisher's to write (its name
    # folder is): the publish fails with the error instead of going ahead without the
    # marker. The publisher is root without the capabilities that override file modes.
    store, src = _published(tmp_path)
    (tmp_path / "store" / STORE_MARKER).unlink()
    os.chown(tmp_path / "store", 65534, 65534)
    os.chmod(tmp_path / "store", 0o755)
    code = (
        "import sys\n"
        "from chroma_snapshots import RemoteStore\n"
        "from chroma_snapshots.backends.file import FileBackend\n"
        "from chroma_snapshots.errors import BackendUnavailableError\n"
        "store = RemoteStore(FileBackend(sys.argv[1]))\n"
        "try:\n"
        "    store.publish('db', sys.argv[2])\n"
        "except BackendUnavailableError as e:\n"
        "    print('refused:', e)\n"
    )
    drop = ["setpriv", "--bounding-set", "-dac_override,-fowner,-dac_read_search"]
    cmd = [*drop, sys.executable, "-c", code, str(tmp_path / "store"), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: writing the store's marker" in done.stdout
    assert len(list(store.versions("db"))) == 1
    assert not (tmp_path / "store" / STORE_MARKER).exists()


@pytest.mark.parametrize("view", ["fuse", "copy"])
def test_a_view_of_a_stores_packs_alone_is_refused(tmp_path: Path, view: str) -> None:
    # neither marker nor name folder shows: the packs do (packs/ab holds ab<62 hex digits>)
    store, src = _published(tmp_path)
    packs = tmp_path / "store" / "db" / "packs"
    if view == "copy":
        shutil.copytree(packs, src / "packs")
        _refused(store, src, "a store's packs are inside the folder being published")
        return
    with FaultyMount(packs, src / "view", state_dir=tmp_path):
        _refused(store, src, "a store's packs are inside the folder being published")
        one = next(p for p in (src / "view").iterdir())
        _refused(store, one, "a store's packs are inside")  # a prefix folder as the source


def test_names_like_a_packs_folder_that_are_not_one_are_published(tmp_path: Path) -> None:
    # a registry's blobs/sha256/ab/<64 hex digits>/data: a folder of that name, no pack
    registry = "blobs/sha256/ab/" + "ab" * 32 + "/data"
    files = {"ab/abc.bin": b"1", "ab/" + "cd" * 32: b"2", "abc/" + "ab" * 32: b"3", registry: b"4"}
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "src", files))
    assert read_tree(store.checkout("db", dest=tmp_path / "out").path) == files


@pytest.mark.parametrize("view", ["fuse", "copy"])
def test_a_view_of_a_cache_name_folder_is_refused(tmp_path: Path, view: str) -> None:
    # The cache's marker is a level up: its name folder shows building, meta and versions.
    # Published through the same cache, each version held the one before (it grew).
    store, src = _published(tmp_path)
    cached = CachedStore(store, tmp_path / "cache")
    cached.checkout("db").release()
    (name_folder,) = (tmp_path / "cache").glob("*/db")
    if view == "copy":
        shutil.copytree(name_folder, src / "backup")  # `cp -a cache/<key>/*`
        _refused(store, src, "a cache's name folder is inside the folder being published")
        return
    with (
        FaultyMount(name_folder, src / "data", state_dir=tmp_path),
        pytest.raises(InvalidInputError, match="a cache's name folder is inside"),
    ):
        cached.publish("db", src)
    assert len(list(store.versions("db"))) == 1
