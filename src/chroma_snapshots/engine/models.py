"""Frozen value types and their canonical JSON forms.

Manifests and refs come from storage anyone with bucket access can write, so
parsing validates everything (paths, sizes, hashes, format version, delta chains)
before a single byte touches the disk. Canonical JSON (sorted keys, compact, UTF-8,
only integers for sizes) makes a format 1 manifest's bytes, and so its version id,
stable; format 2 manifests (compact binary, written by default) are encoded and
parsed by ``manifest_v2``, which reads and writes both formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from chroma_snapshots.engine import validation as val
from chroma_snapshots.engine.chunkids import short_id
from chroma_snapshots.engine.manifest_codec import HEADER_KEYS
from chroma_snapshots.engine.refvalue import RefValue as RefValue
from chroma_snapshots.engine.refvalue import TransferStats as TransferStats
from chroma_snapshots.engine.validation import (
    CODECS,
    FORMAT_VERSION,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_DIRS,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_METADATA_DEPTH,
    MAX_PACK_SIZE,
    MIN_CHUNK_SIZE,
    VERSION_RE,
    canonical_json,
    check_name,
    check_relpath,
    format_time,
    parse_time,
    sha256_hex,
)
from chroma_snapshots.errors import IntegrityError, InvalidInputError, shown

MANIFEST_FORMAT = 2  # what new manifests are written in (manifest_v2); 1 stays readable
DELTA_CODEC = "zdelta"


def link_key(pack: str, offset: int) -> str:
    """The table key of a chain link stored without its hash (format 2 layout 1): where its
    bytes are. Never 64 hex digits, so it cannot be mistaken for a chunk's sha256."""
    return f"{offset}@{pack}"


def is_link_key(key: str) -> bool:
    """True for a :func:`link_key`: a chunk known by place, verified through its chain."""
    return "@" in key


@dataclass(frozen=True, order=True)
class VersionId:
    """``{UTC yyyymmddTHHMMSSffffffZ}-{first 12 hex of sha256(manifest bytes)}``."""

    timestamp: str
    digest: str

    def __str__(self) -> str:
        return f"{self.timestamp}-{self.digest}"

    @classmethod
    def parse(cls, value: str) -> VersionId:
        """Parse a version string; InvalidInputError if it is not one."""
        m = VERSION_RE.fullmatch(value) if isinstance(value, str) else None
        if not m:
            raise InvalidInputError(f"invalid version id {shown(value)}")
        return cls(m.group(1), m.group(2))

    @classmethod
    def is_version(cls, value: str) -> bool:
        """True if ``value`` has the shape of a version id (as opposed to a ref name)."""
        return bool(VERSION_RE.fullmatch(value))

    @classmethod
    def for_manifest(cls, manifest_bytes: bytes, created_at: datetime) -> VersionId:
        """The version id of a manifest: sortable by time, bound to its content."""
        ts = created_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return cls(ts, sha256_hex(manifest_bytes)[:12])

    def names(self, manifest_bytes: bytes, created_at: datetime) -> bool:
        """True if this is the version id of those manifest bytes (a manifest found under
        another version's key, or file, is refused)."""
        return sha256_hex(manifest_bytes)[:12] == self.digest and (
            VersionId.for_manifest(manifest_bytes, created_at) == self
        )


_CHUNK_FIELDS = {"pack", "offset", "length", "size", "codec"}


@dataclass(frozen=True)
class Chunk:
    """Where one chunk lives: ``length`` stored bytes at ``offset`` in ``pack``.

    A ``zdelta`` chunk (format 2 only) is zstd with the bytes of chunk ``base`` (another
    entry of the same manifest's table) as raw-content dictionary. A chain link that no
    file uses may be known by place instead of hash (``hash`` is its :func:`link_key`):
    its decoded bytes are verified through the hash of the chunk its chain ends in."""

    hash: str
    pack: str
    offset: int
    length: int
    size: int
    codec: str = "none"
    base: str | None = None

    def to_obj(self) -> dict[str, Any]:
        if self.base is not None:
            raise InvalidInputError(f"chunk {self.hash[:12]}: format 1 cannot hold a delta")
        return {
            "pack": self.pack,
            "offset": self.offset,
            "length": self.length,
            "size": self.size,
            "codec": self.codec,
        }

    @classmethod
    def from_obj(cls, h: str, obj: object, chunk_size: int) -> Chunk:
        # the common, valid case without building error text (a 3 GiB manifest has 49k chunks)
        if type(obj) is dict and obj.keys() == _CHUNK_FIELDS:
            o: dict[str, Any] = obj
        else:
            o = val.as_obj(obj, f"chunk {h[:12]}", _CHUNK_FIELDS)
        c = cls(
            h,
            val.as_hex64(o["pack"], "pack"),
            val.as_int(o["offset"], "offset", 0, MAX_PACK_SIZE),
            val.as_int(o["length"], "length", 1, MAX_PACK_SIZE),
            val.as_int(o["size"], "size", 1, chunk_size),
            o["codec"],
        )
        # Readers size buffers from these, so every length is bounded by the format: raw bytes
        # are stored as they are, and zstd only when it saves (PackWriter), so no chunk is
        # stored in more bytes than its size, nor its size more than the chunk size.
        if c.codec not in CODECS or c.length > c.size or c.offset + c.length > MAX_PACK_SIZE:
            raise IntegrityError(
                f"chunk {h[:12]}: codec {c.codec!r} with {c.length} stored bytes at offset "
                f"{c.offset} for {c.size} bytes is impossible"
            )
        if c.codec == "none" and c.length != c.size:
            raise IntegrityError(f"chunk {h[:12]}: {c.length} raw bytes stored for {c.size}")
        return c


