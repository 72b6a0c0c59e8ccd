"""Object operations on a directory: the work behind FileBackend.

``LocalFiles`` is small and picklable so that, on a network mount, a guard can
run its methods in a child process it can abandon (see ``guard``). Writes go to
a unique temp file beside the target and are published with ``os.replace``
(overwrite) or ``os.link`` (create: atomic "fail if exists" on POSIX and NFS).
Compare-and-swap updates are serialized with a lock file under ``.locks/`` so
they never show up as keys.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from chroma_snapshots.backends.base import GetResult, ObjectMeta, PutMode, check_key, past_end
from chroma_snapshots.engine.apart import STORE_MARKER, Place, place_of
from chroma_snapshots.engine.placer import pwrite_all
from chroma_snapshots.engine.validation import MAX_PATH_DEPTH
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SnapshotError,
    SnapshotNotFoundError,
    StoreNotFoundError,
)

_RESERVED = "."  # names starting with this are temp files and locks, never keys
_TEMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # put's temp files: .NAME.UUIDHEX.tmp


def _meta(key: str, st: os.stat_result) -> ObjectMeta:
    # inode changes with every replace/link, mtime_ns and size catch in-place edits.
    etag = f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
    return ObjectMeta(key, st.st_size, etag, st.st_mtime)


def _wrap(err: OSError, op: str, key: str, root: Path | None = None) -> SnapshotError:
    if isinstance(err, FileNotFoundError) or err.errno == errno.ENOTDIR:
        if root is not None and not root.is_dir():  # not an absent object: an absent store
            return StoreNotFoundError(f"{root}: store directory does not exist (unmounted?)")
        return SnapshotNotFoundError(f"{key}: no such object")
    if err.errno == errno.ELOOP:
        return IntegrityError(f"{key} is a symbolic link: objects are files this library wrote")
    name = errno.errorcode.get(err.errno or 0, "error")
    return BackendUnavailableError(f"{op} {key}: {name} ({err.strerror})")


def _object(path: str, flags: int) -> int:
    """``open``'s opener for objects: a link planted at an object's key is not followed (it
    could name any file this process can read, outside the store). A FIFO is opened as it
    is: its open blocks, as a read on a hung mount does, and the guard or the deadline
    ends it (the demo's hung mount is one)."""
    return os.open(path, flags | os.O_NOFOLLOW)


def _read_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; fewer bytes only at the end of the file (a read may
    return less than asked before the end: after a signal, on a network mount)."""
    got = 0
    while got < len(buf) and (n := os.preadv(fd, [buf[got:]], offset + got)):
        got += n
    return got


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes from ``offset``, or up to the end of the file (see :func:`_read_into`);
    one read and no copy in the usual case."""
    parts: list[bytes] = []
    got = 0
    while got < size and (part := os.pread(fd, size - got, offset + got)):
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class LocalFiles:
    """Objects as files below ``root``; ``fsync`` makes writes durable before they are visible."""

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def ensure_root(self, create: bool) -> Place:
        """Create the store directory, or (``create=False``) insist that it exists, and
        mark it; what the kernel says it is (engine/apart.py), found here, where a hung
        mount is guarded."""
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a file where a folder must be
                raise InvalidInputError(
                    f"{self.root}: a file is in the way of the store's folder: name a folder"
                ) from None
            except OSError as e:  # e.g. read-only: a store failure, not a raw OSError
                raise _wrap(e, "creating the store directory", str(self.root)) from e
        elif not self.root.is_dir():
            raise StoreNotFoundError(f"{self.root}: store directory does not exist")
        self.mark()
        return place_of(self.root)

    def mark(self, must: bool = False) -> None:
        """Put the store's marker in its folder if it is not there (engine/apart.py: a
        publish refuses a source holding it). An entry of the marker's name that is no
        file stays (a publish's walk refuses any entry of that name). A folder this
        process may not write (a read-only mount) stays as it is, unless ``must`` (a
        publish, which then fails with the error rather than publish unguarded)."""
        path = self.root / STORE_MARKER
        if os.path.lexists(path):
            return
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644))
        except OSError as e:
            if must:
                raise _wrap(e, "writing the store's marker", STORE_MARKER, self.root) from e

    def probe(self) -> None:
        """Cheap health check: stat and list the root."""
        try:
            os.stat(self.root)
            os.listdir(self.root)
        except OSError as e:
            raise _wrap(e, "probe", str(self.root)) from e

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        try:
            with open(self._path(key), "rb", opener=_object) as f:
                meta = _meta(key, os.fstat(f.fileno()))
                if byte_range is None:
                    return GetResult(f.read(), meta)
                start, end = byte_range
                if start >= meta.size and end > start:
                    raise past_end(key, start)
                # never more than the file holds: a read asked for "up to a limit" (a ref,
                # a manifest) must not allocate the limit
                want = max(0, min(end, meta.size) - start)
                return GetResult(_pread_all(f.fileno(), want, start), meta)
        except IsADirectoryError:
            raise SnapshotNotFoundError(f"{key}: no such object") from None
        except OSError as e:
            raise _wrap(e, "get", key, self.root) from e

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        """Bytes ``[start, end)`` of ``key`` read straight into ``buf``."""
        start, end = byte_range
        try:
            want = max(0, min(end - start, len(buf)))
            with open(self._path(key), "rb", opener=_object) as f:
                n = _read_into(f.fileno(), buf[:want], start)
        except IsADirectoryError:
            raise SnapshotNotFoundError(f"{key}: no such object") from None
        except OSError as e:
            raise _wrap(e, "get", key, self.root) from e
        if n == 0 and want:  # nothing at all: the object ends before ``start``
            raise past_end(key, start)
        return n

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{_RESERVED}{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                meta = self._write_tmp(key, tmp, data)
                self._publish(key, tmp, path, mode)
            finally:
                tmp.unlink(missing_ok=True)
        except SnapshotError:  # said already (a lock file in the way)
            raise
        except OSError as e:
            raise _wrap(e, "put", key) from e
        return meta

    def _write_tmp(self, key: str, tmp: Path, data: bytes) -> ObjectMeta:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            pwrite_all(fd, [data], 0, len(data))  # a short write continues or raises
            if self.fsync:
                os.fsync(fd)
            return _meta(key, os.fstat(fd))
        finally:
            os.close(fd)  # raises too if it fails: a network mount reports late errors here

    def _publish(self, key: str, tmp: Path, path: Path, mode: PutMode) -> None:
        if mode.kind == "overwrite":
            os.replace(tmp, path)
        elif mode.kind == "create":
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConflictError(f"{key} already exists") from None
        else:
            with self._locked(key):
                try:
                    current = _meta(key, path.stat()).etag
                except FileNotFoundError:
                    raise ConflictError(
                        f"{key} does not exist (expected etag {mode.etag})"
                    ) from None
                if current != mode.etag:
                    raise ConflictError(f"{key} changed: etag {current} != {mode.etag}")
                os.replace(tmp, path)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """``key``'s compare-and-swap lock, held. A lock file that cannot be taken (a link
        or a folder planted there) is named as itself: it was reported as the object."""
        lock = self._lock_path(key)
        try:
            held = FileLock(lock)
            held.acquire()
        except OSError as e:
            raise _wrap(e, "locking", f"{key}'s lock file {lock.name} in .locks") from e
        try:
            yield
        finally:
            held.release()

    def _lock_path(self, key: str) -> Path:
        locks = self.root / f"{_RESERVED}locks"
        locks.mkdir(exist_ok=True)
        return locks / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")

    def head(self, key: str) -> ObjectMeta:
        path = self._path(key)
        try:
            st = path.stat()
        except OSError as e:
            raise _wrap(e, "head", key) from e
        if not path.is_file():
            raise SnapshotNotFoundError(f"{key}: no such object")
        return _meta(key, st)

    def list(self, prefix: str = "") -> builtins.list[ObjectMeta]:
        # Walk only below the deepest directory the prefix names.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root / base if base else self.root
        try:
            return list(self._walk(top, prefix))
        except OSError as e:
            raise _wrap(e, "list", prefix) from e

    def _walk(self, top: Path, prefix: str) -> Iterator[ObjectMeta]:
        if not top.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(top):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            # no key is deeper than MAX_PATH_DEPTH: stop there (os.walk recurses per level)
            deep = rel != "." and rel.count("/") + 2 > MAX_PATH_DEPTH
            dirnames[:] = [] if deep else [d for d in dirnames if not d.startswith(_RESERVED)]
            for fn in filenames:
                if fn.startswith(_RESERVED):
                    continue
                key = fn if rel == "." else f"{rel}/{fn}"
                if key.startswith(prefix):
                    try:
                        yield _meta(key, os.stat(os.path.join(dirpath, fn)))
                    except FileNotFoundError:
                        continue  # deleted while listing

    def sweep_temp(self, prefix: str, before: float, remove: bool = True) -> int:
        """Remove the temp files (``.NAME.HEX.tmp``) below ``prefix`` that a writer killed
        between writing and renaming left, last written before ``before`` (the storage's
        time: a live writer renames its own within a request's time); with ``remove``
        false, only count them."""
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root / base if base else self.root
        swept = 0
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(_RESERVED)]
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                if not _TEMP.fullmatch(fn):  # only what put names its temp files
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_mtime < before:
                        if remove:
                            os.unlink(path)
                        swept += 1
        return swept

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise _wrap(e, "delete", key) from e
