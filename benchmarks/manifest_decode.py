"""Format 2 manifest encode and decode (+ validation) on synthetic manifests: one of N
chunks in chroma-shaped files (the 1 GiB tree: 16,384 chunks of 64 KiB) and one of N
small files (one chunk each), with CPU seconds per call (best of --repeat).

usage: python benchmarks/manifest_decode.py [--chunks 16384] [--files 100000]
           [--repeat 5] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import random
import time
from datetime import datetime, timezone

from _report import write_json

from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.models import Chunk, FileEntry, Manifest

CS = 1 << 16


def _h(i: int, salt: str) -> str:
    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def manifest(files: list[tuple[str, int]], salt: str) -> Manifest:
    """A manifest of ``files`` (path, size), chunks packed in 32 MiB packs in order."""
    rng = random.Random(1)
    chunks: dict[str, Chunk] = {}
    entries = []
    pack, off, k = _h(0, "pack" + salt), 0, 0
    for path, size in files:
        hs = []
        for j in range(-(-size // CS)):
            csize = min(CS, size - j * CS)
            length = csize if rng.random() < 0.5 else max(1, csize - rng.randrange(csize))
            h = _h(k, salt)
            k += 1
            if off + length > 32 << 20:
                pack, off = _h(k, "pack" + salt), 0
            codec = "none" if length == csize else "zstd"
            chunks[h] = Chunk(h, pack, off, length, csize, codec)
            off += length
            hs.append(h)
        entries.append(FileEntry(path, size, 0o644, tuple(hs)))
    t = datetime(2026, 12, 2, tzinfo=timezone.utc)
    return Manifest("db", t, CS, tuple(entries), chunks, dirs=(), publisher="bench")


def chroma_shaped(n_chunks: int) -> Manifest:
    per = 256  # 16 MiB files: the segment files of a chroma collection
    files = [(f"seg{i // 8:03d}/data_level0_{i:04d}.bin", per * CS) for i in range(n_chunks // per)]
    return manifest(files, "c")


def small_files(n: int) -> Manifest:
    files = [(f"dir{i // 1000:04d}/file{i % 1000:04d}.json", 100) for i in range(n)]
    return manifest(files, "s")


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    out = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        out = min(out, time.process_time() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=16384)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for label, m in (
        (f"{args.chunks} chunks", chroma_shaped(args.chunks)),
        (f"{args.files} files", small_files(args.files)),
    ):
        data = manifest_v2.encode(m)
        assert manifest_v2.loads(data) == m
        enc = best(lambda m=m: manifest_v2.encode(m), args.repeat)
        dec = best(lambda data=data: manifest_v2.loads(data), args.repeat)
        print(f"{label}: {len(data)} bytes, encode {enc:.3f} s, decode {dec:.3f} s CPU")
        rows.append(
            {"manifest": label, "bytes": len(data), "encode_cpu_s": enc, "decode_cpu_s": dec}
        )
        if args.profile:
            p = cProfile.Profile()
            p.runcall(manifest_v2.loads, data)
            pstats.Stats(p).sort_stats("tottime").print_stats(14)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
