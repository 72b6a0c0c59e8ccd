"""Opening stores: a URL or a StoreConfig turned into a ready RemoteStore, source store
(with its fallback) or CachedStore. The settings come from :mod:`chroma_snapshots.config`,
the one module that reads the environment."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from chroma_snapshots.backends import check_store_url
from chroma_snapshots.backends.endpoints import endpoint_label, s3_place, s3fs_path
from chroma_snapshots.config import (
    ENV_CACHE_DIR,
    ENV_STALE_OK,
    StoreConfig,
    environment_cache_dir,
    environment_endpoint,
)
from chroma_snapshots.errors import ConfigError, InvalidInputError, shown

if TYPE_CHECKING:
    from pathlib import Path

    from chroma_snapshots.backends.base import Backend
    from chroma_snapshots.backends.s3 import S3Settings
    from chroma_snapshots.stores.base import SnapshotStore, SourceStore
    from chroma_snapshots.stores.remote import RemoteStore


def _config(target: str | StoreConfig | None, create: bool) -> StoreConfig:
    # A URL replaces only the store the environment names, as the CLI's --store does: a
    # signing key or timeout configured for the process must not be dropped because the
    # caller named the store (a StoreConfig is taken as it is).
    if not isinstance(create, bool):  # "no" is true: it made the store it was told not to
        raise InvalidInputError(f"create={shown(create)} must be True or False")
    if target is None or isinstance(target, str):
        return StoreConfig.from_env(url=target)
    if not isinstance(target, StoreConfig):
        raise InvalidInputError(
            f"a store is opened from a URL, a StoreConfig or None, not {type(target).__name__}"
        )
    return target


def open_remote(target: str | StoreConfig | None = None, *, create: bool = True) -> RemoteStore:
    """The RemoteStore at a URL (other settings from the environment, as in
    :func:`open_store`), from a config, or (``None``) from the environment; no cache,
    no fallback (the fallback URL, if configured, is ignored). ``create=False``: a local store
    directory that does not exist is SnapshotNotFoundError instead of being created."""
    cfg = _config(target, create)
    return remote_for(cfg, cfg.url, create=create)


def remote_for(cfg: StoreConfig, url: str, *, create: bool = True) -> RemoteStore:
    """The RemoteStore at ``url`` with ``cfg``'s timeouts, endpoint, keys and CAS policy."""
    from chroma_snapshots.backends import open_backend
    from chroma_snapshots.backends.s3 import S3Settings
    from chroma_snapshots.engine.signing import Signer
    from chroma_snapshots.stores.remote import RemoteStore

    settings = S3Settings(
        # botocore reads the environment's endpoint when none is given: key by it too
        endpoint_url=cfg.s3_endpoint_url or environment_endpoint(),
        region=cfg.s3_region,
        profile=cfg.s3_profile,
        read_timeout=cfg.s3_timeout,
        connect_timeout=min(5.0, cfg.s3_timeout),
    )
    # the identity keys the cache: one per store (one cache folder) however it is spelled,
    # and a relative path names a different store in another directory
    label = _label(url)
    # s3fs's settings, read once: the store connects to the endpoint its cache is keyed by
    s3fs = _s3fs_options(label, settings)
    s3 = _s3_client(label, settings)
    # ... and the endpoint: the same bucket behind two endpoints is two stores, and their
    # labels (messages, snap.source, offline refusals) say which is which
    endpoint = _endpoint(label, settings, s3fs, s3)
    identity = s3_place(_same_store(label), endpoint)
    if endpoint:
        label = f"{label} at {endpoint_label(endpoint)}"
    if cfg.offline:
        backend = _offline(url, label)
    else:
        backend = open_backend(
            url,
            s3_settings=settings,
            efs_timeout=cfg.efs_timeout,
            create=create,
            unsafe_no_cas=cfg.unsafe_no_cas,
            **s3fs,
            **s3,
        )
    signer = Signer.from_spec(cfg.signing_keys) if cfg.signing_keys else None
    if "://" not in url or url.split("://", 1)[0].lower() in ("file", "efs"):
        from chroma_snapshots.backends.file import local_place
        from chroma_snapshots.backends.registry_factories import local_path

        identity = local_place(local_path(url))  # as FileBackend.place: offline too
    return RemoteStore(
        backend,
        label=label,
        signer=signer,
        identity=identity,
        trust_stamps=cfg.trust_stamps,
        default_timeout=cfg.timeout,
        chunk_hash=cfg.chunk_hash,
        drop_behind=cfg.drop_behind,
    )


