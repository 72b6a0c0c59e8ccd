"""Fixtures (a pytest plugin, see conftest.py) for cache tests on a small local store:
``remote`` (a file store of 4 KiB chunks, ``CHUNK``) and ``cached`` (a cache over it).
A test module that defines fixtures of the same names uses its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend

CHUNK = 4096


@pytest.fixture
def remote(tmp_path: Path) -> RemoteStore:
    return RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK, pack_target=16 * CHUNK)


@pytest.fixture
def cached(remote: RemoteStore, tmp_path: Path) -> CachedStore:
    return CachedStore(remote, tmp_path / "cache")
