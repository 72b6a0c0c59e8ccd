"""An EFS-like mount: copying a raw chroma directory vs checking out from the snapshot layout.

A FUSE filesystem (chroma_snapshots.testing.faultfs) adds a fixed latency to every
operation and caps read throughput, like EFS does. Side by side, on the same data:

- ``shutil.copytree`` of the raw chroma directory on the mount (what the field deployment did);
- ``checkout`` from the content-addressed layout on the same mount (efs://, hang-guarded);
- ``checkout`` from S3 (moto on 127.0.0.1) for reference.

Reports wall time and the filesystem operations the mount served. Needs root and FUSE.

usage: python benchmarks/efs.py [--size-mb 256] [--segments 20] [--latency-ms 3] [--mbps 200]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _data import MiB, make_chroma_dir
from _report import write_json

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.faultfs import FaultyMount


def run(
    size_mb: int, segments: int, latency_ms: float, mbps: float, work: Path
) -> list[dict[str, Any]]:
    backing, raw = work / "backing", work / "backing" / "raw"
    make_chroma_dir(raw, size_mb * MiB, segments)
    total = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    files = sum(1 for p in raw.rglob("*") if p.is_file())
    RemoteStore(FileBackend(backing / "store")).publish("db", raw)
    rows: list[dict[str, Any]] = []
    with FaultyMount(backing, work / "mnt", state_dir=work) as mount:
        mount.set_mode(f"latency {latency_ms / 1000} {mbps}")

        def measure(approach: str, fn: Any) -> None:
            before = mount.op_counts()
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
            ops = mount.op_counts() - before
            rows.append(
                {
                    "approach": approach,
                    "seconds": seconds,
                    "fs_ops": sum(ops.values()),
                    "metadata_ops": sum(v for k, v in ops.items() if k not in ("read", "write")),
                    "MBps": total / MiB / seconds,
                }
            )

        measure(
            "shutil.copytree (raw dir on mount)",
            lambda: shutil.copytree(work / "mnt" / "raw", work / "copy"),
        )
        guard = MountGuard(str(work / "mnt" / "store"), op_timeout=60)
        efs = RemoteStore(FileBackend(work / "mnt" / "store", create=False, guard=guard))
        measure("checkout (efs://, snapshot layout)", lambda: efs.checkout("db", dest=work / "co"))
        efs.close()
    with MotoServer() as server:
        bucket = server.create_bucket("bench")
        s3 = RemoteStore(S3Backend(bucket, "snaps", client=server.client()))
        s3.publish("db", raw)
        t = time.perf_counter()
        s3.checkout("db", dest=work / "s3co")
        seconds = time.perf_counter() - t
        rows.append(
            {
                "approach": "checkout (s3://, moto)",
                "seconds": seconds,
                "fs_ops": 0,
                "metadata_ops": 0,
                "MBps": total / MiB / seconds,
            }
        )
    for r in rows:
        r.update(size_bytes=total, files=files, latency_ms=latency_ms, cap_mbps=mbps)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--segments", type=int, default=20)
    ap.add_argument("--latency-ms", type=float, default=3.0)
    ap.add_argument("--mbps", type=float, default=200.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-efs-bench-") as tmp:
        rows = run(args.size_mb, args.segments, args.latency_ms, args.mbps, Path(tmp))
    r0 = rows[0]
    print(
        f"{r0['size_bytes'] / MiB:.0f} MiB in {r0['files']} files; mount: {args.latency_ms} ms per "
        f"operation, reads capped at {args.mbps} MB/s"
    )
    print(f"{'approach':<38} {'seconds':>8} {'fs ops':>8} {'metadata':>9} {'MiB/s':>7}")
    for r in rows:
        print(
            f"{r['approach']:<38} {r['seconds']:>8.2f} {r['fs_ops']:>8} {r['metadata_ops']:>9} "
            f"{r['MBps']:>7.1f}"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
