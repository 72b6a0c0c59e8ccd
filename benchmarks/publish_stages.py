"""Where a publish's time goes: scan, stamp index, read + hash, pack (compress/delta),
upload requests, manifest encode and the rest, for N small files (the issue's 100,000
files of 100 B) or one tree of M MiB, first publish, unchanged publish with and without
the stamp index, and a publish after changing 1% of the files.

Each stage is timed by wrapping the function that does it (wall seconds, summed over
calls; the pack stage runs on pool threads, so it is summed across them and overlaps the
read + hash stage). The rest of the publish is reading and hashing the files, the
upload loop and the manifest's validation. Also CPU seconds (user + system) of the
whole publish: on a loaded machine they vary less than wall time.

``--store s3`` publishes to moto's S3 server on 127.0.0.1. ``--first-only`` runs the first
publish alone; ``--src DIR`` publishes (and keeps) the tree in DIR, made if missing.
``--compare OLD_SRC NEW_SRC`` times the first publish of one tree with two versions of the
package (their ``src`` folders), each in its own process (with a temp dir of its own, so
no stamp index of an earlier run), alternating, ``--runs`` times each, and prints the
median of each stage side by side with the load average.

usage: python benchmarks/publish_stages.py [--files 100000] [--file-bytes 100]
           [--store memory|file|s3] [--first-only] [--src DIR] [--json out.json]
       python benchmarks/publish_stages.py --mib 1024
       python benchmarks/publish_stages.py --compare OLD/src NEW/src [--runs 5] [--store s3]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _data import MiB, make_chroma_dir
from _report import write_json

from chroma_snapshots import RemoteStore, open_backend
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.engine import bundles, manifest_v2
from chroma_snapshots.engine.keys import manifest_key

try:
    from chroma_snapshots.engine import packing
except ImportError:  # an older version: packing was in chunking
    packing = None  # type: ignore[assignment]
from chroma_snapshots.stores import remote, upload
from chroma_snapshots.testing import MotoServer

BENCH = Path(__file__).resolve().parent
Row = dict[str, Any]
TIMES: dict[str, float] = defaultdict(float)


def _timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[stage] += time.perf_counter() - t

    return run


def instrument() -> None:
    """Wrap each stage's function (module globals, so the publish calls the wrappers).
    Stages a version of the code does not have are left out (to compare with older ones)."""
    remote.scan_source = _timed("scan", remote.scan_source)  # type: ignore[attr-defined]
    remote.manifest_v2 = _Manifests()  # type: ignore[assignment,attr-defined]
    if hasattr(upload, "StampIndex"):
        upload.StampIndex = _timed_index(upload.StampIndex)
    if packing is not None:
        packing._encode_all = _timed("pack (pool threads)", packing._encode_all)
    if hasattr(upload, "cut"):
        upload.cut = _timed("bundle cut", upload.cut)
    # where bundles are read: on the calling thread in engine.bundles, or on the pool
    where, read = bundles if hasattr(bundles, "read_all") else upload, "read_bundles"
    if hasattr(where, read):
        setattr(where, read, _timed("read small files (bundles)", getattr(where, read)))
    up = upload.Uploader
    up.upload = _timed("Uploader.upload (all of it)", up.upload)  # type: ignore[method-assign]
    up._put_pack = _timed("upload requests", up._put_pack)  # type: ignore[method-assign]
    if hasattr(up, "_trusted"):
        up._trusted = _timed("stamp index lookup", up._trusted)  # type: ignore[method-assign]


class _Manifests:
    """manifest_v2 with dumps and loads timed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(manifest_v2, name)

    def dumps(self, m: Any) -> bytes:
        return _timed("manifest encode", manifest_v2.dumps)(m)  # type: ignore[no-any-return]

    def loads(self, data: bytes) -> Any:
        return _timed("manifest decode (parent)", manifest_v2.loads)(data)


def _timed_index(cls: type[Any]) -> type[Any]:
    class Timed(cls):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _timed("stamp index load", super().__init__)(*args, **kwargs)

        def save(self) -> None:
            _timed("stamp index save", super().save)()

    return Timed


def small_tree(root: Path, n: int, size: int) -> None:
    rng = random.Random(3)
    for i in range(n):
        d = root / f"dir{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"file{i % 1000:04d}.json").write_bytes(rng.randbytes(size))


def change_files(root: Path, fraction: float) -> int:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    picked = random.Random(5).sample(files, max(1, int(len(files) * fraction)))
    for p in picked:
        data = bytearray(p.read_bytes())
        data[: min(8, len(data))] = os.urandom(min(8, len(data)))
        p.write_bytes(bytes(data))
    return len(picked)


