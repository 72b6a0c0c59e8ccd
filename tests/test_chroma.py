"""Real chromadb databases through the store: round trips, reopen, live publishing, validation."""

from __future__ import annotations

import contextlib
import json
import os
import select
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from chroma_helpers import build, close_client, counts, query_ids, vectors

from chroma_snapshots import CachedStore, IntegrityError, RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import describe, open_client, publish_client, validate
from chroma_snapshots.testing import MotoServer

WRITER = str(Path(__file__).with_name("chroma_writer.py"))


@pytest.fixture
def s3_store(moto_server: MotoServer, s3_bucket: str) -> RemoteStore:
    return RemoteStore(
        S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    )


def test_round_trip_two_collections_20k_records(s3_store: RemoteStore, tmp_path: Path) -> None:
    client = build(tmp_path / "db", {"receipts": 12000, "merchants": 8000}, dim=32)
    probes = vectors(5, 32, seed=99)
    before = {name: query_ids(client, name, probes) for name in ("receipts", "merchants")}
    info = publish_client(s3_store, "db", client)  # closes the client first
    assert info.metadata["chroma"]["collections"] == {"receipts": 12000, "merchants": 8000}
    cached = CachedStore(s3_store, tmp_path / "cache")
    with open_client(cached, "db") as reader:
        assert counts(reader) == {"receipts": 12000, "merchants": 8000}
        assert {name: query_ids(reader, name, probes) for name in before} == before


def test_reopen_in_the_same_process_sees_the_new_version(
    s3_store: RemoteStore, tmp_path: Path
) -> None:
    publish_client(s3_store, "db", build(tmp_path / "v1", {"receipts": 100}))
    cached = CachedStore(s3_store, tmp_path / "cache")
    with open_client(cached, "db") as c1:
        assert counts(c1) == {"receipts": 100}
    publish_client(s3_store, "db", build(tmp_path / "v2", {"receipts": 250, "extra": 10}))
    with open_client(cached, "db") as c2:
        assert counts(c2) == {"receipts": 250, "extra": 10}
    with open_client(s3_store, "db") as c3:  # without a cache too
        assert counts(c3) == {"receipts": 250, "extra": 10}


