"""The small object-storage surface every backend implements.

Like zarr's ``Store``: five required methods (``get``, ``put``, ``head``,
``list``, ``delete``); everything else is derived and may be overridden where a
backend has a faster native path.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

from chroma_snapshots.engine.apart import Place
from chroma_snapshots.engine.validation import check_relpath
from chroma_snapshots.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SnapshotError,
    SnapshotNotFoundError,
)


@dataclass(frozen=True)
class PutMode:
    """How ``put`` treats an existing object (after obstore's ``PutMode``).

    ``PutMode.OVERWRITE`` replaces unconditionally, ``PutMode.CREATE`` fails with
    ConflictError if the key exists, ``PutMode.update(etag)`` fails with
    ConflictError unless the object's current ETag is ``etag``.
    """

    kind: Literal["overwrite", "create", "update"]
    etag: str | None = None

    OVERWRITE: ClassVar[PutMode]
    CREATE: ClassVar[PutMode]

    @staticmethod
    def update(etag: str) -> PutMode:
        """Compare-and-swap against the ETag a previous ``get``/``head`` returned."""
        if not etag:
            raise InvalidInputError("PutMode.update needs a non-empty etag")
        return PutMode("update", etag)


PutMode.OVERWRITE = PutMode("overwrite")
PutMode.CREATE = PutMode("create")


@dataclass(frozen=True)
class ObjectMeta:
    """An object's key, size, ETag (opaque version token) and modification time (epoch s)."""

    key: str
    size: int
    etag: str
    last_modified: float


@dataclass(frozen=True)
class GetResult:
    """Bytes read together with the metadata of the exact object version they came from."""

    data: bytes
    meta: ObjectMeta


def is_key(key: str) -> bool:
    """True if ``key`` is one this library can name (:func:`check_key`). A listing leaves
    the others out: an S3 console's folder object (``n/gc/``) or a key with ``//`` is never
    one of ours, cannot be read or deleted through a backend, and once listed stopped every
    command that reads its folder for good."""
    try:
        check_key(key)
    except InvalidInputError:
        return False
    return True


def check_key(key: str) -> str:
    """Validate an object key (relative POSIX path); InvalidInputError otherwise."""
    try:
        check_relpath(key, "key")
    except IntegrityError as e:
        raise InvalidInputError(str(e)) from e
    if any(part.startswith(".") for part in key.split("/")):
        # Dot-names are reserved for backends' temp files and locks.
        raise InvalidInputError(f"key {key!r}: components may not start with '.'")
    return key


def put_error(err: SnapshotError, key: str, mode: PutMode) -> SnapshotError:
    """The error a failed put reports: an update of a missing key lost its compare-and-swap."""
    if mode.kind == "update" and isinstance(err, SnapshotNotFoundError):
        return ConflictError(f"{key} does not exist (expected etag {mode.etag})")
    return err


def past_end(key: str, start: int) -> IntegrityError:
    """The error for a range read that starts at or past the end of an object (S3: HTTP 416):
    the object is shorter than whoever asked (a manifest) says, so it is damaged."""
    return IntegrityError(f"{key} ends before byte {start}: shorter than the manifest says")


def range_refused(err: BaseException) -> bool:
    """True for S3's answer to a range that starts past the end (416 InvalidRange), from
    botocore directly or wrapped by s3fs (the ClientError is then the ``__cause__``)."""
    for e in (err, err.__cause__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and (
            resp.get("Error", {}).get("Code") == "InvalidRange"
            or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416
        ):
            return True
    return False


class Backend(ABC):
    """Object storage addressed by ``/``-separated keys relative to the backend's root."""

    @abstractmethod
    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        """Read an object, or bytes ``[start, end)`` of it. SnapshotNotFoundError if absent."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        """Write an object atomically: readers see the old or the new bytes, never a mix."""

    @abstractmethod
    def head(self, key: str) -> ObjectMeta:
        """Metadata of an object. SnapshotNotFoundError if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing object is not an error."""

    # Derived operations.

    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""
        try:
            self.head(key)
        except SnapshotNotFoundError:
            return False
        return True

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        """Read bytes ``[start, end)`` of an object into ``buf``; returns how many arrived.

        Backends that can stream into caller memory override this: a checkout then reuses
        one buffer per worker instead of allocating (and faulting in) every read afresh."""
        data = self.get(key, byte_range=byte_range).data
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        return n

    def delete_many(self, keys: builtins.list[str]) -> None:
        """Remove several objects (a backend with a batch call overrides this)."""
        for key in keys:
            self.delete(key)

    def sweep_temp(self, prefix: str, before: float, remove: bool = True) -> int:
        """Remove what writers killed mid-write left below ``prefix`` (temp files last
        written before ``before``, a time by the storage's clock, as ``ObjectMeta``'s
        ``last_modified``); how many (``remove=False``: only count). Object stores write
        atomically and leave nothing: 0."""
        return 0

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Distinct next path components below ``prefix`` (``""`` or ending in ``/``)."""
        names = {m.key[len(prefix) :].split("/", 1)[0] for m in self.list(prefix)}
        return sorted(n for n in names if n)

    def place(self) -> str:
        """One spelling of where the objects are, whatever the backend was made from: a
        store's cache folder is keyed by it (default: the backend's repr)."""
        return repr(self)

    def folder(self) -> Place | None:
        """The folder on this machine holding the objects as files, if they are, as the
        kernel knows it (engine/apart.py: a publish refuses a source folder that overlaps
        it); None for object stores. Known without touching the folder once the store
        has seen it: it may be on a mount that hangs."""
        return None

    def mark(self) -> None:  # noqa: B027 - optional hook, object stores have no folder
        """Put back the marker of :meth:`folder` if it is missing (engine/apart.py: the
        walk of a publish's source refuses it wherever it meets it). A publish calls it
        for every folder it keeps out, before it reads the source; the backend's error if
        it cannot (the publish then fails rather than go ahead unguarded)."""

    def known_folder(self) -> Place | None:
        """:meth:`folder` if known without asking anything: None for object stores, and
        for a folder on a mount that has not answered since the store opened."""
        return self.folder()

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections and threads."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
