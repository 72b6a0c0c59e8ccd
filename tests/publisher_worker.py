"""A publisher run as a separate OS process by the concurrency and crash tests.

usage: publisher_worker.py URL ENDPOINT MODE WRITER COUNT WORKDIR [--steps]
MODE "append": check out latest, add one file, publish with expected=<that version>, retry on
conflict (the compaction pattern). MODE "churn": publish fresh random content in a loop.
Prints "published ..." after each publish; --steps: announce each backend call and wait for
the parent's go (kill_points.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kill_points import marked

from chroma_snapshots import (
    ConflictError,
    RemoteStore,
    SnapshotNotFoundError,
    StoreConfig,
    open_remote,
)


def _store(url: str, endpoint: str) -> RemoteStore:
    store = open_remote(StoreConfig(url=url, s3_endpoint_url=endpoint or None))
    store.chunk_size, store.pack_target = 4096, 65536
    store.backend = marked(store.backend)
    return store


def append(store: RemoteStore, writer: int, count: int, work: Path) -> None:
    for seq in range(count):
        attempt = 0
        while True:
            attempt += 1
            tree = work / f"w{writer}-{seq}-{attempt}"
            base: str | None
            try:
                base = store.resolve("db").version
                store.checkout("db", base, dest=tree)
            except SnapshotNotFoundError:
                base = None
                tree.mkdir(parents=True)
            (tree / f"w{writer}-{seq}.txt").write_text(f"{writer}:{seq}")
            try:
                meta: dict[str, object] = {"writer": writer, "seq": seq}
                info = store.publish("db", tree, expected=base, metadata=meta)
                print(f"published {info.version}", flush=True)
                break
            except ConflictError:
                continue
            finally:
                shutil.rmtree(tree)


def churn(store: RemoteStore, writer: int, count: int, work: Path) -> None:
    tree = work / f"churn{writer}"
    tree.mkdir(parents=True, exist_ok=True)
    for seq in range(count):
        (tree / "chroma.sqlite3").write_bytes(os.urandom(2 << 20))
        (tree / "seq.txt").write_text(str(seq))
        store.publish("db", tree)
        print(f"published {seq}", flush=True)


if __name__ == "__main__":
    url, endpoint, mode, writer, count, work = sys.argv[1:7]
    run = append if mode == "append" else churn
    run(_store(url, endpoint), int(writer), int(count), Path(work))
