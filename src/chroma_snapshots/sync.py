"""Copying versions between stores (S3 -> an EFS mirror), moving only what is missing."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING

from .backends.base import PutMode
from .backends.bounded import DeadlineBackend
from .deadline import DeadlineLike, as_deadline
from .errors import ConflictError, SnapshotNotFoundError
from .models import RefValue
from .remote import manifest_key, pack_key, ref_key
from .validation import utc_now

if TYPE_CHECKING:
    from .remote import RemoteStore


def sync_version(
    src: RemoteStore,
    dst: RemoteStore,
    name: str,
    version: str,
    *,
    ref: str | None = "latest",
    deadline: DeadlineLike = None,
) -> int:
    """Copy ``version`` of ``name`` from ``src`` to ``dst``: packs it lacks, then the manifest,
    then (if ``ref``) point ``dst``'s ref at it. Returns the bytes copied.

    Same order as a publish, so ``dst`` never has a ref to an incomplete version.
    """
    dl = as_deadline(deadline, src.default_timeout)
    manifest = src.load_manifest(name, version, deadline=dl)
    s_io, d_io = DeadlineBackend(src.backend, dl), DeadlineBackend(dst.backend, dl)
    copied = 0
    for pack in sorted(manifest.packs):
        key = pack_key(name, pack)
        if not d_io.exists(key):
            data = s_io.get(key).data
            with contextlib.suppress(ConflictError):  # content-addressed: same key, same bytes
                d_io.put(key, data, mode=PutMode.CREATE)
            copied += len(data)
    key = manifest_key(name, version)
    with contextlib.suppress(SnapshotNotFoundError, ConflictError):  # the signature, if any
        d_io.put(key + ".sig", s_io.get(key + ".sig").data, mode=PutMode.CREATE)
    with contextlib.suppress(ConflictError):
        d_io.put(key, manifest.to_json(), mode=PutMode.CREATE)
    if ref is not None:
        current = dst.read_ref(name, ref, deadline=dl)
        gen = current[0].generation + 1 if current else 1
        value = RefValue(version, gen, utc_now())
        if dst.signer is not None:
            value = replace(
                value, signature=dst.signer.sign(f"ref:{ref_key(name, ref)}", value.signed_bytes())
            )
        d_io.put(ref_key(name, ref), value.to_json())
    return copied
