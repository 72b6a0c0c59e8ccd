"""Storage backends and the lazy URL-scheme registry (after fsspec's).

Backends are imported only when a URL needs them, so a Lambda package that
only talks to S3 never imports fsspec. A third-party backend plugs in with
:func:`register_backend` or an entry point in the ``chroma_snapshots.backends`` group
(name: the scheme; value: ``package.module:factory``).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from typing import Any
from urllib.parse import urlsplit

from chroma_snapshots.backends.base import Backend, GetResult, ObjectMeta, PutMode
from chroma_snapshots.backends.endpoints import check_endpoint
from chroma_snapshots.backends.options import OpenOptions
from chroma_snapshots.backends.wrapped import WrappedBackend
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConfigError,
    InvalidInputError,
    SnapshotError,
)

__all__ = [
    "Backend",
    "GetResult",
    "ObjectMeta",
    "OpenOptions",
    "PutMode",
    "WrappedBackend",
    "check_endpoint",
    "check_store_url",
    "open_backend",
    "register_backend",
    "registered_schemes",
]

_BUILTIN = "chroma_snapshots.backends.registry_factories"
# scheme -> ("module:factory", the pip extra that provides its dependencies)
_REGISTRY: dict[str, tuple[str, str | None]] = {
    "s3": (f"{_BUILTIN}:s3", None),
    "file": (f"{_BUILTIN}:file", None),
    "efs": (f"{_BUILTIN}:efs", None),
    "memory": (f"{_BUILTIN}:fsspec", "fsspec"),
}
_FSSPEC = _REGISTRY["memory"]  # any scheme nobody registered is tried as an fsspec protocol
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_OWN_SCHEMES = tuple(_REGISTRY)  # the built-in ones (registered later: not ours)
# a store's root has no version or query: s3fs would read "?versionId=" as one
_NO_QUERY = (*_OWN_SCHEMES, "fsspec+s3", "fsspec+s3a")
# "s3//b/p" or "s3;//b/p": one of ours with its colon lost or mistyped, not a local folder
_COLON_LOST = re.compile(rf"({'|'.join(_OWN_SCHEMES)})[^A-Za-z0-9+./:]?//", re.IGNORECASE)
_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
ENTRY_POINT_GROUP = "chroma_snapshots.backends"


def register_backend(
    scheme: str, factory: str, *, extra: str | None = None, replace: bool = False
) -> None:
    """Open ``scheme://`` URLs with ``factory``, given as ``"package.module:function"`` and
    imported on first use. The function is called as ``function(url, opts, **options)``
    (``opts``: the :class:`OpenOptions`; ``options``: the rest of ``open_backend``'s keyword
    arguments, for this backend alone) and returns a :class:`Backend`. ``extra``: what to
    ``pip install`` when its import fails. Replacing a registered scheme needs ``replace``."""
    if not _SCHEME.fullmatch(f"{scheme}:") or scheme != scheme.lower():
        # URL schemes are case-insensitive and urlsplit lowercases them: only lowercase matches
        raise InvalidInputError(f"backend scheme {scheme!r} is not a lowercase URL scheme")
    if not _TARGET.fullmatch(factory):
        raise InvalidInputError(f"backend factory {factory!r} is not 'package.module:function'")
    if scheme in _REGISTRY and not replace:
        raise InvalidInputError(f"backend scheme {scheme!r} is already registered")
    _REGISTRY[scheme] = (factory, extra)


def _registered(scheme: str) -> tuple[str, str | None]:
    """The scheme's registration: explicit, then an installed entry point, then fsspec."""
    if scheme not in _REGISTRY:
        # imported here: only a scheme nobody registered needs the installed metadata
        import importlib.metadata

        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=scheme):
            dist = ep.dist.name if ep.dist else "its package"
            try:
                register_backend(scheme, ep.value, extra=ep.dist.name if ep.dist else None)
            except InvalidInputError as e:
                raise ConfigError(f"the entry point {scheme!r} of {dist} is broken: {e}") from e
            break
    return _REGISTRY.get(scheme, _FSSPEC)


