"""A checkout interrupted (SIGINT) while it reads packs slowly (for tests/test_interrupt.py).

usage: interrupt_worker.py STORE_DIR store|cache DEST_OR_CACHE_DIR READ_TIME wait|exit
    Prints 'reading' as the first pack read starts (each read takes READ_TIME seconds),
    then, once interrupted: with ``wait``, once the call's work has ended, one JSON line:
    {"interrupted", "reads", "reads_after"}: the pack reads started in all, and after the
    interrupt reached the caller; with ``exit``, exits at once (130), as a CLI does.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from chroma_snapshots import CachedStore, RemoteStore, wait_for_cleanups
from chroma_snapshots.backends.file import FileBackend


class SlowReads(FileBackend):
    def __init__(self, root: str, read_time: float) -> None:
        super().__init__(root, create=False)
        self.read_time = read_time
        self.reads = 0
        self.lock = threading.Lock()

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        with self.lock:
            self.reads += 1
            if self.reads == 1:
                print("reading", flush=True)
        time.sleep(self.read_time)
        return super().get_into(key, byte_range, buf)


def main() -> None:
    store_dir, through, where, read_time, then = sys.argv[1:6]
    backend = SlowReads(store_dir, float(read_time))
    remote = RemoteStore(backend, chunk_size=4096, workers=4)
    interrupted, reads = False, 0
    try:
        if through == "cache":
            CachedStore(remote, where).checkout("db", deadline=120)
        else:
            remote.checkout("db", dest=where, deadline=120)
    except KeyboardInterrupt:
        interrupted, reads = True, backend.reads
        if then == "exit":
            sys.exit(130)
    assert wait_for_cleanups(timeout=120)  # what the call left running: ended, not waited out
    print(json.dumps({"interrupted": interrupted, "reads": backend.reads,
                      "reads_after": backend.reads - reads}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
