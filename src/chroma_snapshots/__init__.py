"""chroma-snapshots: versioned, content-addressed, verified ChromaDB snapshots.

Publish a directory atomically, check it out incrementally with every chunk
verified, on S3, a mounted filesystem (EFS) or any fsspec store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from chroma_snapshots.errors import (
    BackendUnavailableError,
    CacheFullError,
    ConfigError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    LocalDiskError,
    LockError,
    ProcessLimitError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
    StoreNotFoundError,
    UnsupportedOperationError,
)

if TYPE_CHECKING:
    from chroma_snapshots.backends import Backend, GetResult, ObjectMeta, PutMode, open_backend
    from chroma_snapshots.config import StoreConfig
    from chroma_snapshots.engine.cleanup import wait_for_cleanups
    from chroma_snapshots.engine.deadline import Deadline
    from chroma_snapshots.engine.models import (
        Chunk,
        FileEntry,
        Manifest,
        RefValue,
        SnapshotInfo,
        TransferStats,
        VersionId,
    )
    from chroma_snapshots.opening import open_remote, open_store
    from chroma_snapshots.stores.base import (
        ANY,
        LATEST,
        LocalSnapshot,
        PruneReport,
        SnapshotStore,
        SourceStore,
        VerifyReport,
    )
    from chroma_snapshots.stores.cache import CachedStore
    from chroma_snapshots.stores.delegating import DelegatingSourceStore, DelegatingStore
    from chroma_snapshots.stores.fallback import FallbackStore
    from chroma_snapshots.stores.remote import RemoteStore

# Imported on first use (like fsspec's registry): `import chroma_snapshots` stays cheap for a
# Lambda cold start and for the hang guard's worker processes, which need only a few modules.
_LAZY = {
    "Backend": "chroma_snapshots.backends",
    "GetResult": "chroma_snapshots.backends",
    "ObjectMeta": "chroma_snapshots.backends",
    "PutMode": "chroma_snapshots.backends",
    "open_backend": "chroma_snapshots.backends",
    "CachedStore": "chroma_snapshots.stores.cache",
    "StoreConfig": "chroma_snapshots.config",
    "open_remote": "chroma_snapshots.opening",
    "open_store": "chroma_snapshots.opening",
    "Deadline": "chroma_snapshots.engine.deadline",
    "FallbackStore": "chroma_snapshots.stores.fallback",
    "Chunk": "chroma_snapshots.engine.models",
    "FileEntry": "chroma_snapshots.engine.models",
    "Manifest": "chroma_snapshots.engine.models",
    "RefValue": "chroma_snapshots.engine.models",
    "SnapshotInfo": "chroma_snapshots.engine.models",
    "TransferStats": "chroma_snapshots.engine.models",
    "VersionId": "chroma_snapshots.engine.models",
    "RemoteStore": "chroma_snapshots.stores.remote",
    "ANY": "chroma_snapshots.stores.base",
    "LATEST": "chroma_snapshots.stores.base",
    "LocalSnapshot": "chroma_snapshots.stores.base",
    "PruneReport": "chroma_snapshots.stores.base",
    "SnapshotStore": "chroma_snapshots.stores.base",
    "SourceStore": "chroma_snapshots.stores.base",
    "DelegatingStore": "chroma_snapshots.stores.delegating",
    "DelegatingSourceStore": "chroma_snapshots.stores.delegating",
    "VerifyReport": "chroma_snapshots.stores.base",
    "wait_for_cleanups": "chroma_snapshots.engine.cleanup",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "ANY",
    "LATEST",
    "Backend",
    "BackendUnavailableError",
    "CacheFullError",
    "CachedStore",
    "Chunk",
    "ConfigError",
    "ConflictError",
    "Deadline",
    "DelegatingSourceStore",
    "DelegatingStore",
    "FallbackStore",
    "FileEntry",
    "GetResult",
    "IntegrityError",
    "InvalidInputError",
    "LocalDiskError",
    "LocalSnapshot",
    "LockError",
    "Manifest",
    "ObjectMeta",
    "ProcessLimitError",
    "PruneReport",
    "PutMode",
    "RefValue",
    "RemoteStore",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "SourceStore",
    "StorageTimeoutError",
    "StoreConfig",
    "StoreNotFoundError",
    "TransferStats",
    "UnsupportedOperationError",
    "VerifyReport",
    "VersionId",
    "open_backend",
    "open_remote",
    "open_store",
    "wait_for_cleanups",
]
