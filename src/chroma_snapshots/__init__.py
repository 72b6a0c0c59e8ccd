"""chroma-snapshots: versioned, content-addressed, verified ChromaDB snapshots.

Publish a directory atomically, check it out incrementally with every chunk
verified, on S3, a mounted filesystem (EFS) or any fsspec store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
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
    from .backends import Backend, GetResult, ObjectMeta, PutMode, open_backend
    from .cache import CachedStore
    from .config import StoreConfig, open_remote, open_store
    from .deadline import Deadline
    from .fallback import FallbackStore
    from .models import Chunk, FileEntry, Manifest, RefValue, SnapshotInfo, TransferStats, VersionId
    from .remote import RemoteStore
    from .store import ANY, LATEST, LocalSnapshot, PruneReport, SnapshotStore, VerifyReport

# Imported on first use (like fsspec's registry): `import chroma_snapshots` stays cheap for a
# Lambda cold start and for the hang guard's worker processes, which need only a few modules.
_LAZY = {
    "Backend": "backends",
    "GetResult": "backends",
    "ObjectMeta": "backends",
    "PutMode": "backends",
    "open_backend": "backends",
    "CachedStore": "cache",
    "StoreConfig": "config",
    "open_remote": "config",
    "open_store": "config",
    "Deadline": "deadline",
    "FallbackStore": "fallback",
    "Chunk": "models",
    "FileEntry": "models",
    "Manifest": "models",
    "RefValue": "models",
    "SnapshotInfo": "models",
    "TransferStats": "models",
    "VersionId": "models",
    "RemoteStore": "remote",
    "ANY": "store",
    "LATEST": "store",
    "LocalSnapshot": "store",
    "PruneReport": "store",
    "SnapshotStore": "store",
    "VerifyReport": "store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
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
