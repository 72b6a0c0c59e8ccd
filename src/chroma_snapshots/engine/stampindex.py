"""The publish stamp index: which chunk hashes each file of a folder had when it was last
published, so the next publish of that folder re-reads only the files that changed.

In the spirit of git's index. Per file it remembers the stamp the scan saw (size,
mtime_ns, ctime_ns, inode, device, st_mode) and the file's chunk hashes; a later publish
of the same folder to the same store trusts those hashes while the stamp is identical.
Files modified less than :data:`RACY_NS` before their scan are "racy" (a change in the
same timestamp granule would leave the stamp as it was) and are never recorded, so they
are re-hashed every time, as git re-checks racily clean entries.

Threat model (docs/EVIDENCE.md): a stale hash needs a write that leaves size, mtime AND
ctime as they were. ``utime`` can restore mtime, but every write and every ``utime`` sets
ctime to the current clock, which user space cannot set; only setting the system clock
back (root) can forge it. The index lives in a private directory of this user (mode 0700,
checked on every use); an index that is damaged, written for another folder, store, name,
chunk size or hash, or not owned by this user is ignored, never trusted. Trusted hashes must
also all be chunks of the parent version (``known``), or the file is read anyway.

Where: ``<tmp>/chroma-snapshots-stamps-<uid>/<sha256 of the key>.idx``, one small file per
(folder real path, store, snapshot name, chunk size, hash), at most :data:`MAX_INDEXES` of
them and :data:`MAX_TOTAL_BYTES` in all (least recently used go first: a load that finds
entries touches its file). Writes are a unique temp file and a rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Sequence
from itertools import accumulate, chain, starmap
from pathlib import Path

from chroma_snapshots.engine.localfs import foreign_dir

# A file whose mtime or ctime is this close to its scan (or after it) is racy: 2 s covers
# the coarsest common timestamp granularity (FAT's 2 s; ext3/HFS+ 1 s) and the kernel's
# coarse clock lag (a jiffy).
RACY_NS = 2_000_000_000
# A test suite's many throwaway folders evicted a real one's index at 64.
MAX_INDEXES = 256
MAX_INDEX_BYTES = 512 << 20
MAX_TOTAL_BYTES = 512 << 20
_MAGIC = b"chroma-snapshots stamps 4\n"  # 4: stamps as rows, the rest in columns
# A file's stamp as stored: a row of (size, mtime, ctime, inode, device, mode), unpacked
# only when looked up (one tuple per file on load, or a transposition on save, cost more).
_ROW = struct.Struct("<qqqQQq")
_DIGEST = 32

Stamp = tuple[int, int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev, st_mode


def stamp_of(st: os.stat_result, scanned_ns: int) -> Stamp | None:
    """The file's stamp, or None if it is racy (changed within RACY_NS of ``scanned_ns``,
    the wall clock before the scan began): such a file is always re-hashed."""
    if max(st.st_mtime_ns, st.st_ctime_ns) >= scanned_ns - RACY_NS:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_mode)


def default_dir() -> Path:
    """This user's private directory of indexes (the temp dir: on Lambda, the only
    writable one)."""
    return Path(tempfile.gettempdir()) / f"chroma-snapshots-stamps-{os.geteuid()}"


class StampIndex:
    """One folder's index for one store, name, chunk size and hash (``ids``: the name of a
    scheme of engine.chunkids; the index keeps full hashes, 64 hex digits, of one kind).
    :meth:`lookup` answers from the index read at open; :meth:`record` collects this
    publish's files; :meth:`save` replaces the index with exactly them (files gone from
    the folder are dropped)."""

    def __init__(self, folder: str | Path, store: str, name: str, chunk_size: int,
                 ids: str = "blake3", directory: Path | None = None) -> None:  # fmt: skip
        real = os.path.realpath(folder)
        self.key = json.dumps([real, store, name, chunk_size, ids])
        self._dir = default_dir() if directory is None else directory
        self.path = self._dir / (hashlib.sha256(self.key.encode()).hexdigest()[:40] + ".idx")
        # what this publish found, in columns (a tuple per file was a third of the save)
        self._paths: list[str] = []
        self._stamps: list[Stamp] = []
        self._hashes: list[Sequence[str]] = []
        self._ats: list[int] = []
        self._hits: dict[str, tuple[str, ...]] = {}
        self._starts: dict[str, int] = {}
        self._changed = False
        self.usable = _private_dir(self._dir, create=False)
        self._old = _load(self.path, self.key) if self.usable else _Table.empty()
        if len(self._old):
            with contextlib.suppress(OSError):
                os.utime(self.path)  # used: the last to be evicted

    @property
    def indexed(self) -> int:
        """How many files the index read at open holds (0: :meth:`lookup` finds none)."""
        return len(self._old)

    def lookup(self, relpath: str, stamp: Stamp | None) -> tuple[str, ...] | None:
        """The file's chunk hashes if its stamp is the recorded one, else None."""
        got = self._old.get(relpath, stamp) if stamp is not None else None
        if got is not None:
            self._hits[relpath], self._starts[relpath] = got
        return None if got is None else got[0]

    def start(self, relpath: str) -> int:
        """Where a file :meth:`lookup` found starts in its chunk (a bundled file; else 0)."""
        return self._starts.get(relpath, 0)

    def record(self, relpath: str, stamp: Stamp | None, hashes: Sequence[str], at: int = 0) -> None:
        """Remember the hashes this publish found (or trusted) for a file, and where it
        starts in its chunk (``at``: a bundled file)."""
        self.record_many([relpath], [stamp], [hashes], [at])

    def record_many(
        self,
        relpaths: Sequence[str],
        stamps: Sequence[Stamp | None],
        hashes: Sequence[Sequence[str]],
        ats: Sequence[int],
    ) -> None:
        """:meth:`record` each file, given in columns: one call for a publish's files (a
        call each was a tenth of publishing 100,000 small files). Racy files (no stamp)
        are left out."""
        if None in stamps:
            keep = [k for k, st in enumerate(stamps) if st is not None]
            relpaths, hashes = [relpaths[k] for k in keep], [hashes[k] for k in keep]
            stamps, ats = [stamps[k] for k in keep], [ats[k] for k in keep]
        self._paths += relpaths
        self._stamps += stamps  # type: ignore[arg-type]  # no None left
        self._hashes += hashes
        self._ats += ats
        if not self._changed and relpaths:
            # a file found but not trusted (a member of a changed bundle) may get new hashes
            hits, starts = self._hits, self._starts
            self._changed = not hits or any(
                hits.get(r) != tuple(h) or starts.get(r, 0) != a
                for r, h, a in zip(relpaths, hashes, ats, strict=True)
            )

    def save(self) -> None:
        """Write the recorded files as the index (nothing if it would not change). Never
        raises for an I/O problem: the index is a cache, a publish does not fail on it."""
        if not self._changed and len(self._paths) == len(self._old):
            return  # every file as indexed, and none gone
        try:
            if not _private_dir(self._dir, create=True):
                return
            tmp = self._dir / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "xb") as f:
                    f.write(self._encoded())
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            _bound(self._dir)
        except (OSError, struct.error):  # struct.error: a time past 2262 has no int64 of ns
            return

    def _encoded(self) -> bytes:
        return _encode(self.key, self._paths, self._stamps, self._hashes, self._ats)


