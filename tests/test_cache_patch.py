"""A new cached version built by patching a retired older one in place
(stores/cache/patch.py): only changed chunk positions are written, whatever a consumer did
to the old tree is verified or removed, and versions someone holds are never taken."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from small_stores import CHUNK

from chroma_snapshots import CachedStore, RemoteStore
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.testing.conformance import read_tree, write_tree


def _v1(cached: CachedStore, tmp_path: Path) -> tuple[Path, Path, str]:
    """Publish and cache v1; returns its source tree, its cached tree and its version."""
    rng = random.Random(3)
    src = write_tree(
        tmp_path / "src",
        {
            "db.sqlite3": rng.randbytes(64 * CHUNK),
            "seg/data.bin": rng.randbytes(32 * CHUNK + 100),
            "seg/gone.bin": rng.randbytes(3 * CHUNK),
        },
    )
    with cached.checkout("db", cached.publish("db", src).version) as snap:
        return src, snap.path, snap.info.version


def _change(src: Path) -> None:
    """Two pages of one file, a file grown, one removed, one added, a mode changed."""
    rng = random.Random(4)
    with open(src / "db.sqlite3", "r+b") as f:
        for page in (3, 40):
            f.seek(page * CHUNK)
            f.write(rng.randbytes(CHUNK))
    with open(src / "seg/data.bin", "ab") as f:
        f.write(rng.randbytes(2 * CHUNK))
    (src / "seg/gone.bin").unlink()
    (src / "new").mkdir()
    (src / "new/file.bin").write_bytes(rng.randbytes(CHUNK + 1))
    os.chmod(src / "db.sqlite3", 0o600)


def test_the_old_version_is_patched_into_the_new_one(cached: CachedStore, tmp_path: Path) -> None:
    src, _, _ = _v1(cached, tmp_path)
    _change(src)
    v2 = cached.publish("db", src).version
    with cached.checkout("db", v2) as snap:
        assert read_tree(snap.path) == read_tree(src)
        assert (snap.path / "db.sqlite3").stat().st_mode & 0o777 == 0o600
        # changed chunks only: 2 pages, the grown tail (3 chunks), the new file (2 chunks)
        assert 0 < snap.stats.bytes_downloaded <= 8 * CHUNK
        total = sum(len(b) for b in read_tree(src).values())
        assert snap.stats.bytes_reused >= total - 8 * CHUNK
    assert cached.dirs("db").complete() == [v2]  # v1 became v2
    assert not list((cached.dirs("db").root / "tmp").iterdir())
    with cached.checkout("db", v2) as warm:  # stamped: a warm checkout serves it as is
        assert warm.stats.bytes_downloaded == 0
        assert warm.stats.bytes_reused == 0


def test_a_consumer_write_to_the_old_copy_is_verified_away(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, _ = _v1(cached, tmp_path)
    path = old / "seg/data.bin"
    st = os.stat(path)
    with open(path, "r+b") as f:  # in place, mtime put back: only the ctime tells
        f.seek(5 * CHUNK)
        f.write(b"\0" * CHUNK)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    _change(src)
    with cached.checkout("db", cached.publish("db", src).version) as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_a_planted_link_is_removed_not_followed(cached: CachedStore, tmp_path: Path) -> None:
    src, old, _ = _v1(cached, tmp_path)
    outside = write_tree(tmp_path / "outside", {"data.bin": b"not yours", "gone.bin": b"x"})
    before = read_tree(outside)
    os.rename(old / "seg", tmp_path / "moved-seg")
    os.symlink(outside, old / "seg")
    os.symlink(outside / "data.bin", old / "db.sqlite3.link")
    os.unlink(old / "db.sqlite3")  # a hard link to a file elsewhere, in a file's place
    os.link(outside / "gone.bin", old / "db.sqlite3")
    os.link(outside / "data.bin", old / "new")  # and where v2 has a folder
    _change(src)
    with cached.checkout("db", cached.publish("db", src).version) as snap:
        assert read_tree(snap.path) == read_tree(src)
        assert not (snap.path / "seg").is_symlink()
        assert not (snap.path / "db.sqlite3.link").exists()
    assert read_tree(outside) == before


def test_a_pinned_version_is_never_patched(cached: CachedStore, tmp_path: Path) -> None:
    src, _, v1 = _v1(cached, tmp_path)
    held = cached.checkout("db", v1)
    want = read_tree(held.path)
    _change(src)
    v2 = cached.publish("db", src).version
    with cached.checkout("db", v2) as snap:
        assert read_tree(snap.path) == read_tree(src)
    assert read_tree(held.path) == want
    assert cached.dirs("db").complete() == sorted([v1, v2])
    held.release()


def test_a_version_a_ref_names_stays_cached(cached: CachedStore, tmp_path: Path) -> None:
    src, _, v1 = _v1(cached, tmp_path)
    cached.set_ref("db", "stable", v1, expected=None)
    cached.checkout("db", "stable").release()
    _change(src)
    v2 = cached.publish("db", src).version
    cached.checkout("db").release()  # latest
    assert cached.dirs("db").complete() == sorted([v1, v2])


def test_a_failed_patch_serves_nothing_and_leaves_nothing(
    cached: CachedStore, remote: RemoteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _, _ = _v1(cached, tmp_path)
    _change(src)
    v2 = cached.publish("db", src).version

    def broken(*args: object, **kwargs: object) -> int:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(remote.backend, "get_into", broken)
        with pytest.raises(SnapshotError):
            cached.checkout("db", v2)
    assert cached.dirs("db").complete() == []  # the retired copy went with the attempt
    assert not list((cached.dirs("db").root / "tmp").iterdir())
    with cached.checkout("db", v2) as snap:  # a cold checkout, then
        assert read_tree(snap.path) == read_tree(src)


def test_a_warm_repair_never_writes_through_a_hard_link(
    cached: CachedStore, tmp_path: Path
) -> None:
    src, old, v1 = _v1(cached, tmp_path)
    outside = write_tree(tmp_path / "outside", {"x.bin": b"not yours" * 1000})
    os.unlink(old / "db.sqlite3")
    os.link(outside / "x.bin", old / "db.sqlite3")
    with cached.checkout("db", v1) as snap:
        assert read_tree(snap.path) == read_tree(src)
    assert (outside / "x.bin").read_bytes() == b"not yours" * 1000


def test_a_bundled_file_at_a_new_place_in_the_same_bundle_is_rewritten(
    cached: CachedStore, tmp_path: Path
) -> None:
    """Small files share a bundle (engine.bundles): "a" and "b" are "X" + "YZ", then "XY" +
    "Z". The bundle's bytes, so its hash, stay the same while each file's slice of it moves:
    a patch that compared chunk hashes alone would keep "X" and serve "X\\0"."""
    big = random.Random(5).randbytes(2 * CHUNK)
    v1_src = write_tree(tmp_path / "v1", {"a": b"X", "b": b"YZ", "big": big})
    v2_src = write_tree(tmp_path / "v2", {"a": b"XY", "b": b"Z", "big": big})
    v1 = cached.publish("db", v1_src).version
    with cached.checkout("db", v1):
        pass
    v2 = cached.publish("db", v2_src).version
    m1, m2 = cached.load_manifest("db", v1), cached.load_manifest("db", v2)
    first = {f.path: f for f in m1.files}
    second = {f.path: f for f in m2.files}
    assert first["a"].chunks == second["a"].chunks == second["b"].chunks  # one bundle, kept
    assert (first["b"].at, second["b"].at) == (1, 2)
    with cached.checkout("db", v2) as snap:
        assert read_tree(snap.path) == read_tree(v2_src)
    assert cached.dirs("db").complete() == [v2]  # it was built by patching v1


@pytest.mark.parametrize("patch", [True, False])
def test_a_chunk_of_another_chunk_size_is_never_kept_at_its_index(
    remote: RemoteStore, tmp_path: Path, patch: bool
) -> None:
    """v1 in 2-block chunks, v2 in 1-block chunks: chunk 1 of both is block C, at offset
    2 blocks in v1 and 1 block in v2. Keeping it "at index 1" would serve C where v2 has it
    nowhere (patching, or copying intact runs without patching)."""
    block = CHUNK
    a, c = os.urandom(block), os.urandom(block)
    big = RemoteStore(remote.backend, chunk_size=2 * block)
    small = RemoteStore(remote.backend, chunk_size=block)
    src = tmp_path / "src"
    write_tree(src, {"f.bin": a + os.urandom(block) + c})
    v1 = big.publish("db", src).version
    with CachedStore(big, tmp_path / "cache", patch_in_place=patch).checkout("db", v1):
        pass
    write_tree(src, {"f.bin": a + c + os.urandom(block)})
    v2 = small.publish("db", src).version
    m1, m2 = (remote.load_manifest("db", v) for v in (v1, v2))
    assert m1.files[0].chunks[1] == m2.files[0].chunks[1]  # the same chunk at index 1
    with CachedStore(small, tmp_path / "cache", patch_in_place=patch).checkout("db", v2) as snap:
        assert read_tree(snap.path) == read_tree(src)


def test_a_ref_record_being_written_never_stops_a_refresh(
    cached: CachedStore, tmp_path: Path
) -> None:
    """A record of a ref mid-write (or left by a killed writer) sits beside the records as
    ``.latest.<hex>.tmp``: a refresh skips it, and the next cache opened after an hour
    removes it."""
    src, _, _ = _v1(cached, tmp_path)
    _change(src)
    refs = cached.dirs("db").root / "refs"
    refs.mkdir(exist_ok=True)
    left = refs / ".latest.0123456789abcdef.tmp"
    left.write_bytes(b"x")
    v2 = cached.publish("db", src).version
    with cached.checkout("db", v2) as snap:
        assert read_tree(snap.path) == read_tree(src)
    os.utime(left, (0, 0))  # an hour old and more: no live writer holds it
    CachedStore(cached.inner, tmp_path / "cache")
    assert not left.exists()


def test_a_pin_is_alive_while_its_lock_is_held_whatever_its_pid(
    cached: CachedStore, tmp_path: Path
) -> None:
    """A process in another PID namespace (a container sharing the cache folder) names its
    pins with a pid this one cannot see: the pin's lock says it lives, so its version is
    neither patched nor evicted; once that process is gone, the pin is cleared."""
    src, _, v1 = _v1(cached, tmp_path)
    pin = cached.dirs("db").root / "pins" / v1 / "999999999-0123456789abcdef"
    pin.parent.mkdir(parents=True, exist_ok=True)
    pin.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()",
         str(pin)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert cached.dirs("db").pinned(v1)
        _change(src)
        v2 = cached.publish("db", src).version
        with cached.checkout("db", v2) as snap:
            assert read_tree(snap.path) == read_tree(src)
        assert sorted(cached.dirs("db").complete()) == sorted([v1, v2])  # v1 was not taken
    finally:
        holder.communicate("")
    assert not cached.dirs("db").pinned(v1)
    assert not pin.exists()


@pytest.mark.parametrize("patch_in_place", [True, False])
def test_a_version_grown_past_the_cap_is_refused_patched_or_not(
    tmp_path: Path, patch_in_place: bool
) -> None:
    # The retired version being patched is out of usage() but still on disk: the cap must
    # count it, or a refresh by patching grew the cache past max_bytes where a cold build
    # of the same version was refused (70 MiB under a 60 MiB cap, in review).
    from chroma_snapshots import CacheFullError
    from chroma_snapshots.backends.file import FileBackend

    rng = random.Random(5)
    store = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=CHUNK)
    a = store.publish("g", write_tree(tmp_path / "a", {"a": rng.randbytes(200 << 10)})).version
    write_tree(tmp_path / "a", {"b": rng.randbytes(300 << 10)})
    b = store.publish("g", tmp_path / "a").version  # 500 KiB, its parent a (200 KiB)
    x = store.publish("x", write_tree(tmp_path / "x", {"x": rng.randbytes(200 << 10)})).version
    cap = 600 << 10
    cached = CachedStore(
        store, tmp_path / "cache", max_bytes=cap, min_free_bytes=0, patch_in_place=patch_in_place
    )
    with cached.checkout("x", x):  # held: 200 + 500 > 600
        cached.checkout("g", a).release()
        with pytest.raises(CacheFullError):
            cached.checkout("g", b)
        assert cached.usage() <= cap
    with cached.checkout("g", b) as snap:  # x released: it fits, by evicting
        assert read_tree(snap.path) == read_tree(tmp_path / "a")
        assert cached.usage() <= cap
