"""How fast an open circuit breaker answers: the hang guard after a mount stopped answering.

Once an operation on a guarded mount timed out, the guard's breaker is open and every call
fails at once with StorageTimeoutError ("unhealthy") instead of feeding another worker to the
mount. The target is an answer within 50 ms. Measured on two paths:

- ``MountGuard.run`` with a worker target that sleeps (no FUSE needed);
- ``RemoteStore.resolve`` on an efs:// store whose FUSE mount hangs (needs root and FUSE;
  skipped with a note when FUSE is missing).

The tests (tests/test_deadlines.py, tests/test_hang.py) only check a generous bound; this
script prints the latency distribution.

usage: python benchmarks/breaker.py [--calls 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _report import write_json

from chroma_snapshots import RemoteStore, StorageTimeoutError
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.testing.conformance import write_tree
from chroma_snapshots.testing.faults import Sleeper

TARGET_MS = 50.0


def _latencies(call: Callable[[], object], calls: int) -> dict[str, Any]:
    """Time ``calls`` calls that must each fail fast with the breaker's error."""
    seconds, refused = [], 0
    for _ in range(calls):
        t = time.perf_counter()
        try:
            call()
        except StorageTimeoutError as e:
            refused += "unhealthy" in str(e)
        seconds.append(time.perf_counter() - t)
    ms = sorted(s * 1000 for s in seconds)
    return {
        "calls": calls,
        "refused_by_breaker": refused,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "max_ms": ms[-1],
        "target_ms": TARGET_MS,
        "within_target": ms[-1] < TARGET_MS,
    }


def guard_row(work: Path, calls: int) -> dict[str, Any]:
    guard = MountGuard("bench-mount", op_timeout=0.5, cooldown=3600)
    target = Sleeper(work / "blocked")
    with contextlib.suppress(StorageTimeoutError):
        guard.run(target, "sleep", 60)  # times out: the breaker opens
    row = _latencies(lambda: guard.run(target, "echo", 1), calls)
    guard.close()
    return {"path": "MountGuard.run", **row}


def efs_row(work: Path, calls: int) -> dict[str, Any]:
    from chroma_snapshots.testing.faultfs import FaultyMount

    (work / "backing").mkdir(parents=True)
    RemoteStore(FileBackend(work / "backing")).publish("db", write_tree(work / "src", {"a": b"a"}))
    with FaultyMount(work / "backing", work / "mnt", state_dir=work) as mount:
        guard = MountGuard(str(mount.mountpoint), op_timeout=0.5, cooldown=3600)
        store = RemoteStore(FileBackend(mount.mountpoint, create=False, guard=guard))
        mount.set_mode("hang")
        with contextlib.suppress(StorageTimeoutError):
            store.resolve("db", deadline=2)  # times out: the breaker opens
        row = _latencies(lambda: store.resolve("db", deadline=2), calls)
        mount.set_mode("ok")
        store.close()
    return {"path": "RemoteStore.resolve (efs://, hung FUSE mount)", **row}


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-breaker-bench-") as tmp:
        rows = [guard_row(Path(tmp) / "guard", args.calls)]
        if fuse_available():
            rows.append(efs_row(Path(tmp) / "efs", args.calls))
        else:
            print("no FUSE on this machine: the efs:// row is skipped")
    print(f"open breaker, {args.calls} calls per path; target: every answer < {TARGET_MS:.0f} ms")
    print(f"{'path':<48} {'refused':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for r in rows:
        print(
            f"{r['path']:<48} {r['refused_by_breaker']:>8} {r['p50_ms']:>8.3f} "
            f"{r['p99_ms']:>8.3f} {r['max_ms']:>8.3f}"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