class _Table:
    """A decoded index: the stamps as rows of bytes, the rest in columns (a tuple per file
    cost most of a 100,000-file load)."""

    def __init__(self, paths: list[str], rows: bytes, nums: array[int], hexes: str):
        self._at = dict(zip(paths, range(len(paths)), strict=True))
        self._rows, self._nums, self._hexes, self._n = rows, nums, hexes, len(paths)
        self._starts = list(accumulate(nums[: self._n], initial=0))
        if len(self._starts) != len(paths) + 1 or self._starts[-1] * 64 != len(hexes):
            raise ValueError("columns do not match")

    @classmethod
    def empty(cls) -> _Table:
        return cls([], b"", array("q"), "")

    def __len__(self) -> int:
        return len(self._at)

    def get(self, relpath: str, stamp: Stamp) -> tuple[tuple[str, ...], int] | None:
        """The file's hashes and its start in its chunk, if its stamp is the one recorded."""
        k = self._at.get(relpath)
        if k is None or _ROW.unpack_from(self._rows, _ROW.size * k) != stamp:
            return None
        a, b, hexes = self._starts[k] * 64, self._starts[k + 1] * 64, self._hexes
        # most files have one hash (every bundled one): no generator for them
        found = (hexes[a:b],) if b - a == 64 else tuple(hexes[j : j + 64] for j in range(a, b, 64))
        return found, self._nums[self._n + k]


