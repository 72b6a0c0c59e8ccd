"""Delta chunks on local disk: the bases a publisher deltas against, and materializing.

A publisher that has its parent version's bytes (a checkout, a cached copy) stores a
changed chunk against the parent's chunk at the same offset of the same file
(:class:`DeltaBases`). A warm cache holds the previous version, so each delta's base
is read (and verified) from local disk and only the small deltas are downloaded. A
cold reader follows each chain down to a base it has or to a keyframe and downloads
every link: in the checkout's one pass of reads where they fit the delta stash
(``engine/stash.py``), the rest here, coalesced like any other reads. Chains are at most
``MAX_CHAIN`` deltas (manifest validation), and the work goes in batches so memory stays
bounded whatever the number of deltas. A chain link that no file of the version uses has
no hash in a layout 1 manifest: it is found locally by where the local copy's manifest
says its bytes are stored, and its decoded bytes are verified through the chunk its
chain ends in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from functools import partial
from pathlib import Path

import zstandard

from chroma_snapshots.engine import delta
from chroma_snapshots.engine.chunking import decode_chunk
from chroma_snapshots.engine.deadline import Deadline, wait_all
from chroma_snapshots.engine.manifest_v2 import chain_depth
from chroma_snapshots.engine.models import Chunk, Manifest, is_link_key, is_slice
from chroma_snapshots.engine.placer import Buffer, Placer
from chroma_snapshots.engine.progress import StatsRecorder
from chroma_snapshots.engine.transfer import Fetch, LocalChunks, Read, plan_reads
from chroma_snapshots.engine.validation import MAX_CHAIN, MAX_CHUNK_SIZE
from chroma_snapshots.errors import IntegrityError

# Deltas resolved per batch: at most this many local bases (64 KiB each at the default
# chunk size) and downloaded chains are held at once.
BATCH = 256
_SLICE = 32  # deltas one worker applies per task


class DeltaBases:
    """The parent's chunks found intact under ``root`` (verified on every read), by file
    path and chunk index: what a new chunk at that place may be stored against."""

    def __init__(self, parent: Manifest, root: Path) -> None:
        self._parent = parent
        # a bundled file's chunk holds other files too: nothing to delta a file against
        self._files = {f.path: f.chunks for f in parent.files if not is_slice(f, parent.chunks)}
        self._local = LocalChunks()
        self._local.add_tree(root, parent)

    def base(self, path: str, index: int) -> tuple[str, bytes] | None:
        """(hash, bytes) of the parent's chunk at ``index`` of ``path``, if it is there and
        a delta on it keeps its chain within ``MAX_CHAIN``; else None."""
        chunks = self._files.get(path)
        if chunks is None or index >= len(chunks):
            return None
        h = chunks[index]
        if chain_depth(self._parent.chunks, h) >= MAX_CHAIN:
            return None  # the new chunk is a keyframe: a cold reader's chain stays bounded
        raw = self._local.read(h)
        return None if raw is None else (h, raw)

    def close(self) -> None:
        self._local.close()


def place_deltas(
    deltas: Sequence[Chunk],
    table: Mapping[str, Chunk],
    local: LocalChunks | None,
    fetch: Fetch,
    placer: Placer,
    *,
    executor: Executor,
    deadline: Deadline,
    stats: StatsRecorder,
    max_read: int,
    ready: Mapping[str, Buffer] | None = None,
) -> None:
    """Decode every chunk of ``deltas`` (each verified) and place it; stored bytes
    ``ready`` holds (the delta stash's) are not downloaded again."""
    ready = {} if ready is None else ready
    for i in range(0, len(deltas), BATCH):
        deadline.check("applying deltas")
        batch = deltas[i : i + BATCH]
        have: dict[str, Buffer] = {}  # verified bytes of bases found locally
        need: dict[str, Chunk] = {}  # links to download
        for c in batch:
            _plan_chain(c, table, local, have, need)
        todo = [c for h, c in need.items() if h not in ready]
        stored: dict[str, Buffer] = {**_download(todo, fetch, executor, deadline, stats, max_read)}
        stored.update((h, ready[h]) for h in need if h in ready)
        # in parallel slices: zstd and hashlib release the GIL
        failed: list[Chunk] = []
        apply = partial(_apply, placer, table, have, stored, failed)
        parts = [batch[j : j + _SLICE] for j in range(0, len(batch), _SLICE)]
        wait_all([executor.submit(apply, p) for p in parts], deadline, "applying deltas")
        if failed:
            _apply_cold(failed, table, fetch, placer, stored, executor, deadline, stats, max_read)


def _apply_cold(
    chunks: list[Chunk],
    table: Mapping[str, Chunk],
    fetch: Fetch,
    placer: Placer,
    stored: dict[str, Buffer],
    executor: Executor,
    deadline: Deadline,
    stats: StatsRecorder,
    max_read: int,
) -> None:
    """Place ``chunks`` from their whole chains, downloaded: a local base that matched
    its own hash was still not the link the chain names (another cached manifest lied
    about what sits at a place), so the store's bytes decide; wrong there is an error."""
    need: dict[str, Chunk] = {}
    for c in chunks:
        _plan_chain(c, table, None, {}, need)
    todo = [c for h, c in need.items() if h not in stored]
    stored.update(_download(todo, fetch, executor, deadline, stats, max_read))
    placer.place_many([(c.hash, resolve(c, table, {}, stored)) for c in chunks])


def _apply(
    placer: Placer,
    table: Mapping[str, Chunk],
    have: Mapping[str, Buffer],
    stored: Mapping[str, Buffer],
    failed: list[Chunk],
    part: Sequence[Chunk],
) -> None:
    """Decode and place ``part``; a chunk whose chain rested on a local base and still
    decodes wrong goes to ``failed``, to be done from the store alone."""
    done = []
    for c in part:
        try:
            done.append((c.hash, resolve(c, table, have, stored)))
        except IntegrityError:
            if not have:
                raise
            failed.append(c)  # list.append is atomic: slices run in parallel
    placer.place_many(done)


def _plan_chain(
    c: Chunk,
    table: Mapping[str, Chunk],
    local: LocalChunks | None,
    have: dict[str, Buffer],
    need: dict[str, Chunk],
) -> None:
    """Walk down from ``c`` until a base is at hand (locally) or a keyframe is reached,
    noting each link to download."""
    link = c
    for _ in range(MAX_CHAIN + 1):
        need[link.hash] = link
        if link.base is None:
            return  # a keyframe: downloaded whole
        base = link.base
        if base in have:
            return
        link = _entry(table, base)
        raw = _local(local, link)
        if raw is not None:
            have[base] = raw
            return
    raise IntegrityError(f"chunk {c.hash[:12]}: delta chain longer than {MAX_CHAIN}")


def local_id(local: LocalChunks | None, c: Chunk) -> str | None:
    """The hash under which a local copy offers table entry ``c``, if one does: its own,
    or for a link known by place, the hash the local copy's manifest gives the chunk
    stored at that place (the same stored bytes, so the same chunk; were it not, the
    chain's end would fail its hash)."""
    if local is None:
        return None
    h = local.hash_at(c.pack, c.offset) if is_link_key(c.hash) else c.hash
    return h if h is not None and h in local else None


def _local(local: LocalChunks | None, c: Chunk) -> Buffer | None:
    """Verified local bytes of table entry ``c`` (see :func:`local_id`)."""
    h = local_id(local, c)
    return None if local is None or h is None else local.read(h)


def decode_keyframe(c: Chunk, stored: Buffer) -> Buffer:
    """A keyframe's decoded bytes: verified against its hash, or, for a link known by
    place, of exactly its size (verified through the chunk its chain ends in)."""
    if not is_link_key(c.hash):
        return decode_chunk(c, stored)
    if c.base is not None or len(stored) != c.length:
        raise IntegrityError(f"chain link {c.hash[:12]}: not a keyframe of {c.length} bytes")
    if c.codec == "none":
        return stored
    try:
        if zstandard.frame_content_size(stored) not in (-1, c.size):
            raise IntegrityError(f"chain link {c.hash[:12]}: frame declares another size")
        raw = zstandard.ZstdDecompressor(max_window_size=MAX_CHUNK_SIZE).decompress(
            stored, max_output_size=c.size
        )
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chain link {c.hash[:12]}: corrupt compressed data") from e
    if len(raw) != c.size:
        raise IntegrityError(f"chain link {c.hash[:12]}: {len(raw)} bytes, not {c.size}")
    return raw


def _entry(table: Mapping[str, Chunk], h: str) -> Chunk:
    c = table.get(h)
    if c is None:  # validation refuses such manifests; never trust that alone
        raise IntegrityError(f"delta base {h[:12]} is not in the manifest")
    return c


def resolve(
    c: Chunk, table: Mapping[str, Chunk], have: Mapping[str, Buffer], stored: Mapping[str, Buffer]
) -> Buffer:
    """The verified bytes of ``c``: its links from the bottom up, each one verified."""
    links = [c]
    while links[-1].base is not None and links[-1].base not in have:
        if len(links) > MAX_CHAIN:
            raise IntegrityError(f"chunk {c.hash[:12]}: delta chain longer than {MAX_CHAIN}")
        links.append(_entry(table, links[-1].base))
    bottom = links[-1]
    if bottom.base is None:
        raw: Buffer = decode_keyframe(bottom, _stored(stored, bottom))
        links.pop()
    else:
        raw = have[bottom.base]
    for link in reversed(links):
        raw = delta.decode(link, _stored(stored, link), raw)
    return raw


def _stored(stored: Mapping[str, Buffer], c: Chunk) -> Buffer:
    data = stored.get(c.hash)
    if data is None:
        raise IntegrityError(f"chunk {c.hash[:12]}: its stored bytes were not read")
    return data


def _download(
    chunks: list[Chunk],
    fetch: Fetch,
    executor: Executor,
    deadline: Deadline,
    stats: StatsRecorder,
    max_read: int,
) -> dict[str, bytes]:
    """The stored bytes of ``chunks``, read in coalesced ranges in parallel (copied out of
    the fetch's buffer, which its worker reuses)."""

    def run(r: Read) -> dict[str, bytes]:
        deadline.check(f"reading pack {r.pack[:12]}")
        data = memoryview(fetch(r))
        if len(data) != r.end - r.start:
            raise IntegrityError(f"pack {r.pack[:12]}: short read")
        stats.add(bytes_downloaded=len(data), requests=1, chunks_transferred=len(r.chunks))
        return {
            c.hash: bytes(data[c.offset - r.start : c.offset - r.start + c.length])
            for c in r.chunks
        }

    reads = plan_reads(chunks, max_read=max_read)
    parts = wait_all([executor.submit(run, r) for r in reads], deadline, "reading deltas")
    return {h: b for part in parts for h, b in part.items()}


def check_deltas(
    table: Mapping[str, Chunk], stored: Mapping[str, bytes], keyframes: Mapping[str, Buffer]
) -> list[str]:
    """Decode every delta of ``table`` (its stored bytes in ``stored``; the decoded bytes
    of the keyframes at the bottom of chains in ``keyframes``) and return the problems
    found. Bases are decoded before what rests on them and dropped once no longer
    needed."""
    depth = {h: chain_depth(table, h) for h, c in table.items() if c.base is not None}
    users: dict[str, int] = {}
    for h in depth:
        link = table[h].base
        assert link is not None
        users[link] = users.get(link, 0) + 1
    done: dict[str, Buffer] = dict(keyframes)
    problems = []
    for h in sorted(depth, key=lambda x: depth[x]):
        c = table[h]
        base = done.get(c.base) if c.base is not None else None
        if c.base is not None and users[c.base] == 1:
            done.pop(c.base, None)  # this was its last user
        elif c.base is not None:
            users[c.base] -= 1
        if h not in stored:
            continue  # its pack is missing: already a problem of its own
        if base is None:
            problems.append(f"chunk {h[:12]}: its base {c.base and c.base[:12]} is unreadable")
            continue
        try:
            raw = delta.decode(c, stored[h], base)
        except IntegrityError as e:
            problems.append(str(e))
            continue
        if users.get(h):
            done[h] = raw
    return problems
