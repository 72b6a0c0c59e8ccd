"""One library setting, A/B on a cold CLI checkout: does a change save CPU, or move it to
another process? Each pair runs the checkout of the same 1 GiB snapshot (16 random 64 MiB
files on one s3rver) with each value of the setting, in ABBA order, the disk settled, the
page cache in the same state (compare.settle) and memory left to go cold before each run
(compare.COLD_PAUSE). The settings:
``write_kib`` (engine/placer.WRITE_BYTES, KiB), ``start_streams`` (how many reads
engine/ramp.Ramp starts with; ``8`` with 8 workers is the fixed count of before),
``drop_behind`` (``0,1``: CHROMA_SNAPSHOTS_DROP_BEHIND, engine/dropbehind.py),
``drop_step_mib`` (with drop-behind on: engine/dropbehind.STEP, MiB),
``placing`` (engine/placer.placing_threads: how many threads verify and place at once),
``workers`` (RemoteStore's ``workers``: the most reads at once),
``stream_buffer_kib`` (engine/streaming.STREAM_BUFFER: each worker's receive buffer),
``rcvbuf_kib`` (each S3 connection's SO_RCVBUF; ``0`` leaves the kernel's autotuning) and
``chunk_hash`` (``sha256,blake3``: the same files published once under each hash, as
``db-sha256`` and ``db-blake3``; the checkout verifies with that hash).
Before every pair a probe classifies the machine's memory independently of the runs: 256
MiB written in 1 MiB pieces after the same pause; its system seconds say whether freed
memory was cold (the VM returned it to its host) at the time. For every run: the client's
user and system seconds (wait4), the server's, and the whole machine's CPU seconds from
/proc/stat (user, nice, system, irq, softirq of every CPU), so a saving in the client that
reappears elsewhere shows, and the client's context switches (a thread that slept on a lock
or a socket and was woken; preempted ones apart); ``--pin CPU`` runs the client on that
one CPU (taskset), as a Lambda with one vCPU, and ``--memory MIB`` runs the client (and
the reader) in a memory cgroup of that size (page cache included, as a Lambda's memory
setting bounds it; needs root). ``--read-back`` reads every file of the checkout right
after it, in a process of its own (as a reader opening the database would), and reports
that reader's seconds too: a setting that leaves less in the page cache moves work to it.
Prints each pair's differences (B - A) and how many B won.

usage: python benchmarks/checkout_ab.py [--setting write_kib=64,32 | chunk_hash=sha256,blake3]
       [--pairs 10] [--read-back] [--gib 1] [--pin CPU] [--memory MIB]
       [--tools .bench-tools] [--cold-pause 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _data import tree_size
from _report import write_json
from _s3rver import REGION, S3rver
from compare import COLD_PAUSE, HERE, _proc, _proc_usage, settle
from receive_bound import TICK, _server_cpu, _stage

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings

Row = dict[str, Any]
PROBE = 256 << 20
# the reader of --read-back: every file of the tree, whole, in 1 MiB reads
READ_ALL = (
    "import os, sys\nbuf = bytearray(1 << 20)\n"
    "for top, _, names in os.walk(sys.argv[1]):\n"
    "    for n in names:\n"
    "        with open(os.path.join(top, n), 'rb', buffering=0) as f:\n"
    "            while f.readinto(buf):\n"
    "                pass\n"
)
# each setting: the statement that sets it in the client before the CLI runs
SETTINGS = {
    "write_kib": "import chroma_snapshots.engine.placer as m\nm.WRITE_BYTES = {} << 10\n",
    "start_streams": (
        "import chroma_snapshots.engine.ramp as m\nm.Ramp.__init__.__kwdefaults__['start'] = {}\n"
    ),
    "drop_behind": "import os\nos.environ['CHROMA_SNAPSHOTS_DROP_BEHIND'] = '{}'\n",
    "drop_step_mib": (  # with drop-behind on: bytes written to a file between two drops
        "import os\nos.environ['CHROMA_SNAPSHOTS_DROP_BEHIND'] = '1'\n"
        "import chroma_snapshots.engine.dropbehind as m\nm.STEP = {} << 20\n"
    ),
    "placing": "import chroma_snapshots.engine.placer as m\nm.placing_threads = lambda: {}\n",
    "workers": (
        "import chroma_snapshots.stores.remote as m\n"
        "m.RemoteStore.__init__.__kwdefaults__['workers'] = {}\n"
    ),
    "stream_buffer_kib": "import chroma_snapshots.stores.fetch as m\nm.STREAM_BUFFER = {} << 10\n",
    "rcvbuf_kib": (  # each S3 connection's socket receive buffer; 0: the kernel's autotuning
        "import socket\nimport botocore.httpsession as m\nif {0}:\n"
        "    made = m.URLLib3Session._get_pool_manager_kwargs\n"
        "    def more(self, **extra):\n"
        "        out = made(self, **extra)\n"
        "        opt = (socket.SOL_SOCKET, socket.SO_RCVBUF, {0} << 10)\n"
        "        out['socket_options'] = [*out['socket_options'], opt]\n"
        "        return out\n"
        "    m.URLLib3Session._get_pool_manager_kwargs = more\n"
    ),
    "chunk_hash": "",  # the snapshot checked out says it: db-{value}
}
HASHES = ("sha256", "blake3")


def _machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy: user, nice, system, irq, softirq."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields)
    return (user + nice + system + irq + softirq) / TICK


def _probe(work: Path, pause: float) -> float:
    """System seconds of writing PROBE bytes in 1 MiB pieces after ``pause``: high when
    freed memory has gone back to the host, low when it has not."""
    path = work / "probe"
    settle(pause=pause)
    piece, t = memoryview(bytearray(os.urandom(1 << 20))), os.times()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for offset in range(0, PROBE, len(piece)):
            os.pwrite(fd, piece, offset)
    finally:
        os.close(fd)
    system = os.times().system - t.system
    path.unlink()
    return system


def _cgroup(mib: int) -> Path:
    """A memory cgroup of ``mib`` MiB (v2, else v1) for the runs, removed by the caller."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    group = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory") / f"checkout-ab-{os.getpid()}"
    group.mkdir()
    (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(mib << 20))
    return group


