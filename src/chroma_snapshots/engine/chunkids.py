"""Chunk ids: which hash names a chunk, told by the id's length alone.

| hex digits | hash | written by |
|---|---|---|
| 64 | sha256 | format 1, format 2 layouts 0-2 |
| 56 | sha256, first 224 bits (112-bit collision resistance) | format 2 layout 3 |
| 60 | BLAKE3, first 240 bits (120-bit collision resistance) | format 2 layout 4 |

Verifying every chunk is most of a checkout's CPU: sha256 cost 0.8 CPU s/GiB on the
benchmark machine, BLAKE3 0.2 (benchmarks/RESULTS.md). Because the length says the hash,
an id can only ever be checked with the hash that made it: a reader needs no other field,
and ids of two hashes never compare equal (a publish or a cache finds nothing of another
hash's chunks and moves them again, rather than mixing them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from blake3 import blake3

from chroma_snapshots.errors import IntegrityError, InvalidInputError, SnapshotNotFoundError


class _Version(Protocol):
    """What :func:`history` reads of a manifest (models imports this module)."""

    @property
    def chunks(self) -> Mapping[str, object]: ...
    @property
    def parent(self) -> str | None: ...


M = TypeVar("M", bound=_Version)
SHORT_ID = 56
B3_ID = 60
_B3_BYTES = B3_ID // 2


def chunk_ok(raw: bytes | memoryview, chunk_id: str) -> bool:
    """True if ``raw`` hashes to ``chunk_id`` (any of the three kinds of id)."""
    if len(chunk_id) == B3_ID:
        return blake3(raw).hexdigest(_B3_BYTES) == chunk_id
    return hashlib.sha256(raw).hexdigest()[: len(chunk_id)] == chunk_id


def short_id(chunk_id: str) -> str:
    """The short form of a chunk id (the key under which sha256 ids of both lengths meet);
    a BLAKE3 id or a link key (a place, not a hash) is returned as it is."""
    return chunk_id[:SHORT_ID] if len(chunk_id) == 64 and "@" not in chunk_id else chunk_id


def _sha256(raw: bytes | memoryview) -> str:
    return hashlib.sha256(raw).hexdigest()


def _blake3(raw: bytes | memoryview) -> str:
    return blake3(raw).hexdigest()


@dataclass(frozen=True)
class IdScheme:
    """How a publish names its chunks: ``digest`` is a chunk's full hash (64 hex digits,
    what the stamp index keeps), :meth:`key` the id written; ``widths`` are the lengths
    of ids of the same hash (a parent's chunks of another hash are not reused)."""

    name: str
    width: int
    digest: Callable[[bytes | memoryview], str]
    widths: frozenset[int]

    def key(self, chunk_id: str) -> str:
        """A full hash, or a parent's id of this scheme, as this scheme writes it; a link
        key (a place, not a hash) as it is."""
        return chunk_id if "@" in chunk_id else chunk_id[: self.width]

    def owns(self, chunk_id: str) -> bool:
        """True if ``chunk_id`` is a hash of this scheme's kind (not a link key)."""
        return len(chunk_id) in self.widths and "@" not in chunk_id


SHA256 = IdScheme("sha256", 64, _sha256, frozenset({64}))  # format 1
SHA256_SHORT = IdScheme("sha256", SHORT_ID, _sha256, frozenset({64, SHORT_ID}))
BLAKE3 = IdScheme("blake3", B3_ID, _blake3, frozenset({B3_ID}))


def scheme_of(chunk_id: str) -> IdScheme:
    """The scheme whose ids look like ``chunk_id``."""
    return {64: SHA256, SHORT_ID: SHA256_SHORT}.get(len(chunk_id), BLAKE3)


def hash_of(table: Iterable[str]) -> IdScheme | None:
    """The scheme of a chunk table's ids (its keys; one manifest's are all of one), or
    None if it has none (only link keys, or nothing)."""
    first = next((h for h in table if "@" not in h), None)
    return None if first is None else scheme_of(first)


def publish_scheme(
    chunk_hash: str | None,
    manifest_format: int,
    history: Iterable[Iterable[str] | None] = (),
) -> IdScheme:
    """The scheme a publish names new chunks with: ``chunk_hash`` "blake3" or "sha256"
    (format 1's only one; in format 2, short ids), or by default (None) the hash of the
    history's: ``history`` is the chunk ids of the parent, then of its parent..., newest
    first (None for a version that could not be read). The first version with chunks says
    the hash; one that cannot be read first says sha256, which every reader knows; none
    (a first version, or only empty ones), BLAKE3. Following the history keeps the publish
    of an unchanged folder from making a version and of a changed one incremental, and a
    store on sha256 readable by readers older than BLAKE3 ids; the other hash moves every
    chunk once."""
    if chunk_hash not in (None, "blake3", "sha256"):
        raise InvalidInputError(f"chunk_hash must be 'blake3' or 'sha256', not {chunk_hash!r}")
    if manifest_format < 2:
        if chunk_hash == "blake3":
            raise InvalidInputError("format 1 manifests name chunks by sha256 only")
        return SHA256
    if chunk_hash is None:
        chunk_hash = "blake3"
        for table in history:
            said = SHA256 if table is None else hash_of(table)
            if said is not None:
                chunk_hash = said.name
                break
    return SHA256_SHORT if chunk_hash == "sha256" else BLAKE3


def history(
    first: M | None, version: str | None, load: Callable[[str], M], depth: int = 16
) -> Iterator[Mapping[str, object] | None]:
    """The chunk tables of ``version`` (whose manifest is ``first``, None if it could not
    be read) and of its ancestors, newest first, ``depth`` at most, loaded as they are
    asked for: None for one that cannot be read (damaged or pruned), and the walk ends."""
    m = first
    for _ in range(depth):
        if version is None:
            return
        if m is None:
            yield None
            return
        yield m.chunks
        version = m.parent
        if version is None:
            return
        try:
            m = load(version)
        except (IntegrityError, SnapshotNotFoundError):
            m = None
