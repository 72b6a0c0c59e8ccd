"""Storage backends and the lazy URL-scheme registry (after fsspec's).

Backends are imported only when a URL needs them, so a Lambda package that
only talks to S3 never imports fsspec.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Backend, GetResult, ObjectMeta, PutMode

__all__ = ["Backend", "GetResult", "ObjectMeta", "PutMode", "open_backend", "registered_schemes"]

# scheme -> (module, factory function, extra that provides its dependencies)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "s3": ("chroma_snapshots.backends.registry_factories", "s3", None),
    "file": ("chroma_snapshots.backends.registry_factories", "file", None),
    "efs": ("chroma_snapshots.backends.registry_factories", "efs", None),
    "memory": ("chroma_snapshots.backends.registry_factories", "fsspec", "fsspec"),
}


def registered_schemes() -> list[str]:
    """URL schemes with a dedicated backend; other fsspec protocols also work."""
    return sorted(_REGISTRY)


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend for ``url`` (``s3://b/p``, ``file:///d``, ``efs:///mnt/x``, ``memory://x``,
    ``fsspec+s3://b/p`` or any other fsspec URL). ``options`` go to the backend factory."""
    scheme = urlsplit(url).scheme if "://" in url else "file"
    if not scheme:
        raise ConfigError(f"store URL {url!r} has no scheme; e.g. s3://bucket/prefix")
    module, func, extra = _REGISTRY.get(scheme, _REGISTRY["memory"])
    try:
        factory = getattr(importlib.import_module(module), func)
        backend: Backend = factory(url, **options)
    except ImportError as e:
        hint = f"pip install 'chroma-snapshots[{extra}]'" if extra else "reinstall chroma-snapshots"
        raise ConfigError(f"store URL {url!r} needs {e.name or 'a missing package'}: {hint}") from e
    return backend
