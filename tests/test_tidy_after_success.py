"""A call whose work is done (its ref moved) returns without waiting out its deadline on
the removal of its own pin: a store that never answers that delete cost a publish its whole
deadline (30 s without one), though latest had moved in 0.2 s (found by an independent
review). The removal goes on in the background; pins expire by themselves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from botocore.config import Config

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.engine.cleanup import running, wait_for_new
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree
from chroma_snapshots.testing.faults import ScheduledFaults
from chroma_snapshots.testing.proxy import CountingProxy

DEADLINE = 20.0


@pytest.mark.parametrize("operation", ["publish", "tag"])
def test_a_hung_pin_removal_does_not_hold_a_call_that_succeeded(
    moto_server: MotoServer, tmp_path: Path, operation: str
) -> None:
    before = running()  # what earlier tests in this process left is not this test's
    bucket = moto_server.create_bucket()
    src = write_tree(tmp_path / "src", {"a.txt": b"a" * 100})
    clean = RemoteStore(S3Backend(bucket, "snaps", client=moto_server.client()))
    first = clean.publish("db", src).version
    # the operation's pin removal is the first batch delete it sends
    plan = ScheduledFaults({("DELETE batch", 0): "latency"})
    plan.latency_seconds = 120.0  # answered only when the proxy stops
    config = Config(connect_timeout=1, read_timeout=60, retries={"total_max_attempts": 1})
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        client = moto_server.client(proxy.url, config=config)
        store = RemoteStore(S3Backend(bucket, "snaps", client=client))
        started = time.monotonic()
        if operation == "publish":
            (src / "b.txt").write_bytes(b"b")
            want = store.publish("db", src, deadline=DEADLINE).version
        else:
            store.set_ref("db", "stable", first, expected=None, deadline=DEADLINE)
            want = first
        took = time.monotonic() - started
        assert plan.counts[("DELETE batch", "latency")] == 1  # the removal did hang
        assert took < DEADLINE / 2  # it waited the whole 20 s before
        ref = "latest" if operation == "publish" else "stable"
        assert clean.resolve("db", ref).version == want
        assert not wait_for_new(before, 0.1)  # the removal still runs, in the background
        store.close()
    assert wait_for_new(before, 30.0)  # the proxy answered it at its stop
    clean.close()
