"""Paired cold checkouts through the CLI: source trees of chroma-snapshots against each
other and against s5cmd, alternating, on one s3rver (127.0.0.1).

A small checkout measures what every process pays before its first byte (interpreter,
imports, the S3 client, the ref and the manifest); a larger one adds the data path. Each
checkout is its own process (`python -m chroma_snapshots.cli ... checkout`, PYTHONPATH set
to the tree); wall time and user and system CPU seconds come from os.wait4. Rounds
alternate the order (forward, then backward), and the medians are printed with the load
average: on a shared machine only paired figures compare.

usage: python benchmarks/process_start.py --tree before=/path/to/old/src --tree after=src
           [--sizes-kib 64,262144] [--rounds 5] [--tools .bench-tools] [--json out.json]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _data import make_chroma_dir
from _report import write_json
from _s3rver import ACCESS, REGION, S3rver

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings

HERE = Path(__file__).resolve().parent
KiB = 1 << 10


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, user CPU s, system CPU s) of one process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(
            f"{cmd[:4]} failed: {p.stderr.read().decode()[-2000:] if p.stderr else ''}"
        )
    return wall, usage.ru_utime, usage.ru_stime


def bench(
    srv: S3rver, work: Path, tools: Path, trees: dict[str, str], size: int, rounds: int
) -> list[dict[str, Any]]:
    name = f"db{size // KiB}k"
    src = work / name
    make_chroma_dir(src, size)
    store = RemoteStore(
        S3Backend(
            srv.bucket, "snaps", settings=S3Settings(endpoint_url=srv.endpoint, region=REGION)
        )
    )
    store.publish(name, src)
    store.close()
    s5 = str(next((tools / "venv/lib").glob("python*/site-packages/s5cmd/bin/s5cmd")))
    raw = f"s3://{srv.bucket}/raw-{name}"
    subprocess.run(
        [s5, "--endpoint-url", srv.endpoint, "cp", f"{src}/", raw + "/"],
        env=srv.env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    dest = work / "out"
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        label: (
            [
                sys.executable,
                "-m",
                "chroma_snapshots.cli",
                "--store",
                f"s3://{srv.bucket}/snaps",
                "--endpoint-url",
                srv.endpoint,
                "checkout",
                name,
                "--dest",
                str(dest),
            ],
            {**srv.env, "PYTHONPATH": tree},
        )
        for label, tree in trees.items()
    }
    commands["s5cmd sync"] = (
        [s5, "--endpoint-url", srv.endpoint, "sync", raw + "/*", f"{dest}/"],
        srv.env,
    )
    runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in commands}
    for i in range(rounds):
        for label in list(commands)[:: 1 if i % 2 == 0 else -1]:
            shutil.rmtree(dest, ignore_errors=True)
            runs[label].append(_run(*commands[label]))
    shutil.rmtree(dest, ignore_errors=True)
    load = os.getloadavg()[0]
    return [
        {
            "size_kib": size // KiB,
            "contender": label,
            "rounds": rounds,
            "wall_s": statistics.median(r[0] for r in rs),
            "cpu_s": statistics.median(r[1] + r[2] for r in rs),
            "user_s": statistics.median(r[1] for r in rs),
            "system_s": statistics.median(r[2] for r in rs),
            "load_1min": load,
        }
        for label, rs in runs.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tree", action="append", required=True, help="LABEL=PATH of a src folder")
    ap.add_argument("--sizes-kib", default="64,262144")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    for tree in trees.values():  # as an installed wheel is: no module compiled per process
        compileall.compile_dir(tree, quiet=1)
    os.environ.update(ACCESS)
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp,
        S3rver(args.tools.resolve(), Path(tmp) / "s3data") as srv,
    ):
        for size in (int(s) * KiB for s in args.sizes_kib.split(",")):
            rows += bench(srv, Path(tmp), args.tools.resolve(), trees, size, args.rounds)
    print(f"{'KiB':>8} {'contender':<12} {'wall s':>7} {'CPU s':>6} {'user':>6} {'sys':>6} load")
    for r in rows:
        figures = " ".join(f"{r[k]:>6.3f}" for k in ("wall_s", "cpu_s", "user_s", "system_s"))
        print(f"{r['size_kib']:>8} {r['contender']:<12}  {figures} {r['load_1min']:.2f}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
