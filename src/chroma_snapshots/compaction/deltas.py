"""Deltas: the unit of work of compaction, and chroma's rules checked before applying one.

A delta that chroma would refuse must never reach chroma inside a batch: chroma raises
for the whole ``upsert`` call, and the batch it belongs to would fail on every delivery
until good deltas reach the dead-letter queue with it. :func:`problem` applies chroma's
rules (chromadb 1.5) to one delta without chroma: collection names, ids, documents,
metadata and embeddings; :func:`dimension_problem` checks the embedding dimension against
a collection's. Neither imports chromadb.

Metadata follows chroma exactly: a NaN or infinity inside a list is refused (chroma refuses
it), a scalar NaN or infinity is accepted and chroma stores it as null.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chroma_snapshots.errors import InvalidInputError

Scalar = str | int | float | bool
MetadataValue = Scalar | None | list[str] | list[int] | list[float] | list[bool]

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]*[a-zA-Z0-9]$")
_IPV4 = re.compile(r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")
_FLOAT32_MAX = 3.4028234663852886e38  # chroma stores float32: larger values become inf
_RESERVED_KEY = "chroma:document"


@dataclass(frozen=True)
class Record:
    """One record to upsert: id, embedding, and optional document and metadata."""

    id: str
    embedding: tuple[float, ...]
    document: str | None = None
    metadata: Mapping[str, MetadataValue] | None = None


@dataclass(frozen=True)
class Delta:
    """A unit of work for one collection, identified by ``id`` for idempotence."""

    id: str
    collection: str
    upserts: tuple[Record, ...] = ()
    deletes: tuple[str, ...] = ()

    @classmethod
    def from_obj(cls, obj: object) -> Delta:
        """Parse and check a delta from decoded JSON (an SQS message body).

        InvalidInputError naming the field that is wrong (``upserts[2].metadata.price``)."""
        try:
            delta = _parse(obj)
        except _Bad as e:
            raise InvalidInputError(f"malformed delta: {e}") from None
        bad = problem(delta)
        if bad is not None:
            raise InvalidInputError(f"delta {delta.id!r} would be refused by chroma: {bad}")
        return delta


class _Bad(ValueError):
    """A field of a delta's JSON is missing or of the wrong type (the message names it)."""


