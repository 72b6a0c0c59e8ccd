"""The pieces of the prune protocol one at a time (docs/RELIABILITY.md, "Prune protocol");
tests/test_interleavings.py runs them against each other at every step boundary."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import boto3
import pytest

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.base import PutMode
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.cli.main import main
from chroma_snapshots.engine import keys
from chroma_snapshots.engine.keys import manifest_key, retired_key
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.errors import ConflictError, IntegrityError, InvalidInputError
from chroma_snapshots.stores.claims import Claim
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree

NAME = "db"
HOUR = 3600.0


def _store(root: Path) -> RemoteStore:
    return RemoteStore(FileBackend(root, fsync=False), chunk_size=4096, pack_target=8192)


def _age(path: Path, seconds: float) -> None:
    st = path.stat()
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def _age_all(root: Path, seconds: float) -> None:
    for p in root.rglob("*"):
        _age(p, seconds)


def _two_versions(tmp_path: Path) -> tuple[RemoteStore, str, str]:
    store = _store(tmp_path / "store")
    v1 = store.publish(NAME, write_tree(tmp_path / "a", {"f": b"a" * 10_000})).version
    v2 = store.publish(NAME, write_tree(tmp_path / "b", {"f": b"b" * 10_000})).version
    return store, v1, v2


def test_a_reader_grace_counts_from_retirement_not_publication(tmp_path: Path) -> None:
    store, v1, v2 = _two_versions(tmp_path)
    root = tmp_path / "store"
    for p in root.rglob("*"):
        if retired_key(NAME, v1) not in p.as_posix():
            _age(p, 2 * HOUR)  # v1 published long ago, retired just now
    assert v1 in store.prune(NAME, keep_last=1, min_age=HOUR).kept_versions
    _age(root / retired_key(NAME, v1), 2 * HOUR)
    report = store.prune(NAME, keep_last=1, min_age=HOUR)
    assert report.deleted_versions == (v1,)
    assert not (root / manifest_key(NAME, v1)).exists()
    assert not (root / retired_key(NAME, v1)).exists()  # the note goes with its version
    assert store.verify(NAME, v2).ok


def test_a_live_prune_record_stops_a_rollback_and_an_expired_one_does_not(
    tmp_path: Path,
) -> None:
    store, v1, v2 = _two_versions(tmp_path)
    key = f"{keys.prefix(NAME, keys.GC)}crashed.json"
    store.backend.put(key, Claim(frozenset([v1]), frozenset(), 600).to_json())
    with pytest.raises(ConflictError, match=r"a prune .* deletes or deleted"):
        store.set_ref(NAME, "latest", v1, expected=v2)
    assert store.resolve(NAME).version == v2  # nothing was made visible
    _age(tmp_path / "store" / key, 601 + 900 + 60)  # its owner's deadline and the margin
    store.set_ref(NAME, "latest", v1, expected=v2)
    assert store.resolve(NAME).version == v1
    store.prune(NAME, keep_last=1, min_age=0)
    assert not (tmp_path / "store" / key).exists()  # a later prune removes the leftover


def test_a_live_pin_protects_what_it_names_and_packs_written_after_it(tmp_path: Path) -> None:
    store, v1, _ = _two_versions(tmp_path)
    root = tmp_path / "store"
    _age_all(root, 2 * HOUR)
    (root / retired_key(NAME, v1)).unlink()  # a store from before the protocol
    pin = f"{keys.prefix(NAME, keys.PINS)}mover.json"
    store.backend.put(pin, Claim(frozenset([v1]), frozenset(), 600).to_json())
    fresh = "ab" * 32
    store.backend.put(f"{NAME}/packs/ab/{fresh}", b"a publish in flight")
    report = store.prune(NAME, keep_last=1, min_age=0)
    assert v1 in report.kept_versions
    assert fresh not in report.deleted_packs  # written after the pin
    assert store.verify(NAME, v1).ok
    store.backend.delete(pin)  # the mover finished (or its pin expired)
    report = store.prune(NAME, keep_last=1, min_age=0)
    assert report.deleted_versions == (v1,)
    assert fresh in report.deleted_packs


def test_a_revert_rewrites_the_old_pack_it_reuses(tmp_path: Path) -> None:
    store, v1, _ = _two_versions(tmp_path)
    root = tmp_path / "store"
    packs = store.load_manifest(NAME, v1).packs
    store.prune(NAME, keep_last=2, min_age=0)
    _age_all(root, 2 * HOUR)
    before = {p: (root / f"{NAME}/packs/{p[:2]}/{p}").stat().st_mtime for p in packs}
    again = store.publish(NAME, write_tree(tmp_path / "a2", {"f": b"a" * 10_000}))
    assert store.load_manifest(NAME, again.version).packs == packs  # byte-identical packs
    for p, mtime in before.items():
        assert (root / f"{NAME}/packs/{p[:2]}/{p}").stat().st_mtime > mtime + HOUR
    assert not list((root / NAME / "pins").glob("*"))  # the publish dropped its pins


def test_an_unreadable_record_is_an_integrity_error_naming_it(tmp_path: Path) -> None:
    store, v1, v2 = _two_versions(tmp_path)
    key = f"{keys.prefix(NAME, keys.GC)}garbage.json"
    store.backend.put(key, b"[" * 100_000, mode=PutMode.CREATE)
    with pytest.raises(IntegrityError, match=r"garbage\.json"):
        store.set_ref(NAME, "stable", v1, expected=None)
    with pytest.raises(IntegrityError, match=r"garbage\.json"):
        store.publish(NAME, write_tree(tmp_path / "c", {"f": b"c"}))
    assert store.resolve(NAME).version == v2
    # once older than any claim could live, it is damage, not a claim: it stops nothing
    # (it stopped every ref move, and one in pins/ every prune, for good) and prune removes it
    pin_garbage = f"{keys.prefix(NAME, keys.PINS)}README"
    store.backend.put(pin_garbage, b"hello", mode=PutMode.CREATE)
    _age_all(tmp_path / "store" / NAME / "gc", 2 * HOUR)
    _age_all(tmp_path / "store" / NAME / "pins", 2 * HOUR)
    store.set_ref(NAME, "stable", v1, expected=None)
    store.publish(NAME, write_tree(tmp_path / "d", {"f": b"d"}))
    store.prune(NAME, keep_last=5, min_age=0)
    assert not store.backend.exists(key)
    assert not store.backend.exists(pin_garbage)


def test_names_are_only_snapshot_names(tmp_path: Path) -> None:
    store, _, _ = _two_versions(tmp_path)
    store.backend.put("_probes/x", b"")  # a conditional-write probe's folder
    assert list(store.names()) == [NAME]


@pytest.mark.parametrize("size", [1024, 5000, 1 << 27, "4096"])
def test_a_chunk_size_readers_refuse_is_refused_before_publishing(
    tmp_path: Path, size: object
) -> None:
    with pytest.raises(InvalidInputError, match="chunk_size"):
        RemoteStore(FileBackend(tmp_path / "s"), chunk_size=size)  # type: ignore[arg-type]
    store = _store(tmp_path / "store")
    store.chunk_size = size  # type: ignore[assignment]
    with pytest.raises(InvalidInputError, match="chunk_size"):
        store.publish(NAME, write_tree(tmp_path / "a", {"f": b"a"}))
    assert list(store.names()) == []  # nothing was written


def test_a_mover_judges_a_record_by_the_stores_clock_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, v1, _ = _two_versions(tmp_path)
    store.backend.put(
        f"{keys.prefix(NAME, keys.GC)}live.json", Claim(frozenset([v1]), frozenset(), 600).to_json()
    )
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)  # this client's clock runs 2 h ahead
    with pytest.raises(ConflictError, match=r"a prune .* deletes or deleted"):
        store.set_ref(NAME, "stable", v1, expected=None)
    assert "stable" not in store.refs(NAME)


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_prune_refuses_a_min_age_that_is_not_a_non_negative_number(
    tmp_path: Path, bad: float
) -> None:
    store, v1, _ = _two_versions(tmp_path)
    with pytest.raises(InvalidInputError, match="min_age"):
        store.prune(NAME, keep_last=1, min_age=bad)
    assert store.verify(NAME, v1).ok  # nothing was deleted


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), "5", True, 1e10, 1e308])
def test_a_deadline_that_is_not_a_number_of_at_most_1e9_seconds_is_invalid_input(
    tmp_path: Path, bad: object
) -> None:
    store, _, _ = _two_versions(tmp_path)
    with pytest.raises(InvalidInputError, match="deadline"):
        store.resolve(NAME, deadline=bad)  # type: ignore[arg-type]


def test_a_signed_cache_never_serves_what_an_unsigned_one_cached(tmp_path: Path) -> None:
    root = tmp_path / "store"
    unsigned = _store(root)
    unsigned.publish(NAME, write_tree(tmp_path / "a", {"f": b"unsigned" * 1000}))
    CachedStore(unsigned, tmp_path / "cache").checkout(NAME).release()
    signer = Signer.from_spec("k1:0123456789abcdef0123")
    signed = RemoteStore(FileBackend(root, fsync=False), label=unsigned.label, signer=signer)
    cache = CachedStore(signed, tmp_path / "cache", stale_ok=True)
    assert cache.root != CachedStore(unsigned, tmp_path / "cache").root
    with pytest.raises(IntegrityError):  # the unsigned ref is refused, nothing served from cache
        cache.checkout(NAME)


def _recording_writes(
    store: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, tuple[object, ...], dict[str, object]]]:
    """Record every write the store's backend serves (to replay it later: a late copy)."""
    calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []
    for method in ("put", "delete", "delete_many"):
        real = getattr(store.backend, method)

        def record(*args: object, _m: str = method, _real: object = real, **kw: object) -> object:
            calls.append((_m, args, kw))
            return _real(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(store.backend, method, record)
    return calls


@pytest.mark.parametrize("revert", [True, False])
def test_every_write_of_a_prune_landing_again_later_leaves_every_ref_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, revert: bool
) -> None:
    # A client retry can answer before the first attempt lands: any write a prune sent may
    # land once more after prune returned, and after a publish that came next (a revert
    # writes the very packs prune deleted).
    store, v1, _ = _two_versions(tmp_path)
    calls = _recording_writes(store, monkeypatch)
    report = store.prune(NAME, keep_last=1, min_age=0)
    assert report.deleted_versions == (v1,)
    assert report.deleted_packs
    monkeypatch.undo()
    src = write_tree(tmp_path / "again", {"f": (b"a" if revert else b"c") * 10_000})
    if revert:  # the record still condemns the packs this would write again: refused
        with pytest.raises(ConflictError, match="deletes or deleted"):
            store.publish(NAME, src)
    else:
        store.publish(NAME, src)
    for method, args, kw in calls:  # every write again, in order, each landing late
        with contextlib.suppress(ConflictError):  # a conditional write that did nothing
            getattr(store.backend, method)(*args, **kw)
    for ref, version in store.refs(NAME).items():
        assert store.verify(NAME, version).ok, ref
    record = next(k for k in store.backend.list(keys.prefix(NAME, keys.GC)))
    assert Claim.from_json(store.backend.get(record.key).data, record.key).packs == set(
        report.deleted_packs
    )


