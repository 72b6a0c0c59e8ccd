"""Which chunk size? Bytes a small chroma update changes, and manifest cost, per chunk size.

Builds a real chromadb database offline (explicit embeddings), snapshots it,
adds a few records, and counts for each chunk size how many bytes of chunks the
new version has that the old one lacks (what a publish uploads) and how many
chunks the manifest must list. Both versions are then published with that chunk
size to a local file store: the manifest's size is measured (its JSON bytes), as is
what the second publish uploaded (packs are compressed, so less than the changed bytes).

usage: python benchmarks/chunk_size.py [--records 20000] [--added 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend

SIZES = [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20, 8 << 20]


def build(path: Path, records: int, dim: int, start: int = 0) -> None:
    import chromadb

    client = chromadb.PersistentClient(path=str(path))
    rng = random.Random(start)
    for name in ("receipts", "merchants"):
        col = client.get_or_create_collection(name, embedding_function=None)
        for lo in range(start, start + records, 1000):
            ids = [f"{name}-{i}" for i in range(lo, min(lo + 1000, start + records))]
            col.add(
                ids=ids,
                embeddings=cast(Any, [[rng.random() for _ in range(dim)] for _ in ids]),
                documents=[f"document {i} text {rng.random()}" for i in ids],
                metadatas=[{"n": i} for i in range(len(ids))],
            )
    from chromadb.api.shared_system_client import SharedSystemClient

    cast(Any, client)._system.stop()  # flush and release files before copying
    SharedSystemClient.clear_system_cache()


def chunks(root: Path, size: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while block := f.read(size):
                    out[hashlib.sha256(block).hexdigest()] = len(block)
    return out


def published(a: Path, b: Path, size: int, work: Path) -> tuple[int, int]:
    """(manifest bytes, bytes uploaded) of publishing ``b`` after ``a`` with chunks of ``size``."""
    # format 1: the manifest column is its JSON (a format 2 manifest bundles small files,
    # which JSON cannot hold), and every file keeps chunks of its own, as when recorded
    store = RemoteStore(FileBackend(work / f"store-{size}"), chunk_size=size, manifest_format=1)
    store.publish("db", a)
    info = store.publish("db", b)
    manifest = len(store.load_manifest("db", info.version).to_json())
    store.close()
    return manifest, info.stats.bytes_uploaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--added", type=int, default=10)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        build(a, args.records // 2, args.dim)
        shutil.copytree(a, b)
        build(b, args.added, args.dim, start=10**7)
        total = sum(p.stat().st_size for p in b.rglob("*") if p.is_file())
        rows: list[dict[str, Any]] = []
        for size in SIZES:
            old, new = chunks(a, size), chunks(b, size)
            changed = sum(n for h, n in new.items() if h not in old)
            manifest, uploaded = published(a, b, size, Path(tmp))
            rows.append(
                {
                    "chunk_size": size,
                    "changed_bytes": changed,
                    "uploaded_bytes": uploaded,
                    "chunks": len(new),
                    "manifest_bytes": manifest,
                    "manifest_bytes_per_chunk": manifest / len(new),
                }
            )
    print(f"database: {args.records} records, {total / 2**20:.1f} MiB; +{args.added} records")
    print(
        f"{'chunk':>8} {'changed MiB':>12} {'uploaded MiB':>13} {'chunks':>8} "
        f"{'manifest KiB':>13} {'bytes/chunk':>12}"
    )
    for r in rows:
        print(
            f"{r['chunk_size'] >> 10:>7}K {r['changed_bytes'] / 2**20:>12.2f} "
            f"{r['uploaded_bytes'] / 2**20:>13.2f} {r['chunks']:>8} "
            f"{r['manifest_bytes'] / 1024:>13.0f} {r['manifest_bytes_per_chunk']:>12.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"total_bytes": total, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
