"""Configuration: the only module that reads environment variables.

``StoreConfig.from_env()`` validates everything at start-up and raises
ConfigError naming the variable and the fix; ``opening.open_store`` turns a URL or a
config into a ready store. The CLI reads its configuration here too: ``--store``
is ``from_env(url=...)``, so every other variable applies to it exactly as to the
library.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from chroma_snapshots.backends import check_endpoint, check_store_url
from chroma_snapshots.engine.deadline import LAMBDA_MAX_SECONDS, MAX_SECONDS
from chroma_snapshots.engine.validation import number_in
from chroma_snapshots.errors import ConfigError, shown
from chroma_snapshots.values import (
    BYTES_RULE,
    SECONDS_RULE,
    check_cache_dir,
    check_lock_key,
    check_lock_table,
    is_bytes,
    is_seconds,
    parse_age,
    parse_seconds,
    whole,
)

ENV_URL = "CHROMA_SNAPSHOTS_URL"
ENV_MODE = "CHROMADB_STORAGE_MODE"
ENV_BUCKET = "CHROMADB_BUCKET"
ENV_ROOT = "CHROMA_ROOT"
ENV_S3_TIMEOUT = "CHROMA_SNAPSHOTS_S3_TIMEOUT"
ENV_EFS_TIMEOUT = "CHROMA_SNAPSHOTS_EFS_TIMEOUT"
ENV_TIMEOUT = "CHROMA_SNAPSHOTS_TIMEOUT"
ENV_FALLBACK = "CHROMA_SNAPSHOTS_FALLBACK_URL"
ENV_MIRROR = "CHROMA_SNAPSHOTS_MIRROR"
ENV_SIGNING = "CHROMA_SNAPSHOTS_SIGNING_KEY"
ENV_CACHE_DIR = "CHROMA_SNAPSHOTS_CACHE_DIR"
ENV_CACHE_MAX = "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES"
ENV_ENDPOINT = "AWS_ENDPOINT_URL_S3"
ENV_UNSAFE_NO_CAS = "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS"
ENV_STALE_OK = "CHROMA_SNAPSHOTS_STALE_OK"
ENV_REFRESH = "CHROMA_SNAPSHOTS_REFRESH_SECONDS"
ENV_OFFLINE = "CHROMA_SNAPSHOTS_OFFLINE"
ENV_TRUST_STAMPS = "CHROMA_SNAPSHOTS_TRUST_STAMPS"
ENV_CHUNK_HASH = "CHROMA_SNAPSHOTS_CHUNK_HASH"
ENV_DROP_BEHIND = "CHROMA_SNAPSHOTS_DROP_BEHIND"
# the Lambda handlers' (LambdaConfig)
ENV_NAME = "CHROMA_SNAPSHOTS_NAME"
ENV_RESERVE = "CHROMA_SNAPSHOTS_RESERVE_SECONDS"
ENV_PROCESSOR = "CHROMA_SNAPSHOTS_PROCESSOR"
ENV_SINK = "CHROMA_SNAPSHOTS_SINK"
ENV_LOCK_TABLE = "CHROMA_SNAPSHOTS_LOCK_TABLE"
ENV_LOCK_KEY = "CHROMA_SNAPSHOTS_LOCK_KEY"
ENV_METRICS = "CHROMA_SNAPSHOTS_METRICS_NAMESPACE"
ENV_RELEASE = "CHROMA_SNAPSHOTS_RELEASE_UNPROCESSED"
ENV_INIT = "CHROMA_SNAPSHOTS_INIT_SECONDS"
# every variable of ours: a near miss of one is refused (_misspelt), never ignored
_OURS = frozenset(v for k, v in dict(globals()).items() if k.startswith("ENV_"))
_PREFIX = "CHROMA_SNAPSHOTS_"
_SUFFIXES = {v.removeprefix(_PREFIX): v for v in _OURS if v.startswith(_PREFIX)}
_HASHES = ("blake3", "sha256")
_MODES = ("s3", "efs", "auto")
# text fields (cache_dir has its own rule, which takes a path object too: check_cache_dir)
_TEXT = ("url", "fallback_url", "signing_keys", "s3_endpoint_url", "s3_profile", "s3_region",
         "chunk_hash")  # fmt: skip
_FLAGS = ("mirror", "unsafe_no_cas", "stale_ok", "offline", "trust_stamps", "drop_behind")


@dataclass(frozen=True)
class StoreConfig:
    """Everything needed to open a store. Build it directly or with :meth:`from_env`.

    ``unsafe_no_cas`` lets publishes and ref moves proceed on an S3 endpoint that ignores
    conditional writes (see ``backends.cas``): only safe with a single writer."""

    url: str
    s3_timeout: float = 30.0
    efs_timeout: float = 10.0
    timeout: float = 600.0  # the deadline of an operation called without one
    fallback_url: str | None = None
    mirror: bool = False
    signing_keys: str | None = field(default=None, repr=False)  # secrets: never in a repr
    cache_dir: str | None = None
    cache_max_bytes: int | None = None
    s3_endpoint_url: str | None = None
    unsafe_no_cas: bool = False
    # The CLI's --profile/--region (boto3 reads AWS_PROFILE/AWS_REGION itself), --stale-ok.
    s3_profile: str | None = None
    s3_region: str | None = None
    stale_ok: bool = False
    # Read-consistency interval of the cache: trust a ref's answer this many seconds.
    refresh_seconds: float | None = None
    # Never contact the stores: serve from the cache what its refs last named (stale reads).
    offline: bool = False
    # Publish: trust the folder's stamp index for unchanged files (False: re-read them all).
    trust_stamps: bool = True
    # Publish: name new chunks by this hash (None: the parent's; BLAKE3 for a first version).
    chunk_hash: str | None = None
    # Checkout: drop what is written from the page cache as it goes (RemoteStore).
    drop_behind: bool = False

    def __post_init__(self) -> None:
        for name in _TEXT:  # before any is read as text: 5 raised AttributeError from .strip
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name != "url")):
                raise ConfigError(f"StoreConfig {name}={shown(value)} must be text")
        if self.mirror is True and self.fallback_url is None:
            raise ConfigError(
                f"StoreConfig mirror=True ({ENV_MIRROR}) copies each version to the other "
                f"store: name one (fallback_url, {ENV_FALLBACK} or {ENV_MODE}=auto)"
            )
        check_store_url(self.url)
        if self.fallback_url is not None:
            check_store_url(self.fallback_url, "fallback URL")
        if self.s3_endpoint_url is not None:
            check_endpoint(self.s3_endpoint_url, "S3 endpoint ")
        _check_fields(self)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, url: str | None = None
    ) -> StoreConfig:
        """Read and validate the configuration from ``environ`` (default: ``os.environ``).

        ``url`` (the CLI's ``--store``) replaces the store the environment names: the URL
        variables (and the fallback, which belongs to that store) are then not read; every
        other variable applies as usual."""
        env = os.environ if environ is None else _text_only(environ)
        _misspelt(env)
        main, fallback = (url, None) if url is not None else _urls_from_env(env)
        return cls(
            url=main,
            fallback_url=fallback,
            mirror=False if url is not None else _flag(env, ENV_MIRROR),  # the fallback's
            signing_keys=_signing(env),
            s3_timeout=_seconds(env, ENV_S3_TIMEOUT, 30.0),
            efs_timeout=_seconds(env, ENV_EFS_TIMEOUT, 10.0),
            timeout=_seconds(env, ENV_TIMEOUT, 600.0),
            cache_dir=_cache_dir(env),
            cache_max_bytes=_bytes(env, ENV_CACHE_MAX),
            s3_endpoint_url=_endpoint(env),
            unsafe_no_cas=_flag(env, ENV_UNSAFE_NO_CAS),
            stale_ok=_flag(env, ENV_STALE_OK),
            refresh_seconds=_refresh(env),
            offline=_flag(env, ENV_OFFLINE),
            trust_stamps=_flag(env, ENV_TRUST_STAMPS, default=True),
            chunk_hash=_chunk_hash(env),
            drop_behind=_flag(env, ENV_DROP_BEHIND),
        )


def _misspelt(env: Mapping[str, str]) -> None:
    """ConfigError for a variable that is a near miss of one of ours (a plural, a missing
    ``_`` or letter, ``CHROMA_SNAPSHOT_``): ignored, ``..._SIGNING_KEYS`` read unsigned data
    as trusted and ``..._CACHEDIR`` downloaded everything on every call."""
    for var in env:
        suffix = var.removeprefix(_PREFIX).removeprefix(_PREFIX[:-2] + "_")
        if var in _OURS or suffix == var:  # ours, or not named like ours at all
            continue
        import difflib  # here: 1.5 ms of every cold start otherwise

        near = difflib.get_close_matches(suffix, _SUFFIXES, n=1, cutoff=0.8)
        if near:
            raise ConfigError(
                f"{var} is not a variable chroma-snapshots reads: "
                f"did you mean {_SUFFIXES[near[0]]}?"
            )


def _text_only(environ: object) -> Mapping[str, str]:
    """``environ`` if it maps text to text, as the environment does, else ConfigError (a
    number as a value raised AttributeError from deep inside)."""
    if not isinstance(environ, Mapping):
        raise ConfigError(f"the environment must be a mapping, not {type(environ).__name__}")
    for k, v in environ.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"the environment's {shown(k)}={shown(v)} is not text")
    return environ


def _check_fields(cfg: StoreConfig) -> None:
    """A StoreConfig built in code is held to the environment's rules: a NaN timeout waited
    forever, ``True`` was one second and the flag ``"no"`` was on."""
    for name in ("s3_timeout", "efs_timeout", "timeout"):
        if not is_seconds(value := getattr(cfg, name)):
            raise ConfigError(f"StoreConfig {name}={shown(value)} {SECONDS_RULE}")
    if cfg.cache_max_bytes is not None and not is_bytes(cfg.cache_max_bytes):
        raise ConfigError(f"StoreConfig cache_max_bytes={shown(cfg.cache_max_bytes)} {BYTES_RULE}")
    refresh = cfg.refresh_seconds
    if refresh is not None and refresh != math.inf and not number_in(refresh, 0, MAX_SECONDS):
        raise ConfigError(  # inf: never, as the variable's "never"; else its range
            f"StoreConfig refresh_seconds={shown(refresh)} must be 0 to {MAX_SECONDS:.0e}, "
            "or math.inf (never)"
        )
    for name in _FLAGS:
        if not isinstance(value := getattr(cfg, name), bool):
            raise ConfigError(f"StoreConfig {name}={shown(value)} must be True or False")
    if cfg.cache_dir is not None:
        check_cache_dir(cfg.cache_dir, "StoreConfig cache_dir")
    if cfg.chunk_hash is not None and cfg.chunk_hash not in _HASHES:
        raise ConfigError(
            f"StoreConfig chunk_hash={shown(cfg.chunk_hash)} must be blake3 or sha256"
        )


def _env_url(env: Mapping[str, str], var: str) -> str | None:
    raw = env.get(var, "").strip()
    if not raw:
        return None
    check_store_url(raw, var)
    if "://" not in raw and not os.path.isabs(raw):  # relative to which directory?
        raise ConfigError(
            f"{var}={shown(raw)} is neither a URL nor an absolute path; e.g. s3://bucket/prefix"
        )
    return raw


def _urls_from_env(env: Mapping[str, str]) -> tuple[str, str | None]:
    """The store URL and, for EFS with S3 fallback, the fallback URL."""
    fallback = _env_url(env, ENV_FALLBACK)
    url = _env_url(env, ENV_URL)
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode and mode not in _MODES:  # even beside a URL: a typo is never silently ignored
        raise ConfigError(f"{ENV_MODE}={mode!r} is invalid; use one of {', '.join(_MODES)}")
    if url:
        return url, fallback
    if not mode:
        raise ConfigError(f"set {ENV_URL} (e.g. s3://bucket/prefix) or {ENV_MODE}=s3|efs|auto")
    if mode == "s3":
        return _s3_url(env, mode), fallback
    efs = _efs_url(env, mode)
    # auto: EFS first, S3 (the source of truth) when EFS is slow or down
    return (efs, _s3_url(env, mode)) if mode == "auto" else (efs, fallback)


def _s3_url(env: Mapping[str, str], mode: str) -> str:
    bucket = env.get(ENV_BUCKET, "").strip()
    if not bucket or "/" in bucket:
        raise ConfigError(f"{ENV_MODE}={mode} needs {ENV_BUCKET} set to a bucket name")
    return f"s3://{bucket}"


def _efs_url(env: Mapping[str, str], mode: str) -> str:
    raw = env.get(ENV_ROOT, "")
    root = raw.strip()
    if not root.startswith("/"):
        raise ConfigError(f"{ENV_MODE}={mode} needs {ENV_ROOT} set to the mount's absolute path")
    if root != raw:  # "/mnt/efs " would open "/mnt/efs", a folder the value does not name
        raise ConfigError(f"{ENV_ROOT}={raw!r} starts or ends with white space")
    # a path, not a URL: quoted, so '%20', '#' or '?' in a folder's name stay that name,
    # and bytes that are no UTF-8 (held as surrogates, as os.environ holds them) those bytes
    return f"efs://{quote(root, errors='surrogateescape')}"


def _signing(env: Mapping[str, str]) -> str | None:
    from chroma_snapshots.engine.signing import Signer

    raw = env.get(ENV_SIGNING, "").strip()
    if raw:
        Signer.from_spec(raw, ENV_SIGNING)  # validate now: a bad key fails at start-up
    return raw or None


def _flag(env: Mapping[str, str], var: str, *, default: bool = False) -> bool:
    raw = env.get(var, "").strip().lower()
    if raw not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"{var}={shown(raw)} must be true or false")
    return default if not raw else raw in ("1", "true", "yes")


def _number_text(env: Mapping[str, str], var: str) -> str:
    """``var``'s value without the ASCII white space around it; other white space stays,
    and makes it no number (str.strip would take a no-break space away unseen)."""
    return env.get(var, "").strip(" \t\n\r\x0b\x0c")


def _seconds(env: Mapping[str, str], var: str, default: float) -> float:
    raw = _number_text(env, var)
    return parse_seconds(raw, var) if raw else default


def _chunk_hash(env: Mapping[str, str]) -> str | None:
    given = env.get(ENV_CHUNK_HASH, "")
    raw = given.strip().lower()
    if raw and raw not in _HASHES:
        raise ConfigError(f"{ENV_CHUNK_HASH}={shown(given)} must be blake3 or sha256")
    return raw or None


def _refresh(env: Mapping[str, str]) -> float | None:
    """Seconds to trust a ref's answer: unset reads it every time, ``never`` once."""
    raw = _number_text(env, ENV_REFRESH).lower()
    if not raw:
        return None
    if raw == "never":
        return math.inf
    return parse_age(raw, ENV_REFRESH, other=", or 'never'")


def _budget(env: Mapping[str, str], var: str) -> float:
    """Seconds of an optional budget: unset or 0 turns it off."""
    return 0.0 if _number_text(env, var) in ("", "0") else _seconds(env, var, 0.0)


def _cache_dir(env: Mapping[str, str]) -> str | None:
    raw = env.get(ENV_CACHE_DIR, "").strip()
    return check_cache_dir(raw, ENV_CACHE_DIR) if raw else None


def _bytes(env: Mapping[str, str], var: str) -> int | None:
    raw = _number_text(env, var)
    if not raw:
        return None
    value = whole(raw, 19)
    if value is None or not is_bytes(value):
        raise ConfigError(f"{var}={shown(raw)} {BYTES_RULE}")
    return value


def environment_cache_dir() -> str | None:
    """The cache folder this process's environment names (``CHROMA_SNAPSHOTS_CACHE_DIR``),
    so that an error about a folder can say where it was named; None if none or invalid."""
    try:
        return _cache_dir(os.environ)
    except ConfigError:
        return None


def environment_endpoint() -> str | None:
    """The S3 endpoint botocore takes from this process's environment when a store's
    configuration names none (a StoreConfig built by hand): the store is keyed and labelled
    by the endpoint it connects to, not by the absence of one."""
    return _endpoint(os.environ)


def _endpoint(env: Mapping[str, str]) -> str | None:
    """The S3 endpoint botocore would take from the environment (its service variable, then
    the one for every service, unless told to ignore both), read here so that it keys the
    store's cache: the same bucket behind two endpoints is two stores."""
    # botocore's own test, exactly: " true" is not true to it, so not here either (it would
    # connect to the endpoint while the cache was keyed without it)
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    for var in (ENV_ENDPOINT, "AWS_ENDPOINT_URL"):
        raw = env.get(var, "")
        if raw:  # checked as given, as --endpoint-url is (botocore reads " " as a URL)
            check_endpoint(raw, f"{var}=")
            return raw
    return None


@dataclass(frozen=True)
class LambdaConfig:
    """What the bundled Lambda handlers need, on top of the store configuration."""

    store: StoreConfig
    name: str
    reserve: float = 10.0
    processor: str | None = None
    sink: str | None = None
    lock_table: str | None = None
    lock_key: str | None = None
    metrics_namespace: str | None = None
    release_unprocessed: bool = False
    init_seconds: float = 0.0  # check the snapshot out during init, within this budget

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LambdaConfig:
        """Read and validate the handler configuration (a cache dir defaults to /tmp)."""
        from chroma_snapshots.engine.validation import check_name

        env = os.environ if environ is None else environ
        store = StoreConfig.from_env(env)
        if store.cache_dir is None:
            store = replace(store, cache_dir="/tmp/chroma-snapshots")
        name = env.get(ENV_NAME, "").strip()
        try:
            check_name(name)
        except ValueError as e:
            raise ConfigError(f"{ENV_NAME}={name!r}: {e}") from None
        for var in (ENV_PROCESSOR, ENV_SINK):
            raw = env.get(var, "").strip()
            if raw and (raw.count(":") != 1 or "" in (p.strip() for p in raw.split(":"))):
                raise ConfigError(f"{var}={shown(raw)} must be module:function")
        if env.get(ENV_LOCK_TABLE) and env.get(ENV_LOCK_KEY):
            raise ConfigError(f"set {ENV_LOCK_TABLE} or {ENV_LOCK_KEY}, not both")
        check_lock_key(env.get(ENV_LOCK_KEY, "").strip(), name, ENV_LOCK_KEY)
        check_lock_table(env.get(ENV_LOCK_TABLE, "").strip(), ENV_LOCK_TABLE)
        return cls(
            store=store,
            name=name,
            reserve=_reserve(env),
            processor=env.get(ENV_PROCESSOR, "").strip() or None,
            sink=env.get(ENV_SINK, "").strip() or None,
            lock_table=env.get(ENV_LOCK_TABLE, "").strip() or None,
            lock_key=env.get(ENV_LOCK_KEY, "").strip() or None,
            metrics_namespace=env.get(ENV_METRICS, "").strip() or None,
            release_unprocessed=_flag(env, ENV_RELEASE),
            init_seconds=_init_budget(env),
        )


def _reserve(env: Mapping[str, str]) -> float:
    """The reserve, less than Lambda's longest invocation: one that long leaves no time to
    start any message, and every invocation left its whole batch for a retry (then the
    dead-letter queue)."""
    reserve = _seconds(env, ENV_RESERVE, 10.0)
    if reserve >= LAMBDA_MAX_SECONDS:
        raise ConfigError(
            f"{ENV_RESERVE}={shown(env[ENV_RESERVE].strip())} leaves no time for any message: a "
            f"Lambda runs at most {LAMBDA_MAX_SECONDS:.0f} s (the default reserve is 10)"
        )
    return reserve


MAX_INIT_SECONDS = 10.0
"""Lambda's limit on the init phase (imports included): an init that takes longer is cut
off and run again during the first invocation, paying the imports and the checkout twice."""


def _init_budget(env: Mapping[str, str]) -> float:
    seconds = _budget(env, ENV_INIT)
    if seconds > MAX_INIT_SECONDS:
        raise ConfigError(
            f"{ENV_INIT}={env.get(ENV_INIT, '').strip()!r} is above Lambda's "
            f"{MAX_INIT_SECONDS:g} s init phase limit (which the imports count against too): "
            "use less, e.g. 8"
        )
    return seconds
