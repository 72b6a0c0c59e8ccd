"""The life of a chroma client this package opens: its settings and a close that leaves
nothing of it in chroma's process-wide cache."""

from __future__ import annotations

from typing import Any

from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.config import Settings


def client_settings() -> Settings:
    """Settings for clients this package opens: no telemetry, no reset."""
    return Settings(anonymized_telemetry=False, allow_reset=False, is_persistent=True)


def close_client(client: Any) -> None:
    """Close a client and evict its system from chroma's shared cache (stopping it)."""
    identifier = client._identifier
    client.close()
    with SharedSystemClient._refcount_lock:
        system = SharedSystemClient._identifier_to_system.pop(identifier, None)
        SharedSystemClient._identifier_to_refcount.pop(identifier, None)
    if system is not None:
        system.stop()
