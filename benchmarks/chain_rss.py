"""Peak RSS of a cold checkout of a version whose chunks are delta chains.

Builds an incompressible tree of ``--mib`` MiB (4 files) in a file:// store, then
publishes ``--depth`` more versions, each changing a few bytes in every chunk against
its parent (so every chunk becomes a delta), and checks out each depth (0 = keyframes
only) cold, to a fresh folder, in a fresh process: prints its peak RSS.

    python benchmarks/chain_rss.py --mib 1024 --depth 2
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from chroma_snapshots import RemoteStore, open_backend

MiB = 1 << 20
FILES = 4


def _write(root: Path, files: list[bytearray]) -> Path:
    for i, data in enumerate(files):
        (root / "seg").mkdir(parents=True, exist_ok=True)
        (root / "seg" / f"part{i}.bin").write_bytes(data)
    return root


def build(tmp: Path, mib: int, depth: int) -> list[str]:
    """Publish the versions; return their ids, keyframes first."""
    store = RemoteStore(open_backend(f"file://{tmp / 'store'}"))
    rng = random.Random(5)
    per = mib // FILES  # MiB a file (randbytes takes at most 256 MiB at once)
    files = [bytearray(b"".join(rng.randbytes(MiB) for _ in range(per))) for _ in range(FILES)]
    old = _write(tmp / "v0", files)
    versions = [store.publish("db", old).version]
    step = store.chunk_size
    for d in range(1, depth + 1):
        for data in files:
            for at in range(0, len(data), step):
                data[at + rng.randrange(min(step, len(data) - at))] ^= 0xFF
        new = _write(tmp / f"v{d}", files)
        versions.append(store.publish("db", new, parent_dir=old).version)
        shutil.rmtree(old)
        old = new
    shutil.rmtree(old)
    return versions


def measure(store: str, version: str, dest: str) -> None:
    """In this (fresh) process: check ``version`` out cold, print peak RSS in MiB."""
    RemoteStore(open_backend(f"file://{store}")).checkout("db", version, dest)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    if args.build:
        print(" ".join(build(Path(args.build), args.mib, args.depth)))
        return
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-chain-rss-") as t:
        tmp = Path(t)
        # each step in a process of its own: a child starts with its parent's peak RSS
        cmd = [sys.executable, __file__, "--build", t, f"--mib={args.mib}", f"--depth={args.depth}"]
        versions = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
        for d, v in enumerate(versions):
            dest = tmp / f"out{d}"
            cmd = [sys.executable, __file__, "--measure", str(tmp / "store"), v, str(dest)]
            rss = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            print(f"{args.mib} MiB, {d} delta(s) per chunk: peak RSS {rss.strip()} MiB")
            shutil.rmtree(dest)


if __name__ == "__main__":
    main()
