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

from chroma_snapshots import (
    CachedStore,
    InvalidInputError,
    RemoteStore,
    SnapshotStore,
    open_backend,
)
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
    other = RemoteStore(open_backend(f"file://{tmp_path}/other"), chunk_size=4096)
    assert FallbackStore([wrapped, other], primary=0).resolve("db").version == second.version
    assert first.version != second.version


def _efs_s3(tmp_path: Path, **kw: object) -> tuple[RemoteStore, RemoteStore]:
    efs = RemoteStore(open_backend(f"file://{tmp_path}/efs"), chunk_size=4096, **kw)  # type: ignore[arg-type]
    s3 = RemoteStore(open_backend(f"file://{tmp_path}/s3"), chunk_size=4096, **kw)  # type: ignore[arg-type]
    return efs, s3


def test_the_source_of_truths_not_found_is_the_answer(tmp_path: Path) -> None:
    """A tag deleted on the source of truth, or a name only a mirror has, does not exist:
    a mirror's copy answers only when the source of truth fails."""
    from chroma_snapshots import FallbackStore, SnapshotNotFoundError

    efs, s3 = _efs_s3(tmp_path)
    fb = FallbackStore([efs, s3], mirror=True)
    v = fb.publish("db", write_tree(tmp_path / "src", {"a": b"1"})).version
    fb.set_ref("db", "stable", v, expected=None)
    s3.backend.delete("db/refs/stable")
    efs.publish("ghost", write_tree(tmp_path / "g", {"a": b"only on the mirror"}))
    for call in (
        lambda: fb.resolve("db", "stable"),
        lambda: fb.current_version("db", "stable"),
        lambda: fb.checkout("ghost"),
        lambda: CachedStore(fb, tmp_path / "cache").checkout("ghost"),
    ):
        with pytest.raises(SnapshotNotFoundError):
            call()
    assert fb.read_ref("db", "stable") is None
    assert list(fb.versions("ghost")) == []  # the source of truth's answer, not the mirror's
    assert list(efs.versions("ghost")) != []


def test_an_outage_of_the_source_of_truth_never_undoes_a_rollback(tmp_path: Path) -> None:
    """A mirror that missed a rollback answers, during an outage of the source of truth,
    only flagged stale, and never over what a stale_ok cache last read from the truth."""
    import shutil

    from chroma_snapshots import FallbackStore

    efs, s3 = _efs_s3(tmp_path)
    fb = FallbackStore([efs, s3], mirror=True)
    src = tmp_path / "src"
    good = fb.publish("db", write_tree(src, {"a": b"good"})).version
    bad = fb.publish("db", write_tree(src, {"a": b"BAD release"})).version
    cache = CachedStore(fb, tmp_path / "cache", stale_ok=True)
    cache.checkout("db").release()
    s3.set_ref("db", "latest", good, expected=bad)  # rolled back on the source of truth alone
    with cache.checkout("db") as snap:
        assert (snap.path / "a").read_bytes() == b"good"
    shutil.rmtree(tmp_path / "s3")  # the source of truth goes away
    (tmp_path / "s3").write_bytes(b"")  # ... and answers with errors, not "not found"
    assert fb.current_version("db") == (bad, True)  # the mirror's answer, flagged stale
    with fb.checkout("db") as snap:  # no cache: the checkout says so too
        assert (snap.info.version, snap.stale) == (bad, True)
        assert (snap.path / "a").read_bytes() == b"BAD release"
    assert fb.checkout("db", bad).stale is False  # a version id is no ref answer
    with cache.checkout("db") as snap:
        assert (snap.path / "a").read_bytes() == b"good"  # what the truth said last
        assert snap.stale
    fresh = CachedStore(fb, tmp_path / "other-cache", stale_ok=True)
    with fresh.checkout("db") as snap:  # never read from the truth: the mirror's, stale
        assert snap.info.version == bad
        assert snap.stale