def test_a_prune_interrupted_before_it_deletes_removes_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C during the second look: nothing was deleted, so nothing need wait for the
    # record to expire (a rollback to a version it condemned works at once).
    store, v1, v2 = _two_versions(tmp_path)
    looks = []
    real = store.refs

    def interrupted(*args: object, **kw: object) -> dict[str, str]:
        looks.append(1)
        if len(looks) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "refs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.prune(NAME, keep_last=1, min_age=0)
    monkeypatch.undo()
    assert not list(store.backend.list(keys.prefix(NAME, keys.GC)))
    store.set_ref(NAME, "latest", v1, expected=v2)
    assert store.verify(NAME, v1).ok


def test_prune_removes_what_writers_killed_mid_write_left_on_a_file_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A writer killed between writing its temp file and renaming it leaves ``.NAME.HEX.tmp``;
    # one an hour old belongs to no live writer.
    store, _, _ = _two_versions(tmp_path)
    root = tmp_path / "store" / NAME
    hexes = "0123abcd" * 4  # put names its temp files with a uuid's 32 hex digits
    old_pack = root / "packs" / "ab" / f".ab12.{hexes}.tmp"
    old_ref = root / "refs" / f".latest.{hexes}.tmp"
    fresh = root / "packs" / "cd" / f".cd34.{hexes}.tmp"
    others = [root / ".user.0123abcd.tmp", root / f".x.{'z' * 32}.tmp"]  # not put's
    for path in (old_pack, old_ref, fresh, *others):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    for path in (old_pack, old_ref, *others):
        _age(path, 2 * HOUR)
    dry = store.prune(NAME, keep_last=1, min_age=0, dry_run=True)
    assert dry.swept_temp_files == 2  # what a prune would remove, and nothing removed
    args = ["--store", str(tmp_path / "store"), "prune", NAME, "--keep-last", "1"]
    assert main([*args, "--min-age", "0"]) == 0
    assert "would remove 2 temp files" in capsys.readouterr().out
    assert old_pack.exists()
    assert old_ref.exists()
    assert store.prune(NAME, keep_last=1, min_age=0).swept_temp_files == 2
    assert not old_pack.exists()
    assert not old_ref.exists()
    assert fresh.exists()  # a live writer's, maybe
    assert all(p.exists() for p in others)


