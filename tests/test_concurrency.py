"""Publishers racing in threads and OS processes, and publishers killed mid-flight."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kill_points import KillAt, run_to_step
from reliability import record, runs

from chroma_snapshots import ConflictError, RemoteStore, SnapshotInfo, StoreConfig, open_remote
from chroma_snapshots.engine import keys
from chroma_snapshots.engine.keys import manifest_key, retired_key
from chroma_snapshots.stores.claims import read_claims
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import race, raise_unexpected, read_tree, write_tree

WORKER = str(Path(__file__).with_name("publisher_worker.py"))


def _s3_store(server: MotoServer, bucket: str) -> RemoteStore:
    store = open_remote(
        StoreConfig(url=f"s3://{bucket}/snaps", s3_endpoint_url=server.endpoint_url)
    )
    store.chunk_size, store.pack_target = 4096, 65536
    return store


def _chain(store: RemoteStore) -> list[str]:
    out, version = [], store.resolve("db").version
    while version:
        out.append(version)
        version = store.load_manifest("db", version).parent  # type: ignore[assignment]
    return out


def test_two_publishers_same_base_exactly_one_wins(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    store = _s3_store(moto_server, s3_bucket)
    base = store.publish("db", write_tree(tmp_path / "base", {"a": b"base"})).version
    made = store.read_ref("db")
    assert made is not None
    srcs = [write_tree(tmp_path / f"s{i}", {"a": f"writer {i}".encode() * 5000}) for i in range(2)]
    outcomes = race(2, lambda i: store.publish("db", srcs[i], expected=base))
    raise_unexpected(outcomes, (ConflictError,))  # any other error fails the test
    won = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, SnapshotInfo)]
    assert len(won) == 1
    assert sum(isinstance(o, ConflictError) for o in outcomes) == 1
    winner, info = won[0]
    latest = store.resolve("db")
    assert latest.version == info.version
    assert latest.parent == base
    assert read_tree(store.checkout("db", dest=tmp_path / "o").path) == read_tree(srcs[winner])
    ref = store.read_ref("db")
    assert ref is not None
    assert ref[0].generation == made[0].generation + 1  # one move won, one lost


def test_four_processes_five_publishes_each_lose_nothing(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/snaps"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                url,
                moto_server.endpoint_url,
                "append",
                str(w),
                "5",
                str(tmp_path / f"work{w}"),
            ]
        )
        for w in range(4)
    ]
    for p in procs:
        assert p.wait(timeout=240) == 0
    store = _s3_store(moto_server, s3_bucket)
    chain = _chain(store)
    assert len(chain) == 20
    seen = {
        (
            store.load_manifest("db", v).metadata["writer"],
            store.load_manifest("db", v).metadata["seq"],
        )
        for v in chain
    }
    assert seen == {(w, s) for w in range(4) for s in range(5)}
    final = read_tree(store.checkout("db", dest=tmp_path / "final").path)
    assert set(final) == {f"w{w}-{s}.txt" for w in range(4) for s in range(5)}


# A publish's writes in order (packs: one of many, chosen at random).
PUBLISH_STEPS = ("put pins", "put packs", "put manifests", "put retired", "put refs", "delete pins")


def test_killed_publisher_never_leaves_a_broken_latest(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    """SIGKILL a publisher at each step of its second publish (it waits there, so the kill
    lands exactly at that step): latest is always a complete, verified version."""
    url = f"s3://{s3_bucket}/snaps"
    store = _s3_store(moto_server, s3_bucket)
    rng = random.Random(1234)
    kills: Counter[str] = Counter()
    total = runs(ci=2 * len(PUBLISH_STEPS), long=50)
    for run in range(total):
        step = PUBLISH_STEPS[run % len(PUBLISH_STEPS)]
        nth = rng.randint(1, 30) if step == "put packs" else 1  # ~32 packs a publish
        cmd = [sys.executable, WORKER, url, moto_server.endpoint_url, "churn", str(run), "50"]
        done = run_to_step([*cmd, str(tmp_path / "work"), "--steps"], KillAt(step, nth, 1))
        assert done.killed_at == step, f"run {run} never reached {step} #{nth}: {done.steps}"
        kills[step] += 1
        found = store.read_ref("db")
        assert found is not None  # the run's first publish is visible
        version = found[0].version
        assert store.verify("db", version).ok
        out = store.checkout("db", dest=tmp_path / f"check{run}")
        assert (out.path / "chroma.sqlite3").stat().st_size == 2 << 20
        shutil.rmtree(out.path)
    assert set(kills) == set(PUBLISH_STEPS)
    record("crash-publisher", {"runs": total, **{f"killed at {k}": n for k, n in kills.items()}})
    src = write_tree(tmp_path / "after", {"chroma.sqlite3": os.urandom(10_000)})
    final = store.publish("db", src)
    report = store.prune("db", keep_last=1, min_age=0)
    # A publisher killed while it held its pin leaves the pin until its time to live ends;
    # until then the pin keeps the version it named and the packs written after it.
    pins = read_claims(store.backend, keys.prefix("db", keys.PINS), time.time())
    pinned = set().union(*(claim.versions for _, claim in pins))
    assert set(report.kept_versions) == {final.version} | pinned
    kept = [store.load_manifest("db", v) for v in report.kept_versions]
    for v in report.kept_versions:
        assert store.verify("db", v).ok
    metas = {m.key: m for m in store.backend.list("db/")}
    since = min((meta.last_modified for meta, _ in pins), default=float("inf"))
    # and the prune's own record, which outlives its deletes until it expires
    records = read_claims(store.backend, keys.prefix("db", keys.GC), time.time())
    assert len(records) == 1
    expected = {"db/refs/latest"} | {meta.key for meta, _ in pins + records}
    expected |= {manifest_key("db", v) for v in report.kept_versions}
    expected |= {f"db/packs/{p[:2]}/{p}" for m in kept for p in m.packs}
    expected |= {f"db/packs/{p[:2]}/{p}" for _, claim in pins for p in claim.packs}
    expected |= {k for k, m in metas.items() if "/packs/" in k and m.last_modified >= since}
    assert set(metas) - expected == {retired_key("db", v) for v in pinned}