def test_stores_that_cannot_be_combined_are_refused_clearly(tmp_path: Path) -> None:
    from chroma_snapshots import DelegatingStore, FallbackStore
    from chroma_snapshots.engine.signing import Signer

    efs, s3 = _efs_s3(tmp_path)
    signed = RemoteStore(s3.backend, signer=Signer.from_spec("k1:" + "a" * 32))
    with pytest.raises(InvalidInputError, match="different signing keys"):
        FallbackStore([efs, signed])
    with pytest.raises(InvalidInputError, match="two or more stores"):
        FallbackStore([efs])
    with pytest.raises(InvalidInputError, match="source stores"):
        FallbackStore([efs, object()])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="CachedStore reads from a source store"):
        CachedStore(DelegatingStore(s3), tmp_path / "cache")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argument", "bad"),
    [
        *(("primary", v) for v in (2, -3, 1.0, "0", None, True)),
        *(("share", v) for v in ("0.5", None, 0, 1, float("nan"), True)),
        *(("mirror", v) for v in ("yes", 1, None)),
        *(("stores", v) for v in ("one store", None, "an iterator", "a set")),
        *(("stores", v) for v in ("one store twice", "one folder twice", "one inside")),
    ],
)
def test_fallback_arguments_that_would_fail_later_or_quietly_differ_are_refused(
    tmp_path: Path, argument: str, bad: object
) -> None:
    """Each gets InvalidInputError naming what is wrong: an index out of range was an
    IndexError, a str a TypeError from deep inside, and a set of stores (no order, yet the
    order says which is read first), one store or folder twice (a fallback to itself) or
    ``mirror="yes"`` were taken."""
    import numpy

    from chroma_snapshots import FallbackStore

    stores = list(_efs_s3(tmp_path))
    again = RemoteStore(open_backend(f"file://{tmp_path}/efs"), chunk_size=4096)
    given = {"one store": stores[0], "an iterator": iter(stores), "a set": set(stores)}
    given |= {"one store twice": [stores[0], stores[0]], "one folder twice": [stores[0], again]}
    given |= {"one inside": [FallbackStore(stores), stores[1]]}
    kwargs = {argument: given.get(bad, bad) if isinstance(bad, str) else bad}
    if argument != "stores":
        kwargs["stores"] = stores
    wrong = {"primary": "primary", "share": "share", "mirror": "mirror"}
    with pytest.raises(InvalidInputError, match=wrong.get(argument, "list|twice")):
        FallbackStore(**kwargs)  # type: ignore[arg-type]
    assert FallbackStore(stores, primary=-2, share=0.25, mirror=True).primary is stores[0]
    assert FallbackStore(stores, primary=numpy.int64(1)).primary is stores[1]  # an index


@pytest.mark.parametrize("url", ["s3://same/p", "fsspec+s3://same/p"])
def test_one_bucket_behind_two_endpoints_is_two_caches(tmp_path: Path, url: str) -> None:
    """An endpoint keys the cache for both ways of reaching S3 (fsspec+s3:// shared one
    cache folder between two servers)."""
    from chroma_snapshots.config import StoreConfig
    from chroma_snapshots.opening import open_store

    def cache_of(endpoint: str | None) -> Path:
        cfg = StoreConfig(url=url, s3_endpoint_url=endpoint, cache_dir=str(tmp_path))
        store = open_store(cfg, create=False)
        assert isinstance(store, CachedStore)
        return store.root

    roots = {cache_of("http://127.0.0.1:1"), cache_of("http://127.0.0.1:2"), cache_of(None)}
    assert len(roots) == 3
    assert cache_of(None) == cache_of(None)


def test_a_hung_mirror_costs_a_publish_a_share_of_its_time(tmp_path: Path) -> None:
    """The publish stands once the source of truth has it; mirroring gets ``share`` of the
    time left, so a hung mirror costs half the deadline, not all of it."""
    import threading
    import time

    from chroma_snapshots import FallbackStore
    from chroma_snapshots.backends.file import FileBackend

    release = threading.Event()

    class Hung(FileBackend):
        def put(self, key: str, data: bytes, **kw: object) -> object:  # type: ignore[override]
            release.wait(60)
            raise ConnectionResetError(104, "released by the test")

    efs = RemoteStore(Hung(tmp_path / "efs"), chunk_size=4096)
    s3 = RemoteStore(open_backend(f"file://{tmp_path}/s3"), chunk_size=4096)
    fb = FallbackStore([efs, s3], mirror=True)
    try:
        t0 = time.monotonic()
        info = fb.publish("db", write_tree(tmp_path / "src", {"a": b"x" * 5000}), deadline=20)
        took = time.monotonic() - t0
    finally:
        release.set()
    assert s3.current_version("db") == (info.version, False)  # the publish stands
    assert took < 15  # about half of the 20 s after the publish itself, never all of it


def test_a_copy_made_from_the_cache_alone_says_the_cache_served_it(tmp_path: Path) -> None:
    """``snap.source`` names where the bytes came from: a second holder's private copy built
    from the cached version downloads nothing, so no store served it."""
    store = RemoteStore(open_backend(f"file://{tmp_path}/store"), chunk_size=4096)
    cache = CachedStore(store, tmp_path / "cache")
    src = write_tree(tmp_path / "src", {"a.bin": os.urandom(9000)})
    store.publish("db", src)
    with cache.checkout("db") as first:
        assert first.source == store.label
        with cache.checkout("db") as second:  # the first still holds it: a copy of its own
            assert second.stats.bytes_downloaded == 0
            assert second.source == "cache"
            assert read_tree(second.path) == read_tree(src)
        copied = cache.checkout("db", dest=tmp_path / "dest")
        assert copied.source == "cache"


