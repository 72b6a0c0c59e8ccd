"""The /tmp cache: :class:`CachedStore` and its on-disk layout."""

from __future__ import annotations

from chroma_snapshots.stores.cache.store import DEFAULT_CACHE_DIR, CachedStore

__all__ = ["DEFAULT_CACHE_DIR", "CachedStore"]
