"""Publish or check out under resource limits, in its own process (the exhaustion tests).

usage: resource_worker.py {publish,checkout,cached} STORE_DIR TREE_DIR NOFILE [drop]
Sets RLIMIT_NOFILE to NOFILE, runs the operation, prints the peak RSS in MiB (VmHWM).
``cached``: a checkout into a cache beside TREE_DIR, then a copy of it to TREE_DIR.
``drop``: the store drops what it writes from the page cache (``drop_behind``).
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.file import FileBackend

if __name__ == "__main__":
    op, store_dir, tree, nofile = sys.argv[1:5]
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), int(nofile)))
    store = RemoteStore(FileBackend(store_dir), drop_behind=sys.argv[5:] == ["drop"])
    if op == "publish":
        store.publish("db", tree)
    elif op == "cached":
        cached = CachedStore(store, Path(tree).with_name("cache"))
        cached.checkout("db").release()
        cached.checkout("db", dest=tree)  # copied from the cached files
    else:
        store.checkout("db", dest=tree)
    status = Path("/proc/self/status").read_text()
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    print(int(hwm[1]) // 1024 if hwm else -1)
