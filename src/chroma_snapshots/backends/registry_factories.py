"""URL -> backend factories, imported lazily by :func:`open_backend`."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from .base import Backend


def _local_path(url: str) -> str:
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"{url!r}: a file/efs URL needs an absolute path, e.g. efs:///mnt/store")
    return unquote(parts.path)


def s3(url: str, **options: Any) -> Backend:
    from .s3 import S3Backend, S3Settings

    parts = urlsplit(url)
    if not parts.netloc:
        raise ConfigError(f"{url!r}: an S3 URL needs a bucket, e.g. s3://bucket/prefix")
    options.pop("efs_timeout", None)
    settings = options.pop("s3_settings", None) or S3Settings()
    return S3Backend(parts.netloc, parts.path.strip("/"), settings=settings, **options)


def file(url: str, **options: Any) -> Backend:
    from .file import FileBackend

    options.pop("s3_settings", None)
    options.pop("efs_timeout", None)
    return FileBackend(_local_path(url), **options)


def efs(url: str, **options: Any) -> Backend:
    from ..guard import MountGuard
    from .file import FileBackend

    options.pop("s3_settings", None)
    path = _local_path(url)
    guard = MountGuard(path, op_timeout=options.pop("efs_timeout", 10.0))
    # A store on a network mount must already exist: creating it would hide a missing mount.
    return FileBackend(path, create=False, guard=guard, **options)


def fsspec(url: str, **options: Any) -> Backend:
    from .fsspec import FsspecBackend

    options.pop("s3_settings", None)
    options.pop("efs_timeout", None)
    try:
        return FsspecBackend.from_url(url.removeprefix("fsspec+"), **options)
    except ValueError as e:  # fsspec's "Protocol not known"
        raise ConfigError(f"store URL {url!r}: {e}") from e
