"""Which folder ``publish_client`` publishes for a client (found by an independent review):
the one the client persists to, never another database that a nominal or relative path
happens to name now, and never a client's in-memory data lost for nothing."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chroma_helpers import build, close_client, counts
from chromadb.config import Settings

from chroma_snapshots import IntegrityError, InvalidInputError, RemoteStore, open_backend
from chroma_snapshots import chroma as chroma_mod
from chroma_snapshots.chroma import client_settings, publish_client


@pytest.fixture
def store(tmp_path: Path) -> RemoteStore:
    return RemoteStore(open_backend(f"file://{tmp_path}/store"))


def test_an_in_memory_client_is_refused_and_left_open(
    store: RemoteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It published whatever database sat at ./chroma (its nominal folder) as this name,
    and closed the client, losing its data."""
    monkeypatch.chdir(tmp_path)
    close_client(build(tmp_path / "chroma", {"someone-elses": 3}))
    mine: Any = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    mine.create_collection("mine").add(ids=["a", "b"], embeddings=[[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InvalidInputError, match="in memory"):
        publish_client(store, "db", mine)
    assert list(store.names()) == []
    assert counts(mine) == {"mine": 2}  # still open, its data still there
    close_client(mine)


def test_a_relative_path_publishes_the_folder_the_client_holds_open(
    store: RemoteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a change of directory it published the same-named folder of the new one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rel = f"db-{tmp_path.name}"  # chroma keys its systems by this text, process-wide
    close_client(build(tmp_path / "b" / rel, {"unrelated": 1}))
    monkeypatch.chdir(tmp_path / "a")
    client = build(Path(rel), {"mine": 5})
    monkeypatch.chdir(tmp_path / "b")
    info = publish_client(store, "db", client)
    assert info.metadata["chroma"]["collections"] == {"mine": 5}
    # and without a change of directory, as before
    monkeypatch.chdir(tmp_path / "a")
    info = publish_client(store, "db", build(Path(f"{rel}-2"), {"here": 2}))
    assert info.metadata["chroma"]["collections"] == {"here": 2}


def test_two_open_databases_under_one_relative_name_are_refused(
    store: RemoteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
    rel = f"db-{tmp_path.name}"  # chroma keys its systems by this text, process-wide
    monkeypatch.chdir(tmp_path / "a")
    first = build(Path(rel), {"first": 1})
    monkeypatch.chdir(tmp_path / "b")
    # another chroma system ("./x" is not "x" to chroma; a Path would drop the "./")
    second = chromadb.PersistentClient(path=f"./{rel}", settings=client_settings())
    with pytest.raises(InvalidInputError, match="2 folders"):
        publish_client(store, "db", first)
    assert list(store.names()) == []
    assert counts(first) == {"first": 1}  # left open: the caller may pass the folder
    for client in (first, second):
        close_client(client)  # chroma flushes on close: a folder is published closed
    info = publish_client(store, "db", tmp_path / "a" / rel)
    assert info.metadata["chroma"]["collections"] == {"first": 1}


def test_a_database_that_keeps_changing_is_refused_as_contention(
    store: RemoteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every take saw a segment move: the error says the database kept changing and is not
    known to be damaged (it read like damage)."""
    close_client(build(tmp_path / "db", {"ccc": 3}))
    ticks = itertools.count()
    real = chroma_mod._segment_stamps
    monkeypatch.setattr(
        chroma_mod, "_segment_stamps", lambda src: {**real(src), "tick": (next(ticks), 0)}
    )
    with pytest.raises(IntegrityError, match=r"kept changing.*3 takes.*not known to be damaged"):
        publish_client(store, "db", tmp_path / "db", attempts=3)
    assert list(store.names()) == []