def _label(url: str) -> str:
    """One spelling of the store ``url`` names: the scheme in lower case, no slash around an
    S3 prefix, a normalized path (``s3://b/p/``, ``S3://b//p`` and ``s3://b/p`` are one
    store, so they share one cache folder and one cache budget)."""
    if "://" not in url:
        from chroma_snapshots.backends.registry_factories import local_path

        return os.path.abspath(local_path(url))  # "~/x" is the home folder's x
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
    if scheme in ("file", "efs") and rest.startswith("/"):
        return f"{scheme}://{os.path.normpath(rest)}"
    return f"{scheme}://{rest}"


_THROUGH_S3FS = ("fsspec+s3", "fsspec+s3a")  # s3fs reads both schemes alike


def _s3fs_options(label: str, settings: S3Settings) -> dict[str, Any]:
    """What s3fs is given for a store reached through it (backends.registry_factories), else
    nothing."""
    if label.split("://", 1)[0] not in _THROUGH_S3FS:
        return {}
    from chroma_snapshots.backends.registry_factories import s3fs_endpoint, s3fs_options

    options = s3fs_options(settings)
    if s3fs_endpoint(options) is None:  # s3fs's botocore would settle on it: name it
        # for the profile s3fs is given, which fsspec's own settings may name
        profile = options.get("profile") or settings.profile
        options["endpoint_url"] = _configured_endpoint(replace(settings, profile=profile), None)
    return options


def _s3_client(label: str, settings: S3Settings) -> dict[str, Any]:
    """For a store at an ``s3://`` label, its botocore client (made here; it contacts
    nothing), so the endpoint that keys the store is the one the client settled on; else
    nothing."""
    if not label.startswith("s3://"):
        return {}
    from chroma_snapshots.backends.s3client import make_client

    return {"client": make_client(settings)}


def _endpoint(
    label: str, settings: S3Settings, s3fs: dict[str, Any], s3: dict[str, Any]
) -> str | None:
    """The endpoint a store at ``label`` reaches, known without contacting it: for S3 the
    setting (--endpoint-url, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL), else where botocore
    settled from the AWS configuration (a profile's ``endpoint_url``, a ``[services]``
    section; ``ignore_configured_endpoint_urls`` honoured), AWS's own endpoint naming
    nothing; for a store through s3fs what its options (with fsspec's settings) name."""
    if s3:
        return settings.endpoint_url or _configured_endpoint(settings, s3["client"])
    if s3fs:
        from chroma_snapshots.backends.registry_factories import s3fs_endpoint

        return s3fs_endpoint(s3fs)
    return None


def _configured_endpoint(settings: S3Settings, client: Any) -> str | None:
    """Where botocore (``client``, or one made here: it contacts nothing) settles with no
    endpoint given: a profile's ``endpoint_url`` or a ``[services]`` section of the AWS
    configuration, ``ignore_configured_endpoint_urls`` honoured. AWS's own names none:
    one bucket name is one bucket there."""
    from chroma_snapshots.backends.endpoints import is_aws_endpoint
    from chroma_snapshots.backends.s3client import make_client

    reached = str((client or make_client(settings)).meta.endpoint_url)
    return None if is_aws_endpoint(reached) else reached


def _same_store(label: str) -> str:
    """``label`` as the cache keys it: s3fs reads ``s3a://`` as ``s3://``, and a slash at
    the end of its path names the same folder. A path with no empty segment names the
    objects an ``s3://`` store of the same spelling names (bucket, then the keys): one
    storage, one key. Not ``b//p``: s3fs keeps the empty segment, an ``s3://`` label drops
    it (``_label``)."""
    scheme, _, rest = label.partition("://")
    if scheme in _THROUGH_S3FS:
        return s3fs_path(rest) or label
    return label


def _offline(url: str, label: str) -> Backend:
    """The stand-in for the store at ``url`` that is not contacted (``offline``); its
    refusals name it by ``label`` (with the endpoint)."""
    from chroma_snapshots.backends.offline import OfflineBackend

    check_store_url(url)
    return OfflineBackend(label)