def _private_dir(d: Path, create: bool) -> bool:
    """Is ``d`` a real directory owned by this user that nobody else can write or read?
    (Another user who could plant an index could make a publish record wrong hashes.)"""
    if create:
        try:
            d.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return False
    return foreign_dir(d, 0o077) is None


def _encode(
    key: str,
    paths: list[str],
    stamps: list[Stamp],
    hashes: list[Sequence[str]],
    ats: list[int],
) -> bytes:
    """Paths (NUL-separated: a path never holds one), the stamps as rows (:data:`_ROW`),
    the number of hashes and the start in its chunk of each file as int64 columns, all
    hashes."""
    nums = array("q", map(len, hashes))
    nums.extend(ats)
    if sys.byteorder != "little":
        nums.byteswap()
    parts = ["\0".join(paths).encode(), b"".join(starmap(_ROW.pack, stamps)), nums.tobytes(),
             bytes.fromhex("".join(chain.from_iterable(hashes)))]  # fmt: skip
    head = key.encode()
    out = bytearray(_MAGIC)
    out += struct.pack("<6Q", len(head), len(paths), *map(len, parts)) + head
    for part in parts:
        out += part
    out += hashlib.sha256(out).digest()
    return bytes(out)


def _load(path: Path, key: str) -> _Table:
    """The index at ``path`` if it is intact, this user's, and for ``key``; else empty."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_size > MAX_INDEX_BYTES:
                return _Table.empty()
            data = f.read(MAX_INDEX_BYTES + 1)
        return _decode(data, key)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return _Table.empty()  # damaged or unreadable: a full re-hash; the save replaces it


def _decode(data: bytes, key: str) -> _Table:
    body, check = data[:-_DIGEST], data[-_DIGEST:]
    if not data.startswith(_MAGIC) or hashlib.sha256(body).digest() != check:
        return _Table.empty()
    pos = len(_MAGIC)
    klen, count, *sizes = struct.unpack_from("<6Q", body, pos)
    pos += 48
    if body[pos : pos + klen].decode() != key:
        return _Table.empty()  # another folder, store, name, chunk size or hash
    pos += klen
    parts = []
    for size in sizes:
        parts.append(body[pos : pos + size])
        pos += size
    if pos != len(body) or sizes[1] != _ROW.size * count or sizes[2] != 16 * count:
        raise ValueError("bad column sizes")
    paths = parts[0].decode().split("\0") if count else []
    nums = array("q", parts[2])
    if sys.byteorder != "little":
        nums.byteswap()
    return _Table(paths, parts[1], nums, parts[3].hex())


def _bound(d: Path) -> None:
    """Keep the most recently used indexes, MAX_INDEXES and MAX_TOTAL_BYTES at most (the
    newest always); drop temp files a crash left (older than an hour: a live writer
    renames its own within seconds)."""
    found: list[tuple[float, int, Path]] = []
    for p in d.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.name.endswith(".tmp"):
            if st.st_mtime < time.time() - 3600:
                p.unlink(missing_ok=True)
        elif p.name.endswith(".idx"):
            found.append((st.st_mtime, st.st_size, p))
    found.sort(reverse=True)
    total = 0
    for i, (_, size, p) in enumerate(found):
        total += size
        if i and (i >= MAX_INDEXES or total > MAX_TOTAL_BYTES):
            p.unlink(missing_ok=True)
