"""What a ref points at, and what an operation moved: small values with no manifest in them
(re-exported by ``engine.models``, where callers import them from)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chroma_snapshots.engine import validation as val
from chroma_snapshots.engine.validation import (
    FORMAT_VERSION,
    MAX_REF_BYTES,
    VERSION_RE,
    canonical_json,
    format_time,
    parse_time,
)
from chroma_snapshots.errors import IntegrityError

MAX_GENERATION = 1 << 62  # no store moves a ref this often: a higher one was not ours


@dataclass(frozen=True)
class RefValue:
    """What a ref points at; ``generation`` grows by one on every update. ``signature``
    (when the store signs) covers :meth:`signed_bytes`."""

    version: str
    generation: int
    updated_at: datetime
    signature: str | None = None

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "version": self.version,
            "generation": self.generation,
            "updated_at": format_time(self.updated_at),
        }

    def signed_bytes(self) -> bytes:
        """The canonical JSON of everything but the signature."""
        return canonical_json(self._body())

    def to_json(self) -> bytes:
        if self.signature is None:
            return self.signed_bytes()
        return canonical_json({**self._body(), "signature": self.signature})

    @classmethod
    def from_json(cls, data: bytes) -> RefValue:
        """Parse and validate ref bytes; IntegrityError on anything unexpected."""
        raw = val.loads_json(data, "ref", MAX_REF_BYTES)
        keys = {"format", "version", "generation", "updated_at"}
        if isinstance(raw, dict) and "signature" in raw:
            keys.add("signature")
        o = val.as_obj(raw, "ref", keys)
        if o["format"] != FORMAT_VERSION:
            raise IntegrityError(f"ref format {o['format']!r} is not supported")
        v = o["version"]
        if not isinstance(v, str) or not VERSION_RE.fullmatch(v):
            raise IntegrityError(f"ref points at an invalid version {str(v)[:64]!r}")
        sig = o.get("signature")
        return cls(
            v,
            val.as_int(o["generation"], "generation", 1, MAX_GENERATION),
            parse_time(o["updated_at"], "updated_at"),
            None if sig is None else val.as_str(sig, "signature"),
        )


@dataclass(frozen=True)
class TransferStats:
    """What an operation moved: bytes, requests, chunk counts and wall time."""

    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    bytes_reused: int = 0
    requests: int = 0
    chunks_total: int = 0
    chunks_transferred: int = 0
    packs_transferred: int = 0
    seconds: float = 0.0
    streams: int = 0  # the most pack reads a checkout allowed at once (engine/ramp.py)
