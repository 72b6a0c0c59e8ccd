"""The public ``SnapshotStore`` interface and the values it returns."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from chroma_snapshots.engine.apart import Place
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike
from chroma_snapshots.engine.models import (
    Manifest,
    RefValue,
    SnapshotInfo,
    TransferStats,
    VersionId,
)
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.validation import check_name
from chroma_snapshots.errors import SnapshotError, SnapshotNotFoundError

if TYPE_CHECKING:
    from chroma_snapshots.backends.base import Backend
    from chroma_snapshots.engine.transfer import Placement
    from chroma_snapshots.stores.claims import Pin
    from chroma_snapshots.stores.upload import ParentDir


class _Sentinel(enum.Enum):
    LATEST = "LATEST"
    ANY = "ANY"


LATEST = _Sentinel.LATEST
"""``expected=LATEST``: base the publish on the ref's current value and CAS against it."""
ANY = _Sentinel.ANY
"""``expected=ANY``: explicit last-writer-wins; overwrite the ref whatever it holds."""

Expected = str | None | _Sentinel


@dataclass(frozen=True)
class LocalSnapshot:
    """A version materialized on local disk. Use as a context manager to release it."""

    path: Path
    info: SnapshotInfo
    stats: TransferStats
    stale: bool = False
    """True when the version was chosen without the source of truth: a cache served it
    because the store did not answer in time, or a FallbackStore's mirror named it."""
    source: str = ""
    """Which store the data came from (``cache`` when nothing was fetched)."""
    _release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> LocalSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Let the store reclaim this checkout (unpins a cached version)."""
        if self._release is not None:
            self._release()


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked and every problem it found (empty ``problems`` means sound)."""

    name: str
    version: str
    packs_checked: int
    chunks_checked: int
    bytes_checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class PruneReport:
    """Versions and packs removed (or, with ``dry_run``, that would be)."""

    name: str
    kept_versions: tuple[str, ...]
    deleted_versions: tuple[str, ...]
    deleted_packs: tuple[str, ...]
    freed_bytes: int
    dry_run: bool
    swept_temp_files: int = 0
    """Temp files writers killed mid-write left (file and EFS stores; over an hour old),
    removed (or, in a dry run, that a prune would remove)."""


