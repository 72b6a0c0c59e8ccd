"""The measured bound of a verifying cold checkout, from the rows of the same compare.py run.

Any client that verifies every byte must (1) receive the bytes from the socket into its own
memory, (2) hash them, (3) copy them into the page cache. s5cmd does (1) and (3) and nothing
else: its system time is what the kernel charges for them in this run, on this VM's memory
(which varies between runs, so only the same run's figures are compared). Ours does the
same kernel work with the placer's write size; the smaller of the two system times is the
kernel floor. The hash of every byte is the hash floor: ``hash_cpu`` measures it on the same
files (one call per 64 KiB chunk, as the checkout verifies, reading excluded), with the hash
the checkout's snapshot names chunks by (BLAKE3; sha256 rows are kept beside it). So:

- CPU floor per GiB = min(system s of s5cmd, of ours) + hash CPU s; no verifying client
  uses less, whatever its language or S3 client (start-up costs are left out: a native
  client has none).
- client and server share the machine's cores: wall floor >= (CPU floor + the server's CPU
  for the same bytes, the smaller of its figures for s5cmd and for ours) / cores; pinned to
  one core, a client's wall time is also at least its own CPU floor.

The speed ceiling against a tool is that tool's wall time over the wall floor: a verifying
checkout faster than that ratio is impossible in this run. Where the ceiling is below the
target's ratio, the target is unreachable on this machine; where above, it is not shown
unreachable (the bound is a floor, not a prediction).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
GiB = 1 << 30
CHUNK = 64 << 10  # the default chunk size: one sha256 call per chunk, as the checkout does
OURS, S5, AWS = "chroma-snapshots", "s5cmd sync", "aws s3 sync"
HASH_ROW = "blake3"  # compare.py's row of the hash the checkout verifies with
STARTUP = "chroma-snapshots start-up"  # compare.py's: the same command, a one-file snapshot
CPU_TARGET, S5_TARGET, AWS_TARGET = 1.5, 1.0, 1.3


def hash_cpu(root: Path, new: Callable[[memoryview], Any] = hashlib.sha256) -> tuple[float, int]:
    """CPU seconds of hashing every file under ``root`` with ``new`` (one thread, one call
    per 64 KiB), reading excluded; and the bytes hashed."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    spent, total = 0.0, 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                t = time.thread_time()
                for i in range(0, got, CHUNK):
                    new(view[i : min(i + CHUNK, got)]).digest()
                spent += time.thread_time() - t
                total += got
    return spent, total


def bound_rows(rows: list[Row]) -> list[Row]:
    """One row per size and cold scenario: the floors, ceilings and what was reached."""
    out: list[Row] = []
    # the hash the checkout verifies with (runs before BLAKE3 ids have only sha256 rows)
    sha = {r["size_mib"]: r for r in rows if r["approach"] == "sha256 (hashlib)"}
    sha |= {r["size_mib"]: r for r in rows if r["approach"] == HASH_ROW}
    for ours in rows:
        if ours["approach"] != OURS or not ours["scenario"].startswith("cold checkout"):
            continue
        same = {
            r["approach"]: r
            for r in rows
            if r["size_mib"] == ours["size_mib"] and r["scenario"] == ours["scenario"]
        }
        s5, h = same.get(S5), sha.get(ours["size_mib"])
        if s5 is None or h is None:
            continue
        out.append(_bound(ours, s5, same.get(AWS), h, same.get(STARTUP)))
    return out


def _bound(ours: Row, s5: Row, aws: Row | None, sha: Row, startup: Row | None) -> Row:
    gib = ours["total_mib"] / 1024
    pinned = "only" in ours["scenario"]
    kernel = min(s5["cpu_system_s"], ours["cpu_system_s"])
    cpu_floor = kernel + sha["cpu_s"] * ours["total_mib"] / sha["hashed_mib"]
    server = min(s5["server_cpu_s"], ours["server_cpu_s"])
    cores = os.cpu_count() or 1
    wall_floor = max(cpu_floor if pinned else cpu_floor / cores, (cpu_floor + server) / cores)
    row: Row = {
        "size_mib": ours["size_mib"],
        "approach": "bound",
        "scenario": ours["scenario"],
        "cpu_floor_s_per_gib": cpu_floor / gib,
        "cpu_s_per_gib": ours["cpu_s_per_gib"],
        "cpu_target_reachable": cpu_floor / gib <= CPU_TARGET,
        "wall_floor_s": wall_floor,
        "s5cmd_ceiling": s5["seconds"] / wall_floor,
        "s5cmd_reached": _paired(s5, ours),
        "s5cmd_target_reachable": s5["seconds"] / wall_floor >= S5_TARGET,
    }
    if startup is not None:  # the process's own CPU, paid once whatever the size
        spent = startup["cpu_user_s"] + startup["cpu_system_s"]
        row["startup_cpu_s"] = spent
        row["cpu_s_per_gib_past_startup"] = ours["cpu_s_per_gib"] - spent / gib
    if aws is not None:
        row["awscli_ceiling"] = aws["seconds"] / wall_floor
        row["awscli_reached"] = _paired(aws, ours)
    return row


def _paired(other: Row, ours: Row) -> float:
    """The tool's seconds over ours, the median of the rounds' pairs (as compare.py's
    ratios), or of the medians where the rounds were not kept."""
    if "runs_s" in other and "runs_s" in ours:
        pairs = [t / o for t, o in zip(other["runs_s"], ours["runs_s"], strict=True)]
        return float(statistics.median(pairs))
    return float(other["seconds"] / ours["seconds"])


def print_bounds(rows: list[Row]) -> None:
    """The bound table: per size and cold scenario, floor against figure reached."""
    bounds = bound_rows(rows)
    if not bounds:
        return
    print(
        f"{'MiB':>5} {'scenario':<27} {'CPU floor/GiB':>13} {'ours':>6} {'<=1.5?':>6} "
        f"{'wall floor':>10} {'s5cmd ceiling':>13} {'reached':>7} {'awscli ceiling':>14} "
        f"{'reached':>7} {'start-up CPU s':>14} {'ours past it':>12}"
    )
    for b in bounds:
        aws = (
            f"{b['awscli_ceiling']:>13.2f}x {b['awscli_reached']:>6.2f}x"
            if "awscli_ceiling" in b
            else f"{'-':>14} {'-':>7}"
        )
        print(
            f"{b['size_mib']:>5} {b['scenario']:<27} {b['cpu_floor_s_per_gib']:>13.2f} "
            f"{b['cpu_s_per_gib']:>6.2f} {'yes' if b['cpu_target_reachable'] else 'NO':>6} "
            f"{b['wall_floor_s']:>9.2f}s {b['s5cmd_ceiling']:>12.2f}x "
            f"{b['s5cmd_reached']:>6.2f}x {aws} {b.get('startup_cpu_s', float('nan')):>14.2f} "
            f"{b.get('cpu_s_per_gib_past_startup', float('nan')):>12.2f}"
        )
