"""Checkout reads from a backend that streams (S3): each coalesced read, up to a whole
pack, is one request streamed through a small buffer per worker, and its chunks are
verified and placed as soon as they are whole in the buffer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from functools import partial
from typing import Protocol, runtime_checkable

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.placer import Placer
from chroma_snapshots.engine.progress import Progress, StatsRecorder
from chroma_snapshots.engine.ramp import Ramp
from chroma_snapshots.engine.transfer import (
    Read,
    byte_counter,
    decode_and_place,
    run_phases,
    to_place,
)
from chroma_snapshots.errors import IntegrityError

# What a backend that streams a range through a buffer offers (backends/s3.py read_range):
# one request carries a whole coalesced read of up to STREAM_MAX_READ bytes (a 16 MiB
# pack is one request, not two) through a STREAM_BUFFER per worker. 1 MiB measured no
# more CPU than 8 MiB and 56 MiB less peak RSS (8 workers; benchmarks/RESULTS.md).
STREAM_MAX_READ = 32 << 20
STREAM_BUFFER = 1 << 20
Take = Callable[[memoryview, int], int]


@runtime_checkable
class RangeStreamer(Protocol):
    def read_range(
        self, key: str, byte_range: tuple[int, int], buf: memoryview, take: Take
    ) -> int: ...


# Streams a read through the calling worker's buffer into ``take``; returns bytes received.
Stream = Callable[[Read, Take], int]


def stream_and_place(
    reads: list[Read],
    stream: Stream,
    placer: Placer,
    keep: Callable[[Read, memoryview], None],
    *,
    executor: Executor,
    deadline: Deadline,
    stats: StatsRecorder,
    progress: Progress | None,
    streams: Ramp,
    then: Sequence[Read] = (),
) -> None:
    """As :func:`fetch_and_place`, for reads far larger than a worker's buffer: each is
    one request streamed through the buffer, its chunks verified and placed as soon as
    they are whole. Every chunk is handed to ``keep`` (the delta stash) with the bytes that
    hold it; those :func:`to_place` leaves out are not placed."""
    report = byte_counter(progress, [*reads, *then])

    def run(r: Read) -> None:
        deadline.check(f"reading pack {r.pack[:12]}")
        seen = [0]  # chunks of r whole in some window so far (offset order)
        placed = len(to_place(r.chunks, placer))  # all of them but in a delta's chain
        every = placed == len(r.chunks)  # then no window needs sorting out
        got = stream(r, partial(_take_window, r, seen, every, placer, keep, deadline, streams))
        if got != r.end - r.start or seen[0] != len(r.chunks):
            raise IntegrityError(f"pack {r.pack[:12]}: short read ({got} of {r.end - r.start})")
        stats.add(bytes_downloaded=got, requests=1, chunks_transferred=placed)
        report(got)

    run_phases(run, (reads, then), executor, deadline, streams)


def _take_window(
    r: Read,
    seen: list[int],
    every: bool,
    placer: Placer,
    keep: Callable[[Read, memoryview], None],
    deadline: Deadline,
    streams: Ramp,
    view: memoryview,
    offset: int,
) -> int:
    """Place the chunks wholly inside ``view`` (bytes from ``offset`` of the pack; all
    of ``r``'s are placed if ``every``); return how many bytes at its front are done with:
    up to the next chunk's start."""
    end, i = offset + len(view), seen[0]
    j = i
    while j < len(r.chunks) and r.chunks[j].offset + r.chunks[j].length <= end:
        j += 1
    if j > i:
        deadline.check(f"reading pack {r.pack[:12]}")
        part = Read(r.pack, offset, end, r.chunks[i:j])
        keep(part, view)
        decode_and_place(part if every else replace(part, chunks=to_place(part.chunks, placer)),
                         view, placer)  # fmt: skip
        seen[0] = j
    nxt = r.chunks[j].offset if j < len(r.chunks) else end
    done = min(nxt, end) - offset
    streams.add(done)
    return done