def run(store: RemoteStore, src: Path, scenario: str, **kwargs: Any) -> Row:
    TIMES.clear()
    if "stamps" in kwargs and not hasattr(upload, "StampIndex"):
        del kwargs["stamps"]  # an older version: it always re-reads
    cpu, wall = os.times(), time.perf_counter()
    info = store.publish("db", src, **kwargs)
    wall = time.perf_counter() - wall
    after = os.times()
    cpu_s = after.user + after.system - cpu.user - cpu.system
    stages = {k: round(v, 3) for k, v in TIMES.items()}
    manifest = len(store.backend.get(manifest_key("db", info.version)).data)
    data = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    print(
        f"{scenario}: {wall:.2f} s wall, {cpu_s:.2f} s CPU, {info.stats.requests} requests, "
        f"{info.stats.bytes_uploaded:,} bytes up, manifest {manifest:,} bytes = "
        f"{manifest / max(1, data):.3f}x the data"
    )
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"    {k:28s} {v:7.3f} s")
    return {"scenario": scenario, "seconds": wall, "cpu_seconds": cpu_s, "stages": stages,
            "manifest_bytes": manifest, "data_bytes": data,
            "bytes_uploaded": info.stats.bytes_uploaded}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--file-bytes", type=int, default=100)
    ap.add_argument("--mib", type=int, help="a chroma-shaped tree of this size instead")
    ap.add_argument("--store", choices=("memory", "file", "s3"), default="memory")
    ap.add_argument("--first-only", action="store_true", help="the first publish alone")
    ap.add_argument("--src", type=Path, help="publish this tree (made if missing, kept)")
    ap.add_argument("--compare", nargs=2, metavar=("OLD_SRC", "NEW_SRC"))
    ap.add_argument("--runs", type=int, default=3, help="runs of each side (--compare)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.compare:
        rows = compare(args)
    else:
        instrument()
        with tempfile.TemporaryDirectory(prefix="chroma-snapshots-stages-") as tmp:
            src = args.src or Path(tmp) / "src"
            if not src.exists():
                make_tree(src, args)
                time.sleep(2.1)  # past the stamp index's racy window, as a folder usually is
            with _store(args.store, Path(tmp)) as store:
                rows = scenarios(store, src, args.first_only)
            if args.src is None:
                shutil.rmtree(src)
        rows = [{"files": args.files, "mib": args.mib, **r} for r in rows]
    if args.json:
        write_json(str(args.json), rows)


def make_tree(src: Path, args: argparse.Namespace) -> None:
    if args.mib:
        make_chroma_dir(src, args.mib * MiB)
    else:
        small_tree(src, args.files, args.file_bytes)


@contextlib.contextmanager
def _store(kind: str, tmp: Path) -> Iterator[RemoteStore]:
    if kind != "s3":
        url = f"memory://stages-{os.getpid()}" if kind == "memory" else f"file://{tmp}/store"
        yield RemoteStore(open_backend(url))
        return
    with MotoServer() as server:
        bucket = server.create_bucket("stages")
        yield RemoteStore(S3Backend(bucket, "snaps", client=server.client()))


def scenarios(store: RemoteStore, src: Path, first_only: bool) -> list[Row]:
    rows = [run(store, src, "first publish")]
    if first_only:
        return rows
    rows.append(run(store, src, "unchanged, stamp index"))
    rows.append(run(store, src, "unchanged, no stamp index", stamps=False))
    n = change_files(src, 0.01)
    time.sleep(2.1)
    rows.append(run(store, src, f"{n} files changed, stamp index"))
    return rows


def compare(args: argparse.Namespace) -> list[Row]:
    """The first publish of one tree by two versions of the package, alternating."""
    sides = {"old": Path(args.compare[0]).resolve(), "new": Path(args.compare[1]).resolve()}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-stages-ab-") as tmp:
        src = args.src or Path(tmp) / "src"
        if not src.exists():
            make_tree(src, args)
            time.sleep(2.1)
        for k in range(args.runs):
            for side in ("old", "new") if k % 2 == 0 else ("new", "old"):
                out = Path(tmp) / f"{side}-{k}.json"
                cmd = [sys.executable, __file__, "--first-only", "--src", str(src), "--store",
                       args.store, "--files", str(args.files), "--json", str(out)]  # fmt: skip
                run_tmp = Path(tempfile.mkdtemp(dir=tmp))  # no stamp index of an earlier run
                env = {**os.environ, "PYTHONPATH": f"{sides[side]}{os.pathsep}{BENCH}",
                       "TMPDIR": str(run_tmp)}  # fmt: skip
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                row = json.loads(out.read_text())[0]
                rows.append({**row, "side": side, "src": str(sides[side]),
                             "load": os.getloadavg()[0]})  # fmt: skip
                shutil.rmtree(run_tmp)
    _print_medians(rows)
    return rows


def _print_medians(rows: list[Row]) -> None:
    by = {s: [r for r in rows if r["side"] == s] for s in ("old", "new")}
    stages = sorted({k for r in rows for k in r["stages"]})
    table = {"wall (publish)": "seconds", "CPU (publish)": "cpu_seconds"}
    print(f"{'median of ' + str(len(by['old'])) + ' runs':34s} {'old':>8s} {'new':>8s}")
    for what in [*table, *stages]:
        old, new = (
            statistics.median(
                r[table[what]] if what in table else r["stages"].get(what, 0.0) for r in by[s]
            )
            for s in ("old", "new")
        )
        print(f"{what:34s} {old:8.3f} {new:8.3f}")
    for s in ("old", "new"):
        print(f"wall per run, {s}:", " ".join(f"{r['seconds']:.2f}" for r in by[s]))
    print("load average (1 min) after each run:", " ".join(f"{r['load']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
