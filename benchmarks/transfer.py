"""Cold, warm and incremental checkouts side by side with "download the whole tar.gz every time".

Everything runs in one process against one moto S3 server on 127.0.0.1, behind a counting
proxy that records what the server really received (so requests and bytes are the server's
view). The snapshot is chroma-shaped (benchmarks/_data.py): a real SQLite file of embedding
rows (~30%) plus incompressible HNSW-like segment files (~70%). The "1% change" rewrites
scattered 4 KiB pages totalling 1% of the bytes, the way SQLite and HNSW updates land.

usage: python benchmarks/transfer.py [--size-mb 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _data import MiB, change_pages, make_chroma_dir
from _report import write_json

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.proxy import CountingProxy


def tar_gz(src: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        tar.add(src, arcname=".")
    return buf.getvalue()


def measure(proxy: CountingProxy, fn: Callable[[], Any]) -> dict[str, float]:
    proxy.reset()
    t, cpu = time.perf_counter(), time.process_time()
    fn()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    seen = proxy.reset()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "requests": len(seen),
        "bytes_down": sum(r.response_bytes for r in seen if r.method == "GET"),
        "bytes_up": sum(r.request_bytes for r in seen),
    }


def run(size_mb: int, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with MotoServer() as server, CountingProxy(server.endpoint_url) as proxy:
        bucket = server.create_bucket("bench")
        client = server.client(endpoint_url=proxy.url)
        store = RemoteStore(S3Backend(bucket, "snaps", client=client))
        cached = CachedStore(store, work / "cache")
        src = work / "src"
        make_chroma_dir(src, size_mb * MiB)
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())

        def row(approach: str, scenario: str, m: dict[str, float], **extra: Any) -> None:
            rows.append({"approach": approach, "scenario": scenario, **m, **extra})

        row("chroma-snapshots", "publish (cold)", measure(proxy, lambda: store.publish("db", src)))
        blob: dict[str, bytes] = {}

        def tar_publish() -> None:
            blob["v"] = tar_gz(src)
            client.put_object(Bucket=bucket, Key="tar/latest.tar.gz", Body=blob["v"])

        row("tar.gz + boto3", "publish (cold)", measure(proxy, tar_publish))

        def tar_checkout(dest: Path) -> None:
            data = client.get_object(Bucket=bucket, Key="tar/latest.tar.gz")["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                tar.extractall(dest, filter="data")

        n = [0]

        def fresh() -> Path:
            n[0] += 1
            return work / f"out{n[0]}"

        row("tar.gz + boto3", "cold checkout", measure(proxy, lambda: tar_checkout(fresh())))
        row(
            "chroma-snapshots",
            "cold checkout (no cache)",
            measure(proxy, lambda: store.checkout("db", dest=fresh())),
        )
        row(
            "chroma-snapshots",
            "cold checkout (cache)",
            measure(proxy, lambda: cached.checkout("db").release()),
        )
        row(
            "chroma-snapshots",
            "warm checkout (unchanged)",
            measure(proxy, lambda: cached.checkout("db").release()),
        )
        row(
            "tar.gz + boto3",
            "warm checkout (unchanged)",
            measure(proxy, lambda: tar_checkout(fresh())),
        )
        # Consumer isolation: repair what a consumer changed vs hand out a private copy.
        row(
            "chroma-snapshots",
            "private copy (checkout with dest)",
            measure(proxy, lambda: cached.checkout("db", dest=fresh())),
        )
        with cached.checkout("db") as snap:
            change_pages(snap.path, 0.001, seed=5)  # a consumer writes to its checkout
        row(
            "chroma-snapshots",
            "warm checkout after consumer wrote 0.1%",
            measure(proxy, lambda: cached.checkout("db").release()),
        )

        changed = change_pages(src, 0.01)
        v2: dict[str, Any] = {}
        row(
            "chroma-snapshots",
            "publish after 1% change",
            measure(proxy, lambda: v2.setdefault("info", store.publish("db", src))),
        )
        row("tar.gz + boto3", "publish after 1% change", measure(proxy, tar_publish))
        manifest = store.load_manifest("db", v2["info"].version)
        new_packs = set(_new_packs(store, v2["info"]))
        new_chunks = [c for c in manifest.chunks.values() if c.pack in new_packs]
        physical = sum(c.length for c in new_chunks)
        m = measure(proxy, lambda: cached.checkout("db").release())
        row(
            "chroma-snapshots",
            "incremental checkout (1% change)",
            m,
            limit_bytes=physical,
            ratio_to_limit=m["bytes_down"] / max(physical, 1),
        )
        row(
            "tar.gz + boto3",
            "checkout after 1% change",
            measure(proxy, lambda: tar_checkout(fresh())),
        )
        for r in rows:
            r.update(size_bytes=total, changed_bytes=changed)
        store.close()
    return rows


def _new_packs(store: RemoteStore, info: Any) -> list[str]:
    parent = store.load_manifest("db", info.parent)
    return sorted(store.load_manifest("db", info.version).packs - parent.packs)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-bench-") as tmp:
        rows = run(args.size_mb, Path(tmp))
    size, changed = rows[0]["size_bytes"] / MiB, rows[0]["changed_bytes"] / MiB
    print(f"snapshot {size:.0f} MiB, 1% change = {changed:.1f} MiB")
    head = f"{'approach':<18} {'scenario':<40} {'seconds':>8} {'CPU-s':>6} {'requests':>9}"
    print(f"{head} {'MiB up':>8} {'MiB down':>9}")
    for r in rows:
        extra = (
            f"  ({r['ratio_to_limit']:.2f}x the changed chunks)" if "ratio_to_limit" in r else ""
        )
        print(
            f"{r['approach']:<18} {r['scenario']:<40} {r['seconds']:>8.3f} "
            f"{r['cpu_seconds']:>6.2f} {r['requests']:>9} "
            f"{r['bytes_up'] / MiB:>8.1f} {r['bytes_down'] / MiB:>9.1f}{extra}"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
