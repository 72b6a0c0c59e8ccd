"""One micro-benchmark per stage of a checkout's data path, so a regression points at its
stage: receive (S3 ranged GETs into a reused buffer), decompress (zstd chunks), hash
(every chunk verified against a BLAKE3 id, and against a sha256 one), place (pwritev of
verified runs into sparse files, as the placer writes them and in 1 MiB calls) and copy
(copy_file_range of unchanged runs, the incremental path). Each runs on one thread and
reports CPU seconds per GiB (user + system, this process) and GB/s.

usage: python benchmarks/stages.py [--mib 256] [--tools .bench-tools] [--json out.json]
       [--skip-receive] [--place-repeat 5] [--place-pause 6]
(receive needs s3rver: benchmarks/install-tools.sh)
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from _data import MiB
from _report import write_json
from compare import COLD_PAUSE, settle

from chroma_snapshots.engine.chunkids import BLAKE3, SHA256_SHORT, chunk_ok
from chroma_snapshots.engine.chunking import _decompressor, _unzstd_into
from chroma_snapshots.engine.localcopy import copy_runs
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest
from chroma_snapshots.engine.placer import WRITE_BYTES, Gate, Placer, pwrite_all
from chroma_snapshots.engine.transfer import Read, decode_and_place

HERE = Path(__file__).resolve().parent
CHUNK = 64 << 10
Row = dict[str, Any]


def _cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, to the microsecond."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def measure(stage: str, nbytes: int, fn: Callable[[], object]) -> Row:
    """Run ``fn`` once; CPU (and user CPU) seconds per GiB and GB/s of ``nbytes``."""
    wall, (user, system) = time.perf_counter(), _cpu()
    fn()
    (user_end, system_end), wall = _cpu(), time.perf_counter() - wall
    gib = nbytes / (1 << 30)
    # the two differences added, not two sums subtracted: rounding then never puts the
    # user share above the whole (it did, by 1e-17, when no system time passed)
    used = user_end - user
    return {
        "stage": stage,
        "bytes": nbytes,
        "cpu_s_per_gib": (used + (system_end - system)) / gib,
        "user_s_per_gib": used / gib,
        "gbps": nbytes / wall / 1e9,
    }


def sqlite_like(n: int, seed: int = 0) -> bytes:
    """Bytes that compress like the benchmark's SQLite file: text rows and random vectors."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += f"receipt {len(out)} merchant {rng.randrange(500)} ".encode() * 8
        out += rng.randbytes(1536)
    return bytes(out[:n])


def stage_decompress(mib: int) -> list[Row]:
    """The checkout's way (into a reused arena) and, for comparison, a new bytes object per
    chunk (the way before commit 01a152f)."""
    import zstandard

    raw = sqlite_like(mib * MiB)
    comp = zstandard.ZstdCompressor(level=3)
    frames = [comp.compress(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK)]
    chunks = [Chunk("0" * 64, "0" * 64, 0, len(f), CHUNK, "zstd") for f in frames]
    arena = memoryview(bytearray(CHUNK))
    d = _decompressor()
    return [
        measure(
            "decompress (zstd 64 KiB chunks, arena)",
            len(raw),
            lambda: (
                [_unzstd_into(c, f, arena) for c, f in zip(chunks, frames, strict=True)] and None
            ),
        ),
        measure(
            "decompress (new bytes per chunk)",
            len(raw),
            lambda: [d.decompress(f, max_output_size=CHUNK) for f in frames] and None,
        ),
    ]


def stage_hash(mib: int) -> list[Row]:
    """Verifying every chunk (``chunk_ok``) against BLAKE3 ids and against sha256 ones."""
    data = memoryview(os.urandom(mib * MiB))
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    rows = []
    for scheme in (BLAKE3, SHA256_SHORT):
        ids = [scheme.key(scheme.digest(c)) for c in chunks]
        if not all(map(chunk_ok, chunks, ids)):
            raise RuntimeError(f"{scheme.name}: a chunk failed its own id")
        label = f"hash ({scheme.name}, 64 KiB chunks, verified)"
        rows.append(measure(label, len(data), partial(_verify_all, chunks, ids)))
    return rows