def _in_group(cmd: list[str], group: Path | None) -> list[str]:
    """``cmd`` started inside ``group`` (the shell joins it, then becomes the command)."""
    if group is None:
        return cmd
    join = f'echo $$ > {group / "cgroup.procs"} && exec "$@"'
    return ["sh", "-c", join, "sh", *cmd]


def _checkout(srv: S3rver, work: Path, args: argparse.Namespace, value: str) -> Row:
    out, gib = work / "out", args.gib
    shutil.rmtree(out, ignore_errors=True)
    code = (
        SETTINGS[args.name].format(value)
        + "import sys\nfrom chroma_snapshots.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    pin = [] if args.pin is None else ["taskset", "-c", str(args.pin)]
    cli = [*pin, sys.executable, "-c", code, "--store", f"s3://bench/snaps{gib}"]
    name = f"db-{value}" if args.name == "chunk_hash" else "db"
    cmd = [*cli, "--endpoint-url", srv.endpoint, "checkout", name, "--dest", str(out)]
    settle(pause=args.cold_pause, evict=work, keep=(srv.data_dir,))
    pid = srv._proc.pid if srv._proc else 0
    server, machine = _server_cpu(pid), _machine_cpu()
    wall, _rss, usage = _proc_usage(_in_group(cmd, args.group), srv.env, work / "client.log")
    machine, server = _machine_cpu() - machine, _server_cpu(pid) - server
    user, system = usage.ru_utime, usage.ru_stime
    got = tree_size(out)[0]
    if got != gib << 30:
        raise RuntimeError(f"checkout with {args.name}={value}: {got} bytes, not {gib << 30}")
    row = {"value": value, "wall_s": wall, "user_s": user, "system_s": system} | {
        "server_cpu_s": server,
        "machine_cpu_s": machine,
        # a thread that sleeps (a lock, a socket) and is woken: each may cross CPUs
        "switches_k": usage.ru_nvcsw / 1000,
        "preempted_k": usage.ru_nivcsw / 1000,
    }
    if args.read_back:
        read = [*pin, sys.executable, "-c", READ_ALL, str(out)]
        wall, _rss, user, system = _proc(_in_group(read, args.group), srv.env, work / "reader.log")
        row |= {"read_wall_s": wall, "read_cpu_s": user + system}
    return row


def _report(rows: list[Row], name: str, a: str, b: str) -> None:
    print(
        f"{'pair':>4s} {'probe sys':>9s} {name:>13s} {'wall':>6s} {'user':>5s} {'sys':>5s} "
        f"{'server':>6s} {'machine':>7s} {'switch k':>8s} {'preempt k':>9s}"
    )
    for r in rows:
        print(
            f"{r['pair']:4d} {r['probe_system_s']:9.2f} {r['value']:>13s} {r['wall_s']:6.2f} "
            f"{r['user_s']:5.2f} {r['system_s']:5.2f} {r['server_cpu_s']:6.2f} "
            f"{r['machine_cpu_s']:7.2f} {r['switches_k']:8.1f} {r['preempted_k']:9.1f}"
        )
    pairs = sorted({r["pair"] for r in rows})
    fields = ["wall_s", "user_s", "system_s", "server_cpu_s", "machine_cpu_s", "switches_k"]
    for field in fields + [f for f in ("read_wall_s", "read_cpu_s") if f in rows[0]]:
        diffs = []
        for p in pairs:
            by = {r["value"]: r[field] for r in rows if r["pair"] == p}
            diffs.append(by[b] - by[a])
        wins = sum(d < 0 for d in diffs)
        print(
            f"{field:14s} {name} {b} - {a}: median {statistics.median(diffs):+.2f} "
            f"[{min(diffs):+.2f} .. {max(diffs):+.2f}], {b} lower in {wins} of {len(diffs)}"
        )


def _setting(text: str) -> tuple[str, str, str]:
    name, _, values = text.partition("=")
    a, _, b = values.partition(",")
    allowed = HASHES if name == "chunk_hash" else None
    ok = {a, b} <= set(allowed) if allowed else a.isdigit() and b.isdigit()
    if name not in SETTINGS or not ok or a == b:
        raise argparse.ArgumentTypeError(
            f"NAME=A,B with NAME one of {sorted(SETTINGS)} (chunk_hash: sha256,blake3)"
        )
    return name, a, b


def _publish_each_hash(srv: S3rver, keep: Path, gib: int) -> None:
    """The staged files again, as db-sha256 and db-blake3."""
    settings = S3Settings(endpoint_url=srv.endpoint, region=REGION)
    for chunk_hash in HASHES:
        store = RemoteStore(S3Backend(srv.bucket, f"snaps{gib}", settings=settings),
                            chunk_hash=chunk_hash)  # fmt: skip
        store.publish(f"db-{chunk_hash}", keep)
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--setting", type=_setting, default="write_kib=64,32", help="NAME=A,B")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--pin", type=int, help="run the client on this one CPU")
    ap.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    ap.add_argument("--cold-pause", type=float, default=COLD_PAUSE, help="seconds before a run")
    ap.add_argument("--memory", type=int, help="MiB of memory for the client, as a Lambda's")
    ap.add_argument("--read-back", action="store_true", help="time a reader of every file")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.name, a, b = args.setting
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="checkout-ab-"))
    args.group = None if args.memory is None else _cgroup(args.memory)
    try:
        with S3rver(args.tools.resolve(), work / "s3data") as srv:
            os.environ.update(srv.env)
            _stage(srv, work, args.gib)
            if args.name == "chunk_hash":
                _publish_each_hash(srv, work / f"keep{args.gib}", args.gib)
            shutil.rmtree(work / f"keep{args.gib}")
            for pair in range(args.pairs):
                probe = _probe(work, args.cold_pause)
                for value in (a, b) if pair % 2 == 0 else (b, a):  # ABBA: neither always first
                    row = _checkout(srv, work, args, value)
                    rows.append({"pair": pair, "probe_system_s": probe, "setting": args.name} | row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.group is not None:
            args.group.rmdir()
    _report(rows, args.name, a, b)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
