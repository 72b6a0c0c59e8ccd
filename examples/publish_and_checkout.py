"""Publish a directory to a store, change one file, publish again, check out both versions.

usage: python examples/publish_and_checkout.py [STORE_URL]   (default: a temporary file:// store)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from chroma_snapshots import open_store


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = sys.argv[1] if len(sys.argv) > 1 else f"file://{tmp}/store"
        store = open_store(url)
        src = Path(tmp) / "db"
        src.mkdir()
        (src / "chroma.sqlite3").write_bytes(bytes(range(256)) * 40_000)
        v1 = store.publish("example", src, message="first")
        print(f"v1 {v1.version}: uploaded {v1.stats.bytes_uploaded} bytes")
        with open(src / "chroma.sqlite3", "r+b") as f:
            f.write(b"changed page")
        v2 = store.publish("example", src, expected=v1.version, message="one page changed")
        print(
            f"v2 {v2.version}: uploaded {v2.stats.bytes_uploaded} bytes, "
            f"reused {v2.stats.bytes_reused}"
        )
        for version in (v1.version, v2.version):
            snap = store.checkout("example", version, dest=Path(tmp) / version)
            print(f"checked out {version} to {snap.path} ({snap.stats.requests} requests)")


if __name__ == "__main__":
    main()
