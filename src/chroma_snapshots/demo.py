"""``chroma-snapshots demo``: the whole story in under a minute on a local S3 server.

Builds a SQLite database shaped like chroma's (rows with float32 embeddings),
publishes it to moto's S3 server on 127.0.0.1, checks it out through the /tmp
cache (cold, then warm), changes ten rows, publishes again, checks out the new
version incrementally and shows how little moved, then rolls back.
"""

from __future__ import annotations

import random
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .backends.s3 import S3Backend
from .cache import CachedStore
from .models import TransferStats
from .remote import RemoteStore
from .testing.s3server import MotoServer

DIM = 384


def build_database(path: Path, rows: int, seed: int = 0) -> None:
    """A SQLite file of ``rows`` documents with explicit DIM-d float32 embeddings."""
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE embeddings (id TEXT PRIMARY KEY, document TEXT, vector BLOB)")
    db.executemany(
        "INSERT INTO embeddings VALUES (?, ?, ?)",
        (
            (
                f"doc-{i}",
                f"receipt {i} merchant {rng.randrange(500)} total {rng.random() * 100:.2f}",
                struct.pack(f"{DIM}f", *(rng.random() for _ in range(DIM))),
            )
            for i in range(rows)
        ),
    )
    db.commit()
    db.close()


def update_rows(path: Path, count: int) -> None:
    """Upsert ``count`` rows, the way a compaction adds a few new receipts."""
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
        (
            (f"new-{i}", f"new receipt {i}", struct.pack(f"{DIM}f", *([0.5] * DIM)))
            for i in range(count)
        ),
    )
    db.commit()
    db.close()


def _row(step: str, s: TransferStats) -> str:
    mb = 1 << 20
    return (
        f"{step:<34}{s.seconds:>8.2f}{s.requests:>9}{s.bytes_uploaded / mb:>11.2f}"
        f"{s.bytes_downloaded / mb:>11.2f}{s.bytes_reused / mb:>11.2f}"
    )


def run_demo(*, size_mb: int = 48, echo: Callable[[str], None] = print) -> list[str]:
    """Run the demo, print its table through ``echo`` and return the table's rows."""
    rows: list[str] = []
    with (
        MotoServer() as server,
        tempfile.TemporaryDirectory(prefix="chroma-snapshots-demo-") as tmp,
    ):
        work = Path(tmp)
        bucket = server.create_bucket("demo")
        echo(f"local S3 server (moto) on {server.endpoint_url}, bucket s3://{bucket}/snapshots")
        store = RemoteStore(S3Backend(bucket, "snapshots", client=server.client()))
        src = work / "chroma"
        src.mkdir()
        t = time.monotonic()
        build_database(src / "chroma.sqlite3", rows=max(1, size_mb * (1 << 20) // 1700))
        echo(
            f"built a {(src / 'chroma.sqlite3').stat().st_size / 2**20:.0f} MiB database "
            f"in {time.monotonic() - t:.1f}s"
        )

        def record(step: str, s: TransferStats) -> None:
            rows.append(_row(step, s))

        v1 = store.publish("receipts", src, message="initial")
        record("publish v1 (cold)", v1.stats)
        cached = CachedStore(store, work / "cache")
        with cached.checkout("receipts") as snap:
            record("checkout v1 (cold, into cache)", snap.stats)
        with cached.checkout("receipts") as snap:
            record("checkout v1 (warm: cached)", snap.stats)
        record("publish v1 again (unchanged)", store.publish("receipts", src).stats)
        update_rows(src / "chroma.sqlite3", 10)
        v2 = store.publish("receipts", src, message="10 new receipts")
        record("publish v2 (10 rows changed)", v2.stats)
        with cached.checkout("receipts") as snap:
            record("checkout v2 (incremental)", snap.stats)
        store.set_ref("receipts", "latest", v1.version, expected=v2.version)
        rolled = store.resolve("receipts")
        echo(
            f"\n{'step':<34}{'seconds':>8}{'requests':>9}"
            f"{'up MiB':>11}{'down MiB':>11}{'reused MiB':>11}"
        )
        for row in rows:
            echo(row)
        echo(f"\nrollback: latest {v2.version} -> {rolled.version} (compare-and-swap)")
        echo(
            f"v2 uploaded {v2.stats.bytes_uploaded / 2**20:.2f} MiB of a "
            f"{v2.total_size / 2**20:.1f} MiB snapshot; every checkout verified every chunk."
        )
        store.close()
    return rows