def _parse(obj: object) -> Delta:
    if not isinstance(obj, dict):
        raise _Bad(f"a delta is a JSON object, not {_kind(obj)}")
    _known_fields(obj, _DELTA_FIELDS, "a delta")
    for key in ("id", "collection"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise _Bad(f"{key!r} must be a non-empty string, got {_kind(obj.get(key))}")
    upserts, deletes = obj.get("upserts", []), obj.get("deletes", [])
    if not isinstance(upserts, list):
        raise _Bad(f"'upserts' must be a list, got {_kind(upserts)}")
    if not isinstance(deletes, list):
        raise _Bad(f"'deletes' must be a list, got {_kind(deletes)}")
    for i, d in enumerate(deletes):
        if not isinstance(d, str):
            raise _Bad(f"deletes[{i}] must be a string id, got {_kind(d)}")
    records = tuple(_record(r, f"upserts[{i}]") for i, r in enumerate(upserts))
    return Delta(obj["id"], obj["collection"], records, tuple(deletes))


# A misspelt field ("delete", "documnet") must not parse as an empty delta that is then
# recorded as applied, and skipped when the producer sends it again, corrected.
_DELTA_FIELDS = frozenset({"id", "collection", "upserts", "deletes"})
_RECORD_FIELDS = frozenset({"id", "embedding", "document", "metadata"})


def _known_fields(obj: dict[Any, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(repr(k)[:80] for k in obj if k not in known)
    if unknown:
        raise _Bad(f"{where} has fields it cannot have: {', '.join(unknown[:5])} "
                   f"(it may have {', '.join(sorted(known))})")  # fmt: skip


def _record(r: object, where: str) -> Record:
    if not isinstance(r, dict):
        raise _Bad(f"{where} must be an object, got {_kind(r)}")
    _known_fields(r, _RECORD_FIELDS, where)
    if not isinstance(r.get("id"), str):
        raise _Bad(f"{where}.id must be a string, got {_kind(r.get('id'))}")
    emb = r.get("embedding")
    if not isinstance(emb, list) or not emb:
        raise _Bad(f"{where}.embedding must be a non-empty list of numbers, got {_kind(emb)}")
    bad = embedding_problem(emb, f"{where}.embedding")
    if bad is not None:
        raise _Bad(bad)
    doc, meta = r.get("document"), r.get("metadata")
    if doc is not None and not isinstance(doc, str):
        raise _Bad(f"{where}.document must be a string or null, got {_kind(doc)}")
    if meta is not None and not isinstance(meta, dict):
        raise _Bad(f"{where}.metadata must be an object or null, got {_kind(meta)}")
    # An empty metadata object means "none" (chroma refuses an empty dict).
    return Record(r["id"], tuple(float(x) for x in emb), doc, meta or None)


def embedding_problem(values: list[Any], where: str) -> str | None:
    """What is wrong with a JSON list as an embedding (naming ``where[j]``), or None: each
    value a number that is a finite 32-bit float (a huge integer literal is not: float()
    would raise OverflowError)."""
    for j, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"{where}[{j}] must be a number, got {_kind(x)}"
        try:
            value = float(x)
        except OverflowError:
            return f"{where}[{j}] is an integer too large for a 32-bit float"
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            return f"{where}[{j}] = {value!r} is not a finite 32-bit float"
    return None


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def problem(delta: Delta) -> str | None:
    """What chroma would refuse in ``delta`` (one reason, naming the field), or None."""
    checks = (
        _delta_id_problem(delta.id),
        _name_problem(delta.collection),
        _ids_problem([r.id for r in delta.upserts], "upserts"),
        _ids_problem(list(delta.deletes), "deletes"),
    )
    for bad in checks:
        if bad is not None:
            return bad
    dims = {len(r.embedding) for r in delta.upserts}
    if len(dims) > 1:
        return f"upserts mix embedding dimensions {sorted(dims)}"
    for i, r in enumerate(delta.upserts):
        bad = _record_problem(r, f"upserts[{i}]")
        if bad is not None:
            return bad
    return None


def dimension_problem(delta: Delta, dimension: int | None) -> str | None:
    """Whether ``delta``'s embeddings fit a collection of ``dimension`` (None: not set yet)."""
    if dimension is None or not delta.upserts:
        return None
    got = len(delta.upserts[0].embedding)
    if got != dimension:
        return f"collection {delta.collection!r} has dimension {dimension}, upserts have {got}"
    return None


def _name_problem(name: str) -> str | None:
    if not 3 <= len(name) <= 512 or not _NAME.match(name):
        return (
            f"collection {name!r}: chroma wants 3-512 characters from [a-zA-Z0-9._-], "
            "starting and ending with a letter or digit"
        )
    if ".." in name:
        return f"collection {name!r}: chroma refuses two consecutive periods"
    if _IPV4.match(name):
        return f"collection {name!r}: chroma refuses a name that looks like an IPv4 address"
    return None


MAX_DELTA_ID_BYTES = 512


def _delta_id_problem(delta_id: str) -> str | None:
    # The id goes into the manifest (UTF-8 JSON) when the delta is applied: a lone
    # surrogate there would fail the publish of the whole batch, and the manifest keeps the
    # last 10,000 ids (merge.MAX_APPLIED), which must fit readers' 16 MiB header limit:
    # 240 KB ids made every batch fail once 60 were recorded.
    if not _utf8(delta_id):
        return "the delta id is not valid UTF-8 text"
    if len(json.dumps(delta_id)) - 2 > MAX_DELTA_ID_BYTES:  # as the manifest holds it, escaped
        return f"the delta id takes more than {MAX_DELTA_ID_BYTES} bytes of JSON"
    return None


def _ids_problem(ids: list[str], where: str) -> str | None:
    seen: set[str] = set()
    for i, x in enumerate(ids):
        if where == "upserts" and not x:
            return f"{where}[{i}].id is empty"
        if not _utf8(x):
            return f"{where}[{i}]: the id is not valid UTF-8 text"
        if x in seen:
            return f"{where}: id {x!r} appears more than once"
        seen.add(x)
    return None


def _record_problem(r: Record, where: str) -> str | None:
    for j, x in enumerate(r.embedding):
        if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
            return f"{where}.embedding[{j}] = {x!r} is not a finite 32-bit float"
    if r.document is not None and not _utf8(r.document):
        return f"{where}.document is not valid UTF-8 text"
    for key, value in (r.metadata or {}).items():
        bad = _metadata_problem(key, value)
        if bad is not None:
            return f"{where}.metadata.{key}: {bad}"
    return None


def _metadata_problem(key: object, value: object) -> str | None:
    if not isinstance(key, str) or not key or key[0] in "#$" or key == _RESERVED_KEY:
        return "chroma refuses this key (empty, starting with # or $, or reserved)"
    if not _utf8(key):
        return "the key is not valid UTF-8 text"
    if isinstance(value, list):
        kinds = {bool if isinstance(v, bool) else type(v) for v in value}
        if not value or len(kinds) != 1 or not kinds <= {str, int, float, bool}:
            return "a list must be non-empty and hold strings, numbers or booleans of one type"
        return next((b for v in value if (b := _list_item_problem(v)) is not None), None)
    if value is None:
        return None
    if not isinstance(value, (str, int, float, bool)):
        return f"must be a string, number, boolean, null or list, not {_kind(value)}"
    return _scalar_problem(value)


def _list_item_problem(value: object) -> str | None:
    # chroma refuses NaN and infinity inside a list (a scalar NaN or infinity it accepts,
    # and stores as null: that is left to chroma)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} in a list: chroma refuses NaN and infinity there"
    return _scalar_problem(value)


def _scalar_problem(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return f"{value} does not fit a 64-bit integer"
    if isinstance(value, str) and not _utf8(value):
        return "not valid UTF-8 text"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON)
        return False
    return True
