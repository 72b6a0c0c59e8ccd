"""What receiving 1 GiB costs with every byte verified: the data path issue's measured bound.

The same bytes (64 MiB objects of random data on one s3rver, 127.0.0.1) are fetched by:
s5cmd (Go, no verification), the `chroma-snapshots checkout` command (a snapshot of the same
files), and bare clients that do only what a verifying checkout must (receive, sha256 of every
byte, pwrite into preallocated files): boto3 in the checkout's request shape (one sha256 per
GET, and one per 64 KiB chunk as the checkout verifies), awscrt's S3 client and obstore, each
also without sha256 where that isolates the hash, and the least a Python client can do
(http.client reading into reused buffers, a sha256 or a BLAKE3 per 64 KiB chunk: the
checkout verifies with the hash its snapshot's ids name, BLAKE3 for this one). "Receive
only" clients (http.client, awscrt, obstore) receive into memory and drop the bytes: no
hash, no file. A verifying checkout does that and more on the same two cores, so the best
of their speeds against s5cmd's in the same rounds (the "x s5cmd" column) is a ceiling
measured, not derived, for any checkout built on those receive paths. Local bounds: sha256
and BLAKE3 of the same files from the page cache (one thread) and `cat > /dev/null`. "Past
start-up" subtracts what a process spent before its first request: each bare client prints
it; for the checkout it is the same command on a one-file snapshot in the same rounds.
Every client is its own process, the order rotated every round, the disk settled, the
page cache in the same state (compare.settle) and memory left to go cold before each run
(compare.COLD_PAUSE); CPU is user + system from
wait4, RSS is VmHWM, and the server's CPU is read from /proc (the client shares the
machine's cores with it).

Write shapes ruled out here (awscrt writing each body to its file natively, and the bare
loop reading into the file's mapping) run only when ``--only`` names them.

usage: python benchmarks/receive_bound.py [--sizes-gib 1,3] [--rounds 3] [--one-core]
           [--tools .bench-tools] [--cold-pause 6] [--only CLIENT,...] [--json out.json]
           [--object-mib 64]  (16 objects per size unit: smaller objects for a smoke run)
Needs TOOLS/native (a venv with boto3, awscrt, obstore, blake3: benchmarks/install-tools.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import boto3
from _data import tree_size
from _report import write_json
from _s3rver import REGION, S3rver
from compare import COLD_PAUSE, HERE, _proc, settle

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings

Row = dict[str, Any]
OBJ = 64 << 20
TICK = os.sysconf("SC_CLK_TCK")
CLIENTS = (
    "boto3+sha256",
    "boto3+sha256/64KiB",
    "boto3",
    "awscrt+sha256",
    "awscrt",
    "obstore+sha256",
    "obstore+blake3/64KiB",
    "http.client+sha256/64KiB",
    "http.client+blake3/64KiB",
    "http.client",
    "receive only: http.client",
    "receive only: awscrt",
    "receive only: obstore",
)
# Write shapes measured and ruled out (benchmarks/RESULTS.md, "A native client writing the
# file itself"): run only when named with --only, so that `nox -s bench` keeps its length.
WRITE_SHAPES = (
    "http.client into mmap+blake3/64KiB",
    "awscrt to file + blake3/64KiB",
    "awscrt to file",
    "awscrt to file (1 MiB parts) + blake3/64KiB",
    "awscrt to file (1 MiB parts)",
    # our own native loop (benchmarks/native-loop/build.sh): what no Python per buffer saves
    "native loop: recv+blake3/64KiB+pwrite",
    "receive only: native loop",
)
CHECKOUT, STARTUP = "chroma-snapshots checkout", "chroma-snapshots start-up"
S5CMD = "s5cmd cp"
LOCAL = (
    "import hashlib, sys\nfrom blake3 import blake3\nbuf = bytearray(8 << 20)\n"
    "new = {'sha256': hashlib.sha256, 'blake3': blake3}[sys.argv[1]]\nfor p in sys.argv[2:]:\n"
    "    h = new()\n    with open(p, 'rb', buffering=0) as f:\n"
    "        while n := f.readinto(buf):\n            h.update(memoryview(buf)[:n])\n"
)


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _stage(srv: S3rver, work: Path, gib: int, obj: int = OBJ) -> list[Path]:
    """16 x GIB random files of ``obj`` bytes (64 MiB: GIB GiB), uploaded raw and
    published as snapshot "db"."""
    keep = work / f"keep{gib}"
    keep.mkdir()
    s3 = boto3.client("s3", endpoint_url=srv.endpoint, region_name=REGION)
    files = []
    for i in range(16 * gib):
        path = keep / f"obj{i:02d}"
        path.write_bytes(os.urandom(obj))
        s3.upload_file(str(path), srv.bucket, f"g{gib}/obj{i:02d}")
        files.append(path)
    settings = S3Settings(endpoint_url=srv.endpoint, region=REGION)
    store = RemoteStore(S3Backend(srv.bucket, f"snaps{gib}", settings=settings))
    store.publish("db", keep)
    tiny = work / f"tiny{gib}"
    tiny.mkdir()
    (tiny / "one").write_bytes(os.urandom(4096))
    store.publish("tiny", tiny)
    store.close()
    return files


def _commands(
    srv: S3rver, tools: Path, gib: int, files: list[Path], out: Path, obj: int
) -> dict[str, Any]:
    s5 = str(next((tools / "venv/lib").glob("python*/site-packages/s5cmd/bin/s5cmd")))
    native = str(tools / "native/bin/python")
    cli = [sys.executable, "-m", "chroma_snapshots.cli", "--store", f"s3://bench/snaps{gib}"]
    names = [str(f) for f in files]
    cmds: dict[str, Any] = {
        S5CMD: [s5, "--endpoint-url", srv.endpoint, "cp", f"s3://bench/g{gib}/*", f"{out}/"],
        CHECKOUT: [*cli, "--endpoint-url", srv.endpoint, "checkout", "db", "--dest", str(out)],
        STARTUP: [*cli, "--endpoint-url", srv.endpoint, "checkout", "tiny", "--dest", str(out)],
        "local: sha256 (hashlib)": [sys.executable, "-c", LOCAL, "sha256", *names],
        "local: blake3": [sys.executable, "-c", LOCAL, "blake3", *names],
        "local: cat": ["cat", *names],
    }
    for mode in CLIENTS + WRITE_SHAPES:
        receiver = str(HERE / "_receivers.py")
        cmds[mode] = [native, receiver, mode, srv.endpoint, "bench", f"g{gib}", str(16 * gib)]
        cmds[mode] += [str(out), str(obj >> 20)]
    return cmds


def _one(
    srv: S3rver,
    work: Path,
    name: str,
    cmd: list[str],
    gib: int,
    obj: int,
    cpus: str | None,
    pause: float,
) -> Row:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    settle(pause=pause, evict=work, keep=(srv.data_dir, work / f"keep{gib}"))
    pid = srv._proc.pid if srv._proc else 0
    before = _server_cpu(pid)
    wall, rss, user, system = _proc(cmd, srv.env, work / "client.log", cpus)
    if not name.startswith("local") and not name.startswith("receive only"):
        got = tree_size(out)[0]
        if got != (4096 if name == STARTUP else 16 * gib * obj):
            raise RuntimeError(f"{name}: {got} bytes received, expected {16 * gib * obj}")
    data_gib = 16 * gib * obj / (1 << 30)  # per GiB of data, whatever the objects' size
    row = {"client": name, "gib": gib, "data_gib": data_gib, "cpus": cpus or "all"}
    row |= {"wall_s": wall, "rss_mib": rss}
    if name in CLIENTS + WRITE_SHAPES:  # its last line: bytes, digest, CPU s at first request
        row["startup_cpu_s"] = float((work / "client.log").read_text().split()[-1])
    row |= {"user_s": user, "system_s": system, "cpu_s_per_gib": (user + system) / data_gib}
    return row | {"server_cpu_s_per_gib": (_server_cpu(pid) - before) / data_gib}


def _past_startup(rows: list[Row]) -> None:
    """Give every checkout row the median CPU of the start-up runs beside it (same size and
    cores), then every row with a start-up its CPU per GiB past it."""
    for r in rows:
        if r["client"] == CHECKOUT:
            same = [q for q in rows if q["client"] == STARTUP and q["cpus"] == r["cpus"]]
            r["startup_cpu_s"] = statistics.median(q["user_s"] + q["system_s"] for q in same)
        if "startup_cpu_s" in r:
            startup = r["startup_cpu_s"] / r["data_gib"]
            r["past_startup_cpu_s_per_gib"] = r["cpu_s_per_gib"] - startup


def _table(rows: list[Row]) -> None:
    print(
        f"{'client':28s} {'GiB':>3s} {'cpus':>4s} {'wall s':>7s} {'CPU s/GiB':>14s} "
        f"{'past start-up':>13s} {'user':>5s} {'RSS MiB':>7s} {'server CPU/GiB':>14s} "
        f"{'x s5cmd':>7s}"
    )
    for key in dict.fromkeys((r["client"], r["gib"], r["cpus"]) for r in rows):
        same = [r for r in rows if (r["client"], r["gib"], r["cpus"]) == key]

        def med(field: str, same: list[Row] = same) -> float:
            return float(statistics.median(r[field] for r in same))

        cpu = [r["cpu_s_per_gib"] for r in same]
        spread = f"{med('cpu_s_per_gib'):.2f} [{min(cpu):.2f}-{max(cpu):.2f}]"
        past = f"{med('past_startup_cpu_s_per_gib'):.2f}" if "startup_cpu_s" in same[0] else "-"
        print(
            f"{key[0]:28s} {key[1]:3d} {key[2]:>4s} {med('wall_s'):7.2f} {spread:>14s} "
            f"{past:>13s} {med('user_s') / key[1]:5.2f} {med('rss_mib'):7.0f} "
            f"{med('server_cpu_s_per_gib'):14.2f} {_speed(rows, key, med('wall_s')):>7s}"
        )


def _speed(rows: list[Row], key: tuple[str, int, str], wall: float) -> str:
    """Speed against s5cmd's (its median wall time over this client's) at the same size
    and cores; "-" for the local bounds, the start-up runs and where s5cmd did not run."""
    s5 = [r["wall_s"] for r in rows if (r["client"], r["gib"], r["cpus"]) == (S5CMD, *key[1:])]
    if not s5 or key[0].startswith("local") or key[0] == STARTUP:
        return "-"
    return f"{statistics.median(s5) / wall:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes-gib", default="1,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one-core", action="store_true", help="also run every client on CPU 0")
    ap.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    ap.add_argument("--cold-pause", type=float, default=COLD_PAUSE, help="seconds before a run")
    ap.add_argument("--only", help="comma-separated clients to run (default: all)")
    ap.add_argument("--object-mib", type=int, default=OBJ >> 20, help="each object's size")
    ap.add_argument("--json")
    args = ap.parse_args()
    obj = args.object_mib << 20
    tools, rows = args.tools.resolve(), list[Row]()
    if not (tools / "native/bin/python").exists():
        raise SystemExit(f"{tools}/native is missing: run benchmarks/install-tools.sh")
    wants_native = any("native loop" in n for n in (args.only or "").split(","))
    probe = [str(tools / "native/bin/python"), "-c", "import native_loop"]
    if wants_native and subprocess.run(probe, capture_output=True).returncode:
        raise SystemExit("the native loop is not built: run benchmarks/native-loop/build.sh")
    work = Path(tempfile.mkdtemp(prefix="receive-bound-"))
    try:
        with S3rver(tools, work / "s3data") as srv:
            os.environ.update(srv.env)
            for gib in (int(s) for s in args.sizes_gib.split(",")):
                files = _stage(srv, work, gib, obj)
                cmds = _commands(srv, tools, gib, files, work / "out", obj)
                for cpus in [None, "0"] if args.one_core else [None]:
                    only = args.only.split(",") if args.only else None
                    names = (
                        [n for n in cmds if n in only]
                        if only
                        else [n for n in cmds if n not in WRITE_SHAPES]
                    )
                    for k in range(args.rounds):  # rotated: no client always runs first
                        for name in names[k % len(names) :] + names[: k % len(names)]:
                            row = _one(srv, work, name, cmds[name], gib, obj, cpus, args.cold_pause)
                            rows.append(row)
                _past_startup([r for r in rows if r["gib"] == gib])
                _table([r for r in rows if r["gib"] == gib])
                shutil.rmtree(work / f"keep{gib}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
