"""The incremental checkout alone, repeatable, for profiling its local half.

    python benchmarks/incremental.py setup --dir D --size-mb 1024
    python benchmarks/incremental.py run --dir D      # one incremental checkout

``setup`` builds the chroma-shaped tree, publishes it to a disk-backed s3rver, checks it out
into a cache, changes 1% of it in scattered pages and publishes again. ``run`` starts the
same server on the same data (same port: the cache is keyed by the endpoint), puts the
cache back as it was after the first checkout (a copy made by ``setup``, synced, untimed),
checks the new version out (from the cached one plus the changed chunks) and prints
seconds, CPU seconds, requests, bytes down and this process's /proc/self/io. Time it
again and again (CS_PATCH=0: the copying path, for A/B; ``perf``/``py-spy``/``strace -c``
around it for a profile). ``--verify`` compares the checkout with the source tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from _data import MiB, change_pages, make_chroma_dir, tree_digest
from _s3rver import REGION, S3rver

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.stores.cache.layout import NameDirs

HERE = Path(__file__).resolve().parent


def _server(tools: Path, d: Path) -> S3rver:
    srv = S3rver(tools, d / "s3data")
    conf = d / "port.json"
    if conf.exists():  # the cache is keyed by the endpoint: keep the port
        srv.port = json.loads(conf.read_text())["port"]
        srv.endpoint = f"http://127.0.0.1:{srv.port}"
        srv.log = d / f"s3rver-{srv.port}.log"
    else:
        conf.write_text(json.dumps({"port": srv.port}))
    return srv


def _stores(srv: S3rver, d: Path) -> tuple[RemoteStore, CachedStore]:
    os.environ.update(srv.env)
    settings = S3Settings(endpoint_url=srv.endpoint, region=REGION)
    store = RemoteStore(S3Backend(srv.bucket, "snaps", settings=settings))
    # CS_PATCH=0: the copying path (every unchanged byte copied into a new tree), for A/B
    patch = os.environ.get("CS_PATCH", "1") != "0"
    return store, CachedStore(store, d / "cache", patch_in_place=patch)


def setup(tools: Path, d: Path, size_mib: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with _server(tools, d) as srv:
        store, cached = _stores(srv, d)
        make_chroma_dir(d / "src", size_mib * MiB)
        time.sleep(2.1)  # files written just now are racy (always re-read): let them age
        store.publish("db", d / "src")
        cached.checkout("db").release()
        subprocess.run(["cp", "-a", str(d / "cache"), str(d / "cache.old")], check=True)
        changed = change_pages(d / "src", 0.01)
        store.publish("db", d / "src")
        print(f"set up {size_mib} MiB, changed {changed / MiB:.1f} MiB")
        store.close()


def _io() -> dict[str, int]:
    pairs = (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in pairs}


def _restore(d: Path) -> None:
    """The cache as ``setup`` left it (the old version only), its pages written back, so
    that a run does not pay for the last one's writeback."""
    shutil.rmtree(d / "cache", ignore_errors=True)
    subprocess.run(["cp", "-a", str(d / "cache.old"), str(d / "cache")], check=True)
    for stamps in (d / "cache").glob("*/db/meta/*.stamps"):  # a copy has new ctimes
        dirs = NameDirs(stamps.parent.parent)
        version = stamps.name.removesuffix(".stamps")
        manifest = dirs.read_manifest(version)
        assert manifest is not None
        dirs.write_stamps(version, dirs.tree(version), manifest)
    os.sync()


def run(tools: Path, d: Path, verify: bool) -> None:
    """Restore the cache to the old version, then check out the new one (timed)."""
    _restore(d)
    with _server(tools, d) as srv:
        store, cached = _stores(srv, d)
        srv.requests()
        io0, t0, c0 = _io(), time.perf_counter(), time.process_time()
        snap = cached.checkout("db")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        io1 = _io()
        requests, down = srv.requests()
        snap.release()
        io = {k: (io1[k] - io0[k]) / MiB for k in ("rchar", "wchar", "read_bytes", "write_bytes")}
        print(
            f"incremental checkout {wall:.3f} s, cpu {cpu:.2f} s, {requests} requests, "
            f"{down / MiB:.1f} MiB down, reused {snap.stats.bytes_reused / MiB:.1f} MiB; "
            + ", ".join(f"{k} {v:.1f} MiB" for k, v in io.items())
            + f"; load {os.getloadavg()[0]:.2f}"
        )
        if verify:
            print("right bytes:", tree_digest(snap.path) == tree_digest(d / "src"))
        store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("setup", "run", "clean"))
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--tools", type=Path, default=HERE.parent / ".bench-tools")
    p.add_argument("--verify", action="store_true", help="compare its bytes with the source")
    a = p.parse_args()
    if a.what == "setup":
        setup(a.tools, a.dir, a.size_mb)
    elif a.what == "run":
        run(a.tools, a.dir, a.verify)
    else:
        shutil.rmtree(a.dir)


if __name__ == "__main__":
    main()
