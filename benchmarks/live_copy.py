"""Copying a chroma database while another process writes to it: plain copy vs publish_client.

A real chromadb database (explicit embeddings, built offline) gets a writer process that
keeps upserting batches of 200 records (tests/chroma_writer.py). While it runs, N plain
``shutil.copytree`` copies are each validated (chroma_snapshots.chroma.validate: PRAGMA
quick_check, chroma opens it, counts every collection, finds a stored vector through the
index), then N ``publish_client`` rounds publish to a local file store and the checked-out
version is validated the same way. ``publish_client`` retakes a copy that changed under it
(up to 5 attempts); the retakes are counted. The writer must still be alive at the end.

usage: python benchmarks/live_copy.py [--copies 20] [--records 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _chroma import add
from _report import write_json

import chroma_snapshots.chroma as chroma
from chroma_snapshots import open_store
from chroma_snapshots.errors import IntegrityError

WRITER = Path(__file__).resolve().parent.parent / "tests" / "chroma_writer.py"
DIM = 32  # the writer's dimension


def wait_for_writes(db: Path, writer: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Return once the writer has changed the database files (its first upsert landed)."""

    def stamp() -> list[tuple[str, int, int]]:
        out = []
        for p in db.iterdir():
            try:  # SQLite removes its journal between the listing and the stat
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((p.name, st.st_size, st.st_mtime_ns))
        return sorted(out)

    before, end = stamp(), time.monotonic() + timeout
    while stamp() == before:
        if writer.poll() is not None:
            raise RuntimeError(f"the writer exited with {writer.returncode}")
        if time.monotonic() > end:
            raise RuntimeError("the writer changed nothing in time")
        time.sleep(0.05)


def outcome(check: Callable[[], Any], work: Path) -> str:
    """The word passed, or the kind of failure (error type and message, paths shortened)."""
    try:
        check()
    except (IntegrityError, OSError, shutil.Error) as e:
        message = re.sub(rf"{re.escape(str(work))}/[^/:' ]+", "COPY", str(e))
        return f"{type(e).__name__}: {message[:100]}"
    return "passed"


def plain_copy(db: Path, dst: Path) -> None:
    shutil.copytree(db, dst)
    chroma.validate(dst)


def run(copies: int, records: int, work: Path) -> list[dict[str, Any]]:
    db = work / "db"
    add(db, records, DIM, seed=1)
    store = open_store(f"file://{work / 'store'}")
    attempts = Counter[str]()
    real_copy = chroma.consistent_copy

    def counted_copy(src: Path, dst: Path) -> None:
        attempts["copies"] += 1
        real_copy(src, dst)

    def published(r: int) -> None:
        info = chroma.publish_client(store, "db", db)
        chroma.validate(store.checkout("db", info.version, dest=work / f"safe{r}").path)

    chroma.consistent_copy = counted_copy  # count retakes
    writer = subprocess.Popen([sys.executable, str(WRITER), str(db)])
    try:
        wait_for_writes(db, writer)
        plain = [outcome(partial(plain_copy, db, work / f"plain{r}"), work) for r in range(copies)]
        safe = [outcome(partial(published, r), work) for r in range(copies)]
        alive = writer.poll() is None
    finally:
        writer.kill()
        writer.wait()
        chroma.consistent_copy = real_copy
    if not alive:
        raise RuntimeError("the writer died during the measurement: nothing was measured")
    return [
        _row("shutil.copytree + validate", plain, copies),
        _row("publish_client + checkout + validate", safe, attempts["copies"]),
    ]


def _row(approach: str, results: list[str], copies_taken: int) -> dict[str, Any]:
    failures = Counter(r for r in results if r != "passed")
    return {
        "approach": approach,
        "rounds": len(results),
        "passed": results.count("passed"),
        "failed": len(results) - results.count("passed"),
        "copies_taken": copies_taken,
        "failures": dict(failures),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--records", type=int, default=10)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-bench-") as tmp:
        rows = run(args.copies, args.records, Path(tmp))
    print(f"{'approach':<38} {'rounds':>6} {'passed':>6} {'failed':>6} {'copies taken':>12}")
    for r in rows:
        print(
            f"{r['approach']:<38} {r['rounds']:>6} {r['passed']:>6} {r['failed']:>6} "
            f"{r['copies_taken']:>12}"
        )
        for kind, n in sorted(r["failures"].items()):
            print(f"    {n} x {kind}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
