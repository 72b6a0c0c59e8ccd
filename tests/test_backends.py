"""Every backend passes the same conformance tests."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from chroma_snapshots import Backend, ConfigError, open_backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.fsspec import FsspecBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import BackendTests


class TestFileBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        return FileBackend(tmp_path / "store")


class TestMemoryBackend(BackendTests):
    @pytest.fixture
    def backend(self) -> Backend:
        return open_backend(f"memory://test-{uuid.uuid4().hex}")


class TestS3Backend(BackendTests):
    @pytest.fixture
    def backend(self, moto_server: MotoServer, s3_bucket: str) -> Backend:
        return S3Backend(
            s3_bucket, "some/prefix", settings=S3Settings(endpoint_url=moto_server.endpoint_url)
        )


class TestS3fsBackend(BackendTests):
    @pytest.fixture
    def backend(self, moto_server: MotoServer, s3_bucket: str) -> Backend:
        return FsspecBackend.from_url(
            f"s3://{s3_bucket}/pre",
            client_kwargs={"endpoint_url": moto_server.endpoint_url},
            skip_instance_cache=True,
        )


def test_s3_multipart_create_is_conditional(moto_server: MotoServer, s3_bucket: str) -> None:
    settings = S3Settings(
        endpoint_url=moto_server.endpoint_url, multipart_threshold=6 << 20, part_size=5 << 20
    )
    backend = S3Backend(s3_bucket, settings=settings)
    data = bytes(range(256)) * (12 << 12)  # 12 MiB: three parts
    from chroma_snapshots import ConflictError, PutMode

    meta = backend.put("big", data, mode=PutMode.CREATE)
    assert meta.etag.endswith("-3")  # really went through multipart
    with pytest.raises(ConflictError):
        backend.put("big", b"other", mode=PutMode.CREATE)
    assert backend.get("big").data == data


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="bucket"):
        open_backend("s3:///no-bucket")
    with pytest.raises(ConfigError, match="nosuchproto"):
        open_backend("nosuchproto://x/y")
    with pytest.raises(ConfigError):
        open_backend("file://remotehost/path")


def test_efs_url_requires_existing_mount(tmp_path: Path) -> None:
    from chroma_snapshots import SnapshotNotFoundError

    with pytest.raises(SnapshotNotFoundError):
        open_backend(f"efs://{tmp_path}/not-mounted")
    assert isinstance(open_backend(f"efs://{tmp_path}"), FileBackend)
