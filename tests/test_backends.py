"""Every backend passes the same conformance tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import boto3
import fsspec
import pytest

from chroma_snapshots import Backend, ConfigError, RemoteStore, open_backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.fsspec import FsspecBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import BackendTests


class FilesOnDisk(BackendTests):
    """Backends that keep each object as a file below a root folder."""

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        assert isinstance(backend, FileBackend)
        path = backend.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_get(self, backend: Backend, key: str) -> bytes:
        assert isinstance(backend, FileBackend)
        return (backend.root / key).read_bytes()


class TestFileBackend(FilesOnDisk):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        return FileBackend(tmp_path / "store")


class TestGuardedEfsBackend(FilesOnDisk):
    """efs:// runs every filesystem call in a guarded worker process (a hung mount costs the
    call's budget, not the caller): the same behaviour as a plain folder."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        (tmp_path / "mount").mkdir()
        return open_backend(f"efs://{tmp_path}/mount")


class TestMemoryBackend(BackendTests):
    @pytest.fixture
    def backend(self) -> Backend:
        return open_backend(f"memory://test-{uuid.uuid4().hex}")

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        assert isinstance(backend, FsspecBackend)
        fsspec.filesystem("memory").pipe_file(f"{backend.root}/{key}", data)

    def raw_get(self, backend: Backend, key: str) -> bytes:
        assert isinstance(backend, FsspecBackend)
        return bytes(fsspec.filesystem("memory").cat_file(f"{backend.root}/{key}"))


class InBucket(BackendTests):
    """Backends on the moto server's bucket, read and written out of band with a client of
    their own."""

    bucket = ""
    prefix = ""

    @pytest.fixture
    def client(self, moto_server: MotoServer) -> Any:
        return boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")

    @pytest.fixture(autouse=True)
    def _keep_client(self, client: Any) -> None:
        self._client = client

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def raw_get(self, backend: Backend, key: str) -> bytes:
        got = self._client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")
        return bytes(got["Body"].read())


class TestS3Backend(InBucket):
    prefix = "some/prefix"

    @pytest.fixture
    def backend(self, moto_server: MotoServer, s3_bucket: str) -> Backend:
        self.bucket = s3_bucket
        settings = S3Settings(endpoint_url=moto_server.endpoint_url)
        return S3Backend(s3_bucket, self.prefix, settings=settings)


class TestS3fsBackend(InBucket):
    prefix = "pre"

    @pytest.fixture
    def backend(self, moto_server: MotoServer, s3_bucket: str) -> Backend:
        self.bucket = s3_bucket
        return FsspecBackend.from_url(
            f"s3://{s3_bucket}/{self.prefix}",
            client_kwargs={"endpoint_url": moto_server.endpoint_url},
            skip_instance_cache=True,
        )


def test_s3fs_reads_an_object_that_writers_keep_replacing(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the object changes during each of the first five reads (writers back to back): the
    # read waits a little and tries again until it sees one version whole
    backend = FsspecBackend.from_url(
        f"s3://{s3_bucket}/pre",
        client_kwargs={"endpoint_url": moto_server.endpoint_url},
        skip_instance_cache=True,
    )
    assert isinstance(backend, FsspecBackend)
    backend.put("ref", b"v0")
    real_cat, reads = backend.fs.cat_file, [0]

    def cat_while_written(path: str, **kw: object) -> bytes:
        data: bytes = real_cat(path, **kw)
        reads[0] += 1
        if reads[0] <= 5:
            backend.put("ref", f"v{reads[0]}".encode())
        return data

    monkeypatch.setattr(backend.fs, "cat_file", cat_while_written)
    assert backend.get("ref").data == b"v5"
    assert reads[0] == 6


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


def test_an_endpoint_from_the_aws_environment_keys_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The label keys the cache folder: the same bucket behind two servers named by
    # AWS_ENDPOINT_URL shared one cache, and an offline checkout served the other's files.
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    labels = []
    for url in ("http://127.0.0.1:9001", "http://127.0.0.1:9002"):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        label = RemoteStore(S3Backend("b", "p", settings=S3Settings(region="us-east-1"))).label
        assert url in label
        labels.append(label)
    assert labels[0] != labels[1]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    aws = repr(S3Backend("b", "p", settings=S3Settings(region="eu-west-1")))
    assert aws == "S3Backend('s3://b/p')"  # AWS's own endpoint: the label as it always was
