"""Wrappers: ``DelegatingStore`` passes every call of a SnapshotStore to the one it wraps,
``DelegatingSourceStore`` every call of a source store (so that it can sit under a cache
or in a FallbackStore); a wrapper overrides only what it changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from chroma_snapshots.engine.apart import Place
from chroma_snapshots.engine.deadline import Deadline, DeadlineLike
from chroma_snapshots.engine.models import Manifest, RefValue, SnapshotInfo
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.stores.base import (
    LATEST,
    Expected,
    LocalSnapshot,
    PruneReport,
    SnapshotStore,
    SourceStore,
    VerifyReport,
)

if TYPE_CHECKING:
    from chroma_snapshots.engine.transfer import Placement
    from chroma_snapshots.stores.upload import ParentDir


class DelegatingStore(SnapshotStore):
    """A store that passes everything to ``inner``; wrappers override what they change."""

    def __init__(self, inner: SnapshotStore) -> None:
        self.inner = inner

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
        return self.inner.publish(
            name, source_dir, expected=expected, message=message, metadata=metadata,
            deadline=deadline, progress=progress, allow_empty=allow_empty,
        )  # fmt: skip

    def resolve(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> SnapshotInfo:
        return self.inner.resolve(name, ref, deadline=deadline)

    def checkout(
        self,
        name: str,
        ref: str = "latest",
        dest: str | Path | None = None,
        *,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
    ) -> LocalSnapshot:
        return self.inner.checkout(name, ref, dest, deadline=deadline, progress=progress)

    def load_manifest(self, name: str, version: str, *, deadline: DeadlineLike = None) -> Manifest:
        return self.inner.load_manifest(name, version, deadline=deadline)

    def current_version(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[str, bool]:
        return self.inner.current_version(name, ref, deadline=deadline)

    def recent_ref(self, name: str, ref: str = "latest") -> str | None:
        return self.inner.recent_ref(name, ref)

    def versions(self, name: str, *, deadline: DeadlineLike = None) -> Iterator[SnapshotInfo]:
        return self.inner.versions(name, deadline=deadline)

    def names(self, *, deadline: DeadlineLike = None) -> Iterator[str]:
        return self.inner.names(deadline=deadline)

    def refs(self, name: str, *, deadline: DeadlineLike = None) -> dict[str, str]:
        return self.inner.refs(name, deadline=deadline)

    def set_ref(
        self,
        name: str,
        ref: str,
        version: str,
        *,
        expected: Expected,
        deadline: DeadlineLike = None,
    ) -> None:
        self.inner.set_ref(name, ref, version, expected=expected, deadline=deadline)

    def verify(self, name: str, version: str, *, deadline: DeadlineLike = None) -> VerifyReport:
        return self.inner.verify(name, version, deadline=deadline)

    def prune(
        self,
        name: str,
        *,
        keep_last: int = 10,
        min_age: float = 3600.0,
        dry_run: bool = False,
        deadline: DeadlineLike = None,
    ) -> PruneReport:
        return self.inner.prune(
            name, keep_last=keep_last, min_age=min_age, dry_run=dry_run, deadline=deadline
        )

    def close(self) -> None:
        self.inner.close()


class DelegatingSourceStore(DelegatingStore, SourceStore):
    """A DelegatingStore around a source store that is one too: refs, placements and
    publishes with a parent copy pass through, as do its label, trust and timeout."""

    inner: SourceStore

    def __init__(self, inner: SourceStore) -> None:
        super().__init__(inner)
        self.label, self.trust, self.identity = inner.label, inner.trust, inner.identity
        self.default_timeout = inner.default_timeout

    @property
    def folders(self) -> tuple[Place, ...]:
        return self.inner.folders

    def read_ref(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[RefValue, str] | None:
        return self.inner.read_ref(name, ref, deadline=deadline)

    def read_current(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[tuple[RefValue, str] | None, SnapshotError | None]:
        return self.inner.read_current(name, ref, deadline=deadline)

    def materialize(
        self,
        name: str,
        job: Placement,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None = None,
    ) -> str:
        return self.inner.materialize(name, job, dl, stats, progress)

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
        return self.inner.publish(
            name, source_dir, expected=expected, message=message, metadata=metadata,
            deadline=deadline, progress=progress, allow_empty=allow_empty, parent_dir=parent_dir,
        )  # fmt: skip
