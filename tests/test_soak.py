"""Soak: publishers and readers as separate processes against one S3 server, for a bounded
time. Every reader sees a complete verified version, the parent chain has no gap, nothing
leaks."""

from __future__ import annotations

import hashlib
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from reliability import record, runs

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree

HERE = Path(__file__).resolve().parent


def _digests(root: Path) -> dict[str, str]:
    return {p: hashlib.sha256(b).hexdigest() for p, b in read_tree(root).items()}


def _first_published(publishers: list[subprocess.Popen[str]]) -> str:
    """The version in the first "published V" line any publisher prints (waits up to 120 s)."""
    pipes = {p.stdout: p for p in publishers if p.stdout is not None}
    ready, _, _ = select.select(list(pipes), [], [], 120)
    assert ready, "no publisher published within 120 s"
    line = ready[0].readline()
    assert line.startswith("published "), (line, pipes[ready[0]].poll())
    return line.split()[1]


def test_soak_publishers_and_readers(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    seconds = runs(ci=10, long=120)
    threads_before = threading.active_count()
    url, ep = f"s3://{s3_bucket}/snaps", moto_server.endpoint_url
    publishers = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "publisher_worker.py"),
                url,
                ep,
                "append",
                str(w),
                "100000",
                str(tmp_path / "work"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    cache = tmp_path / "cache"
    reader_cmd = [sys.executable, str(HERE / "cache_worker.py"), ep, s3_bucket, str(cache)]
    seen: list[tuple[str, dict[str, str]]] = []
    outcomes: Counter[str] = Counter()
    published = {_first_published(publishers)}  # readers start once a version exists
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readers = [
            subprocess.Popen(reader_cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)
        ]
        for r in readers:
            out, _ = r.communicate(timeout=120)
            assert r.returncode == 0, out
            head, *rest = out.splitlines()
            seen.append((head.split()[1], dict(line.split(" ", 1) for line in rest)))
            outcomes["reads ok"] += 1
    for p in publishers:
        p.terminate()
        published |= {line.split()[1] for line in p.communicate(timeout=30)[0].splitlines()}
    store = RemoteStore(S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=ep)))
    versions = {v.version: v for v in store.versions("db")}
    # From latest back through the parents: every version a publisher was told it made
    # visible is on the chain (versions that lost the compare-and-swap stay off it, prunable);
    # at most one more per publisher, made visible as it was terminated.
    chain, at = set(), store.resolve("db").version
    while at:
        chain.add(at)
        at = versions[at].parent or ""
    assert published <= chain
    assert len(chain - published) <= len(publishers)
    assert {v for v, _ in seen} <= chain
    # each version a reader saw is complete and exactly what was published
    for version in {v for v, _ in seen}:
        assert store.verify("db", version).ok
        snap = store.checkout("db", version, dest=tmp_path / f"check-{version}")
        assert all(files == _digests(snap.path) for v, files in seen if v == version)
    assert len({v for v, _ in seen}) >= 1
    tmp = [p for p in cache.rglob("tmp/*")]
    assert tmp == []  # no temp leftovers in the cache
    store.close()
    settle = time.monotonic() + 5  # pool workers exit once they see the shutdown
    while threading.active_count() > threads_before and time.monotonic() < settle:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before  # no leaked threads
    outcomes["versions made visible"] = len(chain)
    outcomes["versions that lost the compare-and-swap"] = len(set(versions) - chain)
    outcomes["distinct versions read"] = len({v for v, _ in seen})
    record("soak", {**outcomes, "seconds": seconds})
