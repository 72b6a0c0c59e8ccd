"""``RemoteStore``: the SnapshotStore on any Backend (S3, a mounted filesystem, fsspec).

The layout below the backend's root is :mod:`chroma_snapshots.engine.keys`.
Publish order is packs, then manifest, then ref, so a reader that sees a ref
always finds a complete manifest and every pack it names.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.apart import Place, store_folder
from chroma_snapshots.engine.chunkids import IdScheme, history, publish_scheme
from chroma_snapshots.engine.chunking import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_TARGET
from chroma_snapshots.engine.deadline import (
    Deadline,
    DeadlineLike,
    as_deadline,
    within,
)
from chroma_snapshots.engine.keys import manifest_key
from chroma_snapshots.engine.localfs import build_at
from chroma_snapshots.engine.models import (
    MANIFEST_FORMAT,
    Manifest,
    RefValue,
    SnapshotInfo,
    VersionId,
)
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.scratch import discard_scratch
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.engine.source import scan_source
from chroma_snapshots.engine.transfer import Placement
from chroma_snapshots.engine.validation import (
    MAX_MANIFEST_BYTES,
    MAX_REF_BYTES,
    check_chunk_size,
    check_flags,
    check_name,
    check_source,
    utc_now,
)
from chroma_snapshots.errors import (
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
)
from chroma_snapshots.stores import claims, refs
from chroma_snapshots.stores.base import (
    LATEST,
    Expected,
    LocalSnapshot,
    SourceStore,
)
from chroma_snapshots.stores.claims import Pin
from chroma_snapshots.stores.fetch import fetch_into
from chroma_snapshots.stores.listing import RemoteListing
from chroma_snapshots.stores.publish_input import (
    check_apart,
    checked_message,
    checked_metadata,
    checked_source,
    publisher_id,
    same_tree,
)
from chroma_snapshots.stores.settings import check_parent_dir, check_settings
from chroma_snapshots.stores.upload import ParentDir, Uploader, delta_bases

log = logging.getLogger(__name__)


class RemoteStore(RemoteListing, SourceStore):
    """Snapshots stored on ``backend``.

    ``chunk_size`` and ``compression_level`` (None: store raw) apply to new
    publishes; readers take both from each manifest. ``manifest_format`` 2 (compact, with
    delta chunks) is the default; 1 writes manifests readers before format 2 can read
    (and no deltas), for a rolling upgrade. ``default_timeout`` is the
    deadline (seconds) of calls made with ``deadline=None``. ``workers`` is the most
    ranged reads (into one reused buffer per worker) a checkout runs at once: it starts
    with 4 and doubles while the streams carry 25% more (engine/ramp.py; on loopback 4
    carry as much as 8 for less CPU, against S3 each stream adds). 8 fill a Lambda's
    network and keep a 3 GiB checkout near 260 MB of memory (16 measured 410 MB and no
    faster; benchmarks/RESULTS.md). ``trust_stamps=False``
    makes every publish re-read every file instead of trusting the folder's stamp index
    (engine.stampindex; the threat model is in docs/SECURITY.md). ``chunk_hash`` names
    new chunks: "blake3" (a quarter of sha256's CPU on every read) or "sha256" (format
    1's only one); by default a publish keeps its parent's hash, and a first one takes
    BLAKE3. A publish reuses none of a parent's chunks of the other hash (a switch moves
    every chunk once; engine.chunkids). ``drop_behind=True`` drops what a checkout (or a
    cache's build) writes from the page cache as it goes: for a snapshot larger than the
    memory that would cache it, or a VM whose freshly used memory is slow (engine/dropbehind.py);
    a reader then reads from disk. ``label`` names the
    store in messages and, with ``identity``, keys a cache's folder; by default the
    folder is keyed by where the backend's objects are (``Backend.place``).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pack_target: int = DEFAULT_PACK_TARGET,
        compression_level: int | None = 3,
        workers: int = 8,
        default_timeout: float = 600.0,
        label: str | None = None,
        signer: Signer | None = None,
        manifest_format: int = MANIFEST_FORMAT,
        identity: str | None = None,
        trust_stamps: bool = True,
        chunk_hash: str | None = None,
        drop_behind: bool = False,
    ) -> None:
        if type(manifest_format) is not int or manifest_format not in (1, MANIFEST_FORMAT):
            raise InvalidInputError(f"manifest_format must be 1 or {MANIFEST_FORMAT}")
        publish_scheme(chunk_hash, manifest_format)  # refuses a wrong one now
        self.chunk_hash = chunk_hash
        check_settings(workers, pack_target, compression_level, default_timeout)
        check_flags({"trust_stamps": trust_stamps, "drop_behind": drop_behind})
        self.manifest_format = manifest_format
        self.trust_stamps, self.drop_behind = trust_stamps, drop_behind
        self.backend = backend
        self.label = label or repr(backend)
        # a label given names the store (two backends, one store); else where its objects
        # are: one cache per store, however it was named
        self.identity = identity or label or backend.place()
        self.signer = signer
        self.trust = signer.fingerprint if signer is not None else ""
        self.chunk_size = check_chunk_size(chunk_size)
        self.pack_target = pack_target
        self.compression_level = compression_level
        self.default_timeout = default_timeout
        self.workers = workers  # each call that runs requests in parallel has its own pool
        self._generations: dict[str, int] = {}  # highest generation seen per ref key

    def __repr__(self) -> str:
        return f"RemoteStore({self.backend!r})"

    @property
    def folders(self) -> tuple[Place, ...]:
        here = self.backend.known_folder()
        return () if here is None else (here,)

    def close(self) -> None:
        self.backend.close()

    # Reading refs and manifests.

    def _io(self, deadline: DeadlineLike) -> DeadlineBackend:
        return DeadlineBackend(self.backend, as_deadline(deadline, self.default_timeout))

    def read_ref(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> tuple[RefValue, str] | None:
        """The ref's value and ETag, or None if it does not exist."""
        return refs.read_ref(self._io(deadline), self.signer, self._generations, name, ref)

    def load_manifest(self, name: str, version: str, *, deadline: DeadlineLike = None) -> Manifest:
        """Fetch and validate a manifest, checking it belongs to ``name`` and ``version``."""
        vid = VersionId.parse(version)
        io = self._io(deadline)
        key = manifest_key(check_name(name), version)
        data = refs.get_bounded(io, key, MAX_MANIFEST_BYTES, "manifest").data
        if self.signer is not None:
            try:  # a signature is ~100 bytes: a ref's bound is plenty
                got = refs.get_bounded(io, key + ".sig", MAX_REF_BYTES, "signature")
                sig: str | None = got.data.decode("ascii", "replace")
            except SnapshotNotFoundError:
                sig = None
            self.signer.verify(f"manifest:{key}", data, sig, f"manifest {key}")
        try:
            m = manifest_v2.loads(data)
        except IntegrityError as e:  # name the object: an operator has to find it
            raise IntegrityError(f"manifest {name}/{version}: {e}") from e
        if not vid.names(data, m.created_at):
            raise IntegrityError(f"manifest {version}: content does not match its version id")
        if m.name != name:
            raise IntegrityError(f"manifest {version} belongs to {m.name!r}, not {name!r}")
        io.deadline.check(f"reading manifest {version}")  # decoding 20,000 files: ~35 ms
        return m

    def resolve(
        self, name: str, ref: str = "latest", *, deadline: DeadlineLike = None
    ) -> SnapshotInfo:
        dl = as_deadline(deadline, self.default_timeout)
        version = self.current_version(name, ref, deadline=dl)[0]
        return SnapshotInfo.from_manifest(version, self.load_manifest(name, version, deadline=dl))

    # Publishing.

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
        parent_dir: ParentDir = None,
        allow_empty: bool = False,
        stamps: bool | None = None,
    ) -> SnapshotInfo:
        """As :meth:`SnapshotStore.publish`. ``parent_dir``: a directory with a copy of the
        parent version's files (or a function from the parent's version id to one, or to
        None): chunks that changed are then stored as deltas against the parent's chunk at
        the same offset when that is under half their size. Every base read from it is
        hash-verified, so a modified copy only costs deltas. ``stamps=False``: re-read
        every file instead of trusting the stamp index for unchanged ones
        (engine.stampindex); None: the store's ``trust_stamps``."""
        with refs.MoveWatch() as watch:  # an error before the move is sent: ref_untouched
            return self._publish(
                name, source_dir, watch, expected, message, metadata, deadline, progress,
                parent_dir, allow_empty, stamps,
            )  # fmt: skip

    def _publish(
        self,
        name: str,
        source_dir: str | Path,
        watch: refs.MoveWatch,
        expected: Expected,
        message: str | None,
        metadata: dict[str, object] | None,
        deadline: DeadlineLike,
        progress: Progress | None,
        parent_dir: ParentDir,
        allow_empty: bool,
        stamps: bool | None,
    ) -> SnapshotInfo:
        check_name(name)
        check_chunk_size(self.chunk_size)  # an attribute users may set: never publish unreadable
        metadata = checked_metadata(metadata)
        message = checked_message(message)
        source_dir = checked_source(source_dir)
        check_parent_dir(parent_dir)
        check_flags({"allow_empty": allow_empty} | ({} if stamps is None else {"stamps": stamps}))
        dl = as_deadline(deadline, self.default_timeout)
        here = within(dl, self.backend.folder)  # a mount not seen yet is asked: in time
        within(dl, self.backend.mark)  # put back if removed since the store opened
        avoid = check_apart(source_dir, () if here is None else [store_folder(here)])
        t0, stats = time.monotonic(), StatsRecorder()
        with manifest_v2.collector_paused():  # an object per file, no cycle
            files, dirs = scan_source(source_dir, avoid)
        check_source(
            [f.relpath for f in files], list(dirs), [f.size for f in files], self.chunk_size
        )
        current = refs.to_move(lambda: self.read_ref(name, deadline=dl), expected)
        stats.add(requests=1)
        refs.check_expected(name, expected, current)
        refs.check_signable(self.backend, self.signer, name, "latest", current)  # before uploads
        parent = current[0].version if current else None
        # The pin covers the parent and, by its time, every pack we write after it.
        with self.pinned(name, [parent] if parent else [], dl) as pin:
            pm = self._parent_manifest(name, parent, dl) if parent else None
            level = self.compression_level
            bases = delta_bases(pm, parent, parent_dir, self.manifest_format, level)
            uploader = Uploader(self.backend, self.workers, self.chunk_size, self.pack_target,
                                self.compression_level,
                                self.trust_stamps if stamps is None else stamps,
                                bundle=self.manifest_format >= 2,
                                ids=self._scheme(name, pm, parent, dl))  # fmt: skip
            try:
                entries, chunks = uploader.upload(
                    name, files, dict(pm.chunks) if pm else {}, dl, stats, progress, pin, bases
                )
            finally:
                if bases is not None:
                    bases.close()
            pin.check_created()
            if pm is not None and parent and not allow_empty and same_tree(pm, entries, dirs):
                stats.add(requests=2)  # the pin and its release: nothing else is written
                return SnapshotInfo.from_manifest(parent, pm, stats.freeze(time.monotonic() - t0))
            manifest = Manifest(name, utc_now(), self.chunk_size, tuple(entries), chunks,
                                tuple(dirs), parent, publisher_id(), message, metadata,
                                self.manifest_format)  # fmt: skip
            version, data = self._write_manifest(manifest, dl)
            watch.sent = True
            self._move_ref(name, "latest", version, expected, current, dl, new=True)
        # pin, prune records, manifest, retirement note, ref
        stats.add(requests=4 + (current is not None), bytes_uploaded=len(data))
        return SnapshotInfo.from_manifest(version, manifest, stats.freeze(time.monotonic() - t0))

    def _write_manifest(self, manifest: Manifest, dl: Deadline) -> tuple[str, bytes]:
        """Encode ``manifest``, check it decodes as readers will, create it once (and its
        signature, before any ref can name it): (version id, bytes)."""
        with manifest_v2.collector_paused():
            data = manifest_v2.dumps(manifest)
            manifest_v2.readable_manifest(manifest.name, data)
        version = str(VersionId.for_manifest(data, manifest.created_at))
        key = manifest_key(manifest.name, version)
        claims.create_once(self._io(dl), key, data)
        if self.signer is not None:
            sig = self.signer.sign(f"manifest:{key}", data).encode()
            claims.create_once(self._io(dl), key + ".sig", sig)
        return version, data

    def _scheme(self, name: str, pm: Manifest | None, parent: str | None, dl: Deadline) -> IdScheme:
        """The hash this publish names chunks by (engine.chunkids.publish_scheme)."""
        load = partial(self.load_manifest, name, deadline=dl)
        return publish_scheme(self.chunk_hash, self.manifest_format, history(pm, parent, load))

    def _parent_manifest(self, name: str, parent: str, dl: Deadline) -> Manifest | None:
        """The parent's manifest, or None if it is damaged: the publish then reuses none of
        its chunks but still moves latest by compare-and-swap, so one damaged manifest
        never stops a name from being published again."""
        try:
            return self.load_manifest(name, parent, deadline=dl)
        except IntegrityError as e:
            log.warning("publishing %s without reuse: its latest is unreadable: %s", name, e)
            return None

    def _move_ref(
        self,
        name: str,
        ref: str,
        version: str,
        expected: Expected,
        current: tuple[RefValue, str] | None,
        dl: Deadline,
        *,
        new: bool = False,
    ) -> None:
        def reread() -> tuple[RefValue, str] | None:
            return self.read_ref(name, ref, deadline=dl)

        def parent(v: str) -> str | None:
            return self.load_manifest(name, v, deadline=dl).parent

        # a new version landed if what the ref names now descends from it (an old one: no
        # telling, what followed it descends from it anyway)
        landed = (lambda now: refs.descends(now, version, parent)) if new else None
        io = self._io(dl)
        refs.move_ref(io, self.signer, name, ref, version, expected, current, reread, landed)

    def set_ref(
        self,
        name: str,
        ref: str,
        version: str,
        *,
        expected: Expected,
        deadline: DeadlineLike = None,
    ) -> None:
        with refs.MoveWatch() as watch:
            check_name(ref, "ref name")
            dl = as_deadline(deadline, self.default_timeout)
            with self.pinned(name, [version], dl):
                # after the pin and the check: a version a prune deleted is gone by now
                self.load_manifest(name, version, deadline=dl)  # never name a broken manifest
                current = refs.to_move(lambda: self.read_ref(name, ref, deadline=dl), expected)
                refs.check_expected(f"{name}/{ref}", expected, current)
                watch.sent = True
                self._move_ref(name, ref, version, expected, current, dl)

    @contextlib.contextmanager
    def pinned(self, name: str, versions: Sequence[str], dl: Deadline) -> Iterator[Pin]:
        """Claim ``versions`` against concurrent prunes (ConflictError if one is deleting
        them) for the duration of the block; confirm they exist inside it."""
        pin = Pin(self._io(dl), check_name(name), dl)
        try:
            pin.add(versions=versions)
            pin.check(versions=versions)
            yield pin
        finally:
            pin.release()

    # Checking out.

    def checkout(
        self,
        name: str,
        ref: str = "latest",
        dest: str | Path | None = None,
        *,
        deadline: DeadlineLike = None,
        progress: Progress | None = None,
    ) -> LocalSnapshot:
        dl = as_deadline(deadline, self.default_timeout)
        t0, stats = time.monotonic(), StatsRecorder()
        version = self.current_version(name, ref, deadline=dl)[0]
        manifest = self.load_manifest(name, version, deadline=dl)
        stats.add(requests=1 if VersionId.is_version(ref) else 2)
        return build_at(
            dest,  # e.g. ENOSPC: CacheFullError, and nothing is left at dest
            lambda work, made: self.materialize(
                name, Placement(work, manifest, root_id=made), dl, stats, progress
            ),
            "writing the checkout",
            dl,
            # a failure (a Ctrl-C) before the caller has the snapshot takes the tree back
            lambda final: LocalSnapshot(
                final,
                SnapshotInfo.from_manifest(version, manifest),
                stats.freeze(time.monotonic() - t0),
                source=self.label,
                # without dest, the folder prepare_dest made is the snapshot's to release
                _release=None if dest is not None else partial(discard_scratch, final.parent),
            ),
        )

    def materialize(
        self,
        name: str,
        job: Placement,
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None = None,
    ) -> str:
        """As :meth:`SourceStore.materialize`: the downloads are coalesced range reads of
        this store's packs."""
        fetch_into(self.backend, self.workers, name, job, dl, stats, progress, self.drop_behind)
        return self.label