def test_not_a_database_and_corrupt_sqlite_are_refused(
    s3_store: RemoteStore, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(IntegrityError, match="not a chroma database"):
        publish_client(s3_store, "db", plain)
    with pytest.raises(IntegrityError):
        validate(plain)
    client = build(tmp_path / "db", {"receipts": 300})
    close_client(client)
    db = tmp_path / "db" / "chroma.sqlite3"
    data = bytearray(db.read_bytes())
    for off in range(4096, len(data), 4096):
        data[off + 100 : off + 200] = os.urandom(100)  # scribble over every page but the header
    db.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        validate(tmp_path / "db")
    with pytest.raises(IntegrityError, match="refusing to publish"):
        publish_client(s3_store, "db", tmp_path / "db", attempts=2)
    assert list(s3_store.names()) == []
    forced = publish_client(s3_store, "db", tmp_path / "db", force=True, attempts=1)
    assert "collections" not in forced.metadata["chroma"]


def test_text_that_is_not_utf8_is_a_documented_error_not_a_traceback(
    s3_store: RemoteStore, tmp_path: Path
) -> None:
    # A damaged database's quick_check report quotes its pages, and a hostile one can name
    # a collection anything: sqlite3 decoded such TEXT as UTF-8 and raised
    # UnicodeDecodeError from inside the check (the scribble test above, once in a CI run).
    db = tmp_path / "db"
    close_client(build(db, {"receipts": 30}))
    with sqlite3.connect(db / "chroma.sqlite3") as raw:
        raw.execute("UPDATE collections SET name = CAST(X'72FF63' AS TEXT)")
    raw.close()
    view = describe(db)
    assert [c.name for c in view.collections] == ["r\ufffdc"]
    assert [c.records for c in view.collections] == [30]
    with pytest.raises(IntegrityError):
        validate(db)
    with pytest.raises(IntegrityError):
        publish_client(s3_store, "db", db, attempts=1)
    assert list(s3_store.names()) == []


def test_live_writer_every_published_version_validates(
    s3_store: RemoteStore, tmp_path: Path
) -> None:
    """publish_client under a writer that keeps upserting (and so persisting segments):
    every version it publishes validates. That a plain copy of such a database breaks is
    measured, not tested: benchmarks/live_copy.py (a race: how often depends on the
    machine's load, which a test cannot fix)."""
    db = tmp_path / "db"
    close_client(build(db, {"receipts": 10}))
    # at most 50 batches of 200 records: it keeps writing, but the database stops growing
    writer = subprocess.Popen(
        [sys.executable, WRITER, str(db), "50"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        ready, _, _ = select.select([writer.stdout], [], [], 120)
        assert ready, "the writer wrote nothing within 120 s"
        assert writer.stdout.readline() == "writing\n"  # its first batch is in
        states = {_segment_state(db)}
        for r in range(20):
            info = publish_client(s3_store, "db", db)
            snap = s3_store.checkout("db", info.version, tmp_path / f"safe{r}")
            assert validate(snap.path).records >= 10
            states.add(_segment_state(db))
        assert writer.poll() is None  # the writer really was writing throughout
        # and persisting segments between the publishes: the hazard a plain copy meets
        assert len(states) >= 3, "the writer persisted no segment during the publishes"
    finally:
        writer.kill()
        writer.communicate()


def _segment_state(db: Path) -> tuple[tuple[str, int, int], ...]:
    """Every segment file's path, size and mtime: what a persist changes (a file that went
    while it was listed is left out: the next look sees the change)."""
    state = []
    for p in sorted(db.rglob("*")):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            if stat.S_ISREG(st.st_mode) and not p.name.startswith("chroma.sqlite3"):
                state.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(state)


def test_describe_and_cli_info_show_the_chroma_view(
    moto_server: MotoServer, s3_bucket: str, s3_store: RemoteStore, tmp_path: Path
) -> None:
    client = build(tmp_path / "db", {"receipts": 300, "merchants": 40}, dim=16)
    close_client(client)
    (tmp_path / "db" / "0000-orphan-segment").mkdir()
    (tmp_path / "db" / "0000-orphan-segment" / "header.bin").write_bytes(b"x")
    view = describe(tmp_path / "db")
    by_name = {c.name: c for c in view.collections}
    assert (by_name["receipts"].records, by_name["receipts"].dimension) == (300, 16)
    assert by_name["merchants"].records == 40
    assert view.orphan_segments == ("0000-orphan-segment",)
    assert all(c.unsynced >= 0 for c in view.collections)
    publish_client(s3_store, "db", tmp_path / "db")
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chroma_snapshots.cli",
            "--store",
            f"s3://{s3_bucket}/snaps",
            "info",
            "db",
            "--chroma",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["chroma"]
    assert {c["name"]: c["records"] for c in shown["collections"]} == {
        "receipts": 300,
        "merchants": 40,
    }
    assert shown["orphan_segments"] == ["0000-orphan-segment"]


def test_arguments_of_the_wrong_kind_are_the_documented_error(tmp_path: Path) -> None:
    # A URL where a store goes, a number where a client or folder goes: each raised an
    # AttributeError or TypeError from inside (found by review).
    from chroma_snapshots import InvalidInputError
    from chroma_snapshots.backends.file import FileBackend

    store = RemoteStore(FileBackend(tmp_path / "store"))
    url = f"file://{tmp_path}/store"
    calls: list[Callable[[], object]] = [
        lambda: open_client(url, "n").__enter__(),  # type: ignore[arg-type]
        lambda: publish_client(url, "n", tmp_path),  # type: ignore[arg-type]
        lambda: publish_client(store, "n", 42),
        lambda: publish_client(store, "n", None),
        lambda: validate(42),  # type: ignore[arg-type]
        lambda: CachedStore(url, tmp_path / "cache"),  # type: ignore[arg-type]
        lambda: CachedStore(None, tmp_path / "cache"),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(InvalidInputError):
            call()
    assert sorted(os.listdir(tmp_path)) == ["store"]
