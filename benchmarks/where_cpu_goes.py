"""Where a cold checkout's CPU goes, by layer: the profile behind the data path's figures.

Stages GIB GiB on one s3rver (127.0.0.1) as snapshot "db": 64 MiB random files, or with
--chroma a chroma-shaped tree (compare.py's: a SQLite file whose chunks compress, and HNSW
segments of random vectors). Then runs
the `chroma-snapshots checkout` command RUNS times under `perf record` (task-clock at
1 kHz: a sample is a millisecond of the client's CPU; the page cache flushed before each run)
and splits the client's CPU into: copying into the page cache (the kernel half of placing a
file), copying out of sockets (receiving), the rest of the kernel, the chunk hash (sha256 in
libcrypto, BLAKE3 in the blake3 module), the interpreter (libpython) and everything
else, as CPU s/GiB and percent; then the kernel functions that make up "other kernel".
Each run waits COLD_PAUSE after the page cache is flushed and put in the same state, as
compare.py's cold runs do (compare.settle; memory freed by the last run goes cold).

With --s5cmd the same profile is taken of `s5cmd cp` fetching the same files (uploaded raw
beside the snapshot), alternating with the checkout's runs (checkout, s5cmd, checkout, ...)
so that both meet the same memory states: the kernel's share of a client that does only
what the kernel must, side by side.

usage: python benchmarks/where_cpu_goes.py [--gib 3] [--runs 3] [--cpus 0] [--chroma]
           [--s5cmd] [--cold-pause 6] [--json out.json]
Needs `perf` (linux-perf) with perf_event_paranoid <= 2, and s3rver (install-tools.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import boto3
from _data import make_chroma_dir
from _report import write_json
from _s3rver import REGION, S3rver
from compare import COLD_PAUSE, HERE, _proc, settle
from receive_bound import _stage

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings

Row = dict[str, Any]
HZ = 1000  # task-clock samples per CPU second
# (label, what a `perf report --sort dso,sym` line must match); the first match wins
KERNEL = r"\[kernel\.kallsyms\].*"
LAYERS = (
    ("page cache writes", re.compile(KERNEL + r"(copy_folio_from_iter|copy_page_from_iter)")),
    ("socket receive copies", re.compile(KERNEL + r"(_copy_to_iter|copyout)")),
    ("other kernel", re.compile(r"\[kernel\.kallsyms\]")),
    ("sha256 (libcrypto)", re.compile(r"libcrypto")),
    ("blake3", re.compile(r"blake3\.cpython")),
    ("interpreter (libpython)", re.compile(r"libpython|python3")),
)


def samples(report: str) -> tuple[dict[str, int], dict[str, int]]:
    """Samples per layer, and per kernel function of "other kernel", from
    ``perf report -n --no-children --sort dso,sym``."""
    out = dict.fromkeys([label for label, _ in LAYERS] + ["other"], 0)
    kernel: dict[str, int] = {}
    for line in report.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(.*)", line)
        if m:
            label = next((lb for lb, pat in LAYERS if pat.search(m[2])), "other")
            out[label] += int(m[1])
            if label == "other kernel":
                sym = m[2].split("]")[-1].strip()
                kernel[sym] = kernel.get(sym, 0) + int(m[1])
    return out, kernel


def stage_chroma(srv: S3rver, work: Path, gib: int) -> None:
    """A chroma-shaped tree of GIB GiB published as snapshot "db" under ``snaps{gib}``,
    and uploaded raw under ``g{gib}/`` (what --s5cmd fetches)."""
    make_chroma_dir(work / "src", gib << 30)
    s3 = boto3.client("s3", endpoint_url=srv.endpoint, region_name=REGION)
    for path in sorted(p for p in (work / "src").rglob("*") if p.is_file()):
        s3.upload_file(str(path), srv.bucket, f"g{gib}/{path.relative_to(work / 'src')}")
    settings = S3Settings(endpoint_url=srv.endpoint, region=REGION)
    store = RemoteStore(S3Backend(srv.bucket, f"snaps{gib}", settings=settings))
    store.publish("db", work / "src")
    store.close()
    shutil.rmtree(work / "src")


def profile(srv: S3rver, work: Path, gib: int, cpus: str | None, pause: float, s5: str) -> Row:
    dest, data = work / "out", work / "perf.data"
    shutil.rmtree(dest, ignore_errors=True)
    settle(pause=pause, evict=work, keep=(srv.data_dir,))
    cmd = ["perf", "record", "-q", "-e", "task-clock", "-F", str(HZ), "-o", str(data), "--"]
    if s5:
        cmd += [s5, "--endpoint-url", srv.endpoint, "cp", f"s3://bench/g{gib}/*", f"{dest}/"]
    else:
        cmd += [sys.executable, "-m", "chroma_snapshots.cli", "--store", f"s3://bench/snaps{gib}"]
        cmd += ["--endpoint-url", srv.endpoint, "checkout", "db", "--dest", str(dest)]
    wall, rss, _, _ = _proc(cmd, srv.env, work / "perf.log", cpus)
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "-n", "--no-children", "--sort", "dso,sym", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    layers, kernel = samples(report)
    per_gib = {label: n / HZ / gib for label, n in layers.items()}
    row: Row = {"gib": gib, "cpus": cpus or "all", "wall_s": wall, "rss_mib": rss}
    row |= {"kernel_cpu_s_per_gib": {sym: n / HZ / gib for sym, n in kernel.items()}}
    return row | {"cpu_s_per_gib": sum(per_gib.values()), "layers_cpu_s_per_gib": per_gib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", help="pin the checkout (taskset -c), e.g. 0")
    ap.add_argument("--chroma", action="store_true", help="a chroma-shaped tree, not raw files")
    ap.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    ap.add_argument("--s5cmd", action="store_true", help="profile s5cmd cp too, alternating")
    ap.add_argument("--cold-pause", type=float, default=COLD_PAUSE, help="seconds before a run")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed (apt-get install linux-perf)")
    tools = args.tools.resolve()
    s5 = str(next((tools / "venv/lib").glob("python*/site-packages/s5cmd/bin/s5cmd")))
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="where-cpu-goes-"))
    try:
        with S3rver(tools, work / "s3data") as srv:
            os.environ.update(srv.env)
            (stage_chroma if args.chroma else _stage)(srv, work, args.gib)
            tools_run = ["", s5] if args.s5cmd else [""]
            for _ in range(args.runs):
                for tool in tools_run:
                    row = profile(srv, work, args.gib, args.cpus, args.cold_pause, tool)
                    rows.append(row | {"client": "s5cmd cp" if tool else "the checkout"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shape = "a chroma-shaped tree" if args.chroma else "64 MiB random files"
    for who in dict.fromkeys(r["client"] for r in rows):
        print(f"CPU s/GiB of {who} by layer (percent), {args.gib} GiB of {shape}")
        table([r for r in rows if r["client"] == who])
    write_json(args.json, rows)


def table(rows: list[Row]) -> None:
    """One client's runs: its layers, then the largest kernel functions of "other"."""
    print(f"{'layer':<26}" + "".join(f"{'run ' + str(i + 1):>16}" for i in range(len(rows))))
    print(f"{'all':<26}" + "".join(f"{r['cpu_s_per_gib']:>16.2f}" for r in rows))
    for label in rows[0]["layers_cpu_s_per_gib"]:
        cells = []
        for r in rows:
            x = r["layers_cpu_s_per_gib"][label]
            cells.append(f"{x:.2f} ({100 * x / r['cpu_s_per_gib']:.0f}%)")
        print(f"{label:<26}" + "".join(f"{c:>16}" for c in cells))
    print('"other kernel", its 12 largest functions, CPU s/GiB (median of the runs)')
    syms = {sym for r in rows for sym in r["kernel_cpu_s_per_gib"]}
    med = {s: statistics.median(r["kernel_cpu_s_per_gib"].get(s, 0.0) for r in rows) for s in syms}
    for sym in sorted(med, key=med.__getitem__, reverse=True)[:12]:
        print(f"  {sym:<40} {med[sym]:.3f}")


if __name__ == "__main__":
    main()
