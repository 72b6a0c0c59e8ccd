"""URL -> backend factories, imported lazily by :func:`open_backend`.

S3 backends (native and through s3fs) come wrapped in a
:class:`~.cas.ConditionalWriteCheck` unless the caller opted out.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from chroma_snapshots.backends.base import Backend
from chroma_snapshots.backends.cas import conditional_write_check
from chroma_snapshots.backends.endpoints import check_endpoint
from chroma_snapshots.backends.options import OpenOptions
from chroma_snapshots.errors import ConfigError, shown

if TYPE_CHECKING:
    from chroma_snapshots.backends.s3 import S3Settings

_BYTES = "surrogateescape"  # %ff in a path is that byte, as os.fsdecode holds it


def local_path(url: str) -> str:
    """The folder a plain path or a ``file://``/``efs://`` URL names. A leading ``~`` or
    ``~user`` is that home folder, as a shell reads it (in ``file://~/store`` too, where
    it lands in the host part), never a folder named ``~`` (``./~`` names one)."""
    if "://" not in url:
        return expand_home(url)  # a plain path, relative to the working directory or absolute
    parts = urlsplit(url)
    if parts.netloc.startswith("~"):
        return expand_home(unquote(parts.netloc + parts.path, errors=_BYTES))
    if parts.netloc not in ("", "localhost") or not parts.path.strip("/ "):
        raise ConfigError(f"{url!r}: a file/efs URL needs an absolute path, e.g. efs:///mnt/store")
    return unquote(parts.path, errors=_BYTES)


def expand_home(path: str) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded; ConfigError if there is no
    such home folder (no HOME, no such user) rather than a folder named ``~``."""
    if not path.startswith("~"):
        return path
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        user = path.split("/", 1)[0]
        raise ConfigError(f"{path!r}: {user} names no home folder; write './{path}' for a folder")
    return expanded


def _checked(backend: Backend, scope: str, opts: OpenOptions) -> Backend:
    return backend if opts.unsafe_no_cas else conditional_write_check(backend, scope)


def s3(url: str, opts: OpenOptions, **options: Any) -> Backend:
    from chroma_snapshots.backends.s3 import S3Backend, S3Settings

    parts = urlsplit(url)
    bucket = _s3_bucket(url)
    settings = opts.s3_settings or S3Settings()
    backend = S3Backend(bucket, parts.path.strip("/"), settings=settings, **options)
    return _checked(backend, f"s3://{bucket} at {backend.client.meta.endpoint_url}", opts)


def _s3_bucket(url: str) -> str:
    """The bucket an S3 URL (``s3://``, ``fsspec+s3://``) names; ConfigError if none
    (s3fs would otherwise send requests to no bucket until the deadline)."""
    bucket = urlsplit(url).netloc
    if not bucket:
        raise ConfigError(f"{url!r}: an S3 URL needs a bucket, e.g. s3://bucket/prefix")
    return bucket


def file(url: str, opts: OpenOptions, **options: Any) -> Backend:
    from chroma_snapshots.backends.file import FileBackend

    return FileBackend(local_path(url), create=opts.create, **options)


def efs(url: str, opts: OpenOptions, **options: Any) -> Backend:
    from chroma_snapshots.backends.file import FileBackend
    from chroma_snapshots.engine.guard import MountGuard

    path = local_path(url)
    guard = MountGuard.shared(path, op_timeout=opts.efs_timeout)
    # A store on a network mount must already exist: creating it would hide a missing mount.
    return FileBackend(path, create=False, guard=guard, **options)


def fsspec(url: str, opts: OpenOptions, **options: Any) -> Backend:
    from chroma_snapshots.backends.fsspec import FsspecBackend

    target = url.removeprefix("fsspec+")
    endpoint = None
    if urlsplit(target).scheme in ("s3", "s3a"):
        _s3_bucket(url)
        options = {**s3fs_options(opts.s3_settings), **options}
        endpoint = s3fs_endpoint(options)  # a bad one is a ConfigError before any request
    try:
        backend = FsspecBackend.from_url(target, **options)
    except ValueError as e:  # fsspec's "Protocol not known"
        raise ConfigError(f"store URL {url!r}: {e}") from e
    except ImportError as e:
        raise _missing_package(url, e) from e
    fs = backend.fs
    if "s3" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return backend  # memory:// is atomic in-process; other filesystems refuse CAS outright
    bucket = backend.root.strip("/").split("/", 1)[0]
    return _checked(backend, f"s3://{bucket} at {endpoint or 'the default endpoint'}", opts)