def registered_schemes() -> list[str]:
    """URL schemes with a dedicated backend; other fsspec protocols also work."""
    return sorted(_REGISTRY)


_JOINERS = "\u200c\u200d"


def _unreachable(e: Exception) -> bool:
    """``e`` says the store's server could not be reached (refused, timed out, a name that
    does not resolve). socket is imported here, not by every process that opens a store."""
    import socket

    return isinstance(e, ConnectionError | TimeoutError | socket.gaierror)


def check_store_url(url: str, what: str = "store URL") -> str:
    """``url`` if it is ``scheme://...`` or a plain filesystem path (absolute or relative).

    Something that starts like a scheme but lacks the ``//`` (``s3:/bucket``, ``s3:bucket``,
    ``file:data``), or one of ours that lost its colon (``s3//bucket``, ``s3;//bucket``), is
    a ConfigError naming the fix: read as a path it would silently name a local folder
    called ``s3:`` (or ``s3``) and publish there."""
    if not url.strip():
        raise ConfigError(f"{what} is empty; e.g. s3://bucket/prefix or /data/store")
    if url != url.strip() or any(c in url for c in "\t\r\n"):
        # URL parsing drops tabs and line breaks, and a trailing space named another prefix
        # (the environment's value is stripped before it gets here)
        raise ConfigError(f"{what} {url!r} has white space at an end, or a tab or line break")
    if any(unicodedata.category(c) in ("Cc", "Cf") and c not in _JOINERS for c in url):
        # a control or invisible character no one types on purpose: the store it names
        # is not the one the error message shows ("does not exist", a 404). The zero-width
        # (non-)joiners are letters' business in Persian and Indic names: they stay
        raise ConfigError(f"{what} {url!r} holds a control or invisible character")
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if not _SCHEME.fullmatch(scheme + ":"):
            raise ConfigError(f"{what} {url!r} has no valid scheme; e.g. s3://bucket/prefix")
        try:
            parts = urlsplit(url)
        except ValueError as e:  # an unbalanced '[', a bracketed name that is no address
            raise ConfigError(f"{what} {url!r} is not a valid URL: {e}") from None
        if scheme.lower() in _NO_QUERY and (parts.query or parts.fragment):
            # they name no store: dropping them silently could name another one
            raise ConfigError(f"{what} {url!r}: {scheme}:// URLs take no '?' or '#' part")
        return url
    lost = _COLON_LOST.match(url)
    if lost is not None:
        scheme, rest = lost.group(1).lower(), url[lost.end() :]
        raise ConfigError(
            f"{what} {url!r} starts like a {scheme} URL but has no '://': did you mean "
            f"'{scheme}://{rest}'? (for a local folder of that name, write './{url}')"
        )
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
    target, extra = _registered(scheme)
    module, func = target.split(":")
    try:
        factory = getattr(importlib.import_module(module), func, None)
        if factory is None:
            raise ConfigError(f"store URL {url!r}: backend factory {target!r} does not exist")
        backend = factory(url, opts, **options)  # factories import their packages
    except SnapshotError:
        raise
    except ImportError as e:
        if extra is None:
            hint = "reinstall chroma-snapshots"
        elif module == _BUILTIN:
            hint = f"pip install 'chroma-snapshots[{extra}]'"
        else:
            hint = f"pip install '{extra}'"
        raise ConfigError(f"store URL {url!r} needs {e.name or 'a missing package'}: {hint}") from e
    except Exception as e:  # a third party's factory: say whose it is, not a traceback
        if _unreachable(e):  # fsspec's ftp:// connects as it opens: exit 7, not a typo's 2
            msg = f"store URL {url!r}: cannot reach the store: {e!r}"
            raise BackendUnavailableError(msg) from e
        raise ConfigError(f"store URL {url!r}: backend factory {target!r} failed: {e!r}") from e
    if not isinstance(backend, Backend):
        raise ConfigError(f"store URL {url!r}: {target!r} returned {backend!r}, not a Backend")
    return backend
