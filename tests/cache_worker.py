"""A process that checks out latest through a CachedStore (for the multi-process cache tests).

usage: cache_worker.py ENDPOINT BUCKET CACHE_DIR
Prints 'version V', then the sha256 of every file of the checkout, one 'path digest' per line.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings

if __name__ == "__main__":
    endpoint, bucket, cache_dir = sys.argv[1:4]
    backend = S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=endpoint))
    store = CachedStore(RemoteStore(backend), cache_dir)
    with store.checkout("db", deadline=120) as snap:
        print("version", snap.info.version)
        for p in sorted(Path(snap.path).rglob("*")):
            if p.is_file():
                print(
                    p.relative_to(snap.path).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()
                )
