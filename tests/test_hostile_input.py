"""Stored data written by an attacker (or damaged) ends in IntegrityError through the public
API and exit code 5 in the CLI: deeply nested or huge JSON, declared sizes that would make a
reader allocate gigabytes, paths hundreds of levels deep, and packs shorter than their
manifest says. Each scenario runs on a real moto S3 server and on a file store."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import (
    ANY,
    IntegrityError,
    InvalidInputError,
    LockError,
    Manifest,
    RefValue,
    RemoteStore,
    SnapshotError,
    VersionId,
    open_backend,
)
from chroma_snapshots.backends.base import Backend
from chroma_snapshots.engine.keys import manifest_key, pack_key, ref_key
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.engine.validation import (
    MAX_PATH_DEPTH,
    canonical_json,
    parse_time,
    utc_now,
)
from chroma_snapshots.locking import ObjectLeaseLock
from chroma_snapshots.stores.fallback import FallbackStore
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree

KEY = "k1:" + "a-signing-secret-" * 2
NESTED = [b"[" * 200_000, b'{"a":' * 200_000, b"[1," * 200_000]


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store URL: a folder, or a bucket on the session's moto server (127.0.0.1)."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    moto: MotoServer = request.getfixturevalue("moto_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint_url)  # boto3 reads it itself
    return f"s3://{request.getfixturevalue('s3_bucket')}/snaps"


def _store(url: str, signed: bool = False) -> RemoteStore:
    signer = Signer.from_spec(KEY) if signed else None
    # format 1: these cases edit the manifest's JSON (test_format_v2 covers format 2)
    return RemoteStore(open_backend(url), chunk_size=4096, signer=signer, manifest_format=1)


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMA_SNAPSHOTS")}
    cmd = [sys.executable, "-m", "chroma_snapshots.cli", "--store", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _assert_exit_5(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 5, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")


def _publish(store: RemoteStore, root: Path, files: dict[str, bytes] | None = None) -> str:
    src = write_tree(root, files or {"a.bin": os.urandom(6000), "d/b.txt": b"b" * 5000})
    return store.publish("db", src).version


def _plant(store: RemoteStore, version: str, edit: Callable[[dict[str, Any]], None]) -> str:
    """Store an edited copy of a manifest under its own (correct) version id, signed if the
    store signs, and point ``latest`` at it: only the edit can be what readers refuse."""
    obj = json.loads(store.backend.get(manifest_key("db", version)).data)
    edit(obj)
    data = canonical_json(obj)
    new = str(VersionId.for_manifest(data, parse_time(obj["created_at"], "created_at")))
    key = manifest_key("db", new)
    store.backend.put(key, data)
    ref = RefValue(new, 99, utc_now())
    if store.signer is not None:
        store.backend.put(key + ".sig", store.signer.sign(f"manifest:{key}", data).encode())
        sig = store.signer.sign(f"ref:{ref_key('db', 'latest')}", ref.signed_bytes())
        ref = RefValue(new, 99, ref.updated_at, sig)
    store.backend.put(ref_key("db", "latest"), ref.to_json())
    return new


# Item 5: hostile JSON.


@pytest.mark.parametrize("repair", ["set_ref", "publish"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("body", [*NESTED, b" " * 5_000_000 + b"{}", b"1" * 100_000])
def test_hostile_ref_is_an_integrity_error(
    url: str, tmp_path: Path, signed: bool, body: bytes, repair: str
) -> None:
    store = _store(url, signed)
    version = _publish(store, tmp_path / "src")
    store.backend.put(ref_key("db", "latest"), body)
    for call in (
        lambda: store.read_ref("db"),
        lambda: store.resolve("db"),
        lambda: store.checkout("db", dest=tmp_path / "out"),
        lambda: store.publish("db", tmp_path / "src"),
        lambda: store.set_ref("db", "latest", version, expected=version),
    ):
        with pytest.raises(IntegrityError, match=r"ref db/refs/latest.*expected=ANY"):
            call()
    assert not (tmp_path / "out").exists()
    # the repair: a move that expects nothing in particular writes over it
    if repair == "set_ref":
        store.set_ref("db", "latest", version, expected=ANY)
    else:
        version = store.publish("db", tmp_path / "src", expected=ANY).version
    assert _store(url, signed).resolve("db").version == version
    assert store.publish("db", tmp_path / "src", allow_empty=True).version != version


@pytest.mark.parametrize("signed", [False, True])
def test_nested_manifest_is_an_integrity_error(url: str, tmp_path: Path, signed: bool) -> None:
    store = _store(url, signed)
    version = _publish(store, tmp_path / "src")
    for body in NESTED:
        store.backend.put(manifest_key("db", version), body)
        with pytest.raises(IntegrityError):
            store.load_manifest("db", version)
        with pytest.raises(IntegrityError):
            store.checkout("db", dest=tmp_path / "out")
    with pytest.raises(IntegrityError, match="nested too deeply"):
        Manifest.from_json(NESTED[0])


def test_metadata_nesting_is_bounded(url: str, tmp_path: Path) -> None:
    """Nesting the JSON decoder accepts but later recursive code (canonical JSON, the CLI's
    --json output) could not handle."""
    store = _store(url)
    version = _publish(store, tmp_path / "src")
    deep: object = {}
    for _ in range(500):
        deep = {"a": deep}
    _plant(store, version, lambda o: o.update(metadata={"x": deep}))
    with pytest.raises(IntegrityError, match="metadata nests deeper"):
        store.resolve("db")
    _assert_exit_5(_cli(url, "info", "db"))


def test_hostile_ref_in_the_cli_is_exit_5(url: str, tmp_path: Path) -> None:
    store = _store(url)
    _publish(store, tmp_path / "src")
    store.backend.put(ref_key("db", "latest"), NESTED[0])
    _assert_exit_5(_cli(url, "info", "db"))
    _assert_exit_5(_cli(url, "checkout", "db", "--dest", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_fallback_store_falls_back_on_a_hostile_ref(tmp_path: Path) -> None:
    bad, good = _store((tmp_path / "bad").as_uri()), _store((tmp_path / "good").as_uri())
    _publish(bad, tmp_path / "src")
    _publish(good, tmp_path / "src")
    bad.backend.put(ref_key("db", "latest"), NESTED[0])
    got = FallbackStore([bad, good]).checkout("db", dest=tmp_path / "out")
    assert read_tree(got.path) == read_tree(tmp_path / "src")


@pytest.mark.parametrize(
    "data",
    [
        NESTED[0],
        b'{"owner": "x", "generation": 1, "expires_at": "9e99"}',  # was a raw TypeError
        b'{"owner": 1, "generation": 1, "expires_at": 1.0}',
        b'{"owner": "x", "generation": true, "expires_at": 1.0}',
        b'["x", 1, 1.0]',
    ],
)
def test_a_lock_object_that_is_not_a_lease_is_a_lock_error(url: str, data: bytes) -> None:
    backend = open_backend(url)
    backend.put("db/locks/publish", data)
    with pytest.raises(LockError, match="malformed"):
        ObjectLeaseLock(backend, "db/locks/publish").acquire(timeout=0)
    assert backend.get("db/locks/publish").data == data  # never overwritten: not a lease


# Item 9: declared sizes.


def _first_chunk(o: dict[str, Any]) -> dict[str, Any]:
    chunk: dict[str, Any] = o["chunks"][o["files"][0]["chunks"][0]]
    return chunk


@pytest.mark.parametrize(
    "edit",
    [
        {"codec": "zstd", "length": 1536 << 20},  # the chunk
        {"codec": "zstd", "length": 4097},  # zstd is only stored when it saves
        {"codec": "none", "length": 4097},
        {"size": 8192},  # larger than the manifest's chunk size
        {"offset": (1 << 32) - 10},  # runs past the largest pack
        {"offset": -1},
    ],
)
def test_declared_chunk_sizes_are_bounded_by_the_format(
    url: str, tmp_path: Path, edit: dict[str, object]
) -> None:
    store = _store(url)
    version = _publish(store, tmp_path / "src", {"a.bin": os.urandom(4096)})
    _plant(store, version, lambda o: _first_chunk(o).update(edit))
    with pytest.raises(IntegrityError):
        store.checkout("db", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_counts_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    store = _store(url)
    _publish(store, tmp_path / "src")
    monkeypatch.setattr("chroma_snapshots.engine.models.MAX_FILES", 1)  # the real limit is 1 Mi
    with pytest.raises(IntegrityError, match="2 files, more than 1"):
        store.resolve("db")


_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from chroma_snapshots import RemoteStore, open_backend
try:
    RemoteStore(open_backend(sys.argv[1]), workers=2).checkout("db", dest=sys.argv[2])
except BaseException as e:
    print(type(e).__name__, e)
"""


