"""chroma-snapshots: versioned, content-addressed, verified ChromaDB snapshots.

Publish a directory atomically, check it out incrementally with every chunk
verified, on S3, a mounted filesystem (EFS) or any fsspec store.
"""

from __future__ import annotations

from .backends import Backend, GetResult, ObjectMeta, PutMode, open_backend
from .cache import CachedStore
from .config import StoreConfig, open_remote, open_store
from .deadline import Deadline
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
from .fallback import FallbackStore
from .models import Chunk, FileEntry, Manifest, RefValue, SnapshotInfo, TransferStats, VersionId
from .remote import RemoteStore
from .store import ANY, LATEST, LocalSnapshot, PruneReport, SnapshotStore, VerifyReport

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
