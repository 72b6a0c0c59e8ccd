"""Chunk and FileEntry objects built from a decoded manifest's columns (engine.manifest_read).

The values are checked before they get here; building is the part of decoding that is left
when the checks run on whole columns.
"""

from __future__ import annotations

from dataclasses import fields

from chroma_snapshots.engine.models import Chunk, FileEntry

# Building a frozen dataclass runs a guarded setattr per field: most of the cost of decoding
# a table of 100,000 chunks. Decoders build them from columns by filling each new object's
# __dict__ (what __init__ would leave there, at half the time; the object then holds a dict
# of its own, about 60 bytes more), so the fields must be the ones named here.
_CHUNK_ORDER = ("hash", "pack", "offset", "length", "size", "codec", "base")
_FILE_ORDER = ("path", "size", "mode", "chunks", "at")
if tuple(f.name for f in fields(Chunk)) != _CHUNK_ORDER or (
    tuple(f.name for f in fields(FileEntry)) != _FILE_ORDER
):
    raise ImportError("builders: build_chunks and build_files must set every field")


def build_chunks(
    keys: list[str],
    packs: list[str],
    offsets: list[int],
    lengths: list[int],
    sizes: list[int],
    codecs: list[str],
    bases: list[str | None],
) -> dict[str, Chunk]:
    """Chunks from columns (already checked), keyed by ``keys``: the same objects as
    ``Chunk(...)`` builds, in a fraction of the time."""
    new, out = object.__new__, {}
    for k, p, o, n, s, c, b in zip(
        keys, packs, offsets, lengths, sizes, codecs, bases, strict=True
    ):
        x = new(Chunk)
        d = x.__dict__
        d["hash"] = k
        d["pack"] = p
        d["offset"] = o
        d["length"] = n
        d["size"] = s
        d["codec"] = c
        d["base"] = b
        out[k] = x
    return out


def build_files(
    paths: list[str],
    sizes: list[int],
    modes: list[int],
    chunks: list[tuple[str, ...]],
    ats: list[int],
) -> tuple[FileEntry, ...]:
    """File entries from columns (already checked), as :func:`build_chunks` builds chunks."""
    new, out = object.__new__, []
    for p, s, m, c, a in zip(paths, sizes, modes, chunks, ats, strict=True):
        x = new(FileEntry)
        d = x.__dict__
        d["path"] = p
        d["size"] = s
        d["mode"] = m
        d["chunks"] = c
        d["at"] = a
        out.append(x)
    return tuple(out)
