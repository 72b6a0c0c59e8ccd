"""What every store offers callers, whatever wraps it: manifests, the current version, and
temporary checkouts the store reclaims. Regression tests for the seams that broke when a
caller needed a capability only one store class had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_snapshots import CachedStore, RemoteStore, SnapshotStore, open_backend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "chroma_snapshots.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_info_works_through_the_cache(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, how: str
) -> None:
    """``--cache-dir`` (or CHROMA_SNAPSHOTS_CACHE_DIR, as in every Lambda) with ``info``
    crashed with AttributeError: the cache had no ``load_manifest``."""
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    store = ["--store", f"s3://{s3_bucket}/snaps"]
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(70_000), "s/h.bin": b"h"})
    assert _cli(*store, "publish", "db", str(src), env=env).returncode == 0
    cache = ["--cache-dir", str(tmp_path / "cache")] if how == "flag" else []
    if how == "environment":
        env["CHROMA_SNAPSHOTS_CACHE_DIR"] = str(tmp_path / "cache")
    assert _cli(*store, *cache, "checkout", "db", env=env).returncode == 0  # now cached
    out = _cli(*store, *cache, "info", "db", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] == ["chroma.sqlite3", "s/h.bin"]


@pytest.fixture
def stores(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> dict[str, SnapshotStore]:
    settings = S3Settings(endpoint_url=moto_server.endpoint_url)
    s3 = RemoteStore(S3Backend(s3_bucket, "p", settings=settings), chunk_size=4096)
    files = RemoteStore(open_backend(f"file://{tmp_path}/store"), chunk_size=4096)
    return {"s3": s3, "file": files, "cached": CachedStore(s3, tmp_path / "cache")}


@pytest.mark.parametrize("kind", ["s3", "file", "cached"])
def test_every_store_gives_manifests_and_current_versions(
    stores: dict[str, SnapshotStore], kind: str, tmp_path: Path
) -> None:
    store = stores[kind]
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(9000), "b/c.bin": b"c"})
    first = store.publish("db", src)
    (src / "a.bin").write_bytes(os.urandom(9000))
    second = store.publish("db", src)
    assert store.current_version("db") == (second.version, False)
    assert store.current_version("db", first.version) == (first.version, False)
    store.set_ref("db", "stable", first.version, expected=None)
    assert store.current_version("db", "stable") == (first.version, False)
    manifest = store.load_manifest("db", second.version)
    assert [f.path for f in manifest.files] == ["a.bin", "b/c.bin"]
    assert manifest.total_size == 9001


@pytest.mark.parametrize("kind", ["s3", "file", "cached"])
def test_a_temporary_checkout_is_reclaimed_on_release(
    stores: dict[str, SnapshotStore], kind: str, tmp_path: Path
) -> None:
    store = stores[kind]
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(9000)})
    store.publish("db", src)
    with store.checkout("db") as snap:
        assert read_tree(snap.path) == read_tree(src)
        path = snap.path
    if kind == "cached":
        assert path.exists()  # the cache keeps its copy for the next checkout
    else:
        assert not path.exists()
        assert not path.parent.exists()  # the temporary folder made for it too
    kept = store.checkout("db", dest=tmp_path / "mine")
    kept.release()
    assert read_tree(tmp_path / "mine") == read_tree(src)  # a chosen dest is the caller's


def test_a_fallback_reads_refs_from_the_source_of_truth(tmp_path: Path) -> None:
    """A mirror that missed a rollback (done on the source of truth alone, or a mirror
    write that failed) must not keep serving the rolled-back version."""
    import shutil

    from chroma_snapshots import FallbackStore

    mirror = RemoteStore(open_backend(f"file://{tmp_path}/efs"), chunk_size=4096)
    truth = RemoteStore(open_backend(f"file://{tmp_path}/s3"), chunk_size=4096)
    reader = FallbackStore([mirror, truth], primary=1, mirror=True)
    src = write_tree(tmp_path / "src", {"a.bin": b"good" * 1000})
    good = reader.publish("db", src)
    (src / "a.bin").write_bytes(b"BAD!" * 1000)
    bad = reader.publish("db", src)
    assert mirror.current_version("db")[0] == bad.version  # mirrored
    truth.set_ref("db", "latest", good.version, expected=bad.version)  # the operator's rollback
    assert reader.current_version("db")[0] == good.version
    assert reader.resolve("db").version == good.version
    assert reader.refs("db") == {"latest": good.version}
    with reader.checkout("db") as snap:
        assert snap.info.version == good.version
        assert (snap.path / "a.bin").read_bytes() == b"good" * 1000
        assert snap.source == mirror.label  # the bytes still come from the fast store
    shutil.rmtree(tmp_path / "s3")  # the source of truth is gone: the mirror answers
    assert reader.current_version("db")[0] == bad.version


@pytest.mark.parametrize("command", [["info", "db"], ["checkout", "db"], ["ls", "db"], ["ls"]])
def test_a_missing_bucket_is_named_by_every_command(
    moto_server: MotoServer, command: list[str]
) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    out = _cli("--store", "s3://no-such-bucket-here/snaps", *command, env=env)
    assert out.returncode == 3, out.stderr
    assert "bucket 'no-such-bucket-here' does not exist" in out.stderr
    assert "no ref" not in out.stderr


def test_a_fallback_takes_any_source_store(tmp_path: Path) -> None:
    """A FallbackStore of FallbackStores serves and fails over like one of RemoteStores;
    mirroring, which copies objects, says which stores it cannot copy to."""
    from chroma_snapshots import FallbackStore

    a, b, c = (RemoteStore(open_backend(f"file://{tmp_path}/{n}"), chunk_size=4096) for n in "abc")
    inner = FallbackStore([a, b], primary=1)
    outer = FallbackStore([inner, c], primary=1)
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(9000)})
    info = outer.publish("db", src)  # to c, the source of truth
    with outer.checkout("db") as snap:  # a and b lack it: c serves
        assert read_tree(snap.path) == read_tree(src)
        assert snap.source == c.label
    assert CachedStore(outer, tmp_path / "cache").checkout("db").info.version == info.version
    with pytest.raises(ValueError, match="mirror=True needs stores kept on a backend"):
        FallbackStore([inner, c], primary=1, mirror=True)


def test_a_wrapper_of_a_source_store_sits_under_a_cache(tmp_path: Path) -> None:
    """A DelegatingSourceStore (here, one that counts checkouts' placements) is a source
    store: a cache and a FallbackStore accept it, and deltas still reach the publish."""
    from chroma_snapshots import DelegatingSourceStore, FallbackStore
    from chroma_snapshots.engine.deadline import Deadline
    from chroma_snapshots.engine.progress import StatsRecorder
    from chroma_snapshots.engine.transfer import Placement

    class Counting(DelegatingSourceStore):
        placed = 0

        def materialize(
            self,
            name: str,
            job: Placement,
            dl: Deadline,
            stats: StatsRecorder,
            progress: object = None,
        ) -> str:
            Counting.placed += 1
            return super().materialize(name, job, dl, stats)

    remote = RemoteStore(open_backend(f"file://{tmp_path}/s"), chunk_size=4096)
    wrapped = Counting(remote)
    cached = CachedStore(wrapped, tmp_path / "cache")
    data = bytearray(os.urandom(40_960))
    first = cached.publish("db", write_tree(tmp_path / "a", {"d.bin": bytes(data)}))
    cached.checkout("db").release()
    data[100:104] = b"edit"
    second = cached.publish("db", write_tree(tmp_path / "b", {"d.bin": bytes(data)}))
    assert second.stats.bytes_uploaded < 4096  # a delta against the cache's copy
    with cached.checkout("db") as snap:
        assert (snap.path / "d.bin").read_bytes() == bytes(data)
    assert Counting.placed == 2
    assert FallbackStore([wrapped, remote]).resolve("db").version == second.version
    assert first.version != second.version
