"""Format 2 decoding reads whole columns (varints, hashes, paths) and checks the chunk
table's rules on them instead of on the built objects: the column readers agree with the
one-number reader, the fast path check agrees with the rules as written, and whatever the
decoder accepts, hostile or not, passes ``Manifest.validate`` on the objects."""

from __future__ import annotations

import gc
import os
import string
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import runs

from chroma_snapshots import RemoteStore, open_backend
from chroma_snapshots.engine import manifest_codec, manifest_v2
from chroma_snapshots.engine.manifest_codec import Reader, read_varints
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest
from chroma_snapshots.engine.validation import (
    check_relpath,
    check_relpath_parts,
    check_relpaths,
    check_tree,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError

FUZZ = settings(
    max_examples=runs(ci=200, long=3000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
T0 = datetime(2026, 12, 2, tzinfo=timezone.utc)
CS = 4096


def _h(i: int) -> str:
    return f"{i:064x}"


def _one_by_one(data: bytes, n: int) -> tuple[list[int], int] | None:
    r = Reader(data)
    try:
        return [r.varint("x") for _ in range(n)], r.pos
    except IntegrityError:
        return None


@FUZZ
@given(data=st.binary(max_size=40), n=st.integers(0, 12))
def test_a_column_of_varints_reads_as_one_number_at_a_time(data: bytes, n: int) -> None:
    try:
        got: tuple[list[int], int] | None = read_varints(data, 0, n, "x")
    except IntegrityError:
        got = None
    assert got == _one_by_one(data, n)


@FUZZ
@given(values=st.lists(st.integers(0, (1 << 63) - 1), max_size=20))
def test_varints_read_back(values: list[int]) -> None:
    out = bytearray()
    for v in values:
        manifest_codec.varint(out, v)
    assert read_varints(bytes(out), 0, len(values), "x") == (values, len(out))
    signed = [v // 2 - (1 << 40) for v in values]  # zigzag coded in 63 bits
    zz = bytearray()
    for v in signed:
        manifest_codec.varint(zz, manifest_codec.zigzag(v))
    assert Reader(bytes(zz)).zigzags(len(signed), "x") == signed


PATHLIKE = st.text(alphabet=string.printable + "./\\\x00\x7f\u00e9", max_size=30) | st.lists(
    st.sampled_from(["a", ".", "..", "", "x" * 255, "x" * 256, "b\\c", "\x00", "..."]),
    max_size=70,
).map("/".join)


def _verdict(fn: object, path: str) -> str | None:
    try:
        return fn(path)  # type: ignore[operator,no-any-return]
    except IntegrityError:
        return None


@FUZZ
@given(path=PATHLIKE)
def test_the_fast_path_check_agrees_with_the_rules(path: str) -> None:
    assert _verdict(check_relpath, path) == _verdict(check_relpath_parts, path)


def _tree_reference(files: list[str], dirs: list[str]) -> bool:
    """The tree rules as first written: no case-folded duplicate, no path inside a file."""
    keys = [p.casefold() for p in files + dirs]
    file_keys = {p.casefold() for p in files}
    if len(set(keys)) != len(keys):
        return False
    return not any(
        "/".join(k.split("/")[:i]) in file_keys for k in keys for i in range(1, k.count("/") + 1)
    )


@FUZZ
@given(
    files=st.lists(st.sampled_from(["a", "A", "a/b", "a/b/c", "b", "b/a", "c/d/e", "C/d"])),
    dirs=st.lists(st.sampled_from(["a", "c", "c/d", "b/a/x", "e"]), max_size=3),
)
def test_tree_rules(files: list[str], dirs: list[str]) -> None:
    why = ""
    try:
        check_tree(files, dirs)
    except IntegrityError as e:
        why = str(e)
    assert (not why) == _tree_reference(files, dirs)
    assert not why or "duplicate path" in why or "inside a file" in why


def _rich() -> Manifest:
    """Files of 0, 1 and 3 chunks (one shared), a directory, a delta chain of two links."""
    pack = _h(100)
    chunks = [
        Chunk(_h(1), pack, 0, 100, CS, "zstd"),
        Chunk(_h(2), pack, 100, CS, CS, "none"),
        Chunk(_h(3), pack, 100 + CS, 10, 10, "none"),
        Chunk(_h(4), pack, 200 + CS, 30, CS, "zdelta", _h(5)),
        Chunk(_h(5), pack, 300 + CS, 30, CS, "zdelta", _h(6)),
        Chunk(_h(6), _h(101), 0, 90, CS, "zstd"),
    ]
    files = [
        FileEntry("a/big", 2 * CS + 10, 0o644, (_h(1), _h(2), _h(3))),
        FileEntry("a/empty", 0, 0o600, ()),
        FileEntry("b", CS, 0o755, (_h(4),)),
        FileEntry("c", CS, 0o644, (_h(1),)),
    ]
    return Manifest("db", T0, CS, tuple(files), {c.hash: c for c in chunks}, dirs=("d/e",))


def test_a_rich_manifest_reads_back_by_place() -> None:
    m = _rich()
    got = manifest_v2.loads(manifest_v2.encode(m))
    assert got == manifest_v2.by_place(m)
    got.validate()


@FUZZ
@given(data=st.data())
def test_damaged_columns_are_refused_or_pass_validate(data: st.DataObject) -> None:
    """Any cut or flipped byte of a manifest with every kind of column: IntegrityError, or
    a manifest the object-level checks (``Manifest.validate``) accept too."""
    body = bytearray(manifest_v2.decompress(manifest_v2.encode(_rich())))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body) - 1))
        if data.draw(st.booleans()):
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            body[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(0, len(body) - 1)) :]
    raw = manifest_codec.MAGIC + _compress(bytes(body))
    try:
        got = manifest_v2.loads(raw)
    except IntegrityError:
        return  # the refusals' messages are the hostile-input tests' concern
    got.validate()
    assert manifest_v2.loads(manifest_v2.encode(got)) == got


