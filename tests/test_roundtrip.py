"""Publish -> checkout is byte-identical for arbitrary trees; dedup is measured, not assumed."""

from __future__ import annotations

import gc
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chroma_snapshots import RemoteStore, open_backend
from chroma_snapshots.engine.source import scan_source
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.stores import remote
from chroma_snapshots.testing.conformance import read_tree, write_tree

CHUNK = 4096
_names = st.text("abcXYZ019_-.é", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith(".")
)
_sizes = st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 5 * CHUNK])
_trees = st.dictionaries(
    st.lists(_names, min_size=1, max_size=3).map("/".join),
    st.tuples(_sizes, st.integers(0, 255), st.sampled_from([0o644, 0o600, 0o755])),
    max_size=8,
)


def _materialize(
    root: Path, tree: dict[str, tuple[int, int, int]]
) -> dict[str, tuple[int, int, int]]:
    kept: dict[str, tuple[int, int, int]] = {}
    for rel, spec in sorted(tree.items()):
        parts = rel.split("/")
        # skip paths that would put a file where a directory is (or the reverse)
        if any("/".join(parts[:i]) in kept for i in range(1, len(parts))) or any(
            k.startswith(rel + "/") for k in kept
        ):
            continue
        kept[rel] = spec
    for rel, (size, seed, mode) in kept.items():
        data = bytes((seed + i * 7) % 251 for i in range(size))
        write_tree(root, {rel: data})
        os.chmod(root / rel, mode)
    return kept


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees, empty_dirs=st.lists(_names, max_size=2))
def test_round_trip_random_trees(
    tree: dict[str, tuple[int, int, int]], empty_dirs: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        kept = _materialize(src, tree)
        for d in empty_dirs:
            if not (src / d).exists():
                (src / "e" / d).mkdir(parents=True, exist_ok=True)
        store = RemoteStore(
            open_backend(f"memory://rt-{uuid.uuid4().hex}"), chunk_size=CHUNK, pack_target=3 * CHUNK
        )
        info = store.publish("t", src)
        snap = store.checkout("t", dest=Path(tmp) / "out")
        assert read_tree(snap.path) == read_tree(src)
        for rel, (_, _, mode) in kept.items():
            assert (snap.path / rel).stat().st_mode & 0o777 == mode
        dirs_in = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_dir())
        dirs_out = sorted(
            p.relative_to(snap.path).as_posix() for p in snap.path.rglob("*") if p.is_dir()
        )
        assert dirs_in == dirs_out
        assert info.file_count == len(kept)


def test_one_page_change_in_64mib_uploads_one_chunk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = src / "chroma.sqlite3"
    big.write_bytes(os.urandom(64 << 20))
    store = RemoteStore(open_backend(f"file://{tmp_path}/store"))
    first = store.publish("db", src)
    assert first.stats.bytes_uploaded > 64 << 20  # random data: every chunk is new and stored raw
    with open(big, "r+b") as f:
        f.seek(40 << 20)
        f.write(os.urandom(4096))  # one 4 KiB sqlite page
    second = store.publish("db", src)
    manifest_bytes = len(store.backend.get(f"db/manifests/{second.version}.json").data)
    assert second.stats.chunks_transferred == 1
    assert second.stats.packs_transferred == 1
    pack_bytes = second.stats.bytes_uploaded - manifest_bytes
    assert 0 < pack_bytes <= store.chunk_size + 64  # about one 64 KiB chunk, not 64 MiB
    assert second.stats.bytes_reused == (64 << 20) - store.chunk_size
    unchanged = store.publish("db", src)
    assert unchanged.stats.packs_transferred == 0
    assert read_tree(store.checkout("db", dest=tmp_path / "out").path) == read_tree(src)


def test_the_collector_is_paused_while_a_publish_lists_files_and_back_on_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100,000 files: an object each and no cycle, but the collector walked them all again
    # and again (0.6 s of 2.5); it must come back on, whatever the publish did
    src = write_tree(tmp_path / "src", {"a": b"a", "d/b": b"b"})
    seen: list[bool] = []
    scan: Callable[..., object] = scan_source

    def spy(root: str | Path, *more: object) -> object:
        seen.append(gc.isenabled())
        return scan(root, *more)

    monkeypatch.setattr(remote, "scan_source", spy)
    store = RemoteStore(open_backend(f"memory://gc-{uuid.uuid4().hex}"))
    assert gc.isenabled()
    store.publish("db", src)
    (src / "link").symlink_to(src / "a")
    with pytest.raises(InvalidInputError, match="symlinks"):
        store.publish("db", src)
    assert seen == [False, False]
    assert gc.isenabled()


@pytest.mark.parametrize("through_cache", [False, True])  # a cache's private copy too
def test_a_checkout_sweeps_what_a_killed_checkout_to_the_same_dest_left(
    tmp_path: Path, through_cache: bool
) -> None:
    """A kill -9 leaves the hidden work folder beside dest (no handler runs); the next
    checkout to that dest removes it, but never one a running checkout holds, nor a new one."""
    import fcntl

    from chroma_snapshots import CachedStore, SnapshotStore

    remote = RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))
    store: SnapshotStore = CachedStore(remote, tmp_path / "cache") if through_cache else remote
    store.publish("db", write_tree(tmp_path / "src", {"a": b"a" * 100}))
    dest = tmp_path / "out"

    def leftover(tag: str, age: float, mark: str = "chroma-snapshots-work-") -> Path:
        p = write_tree(tmp_path / f".out.{mark}{tag}.tmp", {"half": b"x" * 1000})
        os.utime(p, (p.stat().st_atime - age, p.stat().st_mtime - age))
        return p

    killed, young = leftover("killed01", 3600), leftover("young001", 0)
    running = leftover("running1", 3600)
    users = leftover("backup01", 3600, mark="")  # a folder of the user's named alike
    fd = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a checkout in progress holds its own
    try:
        store.checkout("db", dest=dest)
    finally:
        os.close(fd)
    assert read_tree(dest) == {"a": b"a" * 100}
    assert not killed.exists()
    assert young.exists()
    assert running.exists()
    assert users.exists()
