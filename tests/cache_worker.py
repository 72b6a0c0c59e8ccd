"""A process that checks out through a CachedStore (for the multi-process cache tests).

usage: cache_worker.py ENDPOINT BUCKET CACHE_DIR [--steps]
    Checks out latest from S3; prints 'version V', then the sha256 of every file of the
    checkout, one 'path digest' per line. --steps: announce each backend call, and the
    checkout held ("step holding checkout"), and wait for the parent's go (kill_points.py).
usage: cache_worker.py --loop STORE_DIR CACHE_DIR MAX_BYTES COUNT SEED REF...
    COUNT checkouts of random REFs (versions or ref names) from a file store through a cache
    capped at MAX_BYTES; prints one JSON line per checkout: {"version", "digest"} of what it
    served and the cache's usage() while holding it, or {"error", "documented", "message"}.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from kill_points import STEPS, marked, reached

from chroma_snapshots import CachedStore, RemoteStore, SnapshotError
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings


def tree_digest(root: Path) -> str:
    """One digest of every file's path and bytes under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            h.update(f"{p.relative_to(root).as_posix()} {digest}\n".encode())
    return h.hexdigest()


def loop(store_dir: str, cache_dir: str, max_bytes: str, count: str, seed: str, *refs: str) -> None:
    store = CachedStore(
        RemoteStore(FileBackend(store_dir, create=False)),
        cache_dir,
        max_bytes=int(max_bytes),
        min_free_bytes=0,
    )
    rng = random.Random(int(seed))
    for _ in range(int(count)):
        out: dict[str, object]
        try:
            with store.checkout("db", rng.choice(refs), deadline=60) as snap:
                # what the cache counts while this and the other processes hold theirs
                out = {"version": snap.info.version, "digest": tree_digest(snap.path),
                       "usage": store.usage()}  # fmt: skip
        except Exception as e:  # the test counts every type; only documented ones may occur
            out = {
                "error": type(e).__name__,
                "documented": isinstance(e, SnapshotError),
                "message": str(e),
            }
        print(json.dumps(out), flush=True)


def latest_from_s3(endpoint: str, bucket: str, cache_dir: str) -> None:
    backend = S3Backend(bucket, "snaps", settings=S3Settings(endpoint_url=endpoint))
    store = CachedStore(RemoteStore(marked(backend)), cache_dir)
    with store.checkout("db", deadline=120) as snap:
        if STEPS:
            reached("holding checkout")
        print("version", snap.info.version)
        for p in sorted(Path(snap.path).rglob("*")):
            if p.is_file():
                print(
                    p.relative_to(snap.path).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()
                )


if __name__ == "__main__":
    if sys.argv[1] == "--loop":
        loop(*sys.argv[2:])
    else:
        latest_from_s3(*sys.argv[1:4])
