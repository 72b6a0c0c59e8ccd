"""Any fsspec filesystem (``memory://``, ``s3://`` through s3fs, ``gcs://``, ...).

Conditional writes are only as safe as the filesystem: s3fs uses S3's native
``If-None-Match``/``If-Match``; ``memory://`` lives in this process, so a
process-wide lock makes check-then-write atomic. Anything else refuses
``CREATE``/``update`` loudly with UnsupportedOperationError rather than
pretending.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Any

from chroma_snapshots.backends.base import (
    Backend,
    GetResult,
    ObjectMeta,
    PutMode,
    check_key,
    is_key,
    past_end,
    put_error,
    range_refused,
)
from chroma_snapshots.backends.endpoints import is_aws_endpoint, s3_place, s3fs_path
from chroma_snapshots.engine.retry import RetryPolicy
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConfigError,
    ConflictError,
    SnapshotError,
    SnapshotNotFoundError,
    StoreNotFoundError,
    UnsupportedOperationError,
)

_MEMORY_LOCK = threading.Lock()

# A read that saw the object change tries again after a short jittered wait, not at once:
# while writers replace it back to back, five immediate tries all fell inside their
# writes (a loaded machine, four writers), and the read failed with ConflictError.
_STABLE_READ = RetryPolicy(attempts=8, base=0.005, cap=0.1)


def _content_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _wrap(err: Exception, op: str, key: str) -> SnapshotError:
    what = f"{op} {key}" if key else f"{op} (the store's root)"
    if isinstance(err, FileNotFoundError):
        return _not_found(err, what, key)
    if isinstance(err, FileExistsError):
        return ConflictError(f"{op} {key}: already exists")
    cause = err.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
    if code == "PreconditionFailed":
        return ConflictError(f"{op} {key}: precondition failed")
    if "BotoCoreError" in {c.__name__ for c in type(err).__mro__}:  # via s3fs, not mapped
        from chroma_snapshots.backends.s3errors import wrap_error  # no credentials, a typo

        return wrap_error(err, op, key)
    return BackendUnavailableError(f"{what}: {type(err).__name__}: {err}"[:300])


def _not_found(err: FileNotFoundError, what: str, key: str) -> SnapshotError:
    """fsspec raises FileNotFoundError for more than a missing object: s3fs for a missing
    bucket, HTTPFileSystem.info for whatever failed, a refused connection included."""
    cause = err.__cause__
    error = getattr(cause, "response", None)
    error = error.get("Error", {}) if isinstance(error, dict) else {}  # botocore's, via s3fs
    if error.get("Code") == "NoSuchBucket":
        bucket = error.get("BucketName") or "the store's bucket"
        return StoreNotFoundError(
            f"bucket {bucket!r} does not exist (S3 NoSuchBucket); create it or fix the store URL"
        )
    if _unreachable(cause):
        return BackendUnavailableError(f"{what}: {type(cause).__name__}: {cause}"[:300])
    return SnapshotNotFoundError(f"{key}: no such object")


def _unreachable(cause: BaseException | None) -> bool:
    """Is this cause of a FileNotFoundError a failure to get an answer, not a 'no'?"""
    status = getattr(cause, "status", None)  # aiohttp's ClientResponseError: an HTTP answer
    if isinstance(status, int):
        return status not in (404, 410)
    if isinstance(cause, FileNotFoundError):
        return False
    # a refused or reset connection, a timeout, or any other aiohttp client failure
    return isinstance(cause, (OSError, TimeoutError)) or type(cause).__module__.startswith(
        "aiohttp"
    )


def _raise_unless_absent(err: FileNotFoundError, op: str, key: str) -> None:
    """Return if ``err`` means the object is absent; raise what it really means otherwise."""
    mapped = _wrap(err, op, key)
    if type(mapped) is not SnapshotNotFoundError:
        raise mapped from err


class _Changed(Exception):
    """The object's ETag differed before and after a read."""


def _check_range(key: str, byte_range: tuple[int, int] | None, size: int) -> None:
    # as on S3 (416) and files: a range that starts past the end means a damaged object
    if byte_range is not None and byte_range[0] >= size and byte_range[1] > byte_range[0]:
        raise past_end(key, byte_range[0])


