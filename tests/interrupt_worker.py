"""A checkout interrupted (SIGINT) while it reads packs slowly (for tests/test_interrupt.py).

usage: interrupt_worker.py STORE_DIR store|cache DEST_OR_CACHE_DIR
    Prints 'reading' as the first pack read starts, then (once interrupted and the
    call's work has ended) one JSON line: {"interrupted", "reads", "reads_after"}: the
    pack reads started in all, and after the interrupt reached the caller.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from chroma_snapshots import CachedStore, RemoteStore, wait_for_cleanups
from chroma_snapshots.backends.file import FileBackend

READ_TIME = 0.05  # each pack read: a slow store, hundreds of reads to go


class SlowReads(FileBackend):
    def __init__(self, root: str) -> None:
        super().__init__(root, create=False)
        self.reads = 0
        self.lock = threading.Lock()

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        with self.lock:
            self.reads += 1
            if self.reads == 1:
                print("reading", flush=True)
        time.sleep(READ_TIME)
        return super().get_into(key, byte_range, buf)


def main() -> None:
    store_dir, through, where = sys.argv[1:4]
    backend = SlowReads(store_dir)
    remote = RemoteStore(backend, chunk_size=4096, workers=4)
    interrupted, reads = False, 0
    try:
        if through == "cache":
            CachedStore(remote, where).checkout("db", deadline=120)
        else:
            remote.checkout("db", dest=where, deadline=120)
    except KeyboardInterrupt:
        interrupted, reads = True, backend.reads
    assert wait_for_cleanups(timeout=120)  # what the call left running: ended, not waited out
    print(json.dumps({"interrupted": interrupted, "reads": backend.reads,
                      "reads_after": backend.reads - reads}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
