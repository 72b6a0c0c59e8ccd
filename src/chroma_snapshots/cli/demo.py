"""``chroma-snapshots demo``: the whole story in under a minute on a local S3 server.

Builds a real chroma database offline (explicit embeddings, no model download),
publishes it to moto's S3 server on 127.0.0.1, checks it out through the /tmp
cache (cold, then warm), adds ten records, publishes again, checks out the new
version incrementally, reads through a hung EFS mirror (falling back to S3 within
the deadline), then rolls back. Everything lives in a temporary directory.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from chroma_snapshots.backends import open_backend
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.cli.localserver import MotoServer
from chroma_snapshots.engine.keys import ref_key
from chroma_snapshots.engine.models import TransferStats
from chroma_snapshots.ops.sync import sync_version
from chroma_snapshots.stores.cache import CachedStore
from chroma_snapshots.stores.fallback import FallbackStore
from chroma_snapshots.stores.remote import RemoteStore

DIM = 384
NAME = "receipts"
EFS_TIMEOUT = 2.0


@dataclass(frozen=True)
class Step:
    """One row of the demo's table."""

    step: str
    seconds: float
    requests: int
    mib_up: float
    mib_down: float
    mib_reused: float
    source: str = ""


def _vectors(n: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.random() for _ in range(DIM)] for _ in range(n)]


@contextmanager
def _client(path: Path) -> Iterator[Any]:
    import chromadb

    from chroma_snapshots.chroma import client_settings, close_client

    client = chromadb.PersistentClient(path=str(path), settings=client_settings())
    try:
        yield client
    finally:
        close_client(client)


def add_receipts(path: Path, start: int, count: int) -> None:
    """Add ``count`` receipts with explicit embeddings to the chroma database at ``path``."""
    with _client(path) as client:
        col = client.get_or_create_collection(NAME, embedding_function=None)
        for lo in range(start, start + count, 2000):
            ids = [f"receipt-{i}" for i in range(lo, min(lo + 2000, start + count))]
            col.add(
                ids=ids,
                embeddings=cast(Any, _vectors(len(ids), lo)),
                documents=[f"receipt {i} merchant {i % 500}" for i in range(lo, lo + len(ids))],
            )


def _nearest(path: Path) -> str:
    with _client(path) as client:
        res = client.get_collection(NAME).query(
            query_embeddings=cast(Any, _vectors(1, 0)), n_results=1, include=[]
        )
        return str(res["ids"][0][0])


def _step(step: str, s: TransferStats, source: str = "") -> Step:
    mb = float(1 << 20)
    return Step(
        step,
        s.seconds,
        s.requests,
        s.bytes_uploaded / mb,
        s.bytes_downloaded / mb,
        s.bytes_reused / mb,
        source,
    )


def _hang_efs_mirror(root: Path) -> None:
    """Make the mirror's latest ref a FIFO: opening it blocks in the kernel forever,
    as a read on a hung NFS mount does (a real blocking syscall, no root needed)."""
    ref = root / ref_key(NAME, "latest")
    ref.unlink()
    os.mkfifo(ref)


