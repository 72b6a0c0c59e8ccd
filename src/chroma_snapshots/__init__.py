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
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
    UnsupportedOperationError,
)

if TYPE_CHECKING:
    from chroma_snapshots.backends import Backend, GetResult, ObjectMeta, PutMode, open_backend
    from chroma_snapshots.config import StoreConfig, open_remote, open_store
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
    from chroma_snapshots.stores.base import (
        ANY,
        LATEST,
        LocalSnapshot,
        PruneReport,
        SnapshotStore,
        VerifyReport,
    )
    from chroma_snapshots.stores.cache import CachedStore
    from chroma_snapshots.stores.fallback import FallbackStore
    from chroma_snapshots.stores.remote import RemoteStore

# Imported on first use (like fsspec's registry): `import chroma_snapshots` stays cheap for a
# Lambda cold start and for the hang guard's worker processes, which need only a few modules.
_LAZY = {
    "Backend": "backends",
    "GetResult": "backends",
    "ObjectMeta": "backends",
    "PutMode": "backends",
    "open_backend": "backends",
    "CachedStore": "stores.cache",
    "StoreConfig": "config",
    "open_remote": "config",
    "open_store": "config",
    "Deadline": "engine.deadline",
    "FallbackStore": "stores.fallback",
    "Chunk": "engine.models",
    "FileEntry": "engine.models",
    "Manifest": "engine.models",
    "RefValue": "engine.models",
    "SnapshotInfo": "engine.models",
    "TransferStats": "engine.models",
    "VersionId": "engine.models",
    "RemoteStore": "stores.remote",
    "ANY": "stores.base",
    "LATEST": "stores.base",
    "LocalSnapshot": "stores.base",
    "PruneReport": "stores.base",
    "SnapshotStore": "stores.base",
    "VerifyReport": "stores.base",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
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
    "PruneReport",
    "PutMode",
    "RefValue",
    "RemoteStore",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StorageTimeoutError",
    "StoreConfig",
    "TransferStats",
    "UnsupportedOperationError",
    "VerifyReport",
    "VersionId",
    "open_backend",
    "open_remote",
    "open_store",
]