def s3fs_options(s: S3Settings | None) -> dict[str, Any]:
    """Every setting an ``fsspec+s3://`` store gives s3fs: fsspec's own configuration
    (``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3``, its config files), read once, with the
    store's endpoint, region and profile (--endpoint-url, --region, --profile) over it,
    so it talks to the same S3 as an ``s3://`` store. The endpoint and ``client_kwargs``
    are always named: s3fs reads fsspec's configuration again when it is made, and a
    change to it in between must not move the store away from the endpoint its cache is
    keyed by (:func:`s3fs_endpoint` of these). An endpoint given both as ``endpoint_url``
    and in ``client_kwargs`` makes s3fs fail to make its client: the store's wins."""
    found = _s3fs_config()
    kwargs = dict(_client_kwargs(found))
    if s is not None and s.endpoint_url:
        found["endpoint_url"] = s.endpoint_url
        kwargs.pop("endpoint_url", None)
    if s is not None and s.region:
        kwargs["region_name"] = s.region
    if s is not None and s.profile:
        found["profile"] = s.profile
    found.setdefault("endpoint_url", None)
    found["client_kwargs"] = kwargs
    return found


def s3fs_endpoint(options: dict[str, Any]) -> str | None:
    """The endpoint s3fs reaches when given ``options`` (:func:`s3fs_options`, perhaps
    with more over them): ``endpoint_url`` before the one in ``client_kwargs``, as s3fs
    takes them; ConfigError unless it names a server (backends.endpoints: a path would
    be read as the bucket). Contacts nothing: an offline store's cache is keyed by it too."""
    top, kwargs = options.get("endpoint_url"), _client_kwargs(options)
    inner = kwargs.get("endpoint_url")
    if top is not None and "endpoint_url" in kwargs:  # s3fs would fail every request
        raise ConfigError(
            "fsspec's S3 settings name the endpoint twice (endpoint_url and in client_kwargs): "
            "keep one"
        )
    found = inner if top is None else top
    if found is None:
        return None
    if not isinstance(found, str):
        raise ConfigError(f"fsspec's S3 endpoint {shown(found)} must be a URL")
    check_endpoint(found, "fsspec's S3 endpoint ")
    return found


def _s3fs_config() -> dict[str, Any]:
    """What fsspec's configuration gives every s3fs filesystem (it read it at import);
    without fsspec, nothing."""
    try:
        from fsspec.config import conf
    except ImportError:
        return {}
    except Exception as e:  # its files are read at import: a malformed one is the user's
        raise ConfigError(f"fsspec's configuration could not be read: {e}") from e
    merged: dict[str, Any] = {}
    for protocol in ("s3", "s3a"):  # s3fs's, in its order: a later one's settings win
        merged.update(conf.get(protocol) or {})
    return merged


def _client_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The ``client_kwargs`` s3fs is given; ConfigError if they are no mapping (s3fs
    would drop them and reach AWS)."""
    found = options.get("client_kwargs")
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise ConfigError(f"fsspec's S3 client_kwargs {shown(found)} must be a mapping")
    return found


# What the [fsspec] extra installs; any other missing module is a filesystem of its own.
_FSSPEC_EXTRA = ("fsspec", "s3fs", "aiobotocore", "aiohttp", "botocore")


def _missing_package(url: str, err: ImportError) -> ImportError | ConfigError:
    """fsspec names the package a protocol needs (gcsfs for gs://) only in its message."""
    missing = err.name or getattr(err.__cause__, "name", None)
    if missing is None or missing.split(".")[0] in _FSSPEC_EXTRA:
        return err  # open_backend's hint: the [fsspec] extra
    package = missing.split(".")[0]
    return ConfigError(f"store URL {url!r} needs {package}: pip install {package}")
