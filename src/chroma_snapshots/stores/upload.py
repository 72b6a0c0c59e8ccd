"""A publish's uploads: hash the source's chunks, pack the new ones (plain, or as deltas
against the parent's chunk at the same offset), and write each pack claimed against a
concurrent prune. The checks of its input: :mod:`stores.publish_input`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain
from pathlib import Path

from chroma_snapshots.backends.base import Backend, PutMode
from chroma_snapshots.engine.bundles import cut, read_all, small_limit
from chroma_snapshots.engine.chunkids import BLAKE3, IdScheme
from chroma_snapshots.engine.chunking import PackWriter, hashed_chunks
from chroma_snapshots.engine.deadline import Deadline, WorkerPool, wait_all, within
from chroma_snapshots.engine.delta_io import DeltaBases
from chroma_snapshots.engine.keys import pack_key
from chroma_snapshots.engine.manifest_v2 import collector_paused
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.source import SourceFile, check_still_as_scanned
from chroma_snapshots.engine.stampindex import StampIndex
from chroma_snapshots.engine.validation import (
    check_chains,
)
from chroma_snapshots.errors import ConflictError, InvalidInputError
from chroma_snapshots.stores.claims import Pin

# Below this many bytes a batch is hashed on the calling thread.
_INLINE_HASH = 1 << 20
# Where a publisher finds its parent version's files (see RemoteStore.publish).
ParentDir = str | Path | Callable[[str], "str | Path | None"] | None


@dataclass(frozen=True)
class Uploader:
    """Uploads one publish's new chunks to ``backend`` with ``workers`` threads.

    ``stamps``: trust the folder's stamp index (engine.stampindex) for files whose stamp is
    unchanged since the last publish of this folder to this store, instead of re-reading
    them; ``stamp_dir`` is where the indexes live (default: a private temp directory)."""

    backend: Backend
    workers: int
    chunk_size: int
    pack_target: int
    compression_level: int | None
    stamps: bool = True
    stamp_dir: Path | None = None
    bundle: bool = True  # small files into shared chunks (format 2 only: engine.bundles)
    # how chunks are named (engine.chunkids): BLAKE3 (format 2 layout 4) by default
    ids: IdScheme = BLAKE3

    def upload(
        self,
        name: str,
        files: list[SourceFile],
        known: dict[str, Chunk],
        dl: Deadline,
        stats: StatsRecorder,
        progress: Progress | None,
        pin: Pin,
        bases: DeltaBases | None,
    ) -> tuple[list[FileEntry], dict[str, Chunk]]:
        """Hash every chunk of ``files`` (or take the hashes of unchanged files from the
        stamp index); pack and upload those not in ``known`` (as deltas against ``bases``
        where that is smaller); the file entries and the chunk table."""
        uploads: list[Future[None]] = []
        pool = WorkerPool(self.workers)  # this publish's own; leaving it abandons the rest

        def upload(pack_id: str, data: bytes) -> None:
            dl.check("uploading packs")
            put = partial(self._put_pack, name, pack_id, data, stats, pin)
            uploads.append(pool.submit(within, dl, put))
            busy = [u for u in uploads if not u.done()]
            wait_all(busy[:-4], dl, "uploading packs")  # bound memory: few packs in flight

        key = self.ids.key
        with collector_paused():  # objects per file, no cycle (manifest_v2.collector_paused)
            index = self._index(name, files)
            small = self._small(files)
            # The parent's chunks under the ids this publish writes (sha256 ids of both
            # lengths meet under the short one; a full-id publish finds nothing of a short-id
            # parent, nor any publish a parent's of another hash, and uploads them). The
            # hashes below stay full (64 hex digits) until the entries are made.
            known = {key(h): c for h, c in known.items() if "@" in h or self.ids.owns(h)}
            # An index trusts only chunks of the parent: a first publish asks it nothing.
            trust = index if index is not None and index.indexed and known else None
            hashes, todo = self._trusted(files, trust, known, small)
            ats = [0] * len(files)
            groups = self._trusted_groups(small, files, trust, known, hashes, ats)
        total = sum(f.size for f in files)
        reused = done = total - sum(files[i].size for i in (*todo, *(i for g in groups for i in g)))
        if progress is not None and done:
            progress(done, total)
        with pool:
            writer = PackWriter(upload, target=self.pack_target, level=self.compression_level,
                                pool=pool, deadline=dl)  # fmt: skip
            hash_many = partial(self._hash_many, pool, dl)
            reads = [files[i] for i in todo]
            read = [0] * len(files)
            digest_of = self.ids.digest
            for j, raw, digest in hashed_chunks(reads, self.chunk_size, hash_many, digest_of,
                                                pool, dl):  # fmt: skip
                i = todo[j]
                hashes[i].append(digest)
                read[i] += len(raw)
                if key(digest) in known:
                    reused += len(raw)
                elif digest not in writer:
                    base = bases.base(files[i].relpath, len(hashes[i]) - 1) if bases else None
                    if base is not None and not self.ids.owns(base[0]):
                        base = None  # a chain holds ids of one hash: a keyframe instead
                    writer.add(digest, raw, base)
                done += len(raw)
                if progress is not None:
                    progress(done, total)
            _same_sizes(files, todo, read)
            for group, raw, digest in read_all(groups, files, digest_of, pool, dl):
                pos, one = 0, [digest]  # shared by the members: no one appends to it
                for i in group:
                    hashes[i], ats[i] = one, pos
                    pos += files[i].size
                if key(digest) in known:
                    reused += len(raw)
                elif digest not in writer:
                    writer.add(digest, raw)  # no delta: a bundle has no place in a file
                done += len(raw)
                if progress is not None:
                    progress(done, total)
            if trust is not None:  # files it let this publish skip: looked at once more
                read_any = {*todo, *(i for g in groups for i in g)}
                skipped = (f for i, f in enumerate(files) if i not in read_any)
                check_still_as_scanned(skipped, partial(dl.check, "checking the files not read"))
            writer.flush()
            wait_all(uploads, dl, "uploading packs")
        with collector_paused():
            entries = self._entries(files, hashes, ats, index)
        used = dict.fromkeys(h for e in entries for h in e.chunks)
        table = {**known, **{key(h): c for h, c in writer.chunks.items()}}
        stats.add(bytes_reused=reused, chunks_total=len(used),
                  chunks_transferred=len(writer.chunks))  # fmt: skip
        # the used chunks and every link of their delta chains (old ones: in the parent's)
        links = {h: None if c.base is None else key(c.base) for h, c in table.items()}
        need = check_chains(links, used)
        return entries, {h: _renamed(table[h], key) for h in sorted(need)}

    def _entries(
        self,
        files: list[SourceFile],
        hashes: list[list[str]],
        ats: list[int],
        index: StampIndex | None,
    ) -> list[FileEntry]:
        """The file entries (under the ids this publish writes), recorded in ``index``
        with their full hashes whatever the ids' length. Each id is shortened once, not
        once per member of its bundle."""
        ids = {h: self.ids.key(h) for h in dict.fromkeys(chain.from_iterable(hashes))}
        get = ids.__getitem__
        entries = [FileEntry(f.relpath, f.size, f.mode, tuple(map(get, h)), a)
                   for f, h, a in zip(files, hashes, ats, strict=True)]  # fmt: skip
        if index is not None:
            index.record_many([f.relpath for f in files], [f.stamp for f in files], hashes, ats)
            index.save()
        return entries

    def _index(self, name: str, files: list[SourceFile]) -> StampIndex | None:
        if not self.stamps or not files:
            return None
        f = files[0]  # the scan built each abspath as the source folder / relpath
        folder = f.path[: -len(f.relpath)]
        return StampIndex(folder, repr(self.backend), name, self.chunk_size, self.ids.name,
                          self.stamp_dir)  # fmt: skip

    def _small(self, files: list[SourceFile]) -> list[int]:
        """Positions of the files to bundle (none unless ``bundle``)."""
        if not self.bundle:
            return []
        limit = small_limit(self.chunk_size)
        return [i for i, f in enumerate(files) if 0 < f.size <= limit]

    def _trusted(
        self,
        files: list[SourceFile],
        index: StampIndex | None,
        known: dict[str, Chunk],
        small: list[int],
    ) -> tuple[list[list[str]], list[int]]:
        """Each file's hashes as the index has them (for files it may skip), and the
        positions of the files to read, bundled ones left out (:meth:`_trusted_groups`). An
        indexed file is trusted only with as many hashes as its size needs, each a chunk of
        the parent version (its bytes are in the store), a single one of its own size."""
        hashes: list[list[str]] = [[] for _ in files]
        bundled = set(small)
        rest = [i for i in range(len(files)) if i not in bundled]
        if index is None:
            return hashes, rest
        todo: list[int] = []
        for i in rest:
            f = files[i]
            got = index.lookup(f.relpath, f.stamp)
            if got is None or len(got) != -(-f.size // self.chunk_size):
                todo.append(i)
            elif all(self.ids.key(h) in known for h in got) and (
                len(got) != 1 or known[self.ids.key(got[0])].size == f.size
            ):
                hashes[i] = list(got)
            else:
                todo.append(i)
        return hashes, todo

    def _trusted_groups(
        self,
        small: list[int],
        files: list[SourceFile],
        index: StampIndex | None,
        known: dict[str, Chunk],
        hashes: list[list[str]],
        ats: list[int],
    ) -> list[list[int]]:
        """Bundle the ``small`` files; fill in ``hashes`` and ``ats`` of the bundles the
        index vouches for and return the others (positions in ``files``) to read.

        A bundle is trusted only if every member's stamp is unchanged and every member was
        recorded in the same parent chunk, at the start it now has, and their sizes add up
        to it (:func:`_tiles`). Anything else re-reads the whole bundle."""
        sizes = [(files[i].relpath, files[i].size) for i in small]
        todo = []
        for g in cut(sizes, self.chunk_size):
            group = [small[k] for k in g]
            got = [index.lookup(files[i].relpath, files[i].stamp) for i in group] if index else []
            first = got[0] if got else None
            c_full = first[0] if first is not None and len(first) == 1 else None
            c = None if c_full is None else known.get(self.ids.key(c_full))
            if c is None or c_full is None or any(h != first for h in got):
                todo.append(group)
                continue
            if c.size != sum(files[i].size for i in group) or not _tiles(group, files, index):
                todo.append(group)
                continue
            pos = 0
            for i in group:
                hashes[i], ats[i] = [c_full], pos  # the index's full hash
                pos += files[i].size
        return todo

    def _hash_many(self, pool: WorkerPool, dl: Deadline, chunks: list[bytes]) -> list[str]:
        """The full hash of each chunk, spread over the pool in slices (hashing is the CPU
        cost of publishing an unchanged snapshot; both hashes release the GIL, so this uses
        every core)."""
        digest_all = partial(_digest_all, self.ids.digest)
        if sum(map(len, chunks)) < _INLINE_HASH:
            return digest_all(chunks)  # a hand-off to a thread costs more than the hashing
        step = max(1, len(chunks) // 8)
        slices = [chunks[i : i + step] for i in range(0, len(chunks), step)]
        parts = wait_all([pool.submit(digest_all, s) for s in slices], dl, "hashing")
        return [h for part in parts for h in part]

    def _put_pack(
        self, name: str, pack_id: str, data: bytes, stats: StatsRecorder, pin: Pin
    ) -> None:
        key = pack_key(name, pack_id)
        try:
            self.backend.put(key, data, mode=PutMode.CREATE)
            pin.created(pack_id)
        except ConflictError:
            # Same name, same bytes, but maybe an old, unreferenced pack (a revert publishes
            # identical packs) that a prune is deleting: claim it, check no prune condemned
            # it, then write it again, so it exists and is young whatever happened before.
            pin.add(packs=[pack_id])
            pin.check(packs=[pack_id])
            self.backend.put(key, data, mode=PutMode.OVERWRITE)
            stats.add(requests=3)
        stats.add(bytes_uploaded=len(data), requests=1, packs_transferred=1)


def delta_bases(
    parent: Manifest | None,
    version: str | None,
    where: ParentDir,
    manifest_format: int,
    compression_level: int | None,
) -> DeltaBases | None:
    """The parent's chunks a publish may delta against, or None (no parent, no copy of it,
    format 1, or a store that stores raw chunks: deltas are zstd)."""
    if parent is None or version is None or where is None or manifest_format < 2:
        return None
    if compression_level is None:
        return None
    root = where(version) if callable(where) else where
    return None if root is None else DeltaBases(parent, Path(root))


def _digest_all(digest: Callable[[bytes], str], chunks: list[bytes]) -> list[str]:
    return [*map(digest, chunks)]


def _same_sizes(files: Sequence[SourceFile], todo: Sequence[int], read: Sequence[int]) -> None:
    """The files read are as long as the scan found them: a file written meanwhile (an
    SQLite journal between truncate and write) would give a manifest whose chunks do not
    add up to its sizes, which no reader accepts; refuse the publish instead."""
    for i in todo:
        if read[i] != files[i].size:
            raise InvalidInputError(
                f"{files[i].path}: changed while it was being published "
                f"({files[i].size} bytes when scanned, {read[i]} read): publish again"
            )


def _tiles(group: Sequence[int], files: Sequence[SourceFile], index: StampIndex | None) -> bool:
    """Whether each member was recorded at the start it has in ``group``: each then holds
    the bytes of the recorded chunk from that start (its stamp is unchanged), and the
    members cover the chunk end to end, so together they are exactly its bytes. Sizes
    alone were not enough: two folders holding the same files share one bundle chunk,
    and members of both copies can add up to its size in another order."""
    pos = 0
    for i in group:
        if index is None or index.start(files[i].relpath) != pos:
            return False
        pos += files[i].size
    return True


def _renamed(c: Chunk, key: Callable[[str], str]) -> Chunk:
    """``c`` under the ids a publish writes (the parent's may be of the other length)."""
    h, b = key(c.hash), None if c.base is None else key(c.base)
    return c if (h, b) == (c.hash, c.base) else replace(c, hash=h, base=b)