class FsspecBackend(Backend):
    """Objects below ``root`` on the fsspec filesystem ``fs``."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self._kind = "memory" if "memory" in protocols else "s3" if "s3" in protocols else "other"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FsspecBackend:
        """Open ``url`` with fsspec (``options`` go to the filesystem)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **options)
        return cls(fs, root)

    def __repr__(self) -> str:
        url = self._endpoint() if self._kind == "s3" else None
        at = f", endpoint_url={url!r}" if url and not is_aws_endpoint(url) else ""
        return f"FsspecBackend({self._kind}, {self.root!r}{at})"

    def place(self) -> str:
        # an S3 filesystem's endpoint too, as S3Backend's (AWS's own left out), and in its
        # form: s3fs reads "b/p" as an s3:// store reads "s3://b/p", so they are one store.
        # Not a path with an empty segment: s3fs keeps it, an s3:// URL drops it.
        path = s3fs_path(self.root) if self._kind == "s3" else None
        return repr(self) if path is None else s3_place(path, self._endpoint())

    def _endpoint(self) -> str | None:
        """The endpoint the s3fs filesystem sends its requests to: that of the client it
        makes (from its settings, its ``client_kwargs``, the environment or a profile, as
        botocore chooses). Making the client contacts nothing."""
        try:
            self.fs.connect()
            return str(self.fs.s3.meta.endpoint_url)
        except Exception as e:  # its settings are the caller's: say so, not a traceback
            raise ConfigError(f"the s3fs filesystem could not make its client: {e!r}") from e

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _meta(self, key: str, info: dict[str, Any], data: bytes | None = None) -> ObjectMeta:
        etag = info.get("ETag") or info.get("etag")
        if data is not None and self._kind == "memory":
            etag = _content_etag(data)
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0.0
        ts = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
        return ObjectMeta(key, int(info.get("size") or 0), str(etag or "").strip('"'), ts)

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        path = self._path(key)
        start, end = byte_range if byte_range else (None, None)
        try:
            if self._kind == "memory":
                whole = self.fs.cat_file(path)
                _check_range(key, byte_range, len(whole))
                # the etag is the content's hash, so data and etag always agree
                return GetResult(whole[start:end], self._meta(key, {"size": len(whole)}, whole))
            # Read between two metadata calls: equal ETags mean the bytes are that version.
            return _STABLE_READ.call(
                lambda _: self._read_stable(key, path, start, end), retry_on=(_Changed,)
            )
        except _Changed as e:
            raise ConflictError(f"get {key}: object kept changing while being read") from e
        except SnapshotError:
            raise
        except Exception as e:
            if byte_range is not None and range_refused(e):
                raise past_end(key, byte_range[0]) from e
            raise _wrap(e, "get", key) from e

    def _read_stable(self, key: str, path: str, start: int | None, end: int | None) -> GetResult:
        """One read between two metadata calls; _Changed if the object changed meanwhile."""
        before = self.fs.info(path, refresh=True) if self._kind == "s3" else self.fs.info(path)
        data = self.fs.cat_file(path, start=start, end=end)
        after = self.fs.info(path, refresh=True) if self._kind == "s3" else self.fs.info(path)
        if before.get("ETag") != after.get("ETag"):
            raise _Changed(key)
        byte_range = None if start is None or end is None else (start, end)
        _check_range(key, byte_range, int(after.get("size") or 0))
        return GetResult(data, self._meta(key, after))

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        path = self._path(key)
        try:
            if mode.kind == "overwrite":
                self.fs.pipe_file(path, data)
            elif self._kind == "memory":
                self._put_memory(key, path, data, mode)
            elif self._kind == "s3":
                extra = (
                    {"mode": "create"} if mode.kind == "create" else {"IfMatch": f'"{mode.etag}"'}
                )
                self.fs.pipe_file(path, data, **extra)
            else:
                raise UnsupportedOperationError(
                    f"{self.fs.protocol} filesystems cannot do conditional writes safely; "
                    "use an s3:// or file:// store for publishing"
                )
        except SnapshotError:
            raise
        except Exception as e:
            raise put_error(_wrap(e, "put", key), key, mode) from e
        return (
            self.head(key) if self._kind != "memory" else self._meta(key, {"size": len(data)}, data)
        )

    def _put_memory(self, key: str, path: str, data: bytes, mode: PutMode) -> None:
        with _MEMORY_LOCK:
            exists = self.fs.exists(path)
            if mode.kind == "create" and exists:
                raise ConflictError(f"{key} already exists")
            if mode.kind == "update":
                current = _content_etag(self.fs.cat_file(path)) if exists else None
                if current != mode.etag:
                    raise ConflictError(f"{key} changed: etag {current} != {mode.etag}")
            self.fs.pipe_file(path, data)

    def head(self, key: str) -> ObjectMeta:
        path = self._path(key)
        try:
            info = self.fs.info(path)
            if info.get("type") == "directory":
                raise FileNotFoundError(path)
            data = self.fs.cat_file(path) if self._kind == "memory" else None
        except Exception as e:
            raise _wrap(e, "head", key) from e
        return self._meta(key, info, data)

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = f"{self.root}/{base}" if base else self.root
        try:
            found = self.fs.find(top, detail=True)
            if not found:
                self._check_listable(top)
        except FileNotFoundError as e:
            _raise_unless_absent(e, "list", prefix)
            found = {}
        except Exception as e:
            raise _wrap(e, "list", prefix) from e
        root = self.root.strip("/")  # filesystems differ on a leading "/" in what they return
        for path, info in found.items():
            key = path.strip("/")[len(root) :].lstrip("/")
            if key.startswith(prefix) and info.get("type") != "directory" and is_key(key):
                yield self._meta(key, info)

    def _check_listable(self, top: str) -> None:
        """Raise unless ``top`` is really missing or empty: ``find`` and ``exists`` report an
        unreachable server (http, for one) as an empty folder, ``ls`` raises its error."""
        self.fs.ls(top, detail=False)

    def delete(self, key: str) -> None:
        path = self._path(key)  # a bad key is InvalidInputError, not a backend failure
        try:
            self.fs.rm_file(path)
        except FileNotFoundError as e:
            _raise_unless_absent(e, "delete", key)
            return
        except Exception as e:
            raise _wrap(e, "delete", key) from e
