"""HMAC-SHA256 signatures on manifests and refs.

Chroma loads pickle files from a snapshot, so whoever can write the bucket could run code
in every reader. With signing keys configured, a publish signs each manifest (a small
``.sig`` object beside it) and each ref (a ``signature`` field), and readers refuse
anything unsigned or signed with a key they don't accept. A ref's signature covers the
version it names; the manifest's covers its bytes, which name every chunk by sha256.

Keys are ``id:secret`` pairs; the first signs, all verify, so keys can rotate: add the new
key first, keep the old one after it until every version signed with it is gone.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from chroma_snapshots.errors import ConfigError, IntegrityError

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


class Signer:
    """Signs with the active key; verifies with any accepted key."""

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if active not in keys:
            raise ConfigError(f"signing key {active!r} is not among the accepted keys")
        self._keys = dict(keys)
        self.active = active

    @classmethod
    def from_spec(cls, spec: str, variable: str = "CHROMA_SNAPSHOTS_SIGNING_KEY") -> Signer:
        """Parse ``id:secret[,id:secret...]`` (the first key signs)."""
        keys: dict[str, bytes] = {}
        order = []
        for part in (p.strip() for p in spec.split(",")):
            key_id, _, secret = part.partition(":")
            if not _KEY_ID.fullmatch(key_id) or len(secret) < 16:
                raise ConfigError(
                    f"{variable}: each key must be id:secret with an id of "
                    "[A-Za-z0-9_-] and a secret of at least 16 characters"
                )
            if key_id in keys:
                raise ConfigError(f"{variable}: key id {key_id!r} appears twice")
            keys[key_id] = secret.encode()
            order.append(key_id)
        return cls(keys, order[0])

    @property
    def fingerprint(self) -> str:
        """Names the set of accepted keys without revealing them (a MAC of a fixed text
        under each): a cache keeps data verified under different keys apart."""
        macs = sorted(f"{k}:{self._mac(k, 'cache identity', b'')}" for k in self._keys)
        return hashlib.sha256(",".join(macs).encode()).hexdigest()[:16]

    def _mac(self, key_id: str, purpose: str, data: bytes) -> str:
        return hmac.new(
            self._keys[key_id], purpose.encode() + b"\0" + data, hashlib.sha256
        ).hexdigest()

    def sign(self, purpose: str, data: bytes) -> str:
        """``id:hex`` over ``purpose`` and ``data`` (purpose keeps a manifest signature from
        passing as a ref signature)."""
        return f"{self.active}:{self._mac(self.active, purpose, data)}"

    def verify(self, purpose: str, data: bytes, signature: str | None, what: str) -> None:
        """IntegrityError unless ``signature`` is a valid signature by an accepted key."""
        if not signature:
            raise IntegrityError(f"{what} is not signed, and this store requires signatures")
        key_id, _, mac = signature.partition(":")
        if key_id not in self._keys:
            raise IntegrityError(f"{what} is signed with key {key_id!r}, which is not accepted")
        if not hmac.compare_digest(mac, self._mac(key_id, purpose, data)):
            raise IntegrityError(f"{what}: signature mismatch (tampered, or the wrong key)")
