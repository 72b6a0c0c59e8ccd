"""Cold start of the query handler with and without init-phase hydration.

A chroma snapshot is published to a local S3 (moto's server on 127.0.0.1). Each run is a
fresh process with an empty /tmp cache, as a new Lambda container: it resolves the handler
the way Lambda's init phase does (``import ...query; query.handler``), then handles one SQS
batch (the first invocation) and a second one (warm). With ``CHROMA_SNAPSHOTS_INIT_SECONDS``
the checkout happens during init, which Lambda does not bill for on-demand functions
(up to its 10 s init limit) and which runs before the first event arrives.

usage: python examples/lambda/cold_start.py [--records 20000] [--dim 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

INIT_BUDGET = "8"  # seconds: under Lambda's 10 s init limit


def publish(endpoint: str, bucket: str, records: int, dim: int, tmp: Path) -> int:
    """A snapshot of ``records`` vectors; returns its size in bytes."""
    import chromadb

    from chroma_snapshots.backends.s3 import S3Backend, S3Settings
    from chroma_snapshots.chroma import client_settings, publish_client
    from chroma_snapshots.stores.remote import RemoteStore

    rng = random.Random(0)
    client = chromadb.PersistentClient(path=str(tmp / "db"), settings=client_settings())
    col = client.get_or_create_collection("receipts", embedding_function=None)
    for lo in range(0, records, 2000):
        ids = [f"receipt-{i}" for i in range(lo, min(lo + 2000, records))]
        vectors = [[rng.random() for _ in range(dim)] for _ in ids]
        col.add(ids=ids, embeddings=cast(Any, vectors), documents=ids)
    store = RemoteStore(S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=endpoint)))
    return publish_client(store, "receipts", client).total_size


def child(dim: int) -> None:
    """One cold container: init, first invocation, second invocation (JSON on stdout)."""
    from chroma_snapshots.testing.lambda_context import FakeContext

    t0, c0 = time.monotonic(), time.process_time()
    import chroma_snapshots.aws_lambda.query as query

    handler = query.handler  # Lambda resolves the handler during init
    t1, c1 = time.monotonic(), time.process_time()
    body = json.dumps({"collection": "receipts", "query_embeddings": [[0.5] * dim]})
    event = {"Records": [{"messageId": "m0", "receiptHandle": "r", "body": body}]}
    failed = handler(event, FakeContext(60))["batchItemFailures"]
    t2, c2 = time.monotonic(), time.process_time()
    handler(event, FakeContext(60))
    t3 = time.monotonic()
    handler.close()
    out = {
        "init": t1 - t0,
        "first": t2 - t1,
        "second": t3 - t2,
        "init_cpu": c1 - c0,
        "first_cpu": c2 - c1,
        "failed": len(failed),
    }
    print(json.dumps(out))


def measure(env: dict[str, str], dim: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--dim", str(dim)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if got["failed"]:
        raise RuntimeError(f"the first invocation failed: {out.stderr[-2000:]}")
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.dim)
        return
    from chroma_snapshots.cli.localserver import CREDENTIALS
    from chroma_snapshots.testing import MotoServer

    results: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    with MotoServer() as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(CREDENTIALS)
        bucket = server.create_bucket()
        size = publish(server.endpoint_url, bucket, args.records, args.dim, Path(tmp))
        for run in range(args.runs):
            for mode in ("without", "with"):
                env = {
                    **os.environ,
                    "CHROMA_SNAPSHOTS_URL": f"s3://{bucket}/snaps",
                    "AWS_ENDPOINT_URL_S3": server.endpoint_url,
                    "CHROMA_SNAPSHOTS_NAME": "receipts",
                    "CHROMA_SNAPSHOTS_CACHE_DIR": str(Path(tmp) / f"cache-{mode}-{run}"),
                    "CHROMA_SNAPSHOTS_INIT_SECONDS": INIT_BUDGET if mode == "with" else "0",
                }
                results[mode].append(measure(env, args.dim))
    print(f"snapshot: {args.records} x {args.dim} ({size / 2**20:.1f} MiB), {args.runs} runs")
    keys = ("init", "first", "second", "init_cpu", "first_cpu")
    print(f"{'init-phase hydration':22}" + "".join(f"{k + ' s':>12}" for k in keys))
    for mode, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        print(f"{mode:22}" + "".join(f"{med[k]:12.3f}" for k in keys))
    if args.json:
        record = {"records": args.records, "dim": args.dim, "bytes": size, "runs": results}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
