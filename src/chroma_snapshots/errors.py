"""The exceptions chroma-snapshots raises.

Each error also inherits the builtin a caller would naturally catch, so
``except FileNotFoundError`` or ``except TimeoutError`` keep working.
Storage failures from boto3, fsspec or the OS are wrapped in one of these,
with the original exception as ``__cause__``.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class of every error raised by chroma-snapshots.

    ``ref_untouched`` is True on the error of a call that moves a ref (publish, set_ref,
    rollback) when it failed before it sent the move: the ref still names what it named.
    False says nothing (a move whose answer never came may have landed)."""

    ref_untouched: bool = False


class SnapshotNotFoundError(SnapshotError, FileNotFoundError):
    """A name, ref, version or object does not exist."""


class StoreNotFoundError(SnapshotNotFoundError):
    """The store itself does not exist (an S3 bucket), so nothing in it can be found either:
    never read as an absent ref or an empty store."""


class ConflictError(SnapshotError):
    """A compare-and-swap lost (the ref moved, or the key exists); nothing was made visible."""


class IntegrityError(SnapshotError):
    """Stored data failed verification: hash, size or signature mismatch, or a bad manifest."""


class StorageTimeoutError(SnapshotError, TimeoutError):
    """An operation did not finish within its deadline."""


class BackendUnavailableError(SnapshotError, ConnectionError):
    """The storage backend could not be reached or refused the request."""


class ConfigError(SnapshotError, ValueError):
    """Configuration is invalid; the message names the setting and the fix."""


class InvalidInputError(SnapshotError, ValueError):
    """An argument is malformed: a snapshot name, ref, key or source directory."""


class UnsupportedOperationError(SnapshotError, NotImplementedError):
    """The backend cannot do this safely (e.g. conditional writes on a plain filesystem)."""


class LockError(SnapshotError):
    """A lease lock could not be acquired, renewed or released."""


class CacheFullError(SnapshotError, OSError):
    """The local cache cannot hold a version even after evicting everything unpinned."""


class ProcessLimitError(SnapshotError, RuntimeError):
    """The process could not start a thread it needs (at a limit on threads or processes:
    RLIMIT_NPROC, a container's pids limit); nothing was made visible."""


class LocalDiskError(SnapshotError, OSError):
    """A checkout or the cache could not write local files for another reason than a full
    disk (permissions, a read-only or failing disk, too many open files); ``errno`` and
    ``filename`` are those of the failed call."""


__all__ = [
    "BackendUnavailableError",
    "CacheFullError",
    "ConfigError",
    "ConflictError",
    "IntegrityError",
    "InvalidInputError",
    "LocalDiskError",
    "LockError",
    "ProcessLimitError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "StorageTimeoutError",
    "StoreNotFoundError",
    "UnsupportedOperationError",
]


def shown(value: object, limit: int = 80) -> str:
    """``value`` as an error message quotes it: its repr, cut to about ``limit`` characters
    (a value pasted by mistake can be megabytes; an int past 4,300 digits has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return "a number too long to print"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"