def test_the_temp_file_sweep_ages_files_by_the_storages_clock_not_the_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pruning client whose clock runs two hours ahead must not take a live writer's
    # fresh temp file for one an hour old: the age is measured against the prune's own
    # record, which the storage stamps.
    store, _, _ = _two_versions(tmp_path)
    fresh = tmp_path / "store" / NAME / "packs" / "cd" / f".cd34.{'0123abcd' * 4}.tmp"
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_bytes(b"x" * 100)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 2 * HOUR)
    assert store.prune(NAME, keep_last=1, min_age=0).swept_temp_files == 0
    assert fresh.exists()


def test_strays_below_packs_are_neither_pruned_nor_recorded(tmp_path: Path) -> None:
    # An editor's or a copy tool's file below packs/ is not a pack: a prune that recorded
    # one would write a record every reader refuses, stopping every ref move until it expired.
    store, _, _ = _two_versions(tmp_path)
    packs = tmp_path / "store" / NAME / "packs"
    real = next(p for p in packs.rglob("*") if p.is_file())
    strays = [packs / "zz" / "README", packs / "notes.txt", real.parent / f".{real.name}.Xy12Ab"]
    strays.append(packs / "ab" / ("ab" + "0" * 62) / "x")  # a checkout's dest, a folder deep
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"hi")
    _age_all(tmp_path / "store", 2 * HOUR)
    report = store.prune(NAME, keep_last=1, min_age=0)
    assert report.deleted_packs  # v1's pack went; the strays did not
    assert all(p.exists() for p in strays)
    info = store.publish(NAME, write_tree(tmp_path / "c", {"f": b"c" * 10_000}))  # not stopped
    store.set_ref(NAME, "t1", info.version, expected=None)
    assert store.prune(NAME, keep_last=1, min_age=0).deleted_packs