def _compress(body: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(body)


def test_a_body_cut_anywhere_is_refused() -> None:
    body = manifest_v2.decompress(manifest_v2.encode(_rich()))
    for end in range(len(body)):
        with pytest.raises(IntegrityError):
            manifest_v2.loads(manifest_codec.MAGIC + _compress(body[:end]))


def test_a_chunk_of_the_wrong_size_inside_a_file_is_refused() -> None:
    m = _rich()
    chunks = dict(m.chunks)
    chunks[_h(2)] = Chunk(_h(2), _h(100), 100, CS - 1, CS - 1, "none")  # not a whole chunk
    bad = Manifest("db", T0, CS, m.files, chunks, dirs=m.dirs)
    with pytest.raises(IntegrityError, match="chunk 1 missing from the table or of wrong size"):
        manifest_v2.loads(manifest_v2.encode(bad))
    with pytest.raises(IntegrityError, match="chunk 1 missing from the table or of wrong size"):
        bad.validate()


@pytest.mark.parametrize("good", [True, False])
def test_decoding_leaves_the_collector_as_it_found_it(good: bool) -> None:
    data = manifest_v2.encode(_rich())
    data = data if good else data[:-3]
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            manifest_v2.loads(data)
        except IntegrityError:
            assert not good
        assert gc.isenabled() == enabled
    gc.enable()


@pytest.mark.parametrize("short", [0, 1, 200, 70_000, 20_000_000])
def test_length_columns_of_every_width_read_back(short: int) -> None:
    """Stored lengths are kept as size - length in 0 to 4 byte planes."""
    cs = 1 << 26
    chunks = [
        Chunk(_h(1), _h(100), 0, cs - short, cs, "zstd" if short else "none"),
        Chunk(_h(2), _h(100), cs, 5, 7, "zstd"),
    ]
    files = [FileEntry("f", cs + 7, 0o644, (_h(1), _h(2)))]
    m = Manifest("db", T0, cs, tuple(files), {c.hash: c for c in chunks})
    assert manifest_v2.loads(manifest_v2.encode(m)) == m


@FUZZ
@given(
    paths=st.lists(
        st.lists(st.sampled_from(["a", "ab", "é", "x" * 130, "é" * 70, "z"]), min_size=1).map(
            "/".join
        ),
        max_size=8,
    )
)
def test_front_coded_paths_read_back(paths: list[str]) -> None:
    """The shared prefix is counted in bytes, also inside a multi-byte character."""
    out = bytearray()
    manifest_codec.front_coded(out, paths)
    prev, r = b"", Reader(bytes(out))
    for p in paths:
        b = p.encode()
        common = r.varint("x")
        assert common == next(
            (i for i, (x, y) in enumerate(zip(prev, b, strict=False)) if x != y),
            min(len(prev), len(b)),
        )
        rest = r.varint("x")
        assert prev[:common] + bytes(r.take(rest, "x")) == b
        prev = b
    assert not r.left()


@FUZZ
@given(paths=st.lists(PATHLIKE, max_size=6))
def test_paths_checked_together_as_one_by_one(paths: list[str]) -> None:
    refused = [p for p in paths if _verdict(check_relpath_parts, p) is None]
    why = ""
    try:
        check_relpaths(paths)
    except IntegrityError as e:
        why = str(e)
    assert bool(why) == bool(refused)


@pytest.mark.parametrize("stray", [Chunk(_h(9), _h(100), 0, 5, 5, "none"), None])
def test_validate_refuses_a_chunk_no_file_uses(stray: Chunk | None) -> None:
    """With and without delta chains in the table (the check differs: no chain to walk)."""
    m = _rich()
    chunks = {h: c for h, c in m.chunks.items() if c.base is None or stray is None}
    if stray is None:  # drop the file of the delta chain: its three entries are strays
        m = Manifest("db", T0, CS, m.files[:2] + m.files[3:], m.chunks, dirs=m.dirs)
    else:
        files = tuple(f for f in m.files if f.path != "b")
        m = Manifest("db", T0, CS, files, chunks | {stray.hash: stray}, dirs=m.dirs)
    with pytest.raises(IntegrityError, match="no file uses"):
        m.validate()


def test_a_file_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """os.fsdecode keeps such a name as lone surrogates: refused as unsafe, not a crash."""
    with pytest.raises(IntegrityError, match="not UTF-8"):
        check_relpath("a/b\udcff")
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"x")
    fd = os.open(os.fsencode(src) + b"/bad\xff", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    store = RemoteStore(open_backend(f"memory://cols-{uuid.uuid4().hex}"))
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        store.publish("db", src)