@dataclass(frozen=True)
class FileEntry:
    """One regular file: relative POSIX path, size, permission bits and ordered chunk hashes.

    ``at``: where a file of one chunk starts in it (format 2 layout 2: small files are
    bundled into shared chunks, engine.bundles); the file is then bytes ``[at, at + size)``
    of its chunk. Always 0 for a file of several chunks or none."""

    path: str
    size: int
    mode: int
    chunks: tuple[str, ...]
    at: int = 0

    def to_obj(self) -> dict[str, Any]:
        if self.at:
            raise InvalidInputError(f"{self.path}: format 1 cannot hold a bundled file")
        return {
            "path": self.path,
            "size": self.size,
            "mode": self.mode,
            "chunks": list(self.chunks),
        }

    @classmethod
    def from_obj(cls, obj: object) -> FileEntry:
        o = val.as_obj(obj, "file entry", {"path", "size", "mode", "chunks"})
        chunks = o["chunks"]
        if not isinstance(chunks, list):
            raise IntegrityError("file entry: chunks must be a list")
        return cls(
            check_relpath(o["path"]),
            val.as_int(o["size"], "size", 0, MAX_FILE_SIZE),
            val.as_int(o["mode"], "mode", 0, 0o777),
            tuple(val.as_hex64(c, "chunk") for c in chunks),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild one version of a snapshot, byte for byte."""

    name: str
    created_at: datetime
    chunk_size: int
    files: tuple[FileEntry, ...]
    chunks: Mapping[str, Chunk]
    dirs: tuple[str, ...] = ()
    parent: str | None = None
    publisher: str = ""
    message: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_FORMAT
    # The bytes a stored manifest was parsed from (set by manifest_v2.loads): copying it
    # elsewhere must reproduce them exactly, whatever zstd build would re-encode it. Not an
    # init field, so ``dataclasses.replace`` never carries them over to a changed manifest.
    stored: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def total_size(self) -> int:
        """Bytes of all files."""
        return sum(f.size for f in self.files)

    @property
    def packs(self) -> frozenset[str]:
        """Every pack this manifest reads from."""
        return frozenset(c.pack for c in self.chunks.values())

    def to_json(self) -> bytes:
        """Format 1: canonical JSON bytes (InvalidInputError if a chunk is a delta).
        ``manifest_v2.dumps`` writes a manifest in its own format."""
        return canonical_json(
            {
                "format": FORMAT_VERSION,
                "name": self.name,
                "parent": self.parent,
                "created_at": format_time(self.created_at),
                "publisher": self.publisher,
                "message": self.message,
                "chunk_size": self.chunk_size,
                "metadata": dict(self.metadata),
                "files": [f.to_obj() for f in self.files],
                "dirs": list(self.dirs),
                "chunks": {h: c.to_obj() for h, c in sorted(self.chunks.items())},
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and fully validate format 1 bytes; IntegrityError on anything unexpected.
        ``manifest_v2.loads`` reads either format."""
        raw = val.loads_json(data, "manifest", MAX_MANIFEST_BYTES)
        o = val.as_obj(raw, "manifest", _MANIFEST_KEYS)
        if o["format"] != FORMAT_VERSION:
            raise IntegrityError(f"manifest format {o['format']!r} is not supported (need 1)")
        cs = val.as_int(o["chunk_size"], "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        if cs & (cs - 1):
            raise IntegrityError("chunk_size must be a power of two")
        table = val.as_obj(o["chunks"], "chunk table", None)
        file_list, dir_list = val.as_list(o["files"], "files"), val.as_list(o["dirs"], "dirs")
        for what, n, most in (
            ("chunks", len(table), MAX_CHUNKS),
            ("files", len(file_list), MAX_FILES),
            ("dirs", len(dir_list), MAX_DIRS),
        ):
            if n > most:
                raise IntegrityError(f"manifest lists {n} {what}, more than {most}")
        val.check_depth(o["metadata"], "metadata", MAX_METADATA_DEPTH)
        chunks = {h: Chunk.from_obj(val.as_hex64(h, "chunk"), c, cs) for h, c in table.items()}
        files = tuple(FileEntry.from_obj(f) for f in file_list)
        dirs = tuple(check_relpath(d, "dir") for d in dir_list)
        m = cls(
            val.as_str(o["name"], "name"),
            parse_time(o["created_at"], "created_at"),
            cs,
            files,
            chunks,
            dirs,
            val.as_opt_str(o["parent"], "parent"),
            val.as_str(o["publisher"], "publisher"),
            val.as_opt_str(o["message"], "message"),
            val.as_obj(o["metadata"], "metadata", None),
            FORMAT_VERSION,
        )
        m.validate()
        check_no_slices(m, "a format 1 manifest")
        return m

    def validate(self) -> None:
        """Check internal consistency: paths unique and non-overlapping, chunk sizes add up."""
        self.check_names_and_tree()
        table, used = self.chunks, set[str]()
        for f in self.files:
            _check_file_chunks(f, table, self.chunk_size)
            used.update(f.chunks)
        bases, deltas = {}, False
        for h, c in table.items():
            if (c.codec == DELTA_CODEC) != (c.base is not None) or c.hash != h:
                raise IntegrityError(f"chunk {h[:12]}: codec {c.codec!r} and base disagree")
            if is_link_key(h) and (h in used or h != link_key(c.pack, c.offset)):
                raise IntegrityError(f"chunk {h[:12]}: a link known by place is misplaced")
            bases[h] = c.base
            deltas = deltas or c.base is not None
        # Every entry is used by a file or is a link of a used chunk's delta chain (with no
        # delta, each chain is its chunk: every used one is in the table, checked above).
        if (val.check_chains(bases, used) if deltas else used) != table.keys():
            raise IntegrityError("chunk table lists chunks no file uses")

    def check_names_and_tree(self) -> None:
        """What :meth:`validate` checks beyond the chunk table and the files' chunk lists:
        the name, the parent's version id, the format and the tree of paths.
        ``manifest_read.decode`` checks the table's rules on its columns, then calls this."""
        try:
            check_name(self.name)
        except InvalidInputError as e:
            raise IntegrityError(str(e)) from e
        if self.parent is not None and not VersionId.is_version(self.parent):
            raise IntegrityError(f"bad parent version {self.parent!r}")
        val.check_tree([f.path for f in self.files], list(self.dirs))
        if self.format_version not in (FORMAT_VERSION, MANIFEST_FORMAT):
            raise IntegrityError(f"manifest format {self.format_version!r} is not supported")


def file_key(f: FileEntry) -> tuple[object, ...]:
    """What a file entry says about the file, with chunk ids in their short form: equal for
    the same file whatever the length of the ids its manifest uses (format 2 layout 3
    writes short ones, older manifests full ones)."""
    return (f.path, f.size, f.mode, f.at, tuple(map(short_id, f.chunks)))


def is_slice(f: FileEntry, chunks: Mapping[str, Chunk]) -> bool:
    """True if ``f`` is part of a larger chunk (a bundle), not the whole of its chunks."""
    return len(f.chunks) == 1 and (f.at != 0 or chunks[f.chunks[0]].size != f.size)


def check_no_slices(m: Manifest, what: str) -> None:
    """Refuse bundled files in a format that cannot hold them (format 1, layouts 0-1)."""
    if any(is_slice(f, m.chunks) for f in m.files):
        raise IntegrityError(f"{what} holds a file that is not the whole of its chunk")


# format 1: the header format 2 also has (manifest_codec.HEADER_KEYS), then the body
_MANIFEST_KEYS = HEADER_KEYS | {"files", "dirs", "chunks"}


def _check_file_chunks(f: FileEntry, table: Mapping[str, Chunk], chunk_size: int) -> None:
    expected = -(-f.size // chunk_size)
    if len(f.chunks) != expected:
        raise IntegrityError(f"{f.path}: {len(f.chunks)} chunks for {f.size} bytes")
    if expected == 1:
        # a file of one chunk may be a slice of it (a bundle of small files)
        c = table.get(f.chunks[0])
        if c is None or f.at < 0 or f.at + f.size > c.size:
            raise IntegrityError(
                f"{f.path}: its {f.size} bytes at {f.at} are not inside a chunk of the table"
            )
        return
    if f.at != 0:
        raise IntegrityError(f"{f.path}: a file of {expected} chunks cannot start at {f.at}")
    for i, h in enumerate(f.chunks):
        c = table.get(h)
        want = chunk_size if i < expected - 1 else f.size - chunk_size * (expected - 1)
        if c is None or c.size != want:
            raise IntegrityError(f"{f.path}: chunk {i} missing from the table or of wrong size")


@dataclass(frozen=True)
class SnapshotInfo:
    """A published version as a caller sees it."""

    name: str
    version: str
    created_at: datetime
    parent: str | None
    total_size: int
    file_count: int
    message: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    stats: TransferStats = field(default_factory=TransferStats)

    @classmethod
    def from_manifest(
        cls, version: str, m: Manifest, stats: TransferStats | None = None
    ) -> SnapshotInfo:
        return cls(
            m.name,
            version,
            m.created_at,
            m.parent,
            m.total_size,
            len(m.files),
            m.message,
            m.metadata,
            stats or TransferStats(),
        )
