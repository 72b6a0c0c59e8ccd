"""What ``validate`` (and so every ``publish_client`` and compaction) costs, by database size.

For each size, a real chroma database of N records of DIM float32 dimensions is built
offline (explicit embeddings), then validated ROUNDS times. Printed per size: the
database's bytes, the wall seconds of a validation, the caller's CPU seconds and the
child's (it starts a Python, imports chromadb and reads every record's embedding back),
and the child's peak RSS. Compared side by side in the same run with the check chroma's
own client makes: opening it and counting every collection in this process.

usage: python benchmarks/validate_cost.py [--records 10000,100000] [--dim 384]
           [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chromadb
from _chroma import add
from _report import write_json

from chroma_snapshots.chroma import client_settings, close_client, validate


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn: Callable[[], object]) -> dict[str, float]:
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    t0 = time.monotonic()
    fn()
    wall = time.monotonic() - t0
    own2, kids2 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return {  # to the ms: a difference of float sums is -1e-17 when nothing ran
        "wall": round(wall, 3),
        "cpu_caller": round(own2.ru_utime + own2.ru_stime - own.ru_utime - own.ru_stime, 3),
        "cpu_child": round(kids2.ru_utime + kids2.ru_stime - kids.ru_utime - kids.ru_stime, 3),
        "child_peak_rss_mib": kids2.ru_maxrss / 1024,  # the largest child so far
    }


def _count_in_process(db: Path) -> None:
    client = chromadb.PersistentClient(path=str(db), settings=client_settings())
    try:
        for col in client.list_collections():
            col.count()
    finally:
        close_client(client)


def measure(records: int, dim: int, rounds: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="validate-cost-") as tmp:
        db = Path(tmp) / "db"
        add(db, records, dim, seed=1)
        rows = []
        for what, fn in (
            ("validate (child: every embedding)", lambda: validate(db)),
            ("open and count in process", lambda: _count_in_process(db)),
        ):
            runs = [_timed(fn) for _ in range(rounds)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"records": records, "dim": dim, "bytes": _size(db), "check": what, **med})
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="10000,100000", metavar="N,N")
    ap.add_argument("--dim", type=int, default=384, metavar="DIM")
    ap.add_argument("--rounds", type=int, default=3, metavar="N")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    rows = [
        row
        for n in (int(x) for x in args.records.split(","))
        for row in measure(n, args.dim, args.rounds)
    ]
    print(f"{'records':>8} {'MiB':>7}  {'check':<36} {'wall s':>7} {'caller CPU':>10} "
          f"{'child CPU':>9} {'child RSS MiB':>13}")  # fmt: skip
    for r in rows:
        mib, rss = r["bytes"] / 2**20, r["child_peak_rss_mib"]
        print(f"{r['records']:>8} {mib:>7.1f}  {r['check']:<36} {r['wall']:>7.2f} "
              f"{r['cpu_caller']:>10.2f} {r['cpu_child']:>9.2f} {rss:>13.0f}")  # fmt: skip
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
