"""Where every object of a snapshot name lives below a backend's root.

The layout is the same on every backend::

    {name}/packs/{p[0:2]}/{p}          immutable pack, p = sha256 of its bytes
    {name}/manifests/{version}.json    immutable, written with PutMode.CREATE
    {name}/refs/{ref}                  RefValue JSON, moved only by compare-and-swap
    {name}/pins/{id}                   a ref mover's claim on what it is about to name
    {name}/gc/{id}                     a prune in progress and what it plans to delete
    {name}/retired/{version}           when a version stopped being named by a ref
    _probes/{id}                       a short-lived probe object (conditional writes, doctor)

Only this module spells a key; stores, prune and maintenance ask it.
"""

from __future__ import annotations

from chroma_snapshots.engine.validation import is_hex64

MANIFESTS, PACKS, REFS, PINS, GC, RETIRED = "manifests", "packs", "refs", "pins", "gc", "retired"
STORE_KINDS = (MANIFESTS, PACKS, REFS, PINS, GC, RETIRED)  # every folder below a name
PROBES = "_probes"
"""Top-level folder of probe objects; never a snapshot name (names cannot start with ``_``)."""


def pack_key(name: str, pack: str) -> str:
    """Where a pack lives."""
    return f"{name}/{PACKS}/{pack_folder(pack)}/{pack}"


def pack_folder(pack: str) -> str:
    """The folder below ``packs`` that holds ``pack``."""
    return pack[:2]


def pack_at(name: str, key: str) -> str | None:
    """The pack stored at ``key``, or None if ``key`` is not exactly where :func:`pack_key`
    puts one (a stray file, an S3 console's folder object, a temp file of a copy)."""
    pack = key.rsplit("/", 1)[-1]
    return pack if is_hex64(pack) and key == pack_key(name, pack) else None


def manifest_key(name: str, version: str) -> str:
    """Where a version's manifest lives."""
    return f"{name}/{MANIFESTS}/{version}.json"


def ref_key(name: str, ref: str) -> str:
    """Where a ref lives."""
    return f"{name}/{REFS}/{ref}"


def prefix(name: str, kind: str) -> str:
    """The listing prefix of one kind of object of ``name`` (``kind`` is one of the above)."""
    return f"{name}/{kind}/"


def retired_key(name: str, version: str) -> str:
    """Where the note saying when ``version`` stopped being named by a ref lives."""
    return f"{name}/{RETIRED}/{version}"


def split(name: str, key: str) -> tuple[str, str]:
    """``(kind, rest)`` of a key below ``name``: ``("packs", "ab/ab12...")``."""
    kind, _, rest = key[len(name) + 1 :].partition("/")
    return kind, rest