def _checkout_in_1_gib(url: str, dest: Path) -> str:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    cmd = [sys.executable, "-c", _CHILD, url, str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _zstd_frame_declaring(content_size: int, length: int) -> bytes:
    """A valid-looking zstd frame of ``length`` bytes whose header claims ``content_size``."""
    header = struct.pack("<IBBQ", 0xFD2FB528, 0xC0, 0x58, content_size)  # 8-byte size, 2 MiB window
    body = b"x" * (length - len(header) - 3)
    return header + (1 | len(body) << 3).to_bytes(3, "little") + body  # one raw, last block


def test_huge_declared_sizes_allocate_nothing_under_a_1_gib_limit(url: str, tmp_path: Path) -> None:
    """The manifest's declared length, then the zstd frame's declared content size: each of
    1.5 GiB would be a MemoryError in a process limited to 1 GiB of address space."""
    store = _store(url)
    version = _publish(store, tmp_path / "src", {"a.bin": b"a" * 4096})
    chunk = store.load_manifest("db", version).chunks
    (c,) = chunk.values()
    assert c.codec == "zstd"
    assert c.length >= 17  # room for a frame header
    store.backend.put(pack_key("db", c.pack), _zstd_frame_declaring(1536 << 20, c.length))
    assert "IntegrityError" in _checkout_in_1_gib(url, tmp_path / "o1")
    _plant(store, version, lambda o: _first_chunk(o).update(length=1536 << 20))
    assert "IntegrityError" in _checkout_in_1_gib(url, tmp_path / "o2")
    assert not (tmp_path / "o1").exists()
    assert not (tmp_path / "o2").exists()


# Item 10: depth.


def _deep_dirs(top: Path, depth: int) -> Path:
    """``top/d/d/.../d`` ``depth`` levels deep, made one level at a time (os.makedirs
    recurses once per level)."""
    here = top
    for _ in range(depth):
        here = here / "d"
        here.mkdir()
    return here


def remove_deep(top: Path) -> None:
    """Remove a tree of any depth with an explicit stack: shutil.rmtree (and so pytest's
    own clean-up of old temp folders) recurses once per level on Python 3.11."""
    found, todo = [], [top]
    while todo:
        here = todo.pop()
        found.append(here)
        with os.scandir(here) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
                else:
                    os.unlink(e.path)
    for here in reversed(found):  # every folder was found after its parent
        here.rmdir()


@pytest.mark.parametrize("depth", [MAX_PATH_DEPTH + 1, 600])
def test_deep_manifest_paths_are_refused(url: str, tmp_path: Path, depth: int) -> None:
    store = _store(url)
    version = _publish(store, tmp_path / "src")
    deep = "/".join(["d"] * depth)
    _plant(store, version, lambda o: o["files"][0].update(path=deep))
    with pytest.raises(IntegrityError, match=f"{depth} components"):
        store.checkout("db", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tree_at_the_depth_limit_round_trips(url: str, tmp_path: Path) -> None:
    store = _store(url)
    src = tmp_path / "src"
    src.mkdir()
    (_deep_dirs(src, MAX_PATH_DEPTH - 1) / "f").write_bytes(b"bottom")
    store.publish("db", src)
    assert read_tree(store.checkout("db", dest=tmp_path / "out").path) == read_tree(src)


def test_publishing_a_1500_deep_folder_is_invalid_input(url: str, tmp_path: Path) -> None:
    store = _store(url)
    src = tmp_path / "src"
    src.mkdir()
    try:
        (_deep_dirs(src, 1500) / "f").write_bytes(b"deep")
        too_deep = src.joinpath(*["d"] * (MAX_PATH_DEPTH + 1))
        with pytest.raises(InvalidInputError, match=f"{too_deep}: more than {MAX_PATH_DEPTH}"):
            store.publish("db", src)
        assert list(store.backend.list("db/")) == []  # nothing uploaded
    finally:
        remove_deep(src)
    assert not src.exists()


def test_a_deep_folder_planted_in_a_file_store_is_not_walked(tmp_path: Path) -> None:
    store = _store((tmp_path / "store").as_uri())
    version = _publish(store, tmp_path / "src")
    planted = tmp_path / "store" / "db"
    try:
        (_deep_dirs(planted, 1500) / "f").write_bytes(b"x")
        assert [v.version for v in store.versions("db")] == [version]
        keys = [m.key for m in store.backend.list("db/")]
        assert all(len(k.split("/")) <= MAX_PATH_DEPTH for k in keys)
        assert manifest_key("db", version) in keys
    finally:
        remove_deep(planted / "d")


# Item 11: a pack shorter than its manifest says.


@pytest.fixture(params=["memory", "file", "s3", "fsspec+s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return open_backend(f"memory://h-{uuid.uuid4().hex}")
    if request.param == "file":
        return open_backend(str(tmp_path / "b"))
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("s3_bucket")
    if request.param == "s3":
        from chroma_snapshots.backends.s3 import S3Backend, S3Settings

        return S3Backend(bucket, "p", settings=S3Settings(endpoint_url=moto.endpoint_url))
    opts = {"client_kwargs": {"endpoint_url": moto.endpoint_url}}
    return open_backend(f"fsspec+s3://{bucket}/p", **opts)


def test_a_range_past_the_end_is_an_integrity_error(backend: Backend) -> None:
    backend.put("empty", b"")
    backend.put("abc", b"abc")
    for key, rng in (("empty", (0, 10)), ("abc", (3, 10)), ("abc", (5, 10))):
        with pytest.raises(IntegrityError, match="shorter than the manifest says"):
            backend.get(key, byte_range=rng)
        with pytest.raises(IntegrityError, match="shorter than the manifest says"):
            backend.get_into(key, rng, memoryview(bytearray(16)))
    assert backend.get("abc", byte_range=(1, 10)).data == b"bc"  # a short tail is returned


def test_a_pack_emptied_is_an_integrity_error_and_exit_5(url: str, tmp_path: Path) -> None:
    store = _store(url)
    version = _publish(store, tmp_path / "src")
    for pack in store.load_manifest("db", version).packs:
        store.backend.put(pack_key("db", pack), b"")
    with pytest.raises(IntegrityError, match="shorter than the manifest says"):
        store.checkout("db", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _assert_exit_5(_cli(url, "checkout", "db", "--dest", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_ref_at_the_highest_generation_is_not_moved_past_it(tmp_path: Path) -> None:
    # A planted ref at the bound: the next move would write a generation readers refuse,
    # wedging the name. It is refused instead, and the name stays readable.
    from chroma_snapshots.backends.file import FileBackend
    from chroma_snapshots.engine.keys import ref_key
    from chroma_snapshots.engine.models import RefValue
    from chroma_snapshots.engine.refvalue import MAX_GENERATION
    from chroma_snapshots.engine.validation import utc_now

    store = RemoteStore(FileBackend(tmp_path / "store"))
    first = store.publish("db", write_tree(tmp_path / "a", {"a": b"a"})).version
    planted = RefValue(first, MAX_GENERATION, utc_now())
    store.backend.put(ref_key("db", "latest"), planted.to_json())
    fresh = RemoteStore(FileBackend(tmp_path / "store"))
    with pytest.raises(IntegrityError, match="the highest a ref may have"):
        fresh.publish("db", write_tree(tmp_path / "b", {"b": b"b"}))
    assert fresh.resolve("db").version == first


@pytest.mark.parametrize("plant", ["link to a file outside", "link to /dev/zero"])
@pytest.mark.parametrize("what", ["ref", "manifest", "pack"])
def test_a_link_planted_in_a_file_store_is_refused_at_once(
    tmp_path: Path, plant: str, what: str
) -> None:
    # a link could name any file the reader can read (and a ref's text is shown in its
    # error); a FIFO is left to the deadline (tests/test_hang.py, the demo's hung mount)
    store = _store((tmp_path / "store").as_uri())
    version = _publish(store, tmp_path / "src")
    root = tmp_path / "store"
    key = {
        "ref": ref_key("db", "latest"),
        "manifest": manifest_key("db", version),
        "pack": next(k for k in store.backend.list("db/packs/")).key,
    }[what]
    target = root / key
    target.unlink()
    outside = tmp_path / "secret.json"
    outside.write_bytes(store.backend.get(ref_key("db", "latest")).data if what != "ref" else b"{}")
    target.symlink_to(outside if "outside" in plant else Path("/dev/zero"))
    with pytest.raises(IntegrityError, match="is a symbolic link"):
        store.checkout("db", dest=tmp_path / "out", deadline=30)
    assert not (tmp_path / "out").exists()
    done = _cli(
        root.as_uri(), "--timeout", "30", "checkout", "db", "--dest", str(tmp_path / "out2")
    )
    _assert_exit_5(done)


@pytest.mark.parametrize("planted", ["link", "folder"])
def test_a_lock_file_planted_in_a_file_store_is_named_not_the_ref(
    tmp_path: Path, planted: str
) -> None:
    """A link or folder at a ref's compare-and-swap lock file was reported as the ref
    itself being a link or a folder (an independent review): an operator would have gone
    to repair an intact ref. Nothing is written through the link."""
    store = RemoteStore(open_backend(str(tmp_path / "store")))
    src = write_tree(tmp_path / "src", {"a": b"1"})
    store.publish("db", src)
    store.publish("db", write_tree(tmp_path / "src", {"a": b"2"}))
    for lock in (tmp_path / "store" / ".locks").iterdir():
        lock.unlink()
        if planted == "link":
            lock.symlink_to(tmp_path / "elsewhere")
        else:
            lock.mkdir()
    with pytest.raises(SnapshotError, match=r"db/refs/latest's lock file \w+\.lock in \.locks"):
        store.publish("db", write_tree(tmp_path / "src", {"a": b"3"}))
    assert not (tmp_path / "elsewhere").exists()