def _verify_all(chunks: list[memoryview], ids: list[str]) -> None:
    for raw, chunk_id in zip(chunks, ids, strict=True):
        chunk_ok(raw, chunk_id)


def stage_place(mib: int, work: Path, repeat: int, pause: float) -> list[Row]:
    """Placing into the page cache as the placer does (``pwrite_all``: at most WRITE_BYTES a
    call) and in 1 MiB writes (the placer's size before), alternating, ``repeat`` times
    each: the median, and the spread, which on a VM can be tenfold. Each run starts
    ``pause`` seconds after the last run's file was deleted: memory freed that recently is
    still the guest's, and a run that reuses it says nothing about a cold start (on this VM
    freed memory goes back to the host within seconds and faults in again)."""
    run = [os.urandom(CHUNK) for _ in range(16)]  # 1 MiB of 16 chunks
    path = work / "place.bin"

    def place(write: int) -> Callable[[], None]:
        def go() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.ftruncate(fd, mib * MiB)  # sparse, as Placer.create_files makes them
                for off in range(0, mib * MiB, MiB):
                    if write == MiB:
                        os.pwritev(fd, run, off)
                    else:
                        pwrite_all(fd, run, off, MiB)
            finally:
                os.close(fd)

        return go

    names = {WRITE_BYTES: f"place (pwritev {WRITE_BYTES >> 10} KiB, the placer)"}
    names[MiB] = "place (pwritev 1 MiB runs)"
    runs: dict[int, list[Row]] = {w: [] for w in names}
    for _ in range(repeat):
        for write, name in names.items():
            settle(pause=pause)
            runs[write].append(measure(name, mib * MiB, place(write)))
            path.unlink()
    rows = []
    for same in runs.values():
        cpu = sorted(r["cpu_s_per_gib"] for r in same)
        row = same[0] | {"cpu_s_per_gib": statistics.median(cpu), "spread": (cpu[0], cpu[-1])}
        rows.append(row | {"gbps": statistics.median(r["gbps"] for r in same)})
    return rows


