"""The publish stamp index: an unchanged file is not read again, and whatever the index
holds, a publish records exactly the bytes of the folder (the manifest equals a full
re-hash's)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cli_inprocess import Run

from chroma_snapshots import RemoteStore, open_backend
from chroma_snapshots.config import ENV_TRUST_STAMPS, StoreConfig
from chroma_snapshots.engine import bundles, chunking, source, stampindex
from chroma_snapshots.engine.keys import manifest_key
from chroma_snapshots.engine.source import SourceFile, SourceFolders
from chroma_snapshots.errors import ConfigError
from chroma_snapshots.stores import remote
from chroma_snapshots.testing.conformance import read_tree, write_tree

CS = 4096


@pytest.fixture
def stamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private index directory for the test, and no racy window (every file a test
    writes is younger than 2 s; the racy test restores it)."""
    d = tmp_path / "stamps"
    monkeypatch.setattr(stampindex, "default_dir", lambda: d)
    monkeypatch.setattr(stampindex, "RACY_NS", -(10**10))
    return d


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files a publish reads."""
    seen: list[str] = []
    real = chunking.read_chunks

    def counting(path: str | Path, chunk_size: int, *scanned: SourceFile) -> Iterator[bytes]:
        seen.append(os.path.basename(path))
        return real(path, chunk_size, *scanned)

    def counting_small(f: SourceFile, folders: SourceFolders) -> bytes:
        seen.append(os.path.basename(f.path))
        return real_small(f, folders)

    real_small = bundles.read_exact  # small files are read whole into their bundle
    monkeypatch.setattr(chunking, "read_chunks", counting)
    monkeypatch.setattr(bundles, "read_exact", counting_small)
    return seen


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same manifest bytes for the same tree: a fixed creation time and publisher."""
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    monkeypatch.setattr(remote, "utc_now", lambda: when)
    monkeypatch.setattr(remote, "publisher_id", lambda: "host:1:00000000")


def _store() -> RemoteStore:
    return RemoteStore(open_backend(f"memory://stamps-{uuid.uuid4().hex}"), chunk_size=CS)


def _tree(root: Path) -> Path:
    files = {f"f{i}.bin": os.urandom(CS * (i % 3) + 100 * i) for i in range(6)}
    return write_tree(root, {**files, "sub/empty": b""})


def _manifest(store: RemoteStore, version: str) -> bytes:
    return store.backend.get(manifest_key("db", version)).data


def _later(path: Path, data: bytes) -> None:
    """Rewrite ``path``, making sure the filesystem's ctime has moved on."""
    before = path.stat().st_ctime_ns
    while True:
        path.write_bytes(data)
        if path.stat().st_ctime_ns != before:
            return
        time.sleep(0.01)  # a coarse timestamp clock: the next tick is a few ms away


@pytest.mark.usefixtures("stamps", "fixed_clock")
def test_only_changed_files_are_read_and_the_manifest_equals_a_full_rehash(
    tmp_path: Path, reads: list[str]
) -> None:
    src = _tree(tmp_path / "src")
    fast, full = _store(), _store()
    assert fast.publish("db", src).version == full.publish("db", src, stamps=False).version
    _later(src / "f2.bin", os.urandom(300))
    (src / "new.bin").write_bytes(b"new")
    reads.clear()
    v_fast = fast.publish("db", src).version
    assert sorted(reads) == ["f2.bin", "new.bin"]
    v_full = full.publish("db", src, stamps=False).version
    assert _manifest(fast, v_fast) == _manifest(full, v_full)
    assert read_tree(fast.checkout("db", dest=tmp_path / "out").path) == read_tree(src)


@pytest.mark.usefixtures("stamps")
def test_a_change_with_its_mtime_restored_is_caught_by_ctime(
    tmp_path: Path, reads: list[str]
) -> None:
    src = _tree(tmp_path / "src")
    store = _store()
    store.publish("db", src)
    target = src / "f4.bin"
    st = target.stat()
    _later(target, os.urandom(st.st_size))  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as it was
    assert target.stat().st_mtime_ns == st.st_mtime_ns
    reads.clear()
    store.publish("db", src)
    assert reads == ["f4.bin"]
    assert read_tree(store.checkout("db", dest=tmp_path / "out").path) == read_tree(src)