def run_demo(*, size_mb: int = 24, echo: Callable[[str], None] = print) -> list[Step]:
    """Run the demo, print its story and table through ``echo``; return the table's rows."""
    from chroma_snapshots.chroma import publish_client

    steps: list[Step] = []
    with (
        MotoServer() as server,
        tempfile.TemporaryDirectory(prefix="chroma-snapshots-demo-") as tmp,
    ):
        work = Path(tmp)
        bucket = server.create_bucket("demo")
        echo(f"local S3 server (moto) on {server.endpoint_url}, bucket s3://{bucket}/snaps")
        s3 = RemoteStore(S3Backend(bucket, "snaps", client=server.client()), label="s3")
        src = work / "chroma"
        t = time.monotonic()
        # ~2.8 KB per record on disk. chroma persists its HNSW index each 1000 records
        # (sync_threshold), rewriting it whole; stay clear of that for the 10 added below
        # (docs/CHROMA.md measures it).
        records = max(1, size_mb * (1 << 20) // 2_800_000) * 1000 + 100
        add_receipts(src, 0, records)
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        echo(
            f"built a chroma database: {records} records, {size / 2**20:.0f} MiB, "
            f"{time.monotonic() - t:.1f}s"
        )

        v1 = publish_client(s3, NAME, src, message="initial")
        steps.append(_step("publish v1 (cold)", v1.stats))
        cache = CachedStore(s3, work / "cache")
        with cache.checkout(NAME) as snap:
            steps.append(_step("checkout v1 (cold, into cache)", snap.stats))
        with cache.checkout(NAME) as snap:
            steps.append(_step("checkout v1 (warm: cached)", snap.stats))
        # chroma writes to a database it opens, so query a private copy, not the cache's
        with cache.checkout(NAME, dest=work / "query") as snap:
            echo(f"query on a checkout: nearest to probe 0 is {_nearest(snap.path)}")
        steps.append(_step("publish v1 again (unchanged)", publish_client(s3, NAME, src).stats))
        add_receipts(src, records, 10)
        v2 = publish_client(s3, NAME, src, message="10 new receipts")
        steps.append(_step("publish v2 (10 records added)", v2.stats))
        with cache.checkout(NAME) as snap:
            steps.append(_step("checkout v2 (incremental)", snap.stats))

        steps += _efs_steps(s3, work, v2.version, echo)
        s3.set_ref(NAME, "latest", v1.version, expected=v2.version)
        rolled = s3.resolve(NAME)
        _print_table(steps, echo)
        echo(f"\nrollback: latest {v2.version} -> {rolled.version} (compare-and-swap)")
        echo(
            f"v2 uploaded {v2.stats.bytes_uploaded / 2**20:.2f} MiB of a "
            f"{v2.total_size / 2**20:.1f} MiB snapshot; every checkout verified every chunk."
        )
        s3.close()
    return steps


def _efs_steps(
    s3: RemoteStore, work: Path, version: str, echo: Callable[[str], None]
) -> list[Step]:
    """Mirror to an 'EFS' directory and read through EFS-then-S3 fallback, healthy then hung."""
    root = work / "efs"
    root.mkdir()
    efs = RemoteStore(open_backend(f"efs://{root}", efs_timeout=EFS_TIMEOUT), label="efs")
    sync_version(s3, efs, NAME, version)
    reader = CachedStore(FallbackStore([efs, s3], primary=0), work / "cache")
    try:
        with reader.checkout(NAME) as snap:
            healthy = _step("checkout via EFS mirror (cold)", snap.stats, snap.source)
        _hang_efs_mirror(root)
        echo(
            "hung the EFS mirror (its ref is now a FIFO: a read blocks in the kernel, as on a "
            f"dead NFS server); the next checkout should give EFS {EFS_TIMEOUT:.0f}s, then use S3"
        )
        with (
            _expected_failovers() as failovers,
            reader.checkout(NAME, deadline=3 * EFS_TIMEOUT) as snap,
        ):
            hung = _step(
                f"same, EFS hung: ref from S3 ({EFS_TIMEOUT:.0f}s)", snap.stats, snap.source
            )
        echo(f"  as expected: {len(failovers)} EFS read timed out and S3 answered instead")
        return [healthy, hung]
    finally:
        efs.close()


@contextmanager
def _expected_failovers() -> Iterator[list[str]]:
    """Collect the fallback store's warnings instead of printing them: in this step EFS
    failing over to S3 is the point, and a warning above the table would read as a failure."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("chroma_snapshots.stores.fallback")
    handler, propagate = Keep(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _print_table(steps: list[Step], echo: Callable[[str], None]) -> None:
    echo(
        f"\n{'step':<36}{'seconds':>8}{'requests':>9}{'up MiB':>9}{'down MiB':>9}"
        f"{'reused MiB':>11}  data from"
    )
    for s in steps:
        echo(
            f"{s.step:<36}{s.seconds:>8.2f}{s.requests:>9}{s.mib_up:>9.2f}{s.mib_down:>9.2f}"
            f"{s.mib_reused:>11.2f}  {s.source}"
        )
