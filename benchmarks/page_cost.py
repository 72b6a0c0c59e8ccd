"""What a page costs to fill on this machine, whoever fills it: the bound under the cold
checkout's system time.

Two measurements, each run pinned to one CPU (taskset) in a process of its own:

1. Anonymous memory: GIB GiB touched once a page, then again at once, then again after
   PAUSE seconds idle, then again at once. On a VM that returns freed memory to its host
   (free page reporting), memory freed for a while costs a fault on the host at its next
   first touch; memory freed a moment ago does not.
2. File writes: GIB GiB written in 32 KiB ``pwrite``s to 64 MiB files, after the page cache
   is flushed and PAUSE seconds idle, in the orders writers use: appended (each file
   extended in order, as s5cmd writes), in order into files sized first (``ftruncate``),
   and scattered (files sized first, each written by two streams, four files at once, as a
   checkout's parallel pack reads land), each with the written pages kept, or dropped
   behind every STEP MiB a file (``posix_fadvise(DONTNEED)``, as engine/dropbehind.py).

Rounds rotate the variants. Prints system seconds per GiB; needs root for the page cache
flush (``/proc/sys/vm/drop_caches``).

usage: python benchmarks/page_cost.py [--gib 3] [--rounds 2] [--pause 6] [--cpu 0]
           [--steps 32,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import write_json

FILE = 64 << 20
PIECE = 1 << 20  # a stream's unit: 32 pwrites of 32 KiB
WRITE = 32 << 10


def touch(gib: int, pause: float) -> list[tuple[str, float]]:
    """System s/GiB of touching ``gib`` GiB of fresh anonymous memory, in four passes."""
    out = []
    for label, wait in (("first", 0.0), ("at once", 0.0), (f"after {pause:g} s", pause)):
        time.sleep(wait)
        out.append((label, _touch_once(gib)))
    out.append(("at once, again", _touch_once(gib)))
    return out


def _touch_once(gib: int) -> float:
    t = os.times().system
    m = mmap.mmap(-1, gib << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, gib << 30, mmap.PAGESIZE):
        m[off] = 1
    m.close()
    return (os.times().system - t) / gib


def units(order: str, files: int) -> list[tuple[int, int]]:
    """(file, offset) of each 1 MiB piece, in the order ``order`` writes them."""
    if order != "scattered":
        return [(f, o) for f in range(files) for o in range(0, FILE, PIECE)]
    out: list[tuple[int, int]] = []
    for group in range(0, files, 4):  # four files at once, two streams each
        half = FILE // 2
        streams = [
            [(f, o) for o in range(start, start + half, PIECE)]
            for f in range(group, min(group + 4, files))
            for start in (0, half)
        ]
        for k in range(half // PIECE):
            out += [s[k] for s in streams]
    return out


def write(order: str, gib: int, root: Path, step_mib: int) -> float:
    """System s/GiB of writing ``gib`` GiB in ``order``; ``step_mib`` 0 keeps the pages."""
    piece = memoryview(os.urandom(PIECE))
    files = gib * (1 << 30) // FILE
    fds = [os.open(root / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for i in range(files)]
    since = [0] * files
    t = os.times().system
    try:
        for fd in fds if order != "appended" else ():
            os.ftruncate(fd, FILE)
        for f, offset in units(order, files):
            for j in range(0, PIECE, WRITE):
                if os.pwrite(fds[f], piece[j : j + WRITE], offset + j) != WRITE:
                    raise OSError("short write")
            since[f] += PIECE
            if step_mib and since[f] >= step_mib << 20:
                since[f] = 0
                os.posix_fadvise(fds[f], 0, 0, os.POSIX_FADV_DONTNEED)
        for fd in fds if step_mib else ():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        for fd in fds:
            os.close(fd)
    return (os.times().system - t) / gib


def settle(pause: float) -> None:
    """The page cache flushed, then ``pause`` seconds idle (memory freed goes cold)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(pause)


def child(argv: list[str]) -> None:
    """One measurement in this process (run pinned by the parent); prints its JSON."""
    import json

    kind, gib, pause = argv[0], int(argv[1]), float(argv[2])
    if kind == "touch":
        print(json.dumps(touch(gib, pause)))
        return
    order, step, root = argv[3], int(argv[4]), Path(argv[5])
    settle(pause)
    print(json.dumps(write(order, gib, root, step)))


def run(cpu: str, *args: object) -> Any:
    import json

    cmd = ["taskset", "-c", cpu, sys.executable, __file__, "--child", *map(str, args)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pause", type=float, default=6.0)
    ap.add_argument("--cpu", default="0")
    ap.add_argument("--steps", default="32,8", help="drop-behind steps to try, MiB")
    ap.add_argument("--json")
    args = ap.parse_args()
    variants = [(o, 0) for o in ("appended", "in order", "scattered")]
    variants += [(o, int(s)) for s in args.steps.split(",") for o in ("appended", "scattered")]
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="page-cost-"))
    try:
        for r in range(args.rounds):
            rows += [
                {"round": r, "touch": label, "system_s_per_gib": s}
                for label, s in run(args.cpu, "touch", args.gib, args.pause)
            ]
            turn = variants[r % len(variants) :] + variants[: r % len(variants)]
            for order, step in turn:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                s = run(args.cpu, "write", args.gib, args.pause, order, step, out)
                rows.append(
                    {"round": r, "order": order, "drop_step_mib": step, "system_s_per_gib": s}
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(rows, args)
    write_json(args.json, rows)


def _label(row: dict[str, Any]) -> str:
    if "touch" in row:
        return f"anonymous memory, {row['touch']}"
    step = row["drop_step_mib"]
    return f"file writes, {row['order']}, " + (f"dropped every {step} MiB" if step else "kept")


def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"system s/GiB, {args.gib} GiB, CPU {args.cpu}, {args.rounds} rounds (median, range)")
    for label in dict.fromkeys(map(_label, rows)):
        got = [r["system_s_per_gib"] for r in rows if _label(r) == label]
        span = f"{min(got):.2f}-{max(got):.2f}"
        print(f"  {label:<46} {statistics.median(got):6.2f}  ({span})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