def test_a_racy_file_is_always_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[str]
) -> None:
    monkeypatch.setattr(stampindex, "default_dir", lambda: tmp_path / "stamps")
    # above the bundling limit (CS / 16): a racy file in a bundle re-reads the whole bundle
    src = write_tree(tmp_path / "src", {"old.bin": b"o" * 300, "fresh.bin": b"f" * 300})
    past = time.time_ns() - 3 * stampindex.RACY_NS
    os.utime(src / "old.bin", ns=(past, past))
    # ctime cannot be set back, so make the scan see the old file's ctime as long past
    real_stamp = stampindex.stamp_of

    def scan_later(st: os.stat_result, scanned_ns: int) -> stampindex.Stamp | None:
        if st.st_mtime_ns == past:
            scanned_ns += 3 * stampindex.RACY_NS
        return real_stamp(st, scanned_ns)

    monkeypatch.setattr(source, "stamp_of", scan_later)
    store = _store()
    store.publish("db", src)
    reads.clear()
    store.publish("db", src)
    assert reads == ["fresh.bin"]  # written just now: its stamp could not tell a change


@pytest.mark.usefixtures("fixed_clock")
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "foreign", "open_dir"])
def test_a_damaged_or_foreign_index_is_never_trusted(
    tmp_path: Path, stamps: Path, reads: list[str], damage: str
) -> None:
    src = _tree(tmp_path / "src")
    store, full = _store(), _store()
    store.publish("db", src)
    full.publish("db", src, stamps=False)
    [index] = stamps.glob("*.idx")
    data = index.read_bytes()
    if damage == "flip":
        index.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        index.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        index.write_bytes(os.urandom(len(data)))
    elif damage == "foreign":  # a valid index of another folder, under this one's name
        other = _tree(tmp_path / "other")
        store.publish("other", other)
        [foreign] = [p for p in stamps.glob("*.idx") if p != index]
        os.replace(foreign, index)
    else:
        stamps.chmod(0o777)  # others could have planted it
    _later(src / "f1.bin", os.urandom(5000))
    reads.clear()
    v = store.publish("db", src).version
    assert len(reads) == 7  # every file of the folder read again
    assert _manifest(store, v) == _manifest(full, full.publish("db", src, stamps=False).version)


@pytest.mark.usefixtures("stamps")
def test_a_moved_folder_is_read_again(tmp_path: Path, reads: list[str]) -> None:
    src = _tree(tmp_path / "src")
    store = _store()
    v1 = store.publish("db", src).version
    moved = src.rename(tmp_path / "moved")
    reads.clear()
    assert store.publish("db", moved).version == v1  # unchanged, no new version
    assert len(reads) == 7


@pytest.mark.usefixtures("stamps")
def test_another_store_gets_every_file_read_and_uploaded(tmp_path: Path, reads: list[str]) -> None:
    src = _tree(tmp_path / "src")
    _store().publish("db", src)
    other = _store()
    reads.clear()
    info = other.publish("db", src)
    assert len(reads) == 7
    assert info.stats.bytes_uploaded > sum(p.stat().st_size for p in src.rglob("*.bin"))
    assert read_tree(other.checkout("db", dest=tmp_path / "out").path) == read_tree(src)


def test_indexes_are_bounded_and_private(
    tmp_path: Path, stamps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stampindex, "MAX_INDEXES", 3)
    store = _store()
    for i in range(5):
        store.publish(f"db{i}", _tree(tmp_path / f"src{i}"))
    assert len(list(stamps.glob("*.idx"))) == 3
    assert stamps.stat().st_mode & 0o777 == 0o700
    assert not list(stamps.glob("*.tmp"))  # every write renamed its temp file


