"""A read that no store of a FallbackStore can answer says what each store answered, with
the error type of the last: offline (or in an outage of all of them) the error named only
one store, as if the others had not been asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from chroma_snapshots import FallbackStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.offline import OfflineBackend
from chroma_snapshots.errors import BackendUnavailableError, SnapshotNotFoundError

URLS = ("s3://first/p", "s3://second/p", "s3://third/p")


def _offline(n: int) -> FallbackStore:
    return FallbackStore([RemoteStore(OfflineBackend(url)) for url in URLS[:n]])


@pytest.mark.parametrize("n", [2, 3])
def test_a_checkout_no_store_answers_names_every_store(tmp_path: Path, n: int) -> None:
    with pytest.raises(BackendUnavailableError) as err:
        _offline(n).checkout("db", "latest", tmp_path / "d")
    assert all(url in str(err.value) for url in URLS[:n]), err.value
    assert str(err.value).count("OfflineBackend(") == n  # each store named by its label
    assert not (tmp_path / "d").exists()


def test_a_manifest_no_store_holds_names_every_store(tmp_path: Path) -> None:
    stores = [RemoteStore(FileBackend(tmp_path / name)) for name in ("a", "b")]
    with pytest.raises(SnapshotNotFoundError) as err:
        FallbackStore(stores).load_manifest("db", "20261207T093555112019Z-ae84b18ce878")
    said = str(err.value)
    assert "load manifest failed on every store" in said
    assert str(tmp_path / "a") in said, said
    assert str(tmp_path / "b") in said, said
