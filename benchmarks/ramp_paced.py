"""What the ramp of concurrent pack reads (engine/ramp.py) costs where every stream adds:
cold checkouts of one snapshot from moto's S3 server behind a proxy that paces each
response body to ``--stream-mbps`` (as one S3 connection carries a fraction of the
link), every read at once (start 8, as before the ramp) against the ramp as shipped and
with other windows, in alternating rounds, in one process. Prints the median wall time,
the most streams each allowed, and the client's CPU seconds.

usage: python benchmarks/ramp_paced.py [--size-mb 256] [--stream-mbps 20] [--rounds 3]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _data import MiB
from _report import write_json

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.engine import ramp
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.proxy import CountingProxy

# (label, the ramp's start, bytes a level's window needs per stream, its seconds)
VARIANTS = [
    ("every read at once (start 8)", 8, ramp.WINDOW_BYTES, ramp.WINDOW_SECONDS),
    ("from 2, windows 0.2 s + 8 MiB a stream", 2, 8 * MiB, 0.2),
    ("from 2, windows 0.2 s + 2 MiB a stream", 2, 2 * MiB, 0.2),
    ("from 2, windows 0.1 s + 2 MiB a stream", 2, 2 * MiB, 0.1),
    ("from 4, windows 0.2 s + 2 MiB a stream", 4, 2 * MiB, 0.2),
    ("from 4, windows 0.1 s + 2 MiB a stream", 4, 2 * MiB, 0.1),
]


def _checkout(
    store: RemoteStore, dest: Path, start: int, window: int, seconds: float
) -> dict[str, Any]:
    shutil.rmtree(dest, ignore_errors=True)
    defaults = ramp.Ramp.__init__.__kwdefaults__
    assert defaults is not None
    saved = dict(defaults), ramp.WINDOW_BYTES
    defaults["start"], defaults["window"], ramp.WINDOW_BYTES = start, seconds, window
    try:
        t, cpu = time.perf_counter(), time.process_time()
        snap = store.checkout("db", dest=dest)
        wall, used = time.perf_counter() - t, time.process_time() - cpu
    finally:
        defaults.update(saved[0])
        ramp.WINDOW_BYTES = saved[1]
    return {"wall_s": wall, "cpu_s": used, "streams": snap.stats.streams}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--stream-mbps", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="ramp-paced-") as t,
        MotoServer() as server,
        CountingProxy(server.endpoint_url, stream_mbps=args.stream_mbps) as proxy,
    ):
        work = Path(t)
        src = work / "src"
        src.mkdir()
        for i in range(max(1, args.size_mb // 32)):
            (src / f"seg{i}.bin").write_bytes(os.urandom(min(32, args.size_mb) * MiB))
        bucket = server.create_bucket()
        client = server.client(endpoint_url=proxy.url)
        store = RemoteStore(S3Backend(bucket, "snaps", client=client), compression_level=None)
        store.publish("db", src)
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for label, start, window, seconds in order:
                row = _checkout(store, work / "out", start, window, seconds)
                rows.append({"variant": label, "round": r} | row)
    print(f"{args.size_mb} MiB, each response paced to {args.stream_mbps:g} MB/s, "
          f"{args.rounds} rounds (medians)")  # fmt: skip
    print(f"{'variant':40s} {'wall s':>7s} {'streams':>8s} {'CPU s':>6s}")
    for label, *_ in VARIANTS:
        mine = [x for x in rows if x["variant"] == label]
        wall = statistics.median(x["wall_s"] for x in mine)
        cpu = statistics.median(x["cpu_s"] for x in mine)
        streams = sorted({x["streams"] for x in mine})
        print(f"{label:40s} {wall:7.2f} {'/'.join(map(str, streams)):>8s} {cpu:6.2f}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
