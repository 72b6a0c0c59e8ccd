"""How chroma changes its files per update, and what that costs a snapshot store.

For a real chromadb database (explicit embeddings) and each HNSW ``sync_threshold``,
add N records to a copy and measure: bytes of 64 KiB chunks that changed (what a
publish uploads and an incremental checkout downloads), split into sqlite and HNSW
files; rows in chroma's write-ahead log (``embeddings_queue``); and the time a reader
needs to open the copy and answer its first query (which replays records the HNSW
files do not have yet). Also the effect of ``VACUUM`` on size and bytes changed.

usage: python benchmarks/chroma_changes.py [--records 20000] [--dim 384]
                                           [--thresholds 1000,100000] [--added 100,1000,1500]
                                           [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import chromadb
from _chroma import add
from _report import write_json

from chroma_snapshots.chroma import client_settings, close_client

MiB = 1 << 20
CHUNK = 64 << 10


def chunks(root: Path) -> dict[str, dict[str, int]]:
    """kind (sqlite/hnsw) -> chunk hash -> size."""
    out: dict[str, dict[str, int]] = {"sqlite": {}, "hnsw": {}}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            kind = "sqlite" if p.name.startswith("chroma.sqlite3") else "hnsw"
            with open(p, "rb") as f:
                while block := f.read(CHUNK):
                    out[kind][hashlib.sha256(block).hexdigest()] = len(block)
    return out


def changed(old: Path, new: Path) -> dict[str, int]:
    a, b = chunks(old), chunks(new)
    return {k: sum(n for h, n in b[k].items() if h not in a[k]) for k in b}


def open_cost(path: Path, dim: int) -> float:
    work = path.with_name(path.name + "-open")
    shutil.copytree(path, work)
    t = time.perf_counter()
    client = chromadb.PersistentClient(path=str(work), settings=client_settings())
    col = client.get_collection("receipts")
    col.count()
    col.query(query_embeddings=cast(Any, [[0.5] * dim]), n_results=5, include=[])
    seconds = time.perf_counter() - t
    close_client(client)
    shutil.rmtree(work)
    return seconds


def wal_rows(path: Path) -> int:
    db = sqlite3.connect(f"file:{path / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM embeddings_queue").fetchone()[0])
    finally:
        db.close()


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--thresholds", default="1000,100000")
    ap.add_argument("--added", default="100,1000,1500")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-changes-") as tmp:
        for threshold in (int(x) for x in args.thresholds.split(",")):
            base = Path(tmp) / f"base-{threshold}"
            add(base, args.records, args.dim, seed=0, threshold=threshold)
            for n in (int(x) for x in args.added.split(",")):
                new = Path(tmp) / f"t{threshold}-n{n}"
                shutil.copytree(base, new)
                add(new, n, args.dim, seed=n)
                diff = changed(base, new)
                rows.append(
                    {
                        "sync_threshold": threshold,
                        "added": n,
                        "size": size(new),
                        "changed_sqlite": diff["sqlite"],
                        "changed_hnsw": diff["hnsw"],
                        "wal_rows": wal_rows(new),
                        "open_seconds": open_cost(new, args.dim),
                    }
                )
            vac = Path(tmp) / f"t{threshold}-vacuum"
            shutil.copytree(Path(tmp) / f"t{threshold}-n{args.added.split(',')[0]}", vac)
            db = sqlite3.connect(vac / "chroma.sqlite3")
            db.execute("VACUUM")
            db.close()
            diff = changed(base, vac)
            rows.append(
                {
                    "sync_threshold": threshold,
                    "added": f"{args.added.split(',')[0]} + VACUUM",
                    "size": size(vac),
                    "changed_sqlite": diff["sqlite"],
                    "changed_hnsw": diff["hnsw"],
                    "wal_rows": wal_rows(vac),
                    "open_seconds": open_cost(vac, args.dim),
                }
            )
    print(f"base: {args.records} records x {args.dim} dims; chunks of {CHUNK >> 10} KiB")
    print(
        f"{'sync_threshold':>14} {'added':>13} {'size MiB':>9} {'sqlite MiB':>11} {'hnsw MiB':>9} "
        f"{'WAL rows':>9} {'open s':>7}"
    )
    for r in rows:
        print(
            f"{r['sync_threshold']:>14} {r['added']!s:>13} {r['size'] / MiB:>9.1f} "
            f"{r['changed_sqlite'] / MiB:>11.2f} {r['changed_hnsw'] / MiB:>9.2f} "
            f"{r['wal_rows']:>9} {r['open_seconds']:>7.2f}"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
