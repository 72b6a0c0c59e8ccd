"""Amazon S3 (or any S3-compatible server) through botocore (``S3Settings`` and the client
are made in ``s3client.py``).

Conditional writes use S3's ``If-None-Match: *`` and ``If-Match: <etag>``;
large objects are uploaded in parallel multipart parts. Timeouts and retries
are explicit (``botocore.config.Config``) so no call waits forever.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import ClientError, ReadTimeoutError

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
from chroma_snapshots.backends.endpoints import is_aws_endpoint, s3_place
from chroma_snapshots.backends.s3body import BodyReader, direct_reader
from chroma_snapshots.backends.s3client import S3Settings, make_client
from chroma_snapshots.backends.s3errors import (
    BODY_ERRORS,
    S3_ERRORS,
    check_range,
    error_code,
    field,
    wrap_error,
)
from chroma_snapshots.engine.cleanup import clean_up, on_record
from chroma_snapshots.engine.deadline import (
    Deadline,
    WorkerPool,
    current_deadline,
    wait_all,
    within,
)
from chroma_snapshots.engine.retry import IMMEDIATE, RetryPolicy
from chroma_snapshots.errors import (
    BackendUnavailableError,
    IntegrityError,
    StorageTimeoutError,
)

__all__ = ["S3Backend", "S3Settings"]  # S3Settings lives in s3client.py; named here too

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

T = TypeVar("T")
log = logging.getLogger(__name__)
_PART_WORKERS = 8  # parts of one object in flight at once
_ABORT_RETRY = RetryPolicy(attempts=4, base=0.1, cap=1.0)


def _etag(value: Any) -> str:
    return str(value or "").strip('"')


class S3Backend(Backend):
    """Objects under ``s3://bucket/prefix``; one thread-safe client per backend."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        settings: S3Settings | None = None,
        client: S3Client | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or S3Settings()
        self.client = client or make_client(self.settings)

    def __repr__(self) -> str:
        url = self._endpoint()
        at = f", endpoint_url={url!r}" if url else ""
        return f"S3Backend('s3://{self.bucket}/{self.prefix}'{at})"

    def place(self) -> str:
        # the endpoint too: the same bucket behind two servers is two stores, wherever the
        # endpoint came from (settings, AWS_ENDPOINT_URL, a profile's endpoint_url); in the
        # form open_store's stores are keyed by, so one storage is one store however opened
        return s3_place(f"s3://{self.bucket}/{self.prefix}".rstrip("/"), self._endpoint())

    def _endpoint(self) -> str | None:
        """The endpoint requests go to, or None for AWS's own when none was set."""
        url = self.settings.endpoint_url or self.client.meta.endpoint_url
        return None if not self.settings.endpoint_url and is_aws_endpoint(url) else url

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _get_object(
        self, key: str, byte_range: tuple[int, int] | None, read: Callable[[Any], T]
    ) -> tuple[Any, T]:
        """GET ``key`` and ``read`` its body; a stalled or cut body is asked for again."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if byte_range is not None:
            kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"

        def attempt(_: int) -> tuple[Any, T]:
            try:
                resp = self.client.get_object(**kwargs)
            except ReadTimeoutError as e:  # no answer at all: botocore has asked again
                raise wrap_error(e, "get", key) from e  # (a cut error body is urllib3's)
            if byte_range is not None:
                check_range(resp, key, byte_range)
            return resp, read(resp["Body"])

        try:
            policy = IMMEDIATE.with_(attempts=self.settings.body_attempts)
            return policy.call(attempt, retry_on=BODY_ERRORS)
        except BODY_ERRORS as e:
            raise wrap_error(e, "get", key) from e
        except S3_ERRORS as e:
            if byte_range is not None and range_refused(e):
                raise past_end(key, byte_range[0]) from e
            raise wrap_error(e, "get", key) from e

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        if byte_range is not None and byte_range[1] <= byte_range[0]:
            return GetResult(b"", self.head(key))
        resp, data = self._get_object(key, byte_range, lambda body: body.read())
        size = resp.get("ContentLength", len(data))
        if "ContentRange" in resp:
            size = int(str(resp["ContentRange"]).rsplit("/", 1)[1])
        when = field(resp, "LastModified", f"get {key}").timestamp()
        meta = ObjectMeta(key, size, _etag(resp.get("ETag")), when)
        return GetResult(data, meta)

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        start, end = byte_range
        if end <= start:
            return 0
        want = min(end - start, len(buf))

        def read_into(body: Any) -> int:
            direct = direct_reader(body)
            if direct is not None:
                return direct(buf[:want])
            got = 0
            while got < want:
                # 1 MiB at a time: urllib3's readinto reads into a temporary bytes object of
                # the requested size, so one big call would double the memory.
                n = body.readinto(buf[got : min(want, got + (1 << 20))])
                if not n:
                    break
                got += n
            return got

        return self._get_object(key, byte_range, read_into)[1]

    def read_range(
        self,
        key: str,
        byte_range: tuple[int, int],
        buf: memoryview,
        take: Callable[[memoryview, int], int],
    ) -> int:
        """Stream ``byte_range`` of ``key`` through ``buf`` with one GET: each time ``buf``
        is full (or the range ends), ``take(view, offset)`` gets the bytes held, which
        start at ``offset`` of the object, and says how many at the front it is done
        with; the rest (a chunk cut by the buffer's end) moves to the front. A body that
        stalls or breaks is asked for again from the first byte not held. Returns the bytes
        received: fewer than asked only if the answer itself was shorter (the caller
        judges that)."""
        start, end = byte_range
        pos, filled, tries = start, 0, 0  # buf[:filled] holds bytes [pos, pos + filled)
        while pos + filled < end:
            body = self._open_body(key, (pos + filled, end))
            try:
                while pos + filled < end:
                    n = body.readinto(buf[filled : min(len(buf), end - pos)])
                    if not n:
                        return pos + filled - start
                    filled += n
                    if filled == len(buf) or pos + filled == end:
                        used = take(buf[:filled], pos)
                        if used <= 0 and filled == len(buf):
                            raise IntegrityError(f"{key}: a chunk larger than a read buffer")
                        buf[: filled - used] = bytes(buf[used:filled])  # at most one chunk
                        pos, filled = pos + used, filled - used
            except BODY_ERRORS as e:
                tries += 1
                if tries >= self.settings.body_attempts:
                    raise wrap_error(e, "get", key) from e
            finally:
                body.close()
        return end - start

    def _open_body(self, key: str, byte_range: tuple[int, int]) -> BodyReader:
        try:
            resp = self.client.get_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Range=f"bytes={byte_range[0]}-{byte_range[1] - 1}",
            )
        except BODY_ERRORS as e:
            raise wrap_error(e, "get", key) from e
        except S3_ERRORS as e:
            if range_refused(e):
                raise past_end(key, byte_range[0]) from e
            raise wrap_error(e, "get", key) from e
        check_range(resp, key, byte_range)
        return BodyReader(resp["Body"])

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        cond: dict[str, str] = {}
        if mode.kind == "create":
            cond["IfNoneMatch"] = "*"
        elif mode.kind == "update":
            cond["IfMatch"] = f'"{mode.etag}"'
        try:
            if len(data) > self.settings.multipart_threshold:
                etag = on_record(partial(self._put_multipart, self._key(key), data, cond))
            else:
                resp = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    **cond,  # type: ignore[arg-type]
                )
                etag = _etag(field(resp, "ETag", f"put {key}"))
        except S3_ERRORS as e:
            raise put_error(wrap_error(e, "put", key), key, mode) from e
        return ObjectMeta(key, len(data), etag, time.time())

    def _put_multipart(self, full: str, data: bytes, cond: dict[str, str]) -> str:
        """Upload ``data`` in parts on a pool of this call's own, waiting no longer than the
        current deadline: a stalled part holds only its own thread, never a later upload's
        (parts still running when the call fails are abandoned)."""
        step = self.settings.part_size
        count = -(-len(data) // step)
        dl = current_deadline() or Deadline(count * self._worst_request())
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]

        def part(i: int) -> CompletedPartTypeDef:
            body = data[i * step : (i + 1) * step]
            r = self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=i + 1, Body=body
            )
            return {"PartNumber": i + 1, "ETag": field(r, "ETag", f"put {full} part {i + 1}")}

        def complete(parts: list[CompletedPartTypeDef]) -> Any:
            return self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **cond,  # type: ignore[arg-type]
            )

        try:
            with WorkerPool(_PART_WORKERS, "s3-part") as pool:
                futures = [pool.submit(within, dl, partial(part, i)) for i in range(count)]
                parts = wait_all(futures, dl, f"uploading the parts of {full}")
                # on the pool too: a completion never answered held the abort back until
                # its read timeouts ran out, and an exit before that left the parts billed
                done = pool.submit(within, dl, partial(complete, parts))
                resp = wait_all([done], dl, f"completing the upload of {full}")[0]
        except BaseException:
            self._abort_multipart(full, upload_id, dl)
            raise
        return _etag(resp.get("ETag"))

    def _worst_request(self) -> float:
        """The longest one request may take with every retry (a call made without a
        deadline waits no longer than its parts could take one after another)."""
        s = self.settings
        return (s.connect_timeout + s.read_timeout) * s.max_attempts

    def _abort_multipart(self, full: str, upload_id: str, dl: Deadline) -> None:
        """Best effort: parts of an upload nobody aborts are billed until a lifecycle rule
        removes them. A clean-up (engine/cleanup.py): waited for until the deadline (at
        least its grace), then left on record, never cancelled, so a process that waits
        for its clean-ups (the CLI at exit) does not end it unsent; under a budget of its
        own (requests of an expired call are not sent, see stop_at_deadline; an abort
        writes nothing). Its own failure must not hide the error that made us abort."""
        own = Deadline(self._worst_request())

        def abort(_attempt: int) -> None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":  # else an attempt we did not hear did it
                    raise

        def attempts() -> None:
            # tried again whatever the client's retry setting: an abort writes nothing,
            # and one lost to a slow answer leaves the parts billed
            try:
                _ABORT_RETRY.call(abort, retry_on=S3_ERRORS, within=own.remaining())
            except (*S3_ERRORS, StorageTimeoutError) as e:
                log.warning("multipart upload of %s left to the lifecycle rule: %s", full, e)

        clean_up(partial(within, own, attempts), within=dl.remaining())

    def head(self, key: str) -> ObjectMeta:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except S3_ERRORS as e:
            raise wrap_error(e, "head", key) from e
        what = f"head {key}"
        size, when = field(r, "ContentLength", what), field(r, "LastModified", what)
        return ObjectMeta(key, size, _etag(r.get("ETag")), when.timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        try:
            what = f"list {prefix or '(the store root)'}"
            for page in pages:
                field(page, "IsTruncated", what)  # every S3 listing says
                for o in page.get("Contents", []):
                    if not is_key(key := self._strip(field(o, "Key", what))):
                        continue  # not an object of ours (base.is_key)
                    yield ObjectMeta(
                        key,
                        field(o, "Size", what),
                        _etag(o.get("ETag")),
                        field(o, "LastModified", what).timestamp(),
                    )
        except S3_ERRORS as e:
            raise wrap_error(e, "list", prefix) from e

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full, Delimiter="/"
        )
        try:
            what = f"list {prefix or '(the store root)'}"
            found = [
                field(p, "Prefix", what)
                for page in pages
                if field(page, "IsTruncated", what) is not None
                for p in page.get("CommonPrefixes", [])
            ]
        except S3_ERRORS as e:
            raise wrap_error(e, "list", prefix) from e
        return sorted(p[len(full) :].rstrip("/") for p in found)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except S3_ERRORS as e:
            raise wrap_error(e, "delete", key) from e

    def delete_many(self, keys: builtins.list[str]) -> None:
        """DeleteObjects in batches of 1,000 keys: one request instead of one per key."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": batch, "Quiet": True},  # type: ignore[typeddict-item]
                )
            except S3_ERRORS as e:
                raise wrap_error(e, "delete", keys[i]) from e
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise BackendUnavailableError(f"delete {first.get('Key')}: {first.get('Code')}")