def source_for(cfg: StoreConfig, *, create: bool = True) -> SourceStore:
    """The store ``cfg`` names without the cache: its RemoteStore, or a FallbackStore."""
    primary = remote_for(cfg, cfg.url, create=create)
    if cfg.fallback_url is None:
        return primary
    from chroma_snapshots.stores.fallback import FallbackStore

    fallback = remote_for(cfg, cfg.fallback_url, create=create)
    return FallbackStore([primary, fallback], mirror=cfg.mirror)


def open_store(
    target: str | StoreConfig | None = None, *, cache_dir: str | None = None, create: bool = True
) -> SnapshotStore:
    """Open the store at a URL, from a config, or (``None``) from the environment. With a
    URL, every other setting still comes from the environment (signing key, timeouts,
    cache directory, ...), as with the CLI's ``--store``; a StoreConfig is used as given.

    With a cache directory (argument or ``CHROMA_SNAPSHOTS_CACHE_DIR``) the store is a
    CachedStore around the source store; otherwise the source store itself. ``create=False``:
    a local store directory that does not exist is SnapshotNotFoundError (read-only use).
    """
    cfg = _config(target, create)
    cache: str | os.PathLike[str] | None = cfg.cache_dir
    if cache_dir is not None:  # CachedStore's rule, said before a local store is made
        from chroma_snapshots.stores.cache.store import cache_folder

        cache = cache_folder(cache_dir)  # "" too: no folder, not "no cache"
    if cache is None and cfg.stale_ok:  # a stale read is the cache's: it was ignored
        raise ConfigError(
            f"stale_ok ({ENV_STALE_OK}, --stale-ok) serves a cached copy when the store does "
            f"not answer: it needs a cache ({ENV_CACHE_DIR}, --cache-dir or cache_dir)"
        )
    source = source_for(cfg, create=create)
    if cache is None:
        return source
    from chroma_snapshots.stores.cache import CachedStore

    stale_ok = cfg.stale_ok or cfg.offline  # offline: every read is an outage's stale read
    try:
        return CachedStore(
            source,
            cache,
            max_bytes=cfg.cache_max_bytes,
            stale_ok=stale_ok,
            refresh_seconds=cfg.refresh_seconds,
        )
    except (OSError, ConfigError) as e:  # unusable, untrusted: say where it was named
        if str(cache) != environment_cache_dir():
            raise
        raise _named_by_environment(e) from e


def _named_by_environment(e: OSError | ConfigError) -> Exception:
    """``e`` (about the cache folder) saying that CHROMA_SNAPSHOTS_CACHE_DIR named it."""
    said = f"(the folder {ENV_CACHE_DIR} names)"
    if isinstance(e, OSError):
        return type(e)(e.errno, f"{e.strerror} {said}", e.filename)
    return type(e)(f"{e} {said}")


def check_publish_folders(directory: str | Path, cfg: StoreConfig) -> None:
    """What a publish of ``directory`` would refuse about the folders of ``cfg``'s stores
    and cache (stores/publish_input.check_apart), found before any is opened: opening one makes
    its folder, which would land inside ``directory``. Only local stores (a path or a
    ``file://`` URL) are looked at here; an ``efs://`` store's folder is never made by
    opening it, its mount may hang, and the publish checks it through its guard."""
    from pathlib import Path

    from chroma_snapshots.backends.registry_factories import local_path
    from chroma_snapshots.engine.apart import KeptOut, place_of, store_folder
    from chroma_snapshots.stores.cache.store import check_own_folder
    from chroma_snapshots.stores.publish_input import check_apart, checked_source

    directory = checked_source(directory)
    folders = [
        store_folder(place_of(local_path(url)))
        for url in (cfg.url, cfg.fallback_url)
        if url and ("://" not in url or urlsplit(url).scheme.lower() == "file")
    ]
    if cfg.cache_dir:
        # what making the cache would refuse, said by a dry run and `status` too
        check_own_folder(Path(cfg.cache_dir), tuple(k.place for k in folders))
        folders.append(KeptOut(place_of(cfg.cache_dir), "the cache's folder", both_ways=False))
    check_apart(directory, folders)