class SnapshotStore(ABC):
    """Versioned, content-addressed snapshots of a directory, published atomically."""

    @abstractmethod
    def publish(
        self,
        name: str,
        source_dir: str | Path,
        *,
        expected: Expected = LATEST,
        message: str | None = None,
        metadata: dict[str, object] | None = None,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
        allow_empty: bool = False,
    ) -> SnapshotInfo:
        """Upload ``source_dir`` as a new version; move ``latest`` to it (CAS on ``expected``).

        Like git, a source whose files equal the latest version's makes no new version:
        the latest's info comes back and nothing moves, unless ``allow_empty``."""

    @abstractmethod
    def resolve(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> SnapshotInfo:
        """The version a ref (or version id) names. SnapshotNotFoundError if absent."""

    @abstractmethod
    def checkout(
        self,
        name: str,
        ref: str = "latest",
        dest: str | Path | None = None,
        *,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
    ) -> LocalSnapshot:
        """Materialize a version on local disk, every chunk verified.

        With ``dest``, the files are the caller's. Without it, the checkout is temporary and
        the store's: ``release()`` (or leaving the ``with`` block) reclaims it, and a cache
        may hand every caller the same read-only copy. Without a cache, it is held (one
        file descriptor) until then or the process's end; after a kill, the next temporary
        checkout removes it."""

    @abstractmethod
    def load_manifest(self, name: str, version: str, *, deadline: DeadlineLike = None) -> Manifest:
        """A version's validated manifest (files, chunks, packs)."""

    def current_version(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[str, bool]:
        """The version ``ref`` names and whether the answer is stale (a cache serving what it
        last saw because the store did not answer). A version id is its own answer, without
        a request: checkout and load_manifest find out whether it exists. Stores override
        this with a cheaper read."""
        return self.resolve(name, ref, deadline=deadline).version, False

    def recent_ref(self, name: str, ref: str = "latest") -> str | None:
        """The version ``ref`` named when this store last read it, if that answer may still
        be trusted without a request (a cache's read-consistency interval); None: ask."""
        return None

    @abstractmethod
    def versions(self, name: str, *, deadline: DeadlineLike = None) -> Iterator[SnapshotInfo]:
        """Every stored version of ``name``, newest first."""

    @abstractmethod
    def names(self, *, deadline: DeadlineLike = None) -> Iterator[str]:
        """Every snapshot name in the store."""

    @abstractmethod
    def refs(self, name: str, *, deadline: DeadlineLike = None) -> dict[str, str]:
        """Ref name -> version for ``name``."""

    @abstractmethod
    def set_ref(
        self,
        name: str,
        ref: str,
        version: str,
        *,
        expected: Expected,
        deadline: DeadlineLike = None,
    ) -> None:
        """Point ``ref`` at ``version`` (tags, rollback), compare-and-swap on ``expected``;
        ``ANY`` writes over whatever is there, also a ref that cannot be read (a repair)."""

    @abstractmethod
    def verify(self, name: str, version: str, *, deadline: DeadlineLike = None) -> VerifyReport:
        """Download and check every pack and chunk a version uses."""

    @abstractmethod
    def prune(
        self,
        name: str,
        *,
        keep_last: int = 10,
        min_age: float = 3600.0,
        dry_run: bool = False,
        deadline: DeadlineLike = None,
    ) -> PruneReport:
        """Delete old unreferenced versions, then packs no retained version uses."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""


class SourceStore(SnapshotStore):
    """A store a cache can materialize from: refs, manifests and chunk placement.

    ``label`` names the store in results and logs; ``materialize`` returns the label
    of the store that actually served the data (a FallbackStore may use another).
    """

    label: str
    default_timeout: float
    identity: str
    """Where the data lives, told apart from every other store: the folder a cache keeps
    for this store is keyed by it (an S3 URL's label leaves out the endpoint; this does not)."""
    trust: str = ""
    """What this store's data is verified with: a fingerprint of its signing keys, "" when it
    accepts unsigned data. A cache never serves data verified under one trust to another."""

    @property
    def folders(self) -> tuple[Place, ...]:
        """The folders on this machine that hold the store's objects as files: a cache's own
        folder may not overlap them (its clean-ups would take the store's files). Known
        without touching a mount: a store on a mount that has not answered since it opened
        has none known yet (nothing can be written there before it answers)."""
        return ()

    @abstractmethod
    def read_ref(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[RefValue, str] | None:
        """The ref's value and ETag, or None if it does not exist."""

    @abstractmethod
    def publish(
        self,
        name: str,
        source_dir: str | Path,
        *,
        expected: Expected = LATEST,
        message: str | None = None,
        metadata: dict[str, object] | None = None,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
        allow_empty: bool = False,
        parent_dir: ParentDir = None,
    ) -> SnapshotInfo:
        """As :meth:`SnapshotStore.publish`. ``parent_dir``: where a copy of the parent
        version's files is (a folder, or a function from the parent's version id to one or
        to None), so that changed chunks can be stored as deltas against it."""

    def read_current(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[tuple[RefValue, str] | None, SnapshotError | None]:
        """:meth:`read_ref`, and the failure that made the answer stale when it is not the
        source of truth's (a FallbackStore's mirror answering for it); None: fresh."""
        return self.read_ref(name, ref, deadline=deadline), None

    def current_version(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[str, bool]:
        """The version ``ref`` names, with one small request (the ref), and whether the
        answer is stale (see :meth:`read_current`). A ref that is neither a ref name nor
        a version id (None, bytes, a number) is InvalidInputError before any request."""
        if VersionId.is_version(check_name(ref, "ref name")):
            return ref, False
        found, outage = self.read_current(name, ref, deadline=deadline)
        if found is None:
            raise SnapshotNotFoundError(f"{name}: no ref {ref!r}")
        return found[0].version, outage is not None

    @abstractmethod
    def materialize(
        self,
        name: str,
        job: Placement,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None = None,
    ) -> str:
        """Carry out ``job`` (what to write where, and which local copies may serve
        chunks) for snapshot ``name``, every chunk verified; the label of the store that
        served the downloads."""


@runtime_checkable
class BackedStore(Protocol):
    """What prune, verify and sync need of a store kept on a Backend (RemoteStore is one):
    the backend itself, manifests, refs, and the pin that claims versions against a prune."""

    backend: Backend
    label: str
    workers: int
    default_timeout: float
    trust: str  # its signing keys' fingerprint; "" for a store that does not sign

    def load_manifest(
        self, name: str, version: str, *, deadline: DeadlineLike = None
    ) -> Manifest: ...

    def refs(self, name: str, *, deadline: DeadlineLike = None) -> dict[str, str]: ...

    def set_ref(
        self,
        name: str,
        ref: str,
        version: str,
        *,
        expected: Expected,
        deadline: DeadlineLike = None,
    ) -> None: ...

    def pinned(
        self, name: str, versions: Sequence[str], dl: Deadline
    ) -> AbstractContextManager[Pin]: ...
