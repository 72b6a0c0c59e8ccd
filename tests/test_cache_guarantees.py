"""CachedStore under processes sharing one cache, and stale reads that honour the asked ref."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cache_worker import tree_digest
from reliability import record, runs

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.testing.conformance import write_tree

WORKER = str(Path(__file__).with_name("cache_worker.py"))
CHUNK = 4096


def _publish_versions(store_dir: Path, tmp_path: Path, n: int) -> dict[str, str]:
    """``n`` versions that share most chunks (so checkouts reuse cached ones); version -> digest."""
    rng = random.Random(7)
    base = bytearray(rng.randbytes(60 * CHUNK))
    store = RemoteStore(FileBackend(store_dir), chunk_size=CHUNK)
    digests = {}
    for i in range(n):
        base[rng.randrange(len(base))] ^= 0xFF
        src = write_tree(
            tmp_path / f"src{i}",
            {"chroma.sqlite3": bytes(base), f"seg{i % 3}/data.bin": rng.randbytes(5 * CHUNK)},
        )
        digests[store.publish("db", src).version] = tree_digest(src)
    return digests


def test_processes_sharing_a_cache_with_constant_eviction(tmp_path: Path) -> None:
    store_dir, cache = tmp_path / "store", tmp_path / "cache"
    digests = _publish_versions(store_dir, tmp_path, 6)
    size = 65 * CHUNK
    procs, each = 4, runs(ci=40, long=200)
    refs = [*digests, "latest"]
    cmd = [sys.executable, WORKER, "--loop", str(store_dir), str(cache), str(size * 2 + size // 2)]
    running = [
        subprocess.Popen([*cmd, str(each), str(seed), *refs], stdout=subprocess.PIPE, text=True)
        for seed in range(procs)
    ]
    outcomes = Counter[str]()
    wrong = []
    for p in running:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == each
        for r in lines:
            if "error" in r:
                outcomes[f"{r['error']} documented={r['documented']}"] += 1
            else:
                outcomes["ok"] += 1
                if digests.get(r["version"]) != r["digest"]:
                    wrong.append(r)
    record("cache-shared-eviction", {"checkouts": procs * each, **outcomes})
    assert wrong == []
    assert [k for k in outcomes if k != "ok" and not k.endswith("documented=True")] == [], outcomes
    assert outcomes["ok"] >= procs * each * 0.9, outcomes
    assert os.listdir(cache)  # the cache was used (and evicted: it holds at most 2 versions)
