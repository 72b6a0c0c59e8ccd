"""Storage backends and the lazy URL-scheme registry (after fsspec's).

Backends are imported only when a URL needs them, so a Lambda package that
only talks to S3 never imports fsspec.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from chroma_snapshots.backends.base import Backend, GetResult, ObjectMeta, PutMode
from chroma_snapshots.errors import ConfigError

if TYPE_CHECKING:
    from chroma_snapshots.backends.s3 import (
        S3Settings,
    )  # imported for real only by the s3 factory (boto3)

__all__ = [
    "Backend",
    "GetResult",
    "ObjectMeta",
    "OpenOptions",
    "PutMode",
    "check_store_url",
    "open_backend",
    "registered_schemes",
]

# scheme -> (module, factory function, extra that provides its dependencies)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "s3": ("chroma_snapshots.backends.registry_factories", "s3", None),
    "file": ("chroma_snapshots.backends.registry_factories", "file", None),
    "efs": ("chroma_snapshots.backends.registry_factories", "efs", None),
    "memory": ("chroma_snapshots.backends.registry_factories", "fsspec", "fsspec"),
}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class OpenOptions:
    """What every factory may use. ``s3_settings``: an S3Settings (boto3 timeouts, endpoint);
    ``create``: make a missing local store directory (False: a missing one is
    SnapshotNotFoundError, so reading a mistyped path never creates it); ``unsafe_no_cas``:
    skip the check that an S3 endpoint honours conditional writes (see backends.cas)."""

    s3_settings: S3Settings | None = None
    efs_timeout: float = 10.0
    create: bool = True
    unsafe_no_cas: bool = False


def registered_schemes() -> list[str]:
    """URL schemes with a dedicated backend; other fsspec protocols also work."""
    return sorted(_REGISTRY)


def check_store_url(url: str, what: str = "store URL") -> str:
    """``url`` if it is ``scheme://...`` or a plain filesystem path (absolute or relative).

    Something that starts like a scheme but lacks the ``//`` (``s3:/bucket``, ``s3:bucket``,
    ``file:data``) is a ConfigError naming the fix: read as a path it would silently name a
    local folder called ``s3:`` and publish there."""
    if not url.strip():
        raise ConfigError(f"{what} is empty; e.g. s3://bucket/prefix or /data/store")
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if not _SCHEME.fullmatch(scheme + ":"):
            raise ConfigError(f"{what} {url!r} has no valid scheme; e.g. s3://bucket/prefix")
        return url
    found = _SCHEME.match(url)
    if found is None:
        return url
    scheme, rest = found.group()[:-1], url[found.end() :].lstrip("/")
    slashes = "///" if scheme in ("file", "efs") else "//"
    raise ConfigError(
        f"{what} {url!r} starts with '{scheme}:' but has no '//': did you mean "
        f"'{scheme}:{slashes}{rest}'? (for a local folder whose name contains ':', "
        f"write './{url}')"
    )


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend for ``url`` (``s3://b/p``, ``file:///d``, ``efs:///mnt/x``, ``memory://x``,
    ``fsspec+s3://b/p``, any other fsspec URL, or a plain filesystem path).

    ``s3_settings``, ``efs_timeout``, ``create`` and ``unsafe_no_cas`` are the
    :class:`OpenOptions`; other ``options`` go to the backend's constructor."""
    check_store_url(url)
    common = {k: options.pop(k) for k in OpenOptions.__dataclass_fields__ if k in options}
    opts = OpenOptions(**common)
    scheme = urlsplit(url).scheme if "://" in url else "file"
    module, func, extra = _REGISTRY.get(scheme, _REGISTRY["memory"])
    try:
        factory = getattr(importlib.import_module(module), func)
        backend: Backend = factory(url, opts, **options)
    except ImportError as e:
        hint = f"pip install 'chroma-snapshots[{extra}]'" if extra else "reinstall chroma-snapshots"
        raise ConfigError(f"store URL {url!r} needs {e.name or 'a missing package'}: {hint}") from e
    return backend
