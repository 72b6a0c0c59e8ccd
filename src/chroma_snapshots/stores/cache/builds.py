"""How the cache writes a version's files: a new version (built fresh, or patched from a
retired one) or chosen chunks of a cached one (a repair, a private copy), each chunk from the
cached versions where it verifies, the rest from the inner store. Apart from store.py, which
decides what a checkout is served."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from chroma_snapshots.engine.beneath import FileId, FolderId
from chroma_snapshots.engine.cleanup import clean_up, interrupts_held
from chroma_snapshots.engine.deadline import Deadline, call_off_if_interrupt
from chroma_snapshots.engine.folders import Made, landed, new_folder
from chroma_snapshots.engine.models import Manifest
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.transfer import LocalChunks, Placement
from chroma_snapshots.stores.base import SourceStore
from chroma_snapshots.stores.cache.patch import plan_patch, take_retired
from chroma_snapshots.stores.cache.pins import Pin
from chroma_snapshots.stores.cache.room import claim_build, end_build
from chroma_snapshots.stores.cache.space import CacheSpace

_REUSE_FROM = 3  # newest cached versions offered as local chunk sources


class CacheBuilds(CacheSpace):
    """The writing half of a CachedStore (see its ``patch_in_place``)."""

    inner: SourceStore
    stale_ok: bool
    patch_in_place: bool

    def _from_cache(
        self,
        name: str,
        version: str,
        manifest: Manifest,
        target: tuple[Path, FolderId | None],
        dl: Deadline,
        stats: StatsRecorder,
        only: dict[str, list[int]] | None = None,
        stamped: bool = False,
    ) -> str:
        """Write ``manifest``'s chunks (``only`` those) under ``target``: from the cached
        tree of ``version`` (``stamped``: its files whose stamps hold are copied unread)
        and the other cached versions where they verify, the rest downloaded. Returns where
        the bytes came from."""
        d = self.dirs(name)
        with self._local_chunks(name, version) as local:
            stamps = d.read_stamps(version) if stamped else None
            local.add_tree(d.tree(version), manifest, stamps=stamps)  # the rest read verified
            job = Placement(target[0], manifest, reuse=local, only=only, root_id=target[1])
            before = stats.freeze(0).bytes_downloaded
            served = self.inner.materialize(name, job, dl, stats)
        # nothing downloaded: the cached copies served it all, not the store that was asked
        return served if stats.freeze(0).bytes_downloaded > before else "cache"

    @contextmanager
    def _local_chunks(self, name: str, exclude: str) -> Iterator[LocalChunks]:
        """Chunks of the newest other cached versions. They are not pinned: a version that
        another process evicts meanwhile costs downloads, never a wrong byte (every local
        read is verified), and pins here would keep evictions from making room."""
        d = self.dirs(name)
        local = LocalChunks()
        try:
            # newest first: its intact files lend their unchanged runs (engine/localcopy.py)
            for v in [v for v in d.complete() if v != exclude][-_REUSE_FROM:][::-1]:
                if (m := self.cached_manifest(name, v)) is not None:
                    local.add_tree(d.tree(v), m, stamps=d.read_stamps(v))
            yield local
        finally:
            local.close()

    def _materialize(
        self,
        name: str,
        version: str,
        manifest: Manifest,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None,
    ) -> str:
        d = self.dirs(name)
        made: Made | None = None  # the work folder, held open while it is ours to use
        room: Pin | None = None  # this build's claim on the cache's room
        try:
            # stale_ok may have to serve any version a ref named earlier: keep them all
            patch = self.patch_in_place and not self.stale_ok
            with self._room(dl):  # others count the retired version or this claim, never neither
                old = take_retired(d, version, d.work_path(version)) if patch else None
                # what must land, not a folder swapped in (made after: a retired version is
                # renamed onto nothing, so no empty folder of another's can be replaced);
                # either is named for itself, so that a clean-up after a kill takes only it
                made = new_folder(d.work_path(version)) if old is None else old.made
                base = 0 if old is None else old.manifest.total_size
                # the retired version's bytes are no longer in usage() but still on disk
                need = max(0, manifest.total_size - base)
                self._make_room(need, (name, version), held=base, building=made.path)
                room = claim_build(d, version, manifest.total_size)
            work, built = made.path, made.id
            with self._local_chunks(name, version) as local:
                check = partial(dl.check, "checking the cached files")
                files: dict[str, FileId] = {}  # each file as the build left it
                only = None if old is None else plan_patch(work, old, manifest, stats, check, files)
                if old is not None:  # its chunks about to be overwritten are delta bases
                    local.add_tree(work, old.manifest)  # (verified: a torn read costs a GET)
                job = Placement(work, manifest, reuse=local, only=only, root_id=built, made=files)
                source = self.inner.materialize(name, job, dl, stats, progress)
            d.write_meta(version, work, manifest, files)  # each file still the one left there
            d.folder("versions")
            os.replace(work, d.tree(version))
            landed(d.tree(version), work, built, partial(d.drop_meta, version))
        except BaseException as e:
            with interrupts_held():
                call_off_if_interrupt(dl, e)  # the reads still running stop at their next check
                if made is not None:  # (checkout maps a full disk to CacheFullError)
                    held, made = made, None  # removed, then closed, maybe past the call's end
                    clean_up(held.remove, dl.remaining())
            raise
        finally:
            with interrupts_held():
                if made is not None:
                    made.close()
                if room is not None:  # landed (counted by its manifest now) or given up
                    end_build(d, room)
        with self._mlock:
            self._manifests[(name, version)] = manifest
        return source
