"""Compaction of new records into a large snapshot: what the compactor uploads, what a warm
query worker downloads to refresh, and what a cold reader downloads, vs re-uploading.

Builds a real chromadb database offline (explicit embeddings), publishes it to moto's S3
server on 127.0.0.1 (behind the counting proxy), then compacts deltas of new records into
it with ``compaction.compact`` from a warm compactor (its /tmp cache holds the latest
version, as a compaction Lambda's does after its first run). After each compaction a warm
reader (its cache holds the previous version) refreshes, and a cold reader checks the new
version out; last, the final version is re-uploaded as one publish (no deltas) and checked
out cold, so the two cold checkouts show what the delta chains cost a cold reader (CPU
seconds include the in-process counting proxy). ``--manifest-format 1`` runs the format 1
store (whole changed chunks, JSON manifests) for comparison; format 2 stores changed chunks
as deltas.

``--scattered-mib N`` instead measures a file of N MiB (random, incompressible) in which 1%
of its 4 KiB pages change at random places: what a publish with the parent at hand uploads
against the bytes of the changed pages.

``--small-files N`` measures the manifest of N files of 100 random bytes each against the
data (the issue's 100,000-small-files case).

usage: python benchmarks/compaction.py [--records 50000] [--added 100,1000] [--dim 384]
                                       [--manifest-format 2] [--json out.json]
       python benchmarks/compaction.py --scattered-mib 512 [--manifest-format 2]
       python benchmarks/compaction.py --small-files 100000 [--manifest-format 2]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import zstandard
from _chroma import add
from _report import write_json

from chroma_snapshots import CachedStore, Manifest, RemoteStore, open_backend
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.chroma import publish_client
from chroma_snapshots.compaction import Delta, Record, compact
from chroma_snapshots.engine import manifest_v2
from chroma_snapshots.engine.keys import manifest_key
from chroma_snapshots.engine.manifest_codec import front_coded
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.proxy import CountingProxy

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--added", default="100,1000", help="records per compaction, in order")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--manifest-format", type=int, default=2, choices=(1, 2))
    ap.add_argument("--scattered-mib", type=int)
    ap.add_argument("--small-files", type=int)
    ap.add_argument("--from-dir", help="copy this chroma database instead of building one")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.scattered_mib:
        scattered(args.scattered_mib, args.manifest_format)
        return
    if args.small_files:
        small_files(args.small_files, args.manifest_format)
        return
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="chroma-snapshots-compact-bench-") as tmp,
        MotoServer() as server,
        CountingProxy(server.endpoint_url) as proxy,
    ):
        db = Path(tmp) / "db"
        t = time.perf_counter()
        if args.from_dir:
            shutil.copytree(args.from_dir, db)
        else:
            add(db, args.records, args.dim, seed=0)
        size = sum(p.stat().st_size for p in db.rglob("*") if p.is_file())
        print(
            f"built {args.records} records ({size / MiB:.0f} MiB) in {time.perf_counter() - t:.0f}s"
        )
        bucket = server.create_bucket("bench")
        store = RemoteStore(
            S3Backend(bucket, "snaps", client=server.client(endpoint_url=proxy.url)),
            manifest_format=args.manifest_format,
        )

        def measure(approach: str, fn: Callable[[], object]) -> None:
            proxy.reset()
            t, cpu = time.perf_counter(), time.process_time()
            fn()
            cpu = time.process_time() - cpu
            seen = proxy.reset()
            rows.append(
                {
                    **manifest_cost(store, "full" if approach.startswith("re-upload") else "db"),
                    "approach": approach,
                    "seconds": time.perf_counter() - t,
                    "cpu_seconds": cpu,
                    "requests": len(seen),
                    "bytes_up": sum(r.request_bytes for r in seen),
                    "bytes_down": sum(r.response_bytes for r in seen if r.method == "GET"),
                    "records": args.records,
                    "size_bytes": size,
                    "manifest_format": args.manifest_format,
                }
            )

        measure("initial publish (whole database)", lambda: publish_client(store, "db", db))
        compactor = CachedStore(store, Path(tmp) / "compactor-cache")
        reader = CachedStore(store, Path(tmp) / "reader-cache")
        compactor.checkout("db").release()  # a warm compactor holds the latest version
        reader.checkout("db").release()  # so does a warm query worker
        rng = random.Random(1)
        cold = db
        for batch, n in enumerate(int(x) for x in args.added.split(",")):
            recs = tuple(
                Record(f"new-{batch}-{i}", tuple(rng.random() for _ in range(args.dim)))
                for i in range(n)
            )
            delta = Delta(f"bench-{batch}", "receipts", recs)
            measure(
                f"compact {n:,} records (warm compactor)",
                partial(compact, compactor, "db", [delta]),
            )
            measure(f"  warm reader refresh after +{n:,}", lambda: reader.checkout("db").release())
            cold = Path(tmp) / f"cold-{batch}"
            measure(
                f"  cold reader checkout after +{n:,}", partial(store.checkout, "db", dest=cold)
            )
        # the last version again, as one publish with no parent: no deltas, so its cold
        # checkout is what the compacted version's chains cost a cold reader
        final = cold
        measure("re-upload the whole database", lambda: store.publish("full", final))
        measure(
            "  cold reader checkout of it (no deltas)",
            partial(store.checkout, "full", dest=Path(tmp) / "cold-full"),
        )
    print(f"format {args.manifest_format}, {args.records:,} records x {args.dim}")
    print(
        f"{'approach':<44} {'seconds':>8} {'CPU s':>6} {'requests':>9} {'MiB up':>8} "
        f"{'MiB down':>9} "
        f"{'manifest B':>10} {'chunks':>7} {'links':>6} {'B/chunk':>8}"
    )
    for r in rows:
        print(
            f"{r['approach']:<44} {r['seconds']:>8.2f} {r['cpu_seconds']:>6.2f} {r['requests']:>9} "
            f"{r['bytes_up'] / MiB:>8.2f} {r['bytes_down'] / MiB:>9.2f} "
            f"{r['manifest_bytes']:>10} {r['chunks_used']:>7} {r['chain_links']:>6} "
            f"{r['manifest_bytes'] / max(1, r['chunks_used']):>8.1f}"
        )
    write_json(args.json, rows)


def manifest_cost(store: RemoteStore, name: str) -> dict[str, int]:
    """The latest manifest of ``name``: its stored bytes, the chunks its files use, and the
    links of delta chains it lists besides (manifest bytes per chunk = bytes / used)."""
    version = store.current_version(name, "latest")[0]
    manifest = store.load_manifest(name, version)
    used = {h for f in manifest.files for h in f.chunks}
    return {
        "manifest_bytes": len(store.backend.get(manifest_key(name, version)).data),
        "chunks_used": len(used),
        "chain_links": len(manifest.chunks) - len(used),
    }


def scattered(mib: int, manifest_format: int, page: int = 4096, share: float = 0.01) -> None:
    """1% of the pages of an incompressible file change: bytes uploaded vs changed."""
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-scattered-") as tmp:
        old, new = Path(tmp) / "old", Path(tmp) / "new"
        data = bytearray(b"".join(rng.randbytes(MiB) for _ in range(mib)))
        (old / "seg").mkdir(parents=True)
        (old / "seg" / "data.bin").write_bytes(data)
        pages = rng.sample(range(len(data) // page), int(len(data) // page * share))
        for p in pages:
            data[p * page : (p + 1) * page] = rng.randbytes(page)
        (new / "seg").mkdir(parents=True)
        (new / "seg" / "data.bin").write_bytes(data)
        store = RemoteStore(
            open_backend(f"memory://scattered-{mib}"), manifest_format=manifest_format
        )
        store.publish("db", old)
        t = time.perf_counter()
        info = store.publish("db", new, parent_dir=old)
        seconds = time.perf_counter() - t
    changed = len(pages) * page
    up = info.stats.bytes_uploaded
    print(
        f"format {manifest_format}, {mib} MiB, {len(pages):,} of {mib * MiB // page:,} pages "
        f"changed ({changed / MiB:.1f} MiB): uploaded {up / MiB:.1f} MiB = "
        f"{up / changed:.2f}x the changed pages, {seconds:.1f} s"
    )


def small_files(n: int, manifest_format: int, size: int = 100) -> None:
    """The manifest of ``n`` small files (1,000 per folder) against their bytes."""
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-small-") as tmp:
        root = Path(tmp) / "src"
        for i in range(n):
            d = root / f"dir{i // 1000:04d}"
            if i % 1000 == 0:
                d.mkdir(parents=True)
            (d / f"file{i % 1000:04d}.json").write_bytes(rng.randbytes(size))
        store = RemoteStore(open_backend(f"memory://small-{n}"), manifest_format=manifest_format)
        version = store.publish("db", root).version
    data = store.backend.get(manifest_key("db", version)).data
    manifest = len(data)
    print(
        f"format {manifest_format}, {n:,} files of {size} bytes: manifest {manifest / 1e6:.1f} MB"
        f" = {manifest / (n * size):.2f}x the data, {manifest / n:.0f} bytes per file"
    )
    if manifest_format == 2:
        where_the_bytes_go(manifest_v2.loads(data), n)


def where_the_bytes_go(m: Manifest, n: int) -> None:
    """Bytes per file of the sha256 column and of the front-coded paths, each compressed
    on its own (zstd -19) as the manifest's body is; the rest is everything else."""
    z = zstandard.ZstdCompressor(level=19)
    hashes = b"".join(bytes.fromhex(h) for h in m.chunks)
    paths = bytearray()
    front_coded(paths, [f.path for f in m.files])
    for what, raw in (("sha256", hashes), ("paths", bytes(paths))):
        packed = len(z.compress(raw))
        print(f"  {what}: {len(raw):,} bytes, {packed:,} compressed = {packed / n:.2f} per file")


if __name__ == "__main__":
    main()
