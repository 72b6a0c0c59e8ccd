"""A directory on local disk or a network mount (EFS/NFS) as a backend.

On a local disk the operations run in the caller's thread. On a network mount
pass a :class:`~chroma_snapshots.engine.guard.MountGuard`: every operation then runs in
an abandonable worker process, so a hung mount costs a bounded timeout and a
fast failure, never a hung caller (``efs://`` URLs do this).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chroma_snapshots.backends.base import Backend, GetResult, ObjectMeta, PutMode
from chroma_snapshots.backends.fileops import LocalFiles
from chroma_snapshots.engine.apart import Place
from chroma_snapshots.engine.deadline import Deadline, current_deadline
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.errors import BackendUnavailableError, StorageTimeoutError

log = logging.getLogger(__name__)
# How long asking a guarded mount for the store's folder waits (opening the store, and a
# publish asking before it reads its source): a store whose mount has not answered by then
# opens anyway, unknown, so that a FallbackStore (or a cache serving stale) made in a
# Lambda's init still serves from its other store, and a publish through a FallbackStore
# loses at most this much to a mirror that hangs. A mount that answers does so in ms.
OPEN_SECONDS = 2.0


def local_place(root: str | os.PathLike[str]) -> str:
    """Where a local store at ``root`` is (Backend.place): a path, a ``file://`` or
    ``efs://`` URL and a FileBackend of the same folder are one store, with one cache."""
    return f"file://{os.path.abspath(root)}"


class FileBackend(Backend):
    """Objects as files below ``root``.

    ``fsync`` makes writes durable before they become visible; ``create=False``
    insists that the directory exists (a missing mount is an error, not an empty
    store); ``guard`` runs every call through a hang guard.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        create: bool = True,
        guard: MountGuard | None = None,
    ) -> None:
        self.root = Path(os.path.abspath(root))  # fixed now: a later chdir moves nothing
        self.guard = guard
        self._create = create
        self._files = LocalFiles(self.root, fsync)
        # known once, through the guard: comparing folders later touches no mount
        self._place: Place | None = None
        try:
            self._learn(current_deadline(), OPEN_SECONDS)  # the caller's, if sooner
        except (StorageTimeoutError, BackendUnavailableError) as e:
            if guard is None:
                raise
            log.warning("opening %s: the mount did not answer; asking again when needed: %s",
                        self.root, e)  # fmt: skip

    def __repr__(self) -> str:
        return f"FileBackend({str(self.root)!r})"

    def place(self) -> str:
        return local_place(self.root)

    def folder(self) -> Place:
        """As Backend.folder; on a mount that did not answer when the store opened, asked
        now (within the caller's deadline, at most OPEN_SECONDS): StorageTimeoutError while
        it still does not."""
        return self._place or self._learn(current_deadline(), OPEN_SECONDS)

    def known_folder(self) -> Place | None:
        return self._place

    def _learn(self, deadline: Deadline | None, timeout: float | None = None) -> Place:
        """Make sure the store's folder exists (``create``: make it) and learn what it is;
        StoreNotFoundError if it is missing. Every call waits for this first: a store on a
        mount that was missing is never read as an empty one."""
        place: Place = self._call("ensure_root", (self._create,), deadline, timeout=timeout)
        self._place = place
        return place

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._place is None:
            self._learn(current_deadline())
        return self._call(method, args, current_deadline(), **kwargs)

    def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        deadline: Deadline | None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.guard is None:
            return getattr(self._files, method)(*args, **kwargs)
        what = f"{method} {args[0] if args else ''}"
        return self.guard.run(
            self._files, method, *args, deadline=deadline, what=what, timeout=timeout, **kwargs
        )

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        result: GetResult = self._run("get", key, byte_range=byte_range)
        return result

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        if self.guard is not None:  # the guard's worker process hands back bytes
            return super().get_into(key, byte_range, buf)
        return self._files.get_into(key, byte_range, buf)

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        meta: ObjectMeta = self._run("put", key, data, mode=mode)
        return meta

    def head(self, key: str) -> ObjectMeta:
        meta: ObjectMeta = self._run("head", key)
        return meta

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        found: list[ObjectMeta] = self._run("list", prefix)
        return iter(found)

    def delete(self, key: str) -> None:
        self._run("delete", key)

    def sweep_temp(self, prefix: str, before: float, remove: bool = True) -> int:
        swept: int = self._run("sweep_temp", prefix, before, remove)
        return swept

    def probe(self) -> None:
        """Stat and list the root (through the guard when there is one)."""
        self._run("probe")

    def mark(self) -> None:
        """As Backend.mark, through the guard when there is one."""
        self._run("mark", True)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
