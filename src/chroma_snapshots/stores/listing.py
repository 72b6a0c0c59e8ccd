"""Listing and maintenance of a RemoteStore: its versions, names and refs as the backend's
layout holds them, and verify and prune, which ops/ carries out. Apart from remote.py, which
holds the protocol of a publish and a checkout: these only read, or hand the store on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.engine import keys
from chroma_snapshots.engine.deadline import DeadlineLike, as_deadline
from chroma_snapshots.engine.models import RefValue, SnapshotInfo
from chroma_snapshots.engine.validation import check_name, is_name
from chroma_snapshots.ops import maintenance, pruning
from chroma_snapshots.stores.base import BackedStore, PruneReport, VerifyReport


class _Listed(BackedStore, Protocol):
    """The RemoteStore these methods run on, as they use it: a BackedStore (prune and verify
    take one), its backend under a deadline and its refs."""

    def _io(self, deadline: DeadlineLike) -> DeadlineBackend: ...

    def read_ref(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[RefValue, str] | None: ...


class RemoteListing:
    """The listing and maintenance half of a RemoteStore."""

    def versions(
        self: _Listed, name: str, *, deadline: DeadlineLike = None
    ) -> Iterator[SnapshotInfo]:
        dl = as_deadline(deadline, self.default_timeout)
        for version in maintenance.list_versions(self._io(dl), check_name(name)):
            yield SnapshotInfo.from_manifest(
                version, self.load_manifest(name, version, deadline=dl)
            )

    def names(self: _Listed, *, deadline: DeadlineLike = None) -> Iterator[str]:
        # Only valid snapshot names: other top-level folders (a probe's `_probes/`, files a
        # user put beside the store) are not snapshots.
        yield from (n for n in self._io(deadline).list_dirs("") if is_name(n))

    def refs(self: _Listed, name: str, *, deadline: DeadlineLike = None) -> dict[str, str]:
        dl = as_deadline(deadline, self.default_timeout)
        out = {}
        for meta in self._io(dl).list(keys.prefix(check_name(name), keys.REFS)):
            ref = meta.key.rsplit("/", 1)[1]
            found = self.read_ref(name, ref, deadline=dl)
            if found is not None:
                out[ref] = found[0].version
        return out

    def verify(
        self: _Listed, name: str, version: str, *, deadline: DeadlineLike = None
    ) -> VerifyReport:
        return maintenance.verify(self, name, version, as_deadline(deadline, self.default_timeout))

    def prune(
        self: _Listed,
        name: str,
        *,
        keep_last: int = 10,
        min_age: float = 3600.0,
        dry_run: bool = False,
        deadline: DeadlineLike = None,
    ) -> PruneReport:
        dl = as_deadline(deadline, self.default_timeout)
        return pruning.prune(
            self, name, keep_last=keep_last, min_age=min_age, dry_run=dry_run, deadline=dl
        )
