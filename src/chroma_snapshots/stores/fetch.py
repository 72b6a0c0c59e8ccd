"""A checkout's downloads: every chunk of a manifest placed under a folder, from local
copies where they verify and coalesced range reads for the rest, deltas applied as their
chains arrive (the rest last)."""

from __future__ import annotations

import threading
from dataclasses import replace

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.engine.deadline import Deadline, WorkerPool, within
from chroma_snapshots.engine.delta_io import place_deltas
from chroma_snapshots.engine.keys import pack_key
from chroma_snapshots.engine.placer import Placer
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.ramp import Ramp
from chroma_snapshots.engine.stash import DeltaStash
from chroma_snapshots.engine.streaming import (
    STREAM_BUFFER,
    STREAM_MAX_READ,
    RangeStreamer,
    Take,
    stream_and_place,
)
from chroma_snapshots.engine.transfer import (
    DEFAULT_MAX_READ,
    Placement,
    Read,
    fetch_and_place,
    place_local,
    plan_reads,
    to_place,
)


def fetch_into(
    backend: Backend,
    workers: int,
    name: str,
    job: Placement,
    dl: Deadline,
    stats: StatsRecorder,
    progress: Progress | None = None,
    drop_behind: bool = False,
) -> None:
    """Carry out ``job`` for snapshot ``name``: chunks from its local copies where they
    verify, the rest read from ``backend``'s packs, every chunk hash-checked;
    ``drop_behind``: what is written leaves the page cache as the work goes."""
    manifest, damaged = job.manifest, job.only
    local = None if job.reuse is None else job.reuse.reopened()
    placer = Placer(job.root, manifest, damaged, job.root_id, job.made, drop_behind)
    stats.add(chunks_total=len(placer.targets))
    # Buffers are sized by the format, never by a declared length: a chunk is stored in
    # at most chunk_size bytes (bounded by validation), and plan_reads refuses more.
    max_read = max(DEFAULT_MAX_READ, manifest.chunk_size)
    buffers = threading.local()  # one per worker, its own: memory is workers x max_read
    stream_buffer = max(STREAM_BUFFER, manifest.chunk_size)  # holds any chunk whole

    def buffer(kind: str, size: int) -> memoryview:
        buf: bytearray | None = getattr(buffers, kind, None)
        if buf is None:
            buf = bytearray(size)
            setattr(buffers, kind, buf)
        return memoryview(buf)

    def fetch(r: Read) -> memoryview:
        view = buffer("whole", max_read)
        n = within(dl, lambda: backend.get_into(pack_key(name, r.pack), (r.start, r.end), view))
        return view[:n]

    def fetch_kept(r: Read) -> memoryview:  # the one pass: the stash keeps what it wants
        data = fetch(r)
        stash.take(r, data)
        return data

    def stream(r: Read, take: Take) -> int:
        assert isinstance(backend, RangeStreamer)
        key, view = pack_key(name, r.pack), buffer("stream", stream_buffer)
        return within(dl, lambda: backend.read_range(key, (r.start, r.end), view, take))

    try:
        if damaged is None:
            placer.create_files(lambda: dl.check("creating the checkout's files"))
        with WorkerPool(workers) as pool:  # this checkout's own (see WorkerPool)
            todo = place_local(placer, local, stats, executor=pool, deadline=dl, close=False)
            # One pass of coalesced reads carries every chunk and the chain links below
            # the deltas where no local copy has a base; the stash applies each delta
            # whose chain it completes. Reads carrying deltas go first, and the others
            # only once they are done: a keyframe then completes its chains as it passes
            # and is never kept. place_deltas does the rest (bases from local copies
            # where they verify, else their chains).
            deltas = [c for c in todo if c.base is not None]
            stash = DeltaStash(deltas, manifest.chunks, local, placer, stats, dl)
            planned = {c.hash for c in todo}
            wanted = [*todo, *(c for c in stash.links if c.hash not in planned)]
            streaming = isinstance(backend, RangeStreamer)  # fewer, larger requests
            reads = plan_reads(wanted, max_read=max(STREAM_MAX_READ if streaming else 0, max_read))
            first = [r for r in reads if any(c.base is not None for c in r.chunks)]
            then = [r for r in reads if all(c.base is None for c in r.chunks)]
            streams = Ramp(workers)  # as many at once as add throughput (engine/ramp.py)
            if streaming:
                stream_and_place(first, stream, placer, stash.take, executor=pool, deadline=dl,
                                 stats=stats, progress=progress, streams=streams,
                                 then=then)  # fmt: skip
            else:
                first, then = ([replace(r, chunks=to_place(r.chunks, placer)) for r in rs]
                               for rs in (first, then))  # fmt: skip
                fetch_and_place(first, fetch_kept, placer, executor=pool, deadline=dl,
                                stats=stats, progress=progress, streams=streams,
                                then=then)  # fmt: skip
            stats.at_least(streams=streams.peak)
            rest = [c for c in deltas if c.hash not in stash.applied]
            place_deltas(rest, manifest.chunks, local, fetch, placer, executor=pool, deadline=dl,
                         stats=stats, max_read=max_read, ready=stash.stored)  # fmt: skip
        placer.finish(lambda: dl.check("setting the checkout's file modes"))
    finally:
        if local is not None:
            local.close()  # an abandoned read then reads nothing more from local disk
        placer.close()  # reads still running (abandoned) can no longer write
