"""Drop-behind (engine/dropbehind.py): a checkout that drops what it writes from the page
cache writes the same bytes, holds a bounded number of files open, closes every
descriptor it kept whether it succeeds or fails, and leaves fewer of its pages cached.
Residency is read with mincore(2) on a mapping of each file."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chroma_snapshots import RemoteStore, StoreConfig, open_store
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.cli.localserver import MotoServer
from chroma_snapshots.engine.dropbehind import KEEP, DropBehind
from chroma_snapshots.engine.keys import pack_key
from chroma_snapshots.errors import ConfigError, IntegrityError, InvalidInputError
from chroma_snapshots.testing.conformance import read_tree

MiB = 1 << 20
WORKER = str(Path(__file__).with_name("resource_worker.py"))
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore of a shared read-only mapping: mapping
    reads nothing in)."""
    size, page = path.stat().st_size, mmap.PAGESIZE
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_tree(root: Path) -> int:
    return sum(resident(p) for p in root.rglob("*") if p.is_file())


def _tree(root: Path, files: int, size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(files):
        path = root / f"d{i % 3}" / f"f{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))  # incompressible, no chunk shared
    (root / "small.txt").write_bytes(b"left to the kernel\n")
    return root


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_clean_finished_file_leaves_the_page_cache_once_more_are_done(tmp_path: Path) -> None:
    # The mechanism alone, with no timing in it: files written and synced are clean, so
    # the call made when one leaves the kept ones must drop all of its pages.
    paths = [tmp_path / f"f{i}" for i in range(KEEP + 2)]
    for p in paths:
        p.write_bytes(os.urandom(2 * MiB))
    os.sync()
    assert all(resident(p) == 2 * MiB for p in paths)
    behind, closed = DropBehind(), []
    for p in paths:
        closed += behind.finished(os.open(p, os.O_WRONLY))
    assert len(closed) == 2  # only the oldest two are handed back, the rest are kept open
    kept = behind.drain()
    assert len(kept) == KEEP
    assert not set(kept) & set(closed)
    for fd in closed + kept:
        os.close(fd)
    assert [resident(p) for p in paths] == [0] * len(paths)


def test_writes_past_a_step_drop_what_the_step_before_sent_to_disk(tmp_path: Path) -> None:
    from chroma_snapshots.engine.dropbehind import STEP

    path = tmp_path / "big"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        behind, piece = DropBehind(), os.urandom(MiB)
        for i in range(STEP // MiB):
            os.pwrite(fd, piece, i * MiB)
            behind.wrote(fd, MiB)  # the last one starts the writeback of the first step
        os.fsync(fd)  # now clean: the next step's call drops it
        for i in range(STEP // MiB, 2 * STEP // MiB):
            os.pwrite(fd, piece, i * MiB)
            behind.wrote(fd, MiB)
        assert resident(path) <= STEP  # the first step's pages are gone
    finally:
        os.close(fd)


@pytest.fixture
def s3_store(moto_server: MotoServer, s3_bucket: str) -> RemoteStore:
    settings = S3Settings(endpoint_url=moto_server.endpoint_url)
    return RemoteStore(S3Backend(s3_bucket, "snaps", settings=settings))


@pytest.mark.parametrize("backend", ["s3", "file"])
def test_a_checkout_dropping_behind_writes_the_same_bytes_and_caches_fewer(
    tmp_path: Path, s3_store: RemoteStore, backend: str
) -> None:
    src = _tree(tmp_path / "src", files=16, size=4 * MiB)
    store = s3_store if backend == "s3" else RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", src)
    kept = store.checkout("db", dest=tmp_path / "kept").path
    before = _open_fds()
    store.drop_behind = True
    dropped = store.checkout("db", dest=tmp_path / "dropped").path
    assert _open_fds() == before  # every descriptor it kept is closed
    total = 16 * 4 * MiB
    assert resident_tree(kept) >= 0.9 * total  # what not dropping leaves: all of it
    # At most the last KEEP files' pages, still on their way to the disk, stay; the slack
    # is for writeback that lags on a loaded machine. (Read before the bytes are compared:
    # comparing reads them back in.)
    assert resident_tree(dropped) <= 0.75 * total
    assert read_tree(dropped) == read_tree(kept) == read_tree(src)


def test_a_failed_checkout_closes_every_file_it_kept(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", files=12, size=2 * MiB)
    store = RemoteStore(FileBackend(tmp_path / "store"), drop_behind=True)
    version = store.publish("db", src).version
    for pack in store.load_manifest("db", version).packs:  # the end of each is damaged:
        key = pack_key("db", pack)  # the files before it are placed, finished and kept
        data = bytearray(store.backend.get(key).data)
        data[-100] ^= 0xFF
        store.backend.put(key, bytes(data))
    before = _open_fds()
    with pytest.raises(IntegrityError):
        store.checkout("db", dest=tmp_path / "out")
    # reads already running when the error came end on their own, and the last write
    # closes the files (engine/placer.py): the descriptors are back within seconds
    for _ in range(100):
        if _open_fds() == before:
            break
        time.sleep(0.05)
    assert _open_fds() == before
    assert not (tmp_path / "out").exists()


def test_many_large_files_under_a_low_open_file_limit(tmp_path: Path) -> None:
    # Kept finished files are descriptors: KEEP of them at most, whatever the file count.
    src = _tree(tmp_path / "src", files=80, size=MiB + 1)
    for op, tree in (("publish", src), ("checkout", tmp_path / "out")):
        cmd = [sys.executable, WORKER, op, str(tmp_path / "store"), str(tree), "64", "drop"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert read_tree(tmp_path / "out") == read_tree(src)


def test_the_setting_from_the_environment_and_from_code(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    assert not StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": url}).drop_behind
    on = StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": url, "CHROMA_SNAPSHOTS_DROP_BEHIND": "1"})
    store = open_store(on)
    assert isinstance(store, RemoteStore)
    assert store.drop_behind
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_DROP_BEHIND"):
        StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": url, "CHROMA_SNAPSHOTS_DROP_BEHIND": "2"})
    with pytest.raises(ConfigError, match="drop_behind"):
        StoreConfig(url=url, drop_behind="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="drop_behind"):
        RemoteStore(FileBackend(tmp_path / "s"), drop_behind=1)  # type: ignore[arg-type]
