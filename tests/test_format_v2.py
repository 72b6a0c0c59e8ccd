"""Format 2 manifests: compact, read back exactly, and hostile bytes end in IntegrityError;
format 1 stores (a fixture written by the format 1 code) stay readable."""

from __future__ import annotations

import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import runs

from chroma_snapshots import Manifest, RemoteStore, open_backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine import manifest_codec, manifest_read, manifest_v2
from chroma_snapshots.engine.keys import manifest_key
from chroma_snapshots.engine.models import Chunk, FileEntry, is_link_key, link_key
from chroma_snapshots.engine.validation import MAX_CHAIN, MAX_CHUNKS, canonical_json
from chroma_snapshots.errors import IntegrityError, InvalidInputError
from chroma_snapshots.testing.conformance import read_tree, write_tree

FIXTURE = Path(__file__).parent / "fixtures" / "v1_store"
V1_VERSIONS = ("20261202T071712546239Z-0422fb14b0b1", "20261202T071712573743Z-5463a272d644")
T0 = datetime(2026, 12, 2, tzinfo=timezone.utc)
FUZZ = settings(
    max_examples=runs(ci=200, long=3000),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _h(i: int) -> str:
    return f"{i:064x}"


def _manifest(chunks: list[Chunk], files: list[FileEntry], cs: int = 4096) -> Manifest:
    return Manifest("db", T0, cs, tuple(files), {c.hash: c for c in chunks})


def _chain(depth: int, cs: int = 4096) -> Manifest:
    """One file whose one chunk is ``depth`` deltas above a keyframe."""
    chunks = [Chunk(_h(0), _h(100), 0, 100, cs, "zstd")]
    for i in range(1, depth + 1):
        chunks.append(Chunk(_h(i), _h(100), 100 * i, 10, cs, "zdelta", _h(i - 1)))
    return _manifest(chunks, [FileEntry("f", cs, 0o644, (_h(depth),))])


def _published(tmp_path: Path) -> tuple[RemoteStore, str]:
    store = RemoteStore(open_backend(f"memory://v2-{uuid.uuid4().hex}"), chunk_size=4096)
    files = {"a.bin": os.urandom(20_000), "d/b.txt": b"b" * 9000, "d/e/c": b""}
    return store, store.publish("db", write_tree(tmp_path / "src", files)).version


def test_new_manifests_are_format_2_and_read_back(tmp_path: Path) -> None:
    store, version = _published(tmp_path)
    data = store.backend.get(manifest_key("db", version)).data
    assert data.startswith(manifest_v2.MAGIC)
    m = store.load_manifest("db", version)
    assert m.format_version == 2
    assert manifest_v2.dumps(m) == data
    assert manifest_v2.loads(manifest_v2.encode(m)) == manifest_v2.by_place(m)
    out = store.checkout("db", version, tmp_path / "out")
    assert read_tree(out.path) == read_tree(tmp_path / "src")


def test_format_1_can_still_be_written_for_old_readers(tmp_path: Path) -> None:
    store = RemoteStore(open_backend(f"memory://v1-{uuid.uuid4().hex}"), manifest_format=1)
    version = store.publish("db", write_tree(tmp_path / "src", {"a": b"x" * 10})).version
    assert store.backend.get(manifest_key("db", version)).data.startswith(b"{")
    assert store.load_manifest("db", version).format_version == 1
    with pytest.raises(InvalidInputError):
        RemoteStore(open_backend("memory://v1-bad"), manifest_format=3)


def test_manifest_costs_little_more_than_the_chunk_hashes() -> None:
    # 4,096 chunks: zstd-stored (varied lengths) in two packs, three files
    n, cs = 4096, 65536
    chunks = [
        Chunk(os.urandom(32).hex(), _h(i % 2), (i // 2) * 60_000, 40_000 + i % 7919, cs, "zstd")
        for i in range(n)
    ]
    cut = [0, 1000, 3000, n]
    files = [
        FileEntry(f"seg/{k}/data_level0.bin", (cut[k + 1] - cut[k]) * cs, 0o644,
                  tuple(c.hash for c in chunks[cut[k] : cut[k + 1]]))
        for k in range(3)
    ]  # fmt: skip
    m = _manifest(chunks, files, cs)
    per_chunk = len(manifest_v2.dumps(m)) / n
    assert per_chunk <= 36, per_chunk  # 32 of them are the sha256 itself
    assert len(replace(m, format_version=1).to_json()) / n > 200  # format 1, for comparison


def test_format_1_fixture_store_is_readable(tmp_path: Path) -> None:
    root = shutil.copytree(FIXTURE, tmp_path / "store")
    store = RemoteStore(FileBackend(str(root)), chunk_size=4096)  # as it was written
    for version in V1_VERSIONS:
        assert store.load_manifest("db", version).format_version == 1
    old = store.checkout("db", V1_VERSIONS[0], tmp_path / "old")
    assert (old.path / "a.bin").read_bytes() == bytes(range(256)) * 40
    assert (old.path / "seg" / "b.txt").read_bytes() == b"hello v1 format\n" * 300
    assert (old.path / "empty").is_dir()
    new = store.checkout("db", dest=tmp_path / "new")
    assert (new.path / "a.bin").read_bytes() == bytes(range(256)) * 40 + b"tail"
    assert store.verify("db", V1_VERSIONS[1]).ok
    # a format 2 version on top of a format 1 parent reuses its chunks
    (new.path / "extra").write_bytes(b"more")
    info = store.publish("db", new.path)
    assert store.load_manifest("db", info.version).format_version == 2
    assert info.stats.chunks_transferred == 1  # only the new file's chunk


# Hostile format 2 bytes.


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        (_chain(MAX_CHAIN), None),
        # refused by the link count (at most MAX_CHAIN per hashed chunk) or the depth check
        (_chain(MAX_CHAIN + 1), "longer than|more than such a manifest can hold"),
    ],
)
def test_chain_depth_is_bounded(manifest: Manifest, match: str | None) -> None:
    data = manifest_v2.encode(manifest)
    if match is None:
        assert manifest_v2.loads(data) == manifest_v2.by_place(manifest)
    else:
        with pytest.raises(IntegrityError, match=match):
            manifest_v2.loads(data)


def test_a_delta_cycle_is_refused() -> None:
    cs = 4096
    a = Chunk(_h(1), _h(100), 0, 10, cs, "zdelta", _h(2))
    b = Chunk(_h(2), _h(100), 10, 10, cs, "zdelta", _h(1))
    m = _manifest([a, b], [FileEntry("f", cs, 0o644, (_h(1),))])
    with pytest.raises(IntegrityError, match=r"cycle|longer"):
        manifest_v2.loads(manifest_v2.encode(m))


def test_a_delta_on_itself_or_a_missing_base_is_refused() -> None:
    m = _chain(1)
    bad = [
        replace(m, chunks={**m.chunks, _h(1): replace(m.chunks[_h(1)], base=_h(1))}),
        replace(m, chunks={_h(1): m.chunks[_h(1)]}),  # its base is not in the table
        replace(m, chunks={**m.chunks, _h(0): replace(m.chunks[_h(0)], codec="zdelta")}),
    ]
    for manifest in bad:
        with pytest.raises(IntegrityError):
            manifest.validate()


def _frame(body: bytes, *, content_size: bool = True) -> bytes:
    return manifest_v2.MAGIC + zstandard.ZstdCompressor(write_content_size=content_size).compress(
        body
    )


@pytest.mark.parametrize(
    "data",
    [
        manifest_v2.MAGIC,
        manifest_v2.MAGIC + b"not zstd",
        _frame(b"\x00" * 10, content_size=False),  # no declared size: refused
        _frame(b"\xff" * 12),  # a number that never ends
        _frame(b"\x05{}{}{}"),  # a header that is not a manifest header
        manifest_v2.encode(_chain(1)) + b"x",  # data after the frame
    ],
)
def test_malformed_format_2_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        manifest_v2.loads(data)


def test_a_body_declaring_huge_counts_is_refused_before_allocating() -> None:
    body = bytearray(manifest_v2.decompress(manifest_v2.encode(_chain(0))))
    header_len, width = body[0] & 0x7F | body[1] << 7, 2  # a header of 128-16383 bytes
    assert body[0] & 0x80
    assert not body[1] & 0x80
    at = width + header_len  # the pack count
    for huge in (b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"):
        with pytest.raises(IntegrityError, match=r"packs|number"):
            manifest_v2.loads(_frame(bytes(body[:at]) + huge + bytes(body[at + 1 :])))


@FUZZ
@given(data=st.data())
def test_damaged_format_2_bytes_are_refused_or_valid(data: st.DataObject) -> None:
    """Any cut or flipped byte of the body, recompressed so that it reaches the parser:
    IntegrityError or a manifest that validates (and so reads back the same)."""
    m = _chain(data.draw(st.integers(0, 3)))
    body = bytearray(manifest_v2.decompress(manifest_v2.encode(m)))
    at = data.draw(st.integers(0, len(body) - 1))
    if data.draw(st.booleans()):
        body = body[:at]
    else:
        body[at] ^= 1 << data.draw(st.integers(0, 7))
    got = _accepted(lambda: manifest_v2.loads(_frame(bytes(body))))
    if got is not None:
        got.validate()  # the decoder's column checks miss nothing the object checks see
        assert manifest_v2.loads(manifest_v2.encode(got)) == got


def _accepted(fn: Callable[[], Manifest]) -> Manifest | None:
    """``fn()``, or None when it refused with IntegrityError saying why; any other
    exception fails the test."""
    try:
        return fn()
    except IntegrityError as e:
        refusal = str(e)
    assert refusal
    return None


def test_chunk_positions_are_bounded_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A position costs one byte in format 2: the total is bounded on its own."""
    cs = 4096
    zeros = Chunk(_h(1), _h(100), 0, 20, cs, "zstd")
    files = [FileEntry(f"f{i}", 2 * cs, 0o644, (_h(1), _h(1))) for i in range(2)]
    data = manifest_v2.encode(_manifest([zeros], files))
    assert len(manifest_v2.loads(data).files) == 2
    monkeypatch.setattr(manifest_read, "MAX_CHUNK_REFS", 3)
    with pytest.raises(IntegrityError, match="more than the manifest may hold"):
        manifest_v2.loads(data)


def test_front_coded_paths_are_bounded_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Front coding repeats a long path for a few bytes: the decoded total is bounded."""
    long = "d/" + "x" * 200
    files = [FileEntry(f"{long}{i}", 0, 0o644, ()) for i in range(10)]
    data = manifest_v2.encode(_manifest([], files))
    assert len(data) < 400  # about 2 KB of paths
    assert len(manifest_v2.loads(data).files) == 10
    monkeypatch.setattr(manifest_codec, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(IntegrityError, match="paths come to more than"):
        manifest_v2.loads(data)


# Layout 1: chain links no file uses are stored by place, without their hash.

LAYOUT0 = Path(__file__).parent / "fixtures" / "v2_layout0_store"
LAYOUT0_VERSIONS = (
    "20261202T102656905576Z-2292adfb6374",
    "20261202T102656954142Z-a352a2879fbe",
    "20261202T102657004466Z-c22a69f0fee2",
)


def test_chain_links_are_stored_without_their_hash() -> None:
    m = _chain(3)
    data = manifest_v2.encode(m)
    body = manifest_v2.decompress(data)
    assert bytes.fromhex(_h(3)) in body  # the chunk the file uses keeps its hash
    assert not any(bytes.fromhex(_h(i)) in body for i in range(3))  # its chain's links not
    got = manifest_v2.loads(data)
    assert sorted(got.chunks) == sorted([_h(3), *(link_key(_h(100), 100 * i) for i in range(3))])
    assert got == manifest_v2.by_place(m)
    assert manifest_v2.encode(got) == data  # the same bytes whichever keys the links had


def layout0_sources(root: Path) -> None:
    """The trees the layout 0 fixture store holds, as versions v0, v1, v2 under ``root``
    (tests/fixtures/make_v2_layout0_store.py published them with a parent at hand)."""
    rng = random.Random(18)
    data = bytearray(rng.randbytes(3 * 4096 + 100))
    for step in range(3):
        for k in range(3 if step else 0):  # a few bytes change in every chunk
            data[k * 4096 + 10 * step] ^= 0xFF
        write_tree(
            root / f"v{step}",
            {"seg/data.bin": bytes(data), "notes.txt": b"format 2 layout 0 fixture\n" * 40},
        )
        (root / f"v{step}" / "empty").mkdir()


def test_layout_0_fixture_store_is_readable(tmp_path: Path) -> None:
    """Format 2 as first written (every link with its hash): read, checked out, verified,
    and published on top of with a warm parent."""
    root = shutil.copytree(LAYOUT0, tmp_path / "store")
    store = RemoteStore(FileBackend(str(root)), chunk_size=4096)
    src = tmp_path / "src"
    layout0_sources(src)
    for i, version in enumerate(LAYOUT0_VERSIONS):
        m = store.load_manifest("db", version)
        assert m.format_version == 2
        assert not any(is_link_key(h) for h in m.chunks)  # layout 0: hashes only
        out = store.checkout("db", version, tmp_path / f"out{i}")
        assert read_tree(out.path) == read_tree(src / f"v{i}")
        assert store.verify("db", version).ok
    last = store.load_manifest("db", LAYOUT0_VERSIONS[-1])
    assert max(manifest_v2.chain_depth(last.chunks, h) for h in last.chunks) == 2
    smaller = manifest_v2.encode(last)
    assert len(smaller) < len(manifest_v2.dumps(last))
    assert manifest_v2.loads(smaller) == manifest_v2.by_place(last)
    # a layout 1 version on top of it, its deltas resting on the layout 0 chains
    new = tmp_path / "new"
    shutil.copytree(src / "v2", new)
    data = bytearray((new / "seg" / "data.bin").read_bytes())
    data[5] ^= 0xFF
    (new / "seg" / "data.bin").write_bytes(data)
    info = store.publish("db", new, parent_dir=tmp_path / "out2")
    m = store.load_manifest("db", info.version)
    assert any(is_link_key(h) for h in m.chunks)
    assert read_tree(store.checkout("db", info.version, tmp_path / "out3").path) == read_tree(new)
    assert store.verify("db", info.version).ok


def _v(*numbers: int) -> bytes:
    out = bytearray()
    for n in numbers:
        manifest_codec.varint(out, n)
    return bytes(out)


def _body(
    entries: list[tuple[int, int, int]],
    hashed: int,
    bases: list[int],
    refs: list[int],
    header: dict[str, object] | None = None,
) -> bytes:
    """A layout 1 manifest by hand: one pack; ``entries`` are (offset code, size - length,
    codec) of full 4 KiB chunks, the first ``hashed`` of them with hashes 1, 2...; ``bases``
    the raw base codes; one file "f" whose raw chunk reference codes are ``refs``."""
    head = {
        "format": 2, "layout": 1, "name": "db", "parent": None, "publisher": "",
        "message": None, "chunk_size": 4096, "metadata": {},
        "created_at": "2026-12-02T00:00:00.000000Z",
    } | (header or {})  # fmt: skip
    raw = canonical_json(head)
    out = bytearray(_v(len(raw)) + raw + _v(1) + bytes.fromhex(_h(100)))
    out += _v(hashed, len(entries) - hashed)
    out += b"".join(bytes.fromhex(_h(i + 1)) for i in range(hashed))
    out += _v(*(0 for _ in entries), *(e[0] for e in entries), 2)  # packs, offsets, width
    out += bytes(e[1] & 0xFF for e in entries) + bytes(e[1] >> 8 for e in entries)
    out += _v(*(0 for _ in entries), *(e[2] for e in entries), *bases)
    out += _v(1, 0, 1) + b"f" + _v(4096 * len(refs), 0o644, *refs) + _v(0)
    return _frame(bytes(out))


# a file of one chunk (entry 0) resting on two links: 0 -> 1 -> 2 (a keyframe)
_GOOD = ([(0, 4000, 2), (0, 4000, 2), (0, 100, 1)], 1, [0, 0], [0])


def test_a_hand_built_layout_1_manifest_reads() -> None:
    m = manifest_v2.loads(_body(*_GOOD))
    top = m.chunks[_h(1)]
    assert top.base == link_key(_h(100), 96)
    assert m.chunks[top.base].base == link_key(_h(100), 192)
    assert manifest_v2.chain_depth(m.chunks, _h(1)) == 2


@pytest.mark.parametrize(
    ("entries", "hashed", "bases", "refs", "match"),
    [
        (*_GOOD[:2], [0, 2], [0], "not another entry"),  # a base past the table
        (*_GOOD[:2], [3, 0], [0], "not another entry"),  # a base before the table
        (*_GOOD[:2], [0, 1], [0], "not another entry"),  # link 1 on itself
        (*_GOOD[:2], [0, 3], [0], "cycle|longer"),  # link 1 on entry 0: a loop
        (*_GOOD[:2], _GOOD[2], [2], "out of range"),  # the file names a link
        ([(0, 4000, 2), (0, 4000, 1), (0, 4000, 1)], 1, [0], [0], "no file uses"),  # a stray
        ([(0, 4000, 2), (0, 4000, 2), (191, 100, 1)], 1, [0, 0], [0], "same place"),
        ([(0, 4000, 2), (0, 4000, 3)], 1, [0], [0], "bad pack, codec"),
    ],
)
def test_hostile_layout_1_tables_are_refused(
    entries: list[tuple[int, int, int]], hashed: int, bases: list[int], refs: list[int], match: str
) -> None:
    with pytest.raises(IntegrityError, match=match):
        manifest_v2.loads(_body(entries, hashed, bases, refs))


def test_lengths_wider_than_a_chunk_are_refused() -> None:
    body = bytearray(manifest_v2.decompress(_body(*_GOOD)))
    at = body.index(bytes([2, 4000 & 0xFF]))  # the width, then the low bytes
    for width in (5, 200):
        body[at] = width
        with pytest.raises(IntegrityError, match="wide"):
            manifest_v2.loads(_frame(bytes(body)))


@pytest.mark.parametrize(
    "header", [{"layout": 5}, {"layout": 0}, {"layout": True}, {"layout": "1"}, {"layout": None}]
)
def test_an_unknown_layout_is_refused(header: dict[str, object]) -> None:
    with pytest.raises(IntegrityError, match="layout"):
        manifest_v2.loads(_body(*_GOOD, header=header))


def test_link_counts_are_bounded_before_allocating() -> None:
    body = bytearray(manifest_v2.decompress(_body(*_GOOD)))
    at = body.index(bytes.fromhex(_h(100))) + 32 + 1  # the link count, after the chunk count
    assert body[at] == 2
    for huge in (_v(MAX_CHUNKS), _v(1 << 62)):
        with pytest.raises(IntegrityError, match=r"links|number"):
            manifest_v2.loads(_frame(bytes(body[:at]) + huge + bytes(body[at + 1 :])))


@FUZZ
@given(data=st.data())
def test_any_chain_entry_is_refused_or_valid(data: st.DataObject) -> None:
    """Any base codes, codecs and counts of a hand-built table with links: IntegrityError
    or a manifest that validates, whose chains are bounded and end in keyframes."""
    n = data.draw(st.integers(1, 6))
    hashed = data.draw(st.integers(1, n))
    codecs = data.draw(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=n, max_size=n))
    entries = [(0, 4000 if c == 2 else 100 * (c == 1), c) for c in codecs]
    bases = data.draw(st.lists(st.integers(0, 20), min_size=codecs.count(2), max_size=n))
    refs = data.draw(st.lists(st.integers(0, 8), min_size=1, max_size=3))
    got = _accepted(lambda: manifest_v2.loads(_body(entries, hashed, bases, refs)))
    if got is not None:
        got.validate()
        for h in got.chunks:
            assert manifest_v2.chain_depth(got.chunks, h) <= MAX_CHAIN
        assert manifest_v2.loads(manifest_v2.encode(got)) == got


def test_a_tiny_manifest_declaring_a_million_entries_is_refused_before_building_them() -> None:
    """Counts are bounded by the bytes stored, not by what they decompress to: constant
    columns of a million links compress to nothing, and sha256 hashes never do."""
    head = canonical_json(
        {"format": 2, "layout": 1, "name": "db", "parent": None, "publisher": "x",
         "created_at": "2026-12-02T07:17:12.573743Z", "message": None,
         "chunk_size": 4096, "metadata": {}}
    )  # fmt: skip
    links = (1 << 20) - 1
    n = links + 1
    out = bytearray()
    manifest_codec.varint(out, len(head))
    out += head
    manifest_codec.varint(out, 1)  # one pack
    out += b"\x11" * 32
    manifest_codec.varint(out, 1)  # one hashed chunk ...
    manifest_codec.varint(out, links)  # ... and a million links
    out += b"\x22" * 32 + b"\0" * (2 * n)
    manifest_codec.varint(out, 0)
    out += b"\0" * (2 * n)
    for value in (1, 0, 1):
        manifest_codec.varint(out, value)
    out += b"a"
    for value in (4096, 0o644, 0, 0):
        manifest_codec.varint(out, value)
    compressed = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(out))
    data = manifest_codec.MAGIC + compressed
    assert len(data) < 1000
    with pytest.raises(IntegrityError, match="more than such a manifest can hold"):
        manifest_v2.loads(data)
