"""Format 2 layout 3: chunks named by the first 224 bits of their sha256 (56 hex digits), 4
bytes a chunk less (``chunk_hash="sha256"``, and every store whose versions are so named).
Older stores keep their full ids; a store moving from one to the other re-uploads nothing,
makes no new version of an unchanged folder, and a cache reuses what it holds (a byte that
does not hash to its short id is refused like any other: test_chunk_hash.py)."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from test_bundles import LAYOUT12, layout12_sources

from chroma_snapshots import CachedStore, RemoteStore, open_backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.models import is_link_key
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 4096


def _tree(root: Path) -> Path:
    rng = random_bytes = os.urandom
    return write_tree(
        root,
        {
            "big.bin": rng(20 * CS + 7),
            "mid.bin": rng(3 * CS),
            **{f"small/{i:03d}": random_bytes(50 + i) for i in range(30)},
        },
    )


def test_format_2_names_chunks_by_short_ids_and_format_1_by_full_ones(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    for fmt, chunk_hash, width in ((2, "sha256", 56), (2, None, 60), (1, None, 64)):
        store = RemoteStore(open_backend(f"memory://s-{uuid.uuid4().hex}"), chunk_size=CS,
                            manifest_format=fmt, chunk_hash=chunk_hash)  # fmt: skip
        v = store.publish("db", src).version
        m = store.load_manifest("db", v)
        assert {len(h) for h in m.chunks} == {width}
        out = tmp_path / f"out{width}"
        assert read_tree(store.checkout("db", v, out).path) == read_tree(src)
        assert store.verify("db", v).ok


def test_short_ids_take_4_bytes_a_chunk_less(tmp_path: Path) -> None:
    store = RemoteStore(
        open_backend(f"memory://s-{uuid.uuid4().hex}"), chunk_size=CS, chunk_hash="sha256"
    )
    v = store.publish("db", write_tree(tmp_path / "src", {"a": os.urandom(400 * CS)})).version
    short = store.load_manifest("db", v)
    full_ids = {h: h + os.urandom(4).hex() for h in short.chunks}  # as random as sha256
    full = replace(
        short,
        chunks={full_ids[h]: replace(c, hash=full_ids[h]) for h, c in short.chunks.items()},
        files=tuple(replace(f, chunks=tuple(full_ids[h] for h in f.chunks)) for f in short.files),
    )
    saved = len(manifest_v2.encode(full)) - len(manifest_v2.encode(short))
    assert saved >= 4 * len(short.chunks) - 16  # the ids do not compress
    assert b'"layout":3' in manifest_v2.decompress(manifest_v2.encode(short))


def test_mixed_id_lengths_cannot_be_encoded(tmp_path: Path) -> None:
    store = RemoteStore(
        open_backend(f"memory://s-{uuid.uuid4().hex}"), chunk_size=CS, chunk_hash="sha256"
    )
    v = store.publish("db", write_tree(tmp_path / "src", {"a": os.urandom(3 * CS)})).version
    m = store.load_manifest("db", v)
    h = next(iter(m.chunks))
    long = h + "0" * 8
    mixed = replace(
        m,
        chunks={
            **{k: c for k, c in m.chunks.items() if k != h},
            long: replace(m.chunks[h], hash=long),
        },
        files=tuple(
            replace(f, chunks=tuple(long if x == h else x for x in f.chunks)) for f in m.files
        ),
    )
    with pytest.raises(InvalidInputError, match="all be of one hash and length"):
        manifest_v2.encode(mixed)


def test_a_store_of_full_ids_moves_to_short_ones_without_uploading(tmp_path: Path) -> None:
    """The layout 1 and 2 fixture store (full ids): publishing its last tree again makes no
    new version; a changed tree uploads only the change; a cache holding the full-id
    version refreshes to the short-id one from what it holds."""
    root = shutil.copytree(LAYOUT12, tmp_path / "store")
    layout12_sources(tmp_path / "src")
    store = RemoteStore(FileBackend(str(root)), chunk_size=CS)
    latest = store.current_version("db")[0]
    table = store.load_manifest("db", latest).chunks
    assert {len(h) for h in table if not is_link_key(h)} == {64}
    cache = CachedStore(store, tmp_path / "cache")
    with cache.checkout("db", latest):
        pass
    again = store.publish("db", tmp_path / "src" / "v2")
    assert again.version == latest  # unchanged: no new version, whatever the ids' length
    changed = tmp_path / "src" / "v2"
    (changed / "conf" / "f03.json").write_bytes(b'{"n": "three"}\n')
    info = store.publish("db", changed)
    assert info.stats.chunks_transferred == 1  # one bundle: every other chunk was known
    table = store.load_manifest("db", info.version).chunks
    assert {len(h) for h in table if not is_link_key(h)} == {56}
    with cache.checkout("db", info.version) as snap:
        assert read_tree(snap.path) == read_tree(changed)
        assert snap.stats.bytes_downloaded < 2 * CS  # the one bundle; the rest was local
