"""Placing a checkout's files: a cold checkout from a local file store (no network) of many
small files in folders and of a few large files, side by side with `cp -r` of the same
source tree (what a user copying a folder would run). Every file is created, written and
given its mode through folder descriptors (engine/beneath.py); this shows what that costs.

usage: python benchmarks/placement.py [--files 20000] [--folders 200] [--big-mib 256]
           [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _report import write_json

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend


def _small(root: Path, files: int, folders: int) -> None:
    rng = random.Random(1)
    for i in range(files):
        p = root / f"d{i % folders:03d}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(2048 + i % 100))  # over the bundling size: a chunk each


def _big(root: Path, mib: int) -> None:
    rng = random.Random(2)
    root.mkdir(parents=True)
    for i in range(4):
        with open(root / f"big{i}.bin", "wb") as f:
            for _ in range(mib // 4):
                f.write(rng.randbytes(1 << 20))


def _timed(run: Callable[[], None], out: Path, repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds (this process and its children) of ``run``."""
    walls, cpus = [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        r0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
        r1 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpus.append(
            sum(
                b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
                for a, b in zip(r0, r1, strict=True)
            )
        )
    shutil.rmtree(out, ignore_errors=True)
    return sorted(walls)[repeat // 2], sorted(cpus)[repeat // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--folders", type=int, default=200)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="placement-") as tmp:
        trees: dict[str, Callable[[Path], None]] = {
            f"{args.files:,} files of 2 KiB in {args.folders} folders": lambda p: _small(
                p, args.files, args.folders
            ),
            f"4 files, {args.big_mib} MiB": lambda p: _big(p, args.big_mib),
        }
        for i, (label, make) in enumerate(trees.items()):
            src, out = Path(tmp, f"src{i}"), Path(tmp, f"out{i}")
            make(src)
            store = RemoteStore(FileBackend(Path(tmp, f"store{i}")))
            store.publish("db", src)

            def checkout(store: RemoteStore = store, out: Path = out) -> None:
                store.checkout("db", dest=out)

            def cp(src: Path = src, out: Path = out) -> None:
                subprocess.run(["cp", "-r", str(src), str(out)], check=True)

            tools: dict[str, Callable[[], None]] = {
                "chroma-snapshots checkout": checkout,
                "cp -r": cp,
            }
            for tool, run in tools.items():
                wall, cpu = _timed(run, out, args.repeat)
                rows.append({"tree": label, "tool": tool, "wall_s": round(wall, 3),
                             "cpu_s": round(cpu, 3)})  # fmt: skip
    print(f"{'tree':<40} {'tool':<27} {'wall s':>8} {'CPU s':>8}")
    for r in rows:
        print(f"{r['tree']:<40} {r['tool']:<27} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
