"""Every SnapshotStore passes the same conformance tests, on every backend."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import FallbackStore, RemoteStore, SnapshotStore, open_backend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import SnapshotStoreTests

SMALL: dict[str, Any] = {"chunk_size": 4096, "pack_target": 16384}


class TestFileStore(SnapshotStoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> SnapshotStore:
        return RemoteStore(open_backend(f"file://{tmp_path}/store"), **SMALL)


class TestMemoryStore(SnapshotStoreTests):
    @pytest.fixture
    def store(self) -> SnapshotStore:
        return RemoteStore(open_backend(f"memory://s-{uuid.uuid4().hex}"), **SMALL)


class TestS3Store(SnapshotStoreTests):
    @pytest.fixture
    def store(self, moto_server: MotoServer, s3_bucket: str) -> SnapshotStore:
        settings = S3Settings(endpoint_url=moto_server.endpoint_url)
        return RemoteStore(S3Backend(s3_bucket, "snapshots", settings=settings), **SMALL)


class TestGuardedEfsStore(SnapshotStoreTests):
    """A store on efs://: every filesystem call in a guarded worker process."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> SnapshotStore:
        (tmp_path / "mount").mkdir()
        return RemoteStore(open_backend(f"efs://{tmp_path}/mount"), **SMALL)


class TestFallbackStore(SnapshotStoreTests):
    """Two stores, publishes mirrored from the first: reads fail over from one to the other."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> SnapshotStore:
        stores = [RemoteStore(open_backend(f"file://{tmp_path}/{n}"), **SMALL) for n in "ab"]
        return FallbackStore(stores, primary=0, mirror=True)

    def remote_of(self, store: SnapshotStore) -> RemoteStore:
        assert isinstance(store, FallbackStore)
        assert isinstance(store.primary, RemoteStore)
        return store.primary

    def remotes_of(self, store: SnapshotStore) -> list[RemoteStore]:
        assert isinstance(store, FallbackStore)
        return [s for s in store.stores if isinstance(s, RemoteStore)]