def stage_bookkeeping(mib: int, work: Path) -> list[Row]:
    """The checkout's Python path around each 64 KiB chunk, against the bare calls it
    wraps: verifying a window's chunks (``decode_and_place``, placing left out) against
    the hash loop alone, and ``Placer.place_many`` against a ``pwrite_all`` loop, both
    into a file on /dev/shm (no disk, so the user CPU is the Python path's)."""
    data = memoryview(os.urandom(16 * CHUNK))  # one 1 MiB window of 16 chunks
    spans = [data[i * CHUNK : (i + 1) * CHUNK] for i in range(16)]
    ids = [BLAKE3.key(BLAKE3.digest(raw)) for raw in spans]
    chunks = tuple(Chunk(h, "0" * 64, i * CHUNK, CHUNK, CHUNK) for i, h in enumerate(ids))
    window = Read("0" * 64, 0, len(data), chunks)
    windows = mib  # of 1 MiB

    class Unplaced:
        manifest = Manifest("db", datetime.now(timezone.utc), CHUNK, (), {})
        gate = Gate(2)

        def place_many(self, batch: object) -> int:
            return 0

    def verify() -> None:
        for _ in range(windows):
            decode_and_place(window, data, Unplaced())  # type: ignore[arg-type]

    def hashes() -> None:
        for _ in range(windows):
            _verify_all(
                [data[c.offset : c.offset + CHUNK] for c in chunks], [c.hash for c in chunks]
            )

    shm = Path("/dev/shm") if os.path.isdir("/dev/shm") else work
    root = Path(tempfile.mkdtemp(prefix="stages-", dir=shm))
    n = windows * 16
    names = [f"{i:060x}" for i in range(n)]  # a chunk id for each position of one file
    tree = (FileEntry("f", n * CHUNK, 0o644, tuple(names)),)
    manifest = Manifest(
        "db",
        datetime.now(timezone.utc),
        CHUNK,
        tree,
        {h: Chunk(h, "0" * 64, 0, CHUNK, CHUNK) for h in names},
    )

    def placer() -> None:
        p = Placer(root / "placer", manifest)
        p.create_files()
        for i in range(0, n, 16):
            p.place_many([(names[i + j], spans[j]) for j in range(16)])
        p.close()

    def bare() -> None:
        fd = os.open(root / "bare", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.ftruncate(fd, n * CHUNK)
            for i in range(0, n, 16):
                for j in range(16):
                    pwrite_all(fd, [spans[j]], (i + j) * CHUNK, CHUNK)
        finally:
            os.close(fd)

    try:
        return [
            measure("verify a window (decode_and_place)", windows * MiB, verify),
            measure("verify a window (the hash loop alone)", windows * MiB, hashes),
            measure("place (Placer.place_many, /dev/shm)", n * CHUNK, placer),
            measure("place (pwrite_all per chunk, /dev/shm)", n * CHUNK, bare),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stage_copy(mib: int, work: Path) -> Row:
    src, dst = work / "copy-src.bin", work / "copy-dst.bin"
    with open(src, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    runs = [(i * 16, 16, MiB) for i in range(mib)]  # 1 MiB runs of 16 chunks

    def copy() -> None:
        s = os.open(src, os.O_RDONLY)
        d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.ftruncate(d, mib * MiB)
            copy_runs(s, d, runs, CHUNK)
        finally:
            os.close(s)
            os.close(d)

    row = measure("copy (copy_file_range 1 MiB runs)", mib * MiB, copy)
    src.unlink()
    dst.unlink()
    return row


def stage_receive(mib: int, tools: Path, work: Path) -> Row:
    from _s3rver import ACCESS, REGION, S3rver

    from chroma_snapshots.backends.s3 import S3Backend, S3Settings

    os.environ.update(ACCESS)
    with S3rver(tools, work / "s3data") as srv:
        backend = S3Backend(
            srv.bucket, "", settings=S3Settings(endpoint_url=srv.endpoint, region=REGION)
        )
        backend.put("blob", os.urandom(mib * MiB))
        buf = memoryview(bytearray(8 * MiB))
        ranges = [(o, min(o + 8 * MiB, mib * MiB)) for o in range(0, mib * MiB, 8 * MiB)]

        def receive() -> None:
            for r in ranges:
                backend.get_into("blob", r, buf)

        row = measure("receive (S3 8 MiB ranged GETs, s3rver)", mib * MiB, receive)
        backend.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    ap.add_argument("--skip-receive", action="store_true")
    ap.add_argument("--place-repeat", type=int, default=5, help="runs of the place stage")
    ap.add_argument("--place-pause", type=float, default=COLD_PAUSE, help="seconds before a place")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-stages-") as tmp:
        work = Path(tmp)
        if not args.skip_receive:
            rows.append(stage_receive(args.mib, args.tools.resolve(), work))
        rows += stage_decompress(args.mib)
        rows.extend(stage_hash(args.mib))
        rows += stage_bookkeeping(args.mib, work)
        rows += stage_place(args.mib, work, args.place_repeat, args.place_pause)
        rows.append(stage_copy(args.mib, work))
    print(f"{'stage':<42} {'CPU s/GiB':>9} {'user':>6} {'GB/s':>6}  spread of CPU s/GiB")
    for r in rows:
        spread = "  [{:.2f}-{:.2f}]".format(*r["spread"]) if "spread" in r else ""
        cpu, user = r["cpu_s_per_gib"], r["user_s_per_gib"]
        print(f"{r['stage']:<42} {cpu:>9.2f} {user:>6.2f} {r['gbps']:>6.2f}{spread}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
