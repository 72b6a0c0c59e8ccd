"""S3 faults on every request type (503, 500 after the write, reset, stalled and truncated
bodies, latency) at 5% and 20%: a publish, checkout or prune either succeeds with verified
data or fails with a documented error within its deadline; the ref never names an incomplete
version. Multipart uploads: tests/test_multipart_faults.py (a fault at each request).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from botocore.config import Config
from reliability import LONG, record, runs

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faults import FaultPlan
from chroma_snapshots.testing.proxy import CountingProxy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
DEADLINE = 15.0
# A bound that shows the deadline is honoured, not a performance target: a deadline abandons
# the waiting call, and a loaded machine may take a moment to schedule the return.
MAX_OVERRUN = 2.0


def _tree(root: Path, seed: int) -> Path:
    rnd = os.urandom(400_000) + seed.to_bytes(4, "big")
    return write_tree(
        root,
        {
            "chroma.sqlite3": rnd,
            "seg/data_level0.bin": os.urandom(300_000),
            "seg/header.bin": b"h" * 100 + bytes([seed % 256]),
            "notes.txt": b"compressible " * 20_000,
        },
    )


def _store(client: S3Client, bucket: str) -> RemoteStore:
    # small packs: a publish is several pack PUTs, a checkout several ranged GETs
    return RemoteStore(S3Backend(bucket, "snaps", client=client), pack_target=128 << 10)


def _timed(
    outcomes: Counter[str], durations: dict[str, list[float]], what: str, fn: Callable[[], T]
) -> T | None:
    """Run one operation, count its outcome and record how long it took."""
    t = time.monotonic()
    result: T | None
    try:
        result = fn()
    except SnapshotError as e:
        outcomes[f"{what} failed: {type(e).__name__}"] += 1
        result = None
    elapsed = time.monotonic() - t
    durations.setdefault(what, []).append(elapsed)
    assert elapsed - DEADLINE < MAX_OVERRUN, f"{what} took {elapsed:.1f}s"
    if result is not None:
        outcomes[f"{what} ok"] += 1
    return result


def _overruns(durations: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per operation: the longest duration and its overrun (duration - deadline; < 0 is
    inside the deadline), the figure docs/RELIABILITY.md reports."""
    return {
        what: {
            "count": len(times),
            "max seconds": round(max(times), 3),
            "max overrun seconds": round(max(times) - DEADLINE, 3),
        }
        for what, times in sorted(durations.items())
    }


# 50% only in the long suite: there some operations must fail, and fail well
@pytest.mark.parametrize("rate", [0.05, 0.2, *([0.5] if LONG else [])])
@pytest.mark.timeout(1800 if LONG else 300)  # each step is bounded by DEADLINE, not the test
def test_publish_and_checkout_under_s3_faults(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, rate: float
) -> None:
    plan = FaultPlan(rate, seed=int(rate * 100), stall_seconds=4.0, latency_seconds=0.05)
    config = Config(
        connect_timeout=1, read_timeout=1, retries={"max_attempts": 4, "mode": "standard"}
    )
    outcomes: Counter[str] = Counter()
    durations: dict[str, list[float]] = {}
    clean = _store(moto_server.client(), s3_bucket)
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        faulty = _store(moto_server.client(endpoint_url=proxy.url, config=config), s3_bucket)
        attempted: list[dict[str, bytes]] = []  # a failed publish may still have landed
        for i in range(runs(ci=4, long=40 if rate <= 0.2 else 15)):
            src = _tree(tmp_path / f"src{i}", i)
            attempted.append(read_tree(src))
            _timed(
                outcomes,
                durations,
                "publish",
                partial(faulty.publish, "db", src, deadline=DEADLINE),
            )
            found = clean.read_ref("db")
            if found is not None:  # whatever latest names is complete and sound
                assert clean.verify("db", found[0].version).ok
            dest = tmp_path / f"out{i}"
            snap = _timed(
                outcomes,
                durations,
                "checkout",
                partial(faulty.checkout, "db", dest=dest, deadline=DEADLINE),
            )
            if snap is not None:
                assert read_tree(dest) in attempted  # never a wrong byte
            else:
                assert not dest.exists()  # nothing half-written
            if i % 2:  # LIST and batch DELETE under faults: prune never breaks what refs name
                prune = partial(faulty.prune, "db", keep_last=1, min_age=0, deadline=DEADLINE)
                _timed(outcomes, durations, "prune", prune)
                found = clean.read_ref("db")
                assert found is None or clean.verify("db", found[0].version).ok
        faulty.close()
    clean.close()
    faults = Counter({k: v for k, v in plan.counts.items() if k[1] != "ok"})
    assert sum(faults.values()) > 0
    assert outcomes["publish ok"] > 0 or rate > 0.2
    record(
        f"s3-faults-{int(rate * 100)}pct",
        {
            **outcomes,
            "faults injected": {f"{t} {k}": n for (t, k), n in sorted(faults.items())},
            "requests": sum(plan.counts.values()),
            "deadline seconds": DEADLINE,
            "durations": _overruns(durations),
        },
    )