@pytest.mark.usefixtures("stamps", "clean_env")
def test_the_cli_trusts_stamps_unless_told_not_to(
    tmp_path: Path, reads: list[str], run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``publish --no-stamps`` and CHROMA_SNAPSHOTS_TRUST_STAMPS=0 each reach the publish:
    every file is read again; by default an unchanged folder reads none."""
    src = _tree(tmp_path / "src")
    store = str(tmp_path / "store")
    everything = sorted(p.name for p in src.rglob("*") if p.is_file())
    assert run("--store", store, "publish", "db", str(src))[0] == 0
    cases: list[tuple[tuple[str, ...], str | None, list[str]]] = [
        ((), None, []),
        (("--no-stamps",), None, everything),
        ((), "0", everything),
        ((), "true", []),
    ]
    for flags, env, want in cases:
        if env is None:
            monkeypatch.delenv(ENV_TRUST_STAMPS, raising=False)
        else:
            monkeypatch.setenv(ENV_TRUST_STAMPS, env)
        reads.clear()
        code, _, err = run("--store", store, "publish", "db", str(src), *flags)
        assert code == 0, err
        assert sorted(reads) == want, (flags, env)


@pytest.mark.usefixtures("clean_env")
def test_a_bad_trust_stamps_value_is_a_config_error(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_TRUST_STAMPS, "maybe")
    with pytest.raises(ConfigError, match=ENV_TRUST_STAMPS):
        StoreConfig.from_env(url=str(tmp_path))
    code, _, err = run("--store", str(tmp_path / "s"), "publish", "db", str(tmp_path))
    assert code != 0
    assert ENV_TRUST_STAMPS in err
    monkeypatch.delenv(ENV_TRUST_STAMPS)
    assert StoreConfig.from_env(url=str(tmp_path)).trust_stamps is True


@pytest.mark.usefixtures("stamps")
def test_a_bundle_is_trusted_only_with_each_member_at_its_recorded_start(
    tmp_path: Path,
) -> None:
    """Two folders hold the same small files, so both copies are one bundle chunk. After a
    few deletions the cut groups members of both copies, whose sizes still add up to that
    chunk: trusted on sizes alone, the publish recorded files against the wrong bytes."""
    cs = 16384

    def ends(path: str, size: int) -> bool:
        return bundles._ends_bundle(path, size, cs // 64)

    n1, n2 = [
        f"{i:03d}"
        for i in range(1, 500)
        if not ends(f"a/{i:03d}", 100) and not ends(f"b/{i:03d}", 100)
    ][:2]
    one, two, three = b"1" * 100, b"2" * 100, b"3" * 256
    files = {"a/000": os.urandom(256)}
    for d in "ab":
        files |= {f"{d}/{n1}": one, f"{d}/{n2}": two, f"{d}/zzz": three}
    src = write_tree(tmp_path / "src", files)
    store = RemoteStore(open_backend(f"memory://stamps-{uuid.uuid4().hex}"), chunk_size=cs)
    store.publish("db", src)
    for gone in (f"a/{n1}", "a/zzz", f"b/{n2}"):
        (src / gone).unlink()
    v2 = store.publish("db", src).version
    assert read_tree(store.checkout("db", v2, tmp_path / "out").path) == read_tree(src)


def test_a_first_publish_asks_the_index_nothing(
    tmp_path: Path, stamps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it trusts only chunks of a parent: with none, 100,000 lookups were wasted time
    src = write_tree(tmp_path / "src", {"big": os.urandom(3 * CS), "d/small": b"s"})
    asked: list[str] = []
    real = stampindex.StampIndex.lookup

    def lookup(self: stampindex.StampIndex, relpath: str, stamp: stampindex.Stamp | None) -> object:
        asked.append(relpath)
        return real(self, relpath, stamp)

    monkeypatch.setattr(stampindex.StampIndex, "lookup", lookup)
    store = RemoteStore(open_backend(f"memory://first-{uuid.uuid4().hex}"), chunk_size=CS)
    store.publish("db", src)
    assert asked == []
    (src / "d" / "small").write_bytes(b"t")
    store.publish("db", src)
    assert sorted(asked) == ["big", "d/small"]  # the next publish does ask


def test_each_field_of_a_stamp_is_compared_after_a_save_and_load(stamps: Path) -> None:
    """Every field of every file's stamp, its hashes (one, several, none) and its start
    survive a save and a load, and a change to any one field of any file fails its lookup."""
    files = {
        "a": ((1, 2, 3, 2**64 - 1, 5, 0o100644), ("a" * 64,), 0),
        "b/c": ((70_000, -(2**63), 2**63 - 1, 7, 2**63, 0o100600), ("b" * 64, "c" * 64), 0),
        "d": ((0, 10, 11, 12, 13, 0o100644), (), 0),
        "e": ((9, 20, 21, 22, 23, 0o100644), ("a" * 64,), 1),
    }
    index = stampindex.StampIndex(stamps.parent, "store", "db", CS)
    for path, (stamp, hashes, at) in files.items():
        index.record(path, stamp, hashes, at)
    index.record("racy", None, ("f" * 64,))  # no stamp: never recorded
    index.save()
    loaded = stampindex.StampIndex(stamps.parent, "store", "db", CS)
    assert loaded.indexed == len(files)
    assert loaded.lookup("racy", (1, 2, 3, 4, 5, 6)) is None
    for path, (stamp, hashes, at) in files.items():
        assert loaded.lookup(path, stamp) == hashes
        assert loaded.start(path) == at
        for k in range(6):
            other = (*stamp[:k], stamp[k] ^ 1, *stamp[k + 1 :])
            assert loaded.lookup(path, other) is None  # type: ignore[arg-type]


def test_a_stamp_the_index_cannot_hold_leaves_no_index_and_no_error(stamps: Path) -> None:
    """A time before 1677 (tmpfs and XFS keep one; ext4 clamps it to 1901) has no int64 of
    nanoseconds: the save writes nothing, and the publish it ends does not fail."""
    index = stampindex.StampIndex(stamps.parent, "store", "db", CS)
    index.record("a", (1, -(10**19), 3, 4, 5, 0o100644), ("a" * 64,))
    index.save()
    assert not list(stamps.glob("*.idx"))
