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
checked on every use); an index that is damaged, written for another folder, store, name
or chunk size, or not owned by this user is ignored, never trusted. Trusted hashes must
also all be chunks of the parent version (``known``), or the file is read anyway.

Where: ``<tmp>/chroma-snapshots-stamps-<uid>/<sha256 of the key>.idx``, one small file per
(folder real path, store, snapshot name, chunk size), at most :data:`MAX_INDEXES` of
them (least recently written go first). Writes are a unique temp file and a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

# A file whose mtime or ctime is this close to its scan (or after it) is racy: 2 s covers
# the coarsest common timestamp granularity (FAT's 2 s; ext3/HFS+ 1 s) and the kernel's
# coarse clock lag (a jiffy).
RACY_NS = 2_000_000_000
MAX_INDEXES = 64
MAX_INDEX_BYTES = 512 << 20
_MAGIC = b"chroma-snapshots stamps 1\n"
_ENTRY = struct.Struct("<IqqqQQII")  # path length, size, mtime, ctime, ino, dev, mode, n
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
    """One folder's index for one store, name and chunk size. :meth:`lookup` answers from
    the index read at open; :meth:`record` collects this publish's files; :meth:`save`
    replaces the index with exactly them (files gone from the folder are dropped)."""

    def __init__(self, folder: str | Path, store: str, name: str, chunk_size: int,
                 directory: Path | None = None) -> None:  # fmt: skip
        real = os.path.realpath(folder)
        self.key = json.dumps([real, store, name, chunk_size])
        self._dir = default_dir() if directory is None else directory
        self.path = self._dir / (hashlib.sha256(self.key.encode()).hexdigest()[:40] + ".idx")
        self._old: dict[str, tuple[Stamp, tuple[str, ...]]] = {}
        self._new: dict[str, tuple[Stamp, tuple[str, ...]]] = {}
        self._hits = 0
        self.usable = _private_dir(self._dir, create=False)
        if self.usable:
            self._old = _load(self.path, self.key)

    def lookup(self, relpath: str, stamp: Stamp | None) -> tuple[str, ...] | None:
        """The file's chunk hashes if its stamp is the recorded one, else None."""
        if stamp is None:
            return None
        got = self._old.get(relpath)
        return got[1] if got is not None and got[0] == stamp else None

    def record(self, relpath: str, stamp: Stamp | None, hashes: Iterable[str]) -> None:
        """Remember the hashes this publish found (or trusted) for a file."""
        if stamp is not None:
            self._new[relpath] = (stamp, tuple(hashes))

    def save(self) -> None:
        """Write the recorded files as the index (nothing if it would not change). Never
        raises for an I/O problem: the index is a cache, a publish does not fail on it."""
        if self._new == self._old:
            return
        try:
            if not _private_dir(self._dir, create=True):
                return
            tmp = self._dir / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "xb") as f:
                    f.write(_encode(self.key, self._new))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            _bound(self._dir)
        except OSError:
            return


def _private_dir(d: Path, create: bool) -> bool:
    """Is ``d`` a real directory owned by this user that nobody else can write or read?
    (Another user who could plant an index could make a publish record wrong hashes.)"""
    if create:
        try:
            d.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return False
    try:
        st = os.lstat(d)
    except OSError:
        return False
    mine = st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode)
    return mine and not st.st_mode & 0o077


def _encode(key: str, entries: dict[str, tuple[Stamp, tuple[str, ...]]]) -> bytes:
    head = key.encode()
    out = bytearray(_MAGIC)
    out += struct.pack("<II", len(head), len(entries)) + head
    for rel, (st, hashes) in sorted(entries.items()):
        path = rel.encode()
        out += _ENTRY.pack(len(path), *st, len(hashes)) + path
        out += b"".join(bytes.fromhex(h) for h in hashes)
    out += hashlib.sha256(out).digest()
    return bytes(out)


def _load(path: Path, key: str) -> dict[str, tuple[Stamp, tuple[str, ...]]]:
    """The index at ``path`` if it is intact, this user's, and for ``key``; else empty."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_size > MAX_INDEX_BYTES:
                return {}
            data = f.read(MAX_INDEX_BYTES + 1)
        return _decode(data, key)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return {}  # damaged or unreadable: a full re-hash, and the save replaces it


def _decode(data: bytes, key: str) -> dict[str, tuple[Stamp, tuple[str, ...]]]:
    body, check = data[:-_DIGEST], data[-_DIGEST:]
    if not data.startswith(_MAGIC) or hashlib.sha256(body).digest() != check:
        return {}
    pos = len(_MAGIC)
    klen, count = struct.unpack_from("<II", body, pos)
    pos += 8
    if body[pos : pos + klen].decode() != key:
        return {}  # another folder, store, name or chunk size (a hash-name collision)
    pos += klen
    out: dict[str, tuple[Stamp, tuple[str, ...]]] = {}
    for _ in range(count):
        plen, size, mtime, ctime, ino, dev, mode, n = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        rel = body[pos : pos + plen].decode()
        pos += plen
        raw = body[pos : pos + n * _DIGEST]
        pos += n * _DIGEST
        if len(raw) != n * _DIGEST:
            raise ValueError("truncated entry")
        hashes = tuple(raw[i : i + _DIGEST].hex() for i in range(0, len(raw), _DIGEST))
        out[rel] = ((size, mtime, ctime, ino, dev, mode), hashes)
    if pos != len(body):
        raise ValueError("trailing bytes")
    return out


def _bound(d: Path) -> None:
    """Keep the newest MAX_INDEXES indexes; drop temp files a crash left (older than an
    hour: a live writer renames its own within seconds)."""
    found: list[tuple[float, Path]] = []
    for p in d.iterdir():
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        if p.name.endswith(".tmp"):
            if mtime < time.time() - 3600:
                p.unlink(missing_ok=True)
        elif p.name.endswith(".idx"):
            found.append((mtime, p))
    for _, p in sorted(found, reverse=True)[MAX_INDEXES:]:
        p.unlink(missing_ok=True)