def test_s3_folder_objects_below_a_name_stop_no_command(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    # The S3 console's "Create folder" puts a zero-byte object named like a folder.
    settings = S3Settings(endpoint_url=moto_server.endpoint_url)
    backend = S3Backend(s3_bucket, "snaps", settings=settings)
    store = RemoteStore(backend, chunk_size=4096, pack_target=8192)
    for data in (b"a", b"b"):
        store.publish(NAME, write_tree(tmp_path / data.decode(), {"f": data * 10_000}))
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    # ... in every folder of a name: each stopped every command reading it, for good
    kinds = ("packs", "packs/zz", "gc", "refs", "pins", "manifests", "retired")
    folders = [f"snaps/{NAME}/{kind}/" for kind in kinds] + [f"snaps/{NAME}//x"]
    for key in folders:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    report = store.prune(NAME, keep_last=1, min_age=0)
    assert report.deleted_packs
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"snaps/{NAME}/")["Contents"]
    assert set(folders) <= {o["Key"] for o in listed}
    info = store.publish(NAME, write_tree(tmp_path / "c", {"f": b"c" * 10_000}))
    store.set_ref(NAME, "t1", info.version, expected=None)
    assert store.refs(NAME) == {"latest": info.version, "t1": info.version}
    assert len(list(store.versions(NAME))) == 2
    assert store.prune(NAME, keep_last=1, min_age=0).deleted_versions