def test_fsspec_s_endpoint_variable_keys_the_cache_of_the_cli(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    """FSSPEC_S3_ENDPOINT_URL sends an fsspec+s3:// store to its server. Two servers hold a
    bucket of one name with different data: the second, offline or online, is never served
    the first's from the shared cache folder (it was, until fsspec's settings keyed it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT", "FSSPEC"))}
    bucket = moto_server.create_bucket()
    store = ["--store", f"fsspec+s3://{bucket}/p", "--cache-dir", str(tmp_path / "cache")]
    with MotoServer() as other:
        other.create_bucket(bucket)
        servers = {"a": moto_server.endpoint_url, "b": other.endpoint_url}
        for name, endpoint in servers.items():
            src = write_tree(tmp_path / f"src-{name}", {"who.txt": name.encode() * 9})
            env["FSSPEC_S3_ENDPOINT_URL"] = endpoint
            assert _cli(*store, "publish", "db", str(src), env=env).returncode == 0
        env["FSSPEC_S3_ENDPOINT_URL"] = servers["a"]
        assert (
            _cli(*store, "checkout", "db", "--dest", str(tmp_path / "a"), env=env).returncode == 0
        )
        env["FSSPEC_S3_ENDPOINT_URL"] = servers["b"]
        offline = _cli(
            *store, "--offline", "checkout", "db", "--dest", str(tmp_path / "b"), env=env
        )
        assert offline.returncode == 7, offline.stderr  # not in b's cache: nothing served
        assert not (tmp_path / "b").exists()
        online = _cli(*store, "checkout", "db", "--dest", str(tmp_path / "b"), env=env)
        assert online.returncode == 0, online.stderr
    assert read_tree(tmp_path / "a") == {"who.txt": b"a" * 9}
    assert read_tree(tmp_path / "b") == {"who.txt": b"b" * 9}


@pytest.mark.parametrize("offline", [[], ["--offline"]])
def test_a_malformed_fsspec_config_file_is_a_configuration_error(
    tmp_path: Path, offline: list[str]
) -> None:
    """fsspec reads its files at import: offline that was "unexpected JSONDecodeError (a
    bug in chroma-snapshots)", exit 1; online and offline it is exit 2, naming the cause."""
    conf = tmp_path / "fsspec"
    conf.mkdir()
    (conf / "c.json").write_text("{not json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSSPEC")}
    env["FSSPEC_CONFIG_DIR"] = str(conf)
    store = ["--store", "fsspec+s3://b/p", "--cache-dir", str(tmp_path / "cache")]
    out = _cli(*store, *offline, "checkout", "db", "--dest", str(tmp_path / "d"), env=env)
    assert out.returncode == 2, out.stderr
    assert "fsspec's configuration" in out.stderr
    assert "Traceback" not in out.stderr
    assert "a bug" not in out.stderr


@pytest.mark.parametrize("scheme", ["s3", "fsspec+s3"])
def test_a_profile_s_endpoint_in_the_aws_config_file_keys_the_cache(
    moto_server: MotoServer, tmp_path: Path, scheme: str
) -> None:
    """A profile's endpoint_url in the AWS config file sends the store to its server
    (botocore reads it). Two profiles name two servers holding a bucket of one name with
    different data: the second, offline, is never served the first's from the cache (it
    was: the cache was keyed without the endpoint, and the label named none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT", "FSSPEC"))}
    env.pop("AWS_PROFILE", None)
    bucket = moto_server.create_bucket()
    store = ["--store", f"{scheme}://{bucket}/p", "--cache-dir", str(tmp_path / "cache")]
    with MotoServer() as other:
        other.create_bucket(bucket)
        servers = {"a": moto_server.endpoint_url, "b": other.endpoint_url}
        config = tmp_path / "aws-config"
        keys = "aws_access_key_id = testing\naws_secret_access_key = testing\n"  # a profile's own
        config.write_text(
            "".join(f"[profile {n}]\nendpoint_url = {at}\n{keys}" for n, at in servers.items())
        )
        env["AWS_CONFIG_FILE"] = str(config)
        for name in servers:
            src = write_tree(tmp_path / f"src-{name}", {"who.txt": name.encode() * 9})
            out = _cli(*store, "--profile", name, "publish", "db", str(src), env=env)
            assert out.returncode == 0, out.stderr
        a = _cli(*store, "--profile", "a", "checkout", "db", "--dest", str(tmp_path / "a"), env=env)
        assert a.returncode == 0, a.stderr
        b = ["--profile", "b", "checkout", "db", "--dest", str(tmp_path / "b")]
        offline = _cli(*store, "--offline", *b, env=env)
        assert offline.returncode == 7, offline.stderr  # not in b's cache: nothing served
        assert f"at {servers['b']}" in offline.stderr  # and the refusal says which server
        assert not (tmp_path / "b").exists()
        assert _cli(*store, *b, env=env).returncode == 0
    assert read_tree(tmp_path / "a") == {"who.txt": b"a" * 9}
    assert read_tree(tmp_path / "b") == {"who.txt": b"b" * 9}
