"""Configuration from the environment: good values open stores, bad ones name the variable."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from chroma_snapshots import (
    BackendUnavailableError,
    CachedStore,
    ConfigError,
    RemoteStore,
    SnapshotNotFoundError,
    StoreConfig,
    open_remote,
    open_store,
)
from chroma_snapshots.backends.cas import ConditionalWriteCheck, unchecked
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.testing.proxy import closed_endpoint


def test_url_wins() -> None:
    cfg = StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": "s3://b/p", "CHROMADB_STORAGE_MODE": "efs"})
    assert cfg.url == "s3://b/p"


def test_compatibility_modes(tmp_path: Path) -> None:
    env = {
        "CHROMADB_STORAGE_MODE": "S3",
        "CHROMADB_BUCKET": "bkt",
        "CHROMA_SNAPSHOTS_S3_TIMEOUT": "7.5",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
    }
    cfg = StoreConfig.from_env(env)
    assert (cfg.url, cfg.s3_timeout, cfg.s3_endpoint_url) == ("s3://bkt", 7.5, "http://127.0.0.1:9")
    store = open_remote(cfg)
    assert isinstance(store.backend, ConditionalWriteCheck)  # S3 CAS is checked before use
    s3 = unchecked(store.backend)
    assert isinstance(s3, S3Backend)
    assert s3.settings.read_timeout == 7.5
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert isinstance(open_remote(replace(cfg, unsafe_no_cas=True)).backend, S3Backend)
    efs = StoreConfig.from_env({"CHROMADB_STORAGE_MODE": "efs", "CHROMA_ROOT": str(tmp_path)})
    assert efs.url == f"efs://{tmp_path}"
    store = open_remote(efs)
    assert isinstance(store, RemoteStore)
    assert isinstance(store.backend, FileBackend)


@pytest.mark.parametrize(
    "name", ["efs%20data", "a#b", "a?b", "100%", "~x", "é", os.fsdecode(b"no-utf8-\xff")]
)
def test_chroma_root_is_a_path_whatever_its_characters(tmp_path: Path, name: str) -> None:
    root = tmp_path / name
    root.mkdir()
    cfg = StoreConfig.from_env({"CHROMADB_STORAGE_MODE": "efs", "CHROMA_ROOT": str(root)})
    backend = open_remote(cfg).backend
    assert isinstance(backend, FileBackend)
    assert backend.root == root  # not "efs data", "a" or a folder made beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("value", [" /mnt/efs", "/mnt/efs ", "/mnt/efs\n"])
def test_chroma_root_with_white_space_at_an_end_is_refused(value: str) -> None:
    # stripped, it would open another folder than the one named
    with pytest.raises(ConfigError, match="CHROMA_ROOT"):
        StoreConfig.from_env({"CHROMADB_STORAGE_MODE": "efs", "CHROMA_ROOT": value})


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "CHROMA_SNAPSHOTS_URL"),
        ({"CHROMA_SNAPSHOTS_URL": "bucket/prefix"}, "CHROMA_SNAPSHOTS_URL"),
        ({"CHROMADB_STORAGE_MODE": "ftp"}, "CHROMADB_STORAGE_MODE"),
        ({"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMADB_STORAGE_MODE": "bogus"}, "CHROMADB_STORAGE"),
        ({"CHROMADB_STORAGE_MODE": "auto"}, "CHROMADB_STORAGE_MODE"),
        ({"CHROMADB_STORAGE_MODE": "s3"}, "CHROMADB_BUCKET"),
        ({"CHROMADB_STORAGE_MODE": "s3", "CHROMADB_BUCKET": "a/b"}, "CHROMADB_BUCKET"),
        ({"CHROMADB_STORAGE_MODE": "efs"}, "CHROMA_ROOT"),
        ({"CHROMADB_STORAGE_MODE": "efs", "CHROMA_ROOT": "relative"}, "CHROMA_ROOT"),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_S3_TIMEOUT": "soon"},
            "CHROMA_SNAPSHOTS_S3_TIMEOUT",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_S3_TIMEOUT": "-1"},
            "CHROMA_SNAPSHOTS_S3_TIMEOUT",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_S3_TIMEOUT": "inf"},
            "CHROMA_SNAPSHOTS_S3_TIMEOUT",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL_S3": "localhost:9000"},
            "AWS_ENDPOINT_URL_S3",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_DIR": "tmp/c"},
            "CHROMA_SNAPSHOTS_CACHE_DIR",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": "4G"},
            "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": "0"},
            "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        ),
        # digits of other scripts: isdigit() says yes, int() of a superscript raises
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": "\u00b2"},
            "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": "\uff11\uff10"},
            "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_S3_TIMEOUT": "\u0665"},
            "CHROMA_SNAPSHOTS_S3_TIMEOUT",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_REFRESH_SECONDS": "\u0665"},
            "CHROMA_SNAPSHOTS_REFRESH_SECONDS",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL_S3": "http://h:9000/?a=b"},
            "AWS_ENDPOINT_URL_S3",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL_S3": "http://h:9000/bkt"},
            "AWS_ENDPOINT_URL_S3",
        ),
        # white space alone, or inside (botocore's raw ValueError: "a bug", exit 1)
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL_S3": " "},
            "AWS_ENDPOINT_URL_S3",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL": "http://h :9000"},
            "AWS_ENDPOINT_URL",
        ),
        # white space at an end, as --endpoint-url refuses it (it was stripped unseen)
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL_S3": "http://h:9000/ "},
            "AWS_ENDPOINT_URL_S3",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL": " http://h:9000"},
            "AWS_ENDPOINT_URL",
        ),
        # past what a signed 64-bit count holds, and past what int() reads at all
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": str(2**64)},
            "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        ),
        (
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": "9" * 4301},
            "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        StoreConfig.from_env(env)


def test_errors_quote_a_long_value_cut_short() -> None:
    env = {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_TIMEOUT": "5" * 5000}
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_TIMEOUT") as err:
        StoreConfig.from_env(env)
    assert len(str(err.value)) < 300


def test_bad_urls_are_config_errors() -> None:
    for url in ("s3://", "nosuch://x", "file://host/x"):
        with pytest.raises(ConfigError):
            open_remote(url)
    for url in ("s3://b/p?versionId=1", "s3://b/p#x", "file:///x?y", "fsspec+s3://b/p?versionId=1"):
        with pytest.raises(ConfigError, match="take no '\\?' or '#' part"):
            open_remote(url)  # never dropped silently, nor read by s3fs as an object version


def test_a_bucket_name_s3_cannot_have_through_s3fs_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with closed_endpoint() as url:
        store = open_remote(StoreConfig(url="fsspec+s3://bkt:80/p", s3_endpoint_url=url))
        with pytest.raises(ConfigError, match='Invalid bucket name "bkt:80"; fix the store URL'):
            list(store.names())  # as through botocore: a typo, not an outage (exit 7)


def test_cache_from_environment(tmp_path: Path) -> None:
    env = {
        "CHROMA_SNAPSHOTS_URL": f"file://{tmp_path}/store",
        "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
        "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": "1048576",
    }
    cfg = StoreConfig.from_env(env)
    store = open_store(cfg)
    assert isinstance(store, CachedStore)
    assert store.max_bytes == 1 << 20
    assert store.root.parent == tmp_path / "cache"
    assert isinstance(open_store(StoreConfig(url=cfg.url)), RemoteStore)
    assert isinstance(open_store(cfg.url, cache_dir=str(tmp_path / "c2")), CachedStore)


def test_missing_extra_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if the fsspec extra were missing
    with pytest.raises(ConfigError, match=r"pip install 'chroma-snapshots\[fsspec\]'"):
        open_remote("memory://x")


def test_store_url_replaces_only_the_url() -> None:
    env = {
        "CHROMADB_STORAGE_MODE": "auto",  # incomplete: would be a ConfigError if it were read
        "CHROMA_SNAPSHOTS_FALLBACK_URL": "s3://other/x",
        "CHROMA_SNAPSHOTS_S3_TIMEOUT": "4",
        "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS": "yes",
    }
    cfg = StoreConfig.from_env(env, url="s3://mine/p")
    assert (cfg.url, cfg.fallback_url, cfg.s3_timeout) == ("s3://mine/p", None, 4.0)
    assert cfg.unsafe_no_cas is True
    assert StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": "s3://b"}).unsafe_no_cas is False
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_UNSAFE_NO_CAS"):
        StoreConfig.from_env({"CHROMA_SNAPSHOTS_UNSAFE_NO_CAS": "maybe"}, url="s3://b")


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("s3:/my-bucket/chroma", "s3://my-bucket/chroma"),
        ("s3:my-bucket", "s3://my-bucket"),
        ("file:relative", "file:///relative"),
        ("efs:/x", "efs:///x"),
        ("fsspec+s3:b", "fsspec+s3://b"),
    ],
)
def test_a_scheme_without_slashes_names_the_fix(url: str, fix: str) -> None:
    with pytest.raises(ConfigError, match="did you mean") as e:
        StoreConfig(url=url)
    assert repr(fix) in str(e.value)
    assert f"./{url}" in str(e.value)  # and how to mean a local folder


def test_plain_paths_and_missing_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for path in ("relative/store", "./with:colon", str(tmp_path / "absolute")):
        with pytest.raises(SnapshotNotFoundError, match="does not exist"):
            open_remote(path, create=False)
        with pytest.raises(SnapshotNotFoundError, match="does not exist"):
            open_store(path, cache_dir=str(tmp_path / "cache"), create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, not even a cache
    store = open_remote("relative/store")  # the library default creates (publishing)
    assert isinstance(store.backend, FileBackend)
    assert (tmp_path / "relative" / "store").is_dir()
    assert store.label == str(tmp_path / "relative" / "store")  # caches key on where it is


@pytest.mark.parametrize(
    ("spellings", "endpoints"),
    [
        (["s3://bkt/snaps", "s3://bkt/snaps/", "s3://bkt//snaps", "S3://bkt/snaps"], [None]),
        (
            ["s3://bkt/snaps"],
            ["http://127.0.0.1:9000", "http://127.0.0.1:9000/", "HTTP://127.0.0.1:9000"],
        ),
        (["file://{tmp}/store", "file://{tmp}/store/", "file://{tmp}//store"], [None]),
        (  # s3fs reads s3a:// as s3://, its root without a slash at the end, and the
            # objects an s3:// store of the bucket and prefix names
            [
                "fsspec+s3://bkt/snaps",
                "fsspec+s3://bkt/snaps/",
                "fsspec+s3a://bkt/snaps",
                "s3://bkt/snaps",
            ],
            ["http://127.0.0.1:9000", "http://127.0.0.1:9000/"],
        ),
    ],
)
def test_spellings_of_one_store_share_one_cache_folder(
    tmp_path: Path, spellings: list[str], endpoints: list[str | None]
) -> None:
    (tmp_path / "store").mkdir()
    roots = {
        CachedStore(
            open_remote(StoreConfig(url=url.format(tmp=tmp_path), s3_endpoint_url=endpoint)),
            tmp_path / "cache",
        ).root
        for url in spellings
        for endpoint in endpoints
    }
    assert len(roots) == 1


def test_a_local_store_has_one_cache_folder_however_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path (absolute or relative), a file:// or efs:// URL, a FileBackend of the folder
    and the store opened offline are one store: one cache folder (each had its own)."""
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path)
    urls = [str(tmp_path / "store"), "store", f"file://{tmp_path}/store",
            f"file://{tmp_path}/./store/", f"efs://{tmp_path}/store"]  # fmt: skip
    stores = [open_remote(StoreConfig(url=u)) for u in urls]
    stores.append(RemoteStore(FileBackend(tmp_path / "store")))
    stores.append(open_remote(StoreConfig(url=str(tmp_path / "store"), offline=True)))
    assert len({CachedStore(s, tmp_path / "cache").root for s in stores}) == 1
    other = RemoteStore(FileBackend(tmp_path / "other"))  # another folder: another cache
    assert (
        CachedStore(other, tmp_path / "cache").root
        != CachedStore(stores[0], tmp_path / "cache").root
    )


def test_an_operation_timeout_past_what_a_clock_holds_is_a_config_error() -> None:
    env = {"CHROMA_SNAPSHOTS_URL": "memory://x", "CHROMA_SNAPSHOTS_TIMEOUT": "1e10"}
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_TIMEOUT='1e10' must be positive"):
        StoreConfig.from_env(env)


@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        *(("stale_after", v) for v in (0, -1.0, float("inf"), float("nan"), "3", True)),
        *(("refresh_seconds", v) for v in (-1, float("nan"), "5", True)),
        *(("max_bytes", v) for v in (-1, float("nan"), float("inf"), "1", True, 2**64, 1.5)),
        *(("min_free_bytes", v) for v in (0.5, float("nan"), "1", True)),
        # an int this long has no repr: neither the message nor the test's id may need it
        pytest.param("max_bytes", 10**5000, id="max_bytes-5000-digits"),
    ],
)
def test_cache_settings_that_would_quietly_do_something_else_are_refused(
    tmp_path: Path, setting: str, bad: object
) -> None:
    from chroma_snapshots.errors import InvalidInputError

    remote = RemoteStore(FileBackend(tmp_path / "store"))
    with pytest.raises(InvalidInputError, match=setting):
        CachedStore(remote, tmp_path / "cache", stale_ok=True, **{setting: bad})  # type: ignore[arg-type]


def test_the_endpoint_of_every_service_keys_the_store_as_botocore_reads_it() -> None:
    # AWS_ENDPOINT_URL (every service's) was left to botocore: the store connected to it,
    # but its cache was keyed without it, so the same bucket behind two servers shared one.
    a, b = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    base = {"CHROMA_SNAPSHOTS_URL": "s3://bkt/p"}
    identities = set()
    for url in (a, b):
        cfg = StoreConfig.from_env({**base, "AWS_ENDPOINT_URL": url})
        assert cfg.s3_endpoint_url == url
        identities.add(open_remote(cfg).identity)
    assert len(identities) == 2
    both = {**base, "AWS_ENDPOINT_URL": a, "AWS_ENDPOINT_URL_S3": b}
    assert StoreConfig.from_env(both).s3_endpoint_url == b  # the service's own wins
    ignored = {**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "TRUE"}
    assert StoreConfig.from_env(ignored).s3_endpoint_url is None
    for not_true in (" true", "true\n", "1"):  # not true to botocore either: it connects
        odd = {**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": not_true}
        assert StoreConfig.from_env(odd).s3_endpoint_url == b
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL="):
        StoreConfig.from_env({**base, "AWS_ENDPOINT_URL": "http://h:9000/bucket"})


def test_a_store_folder_named_in_bytes_that_are_no_utf8_is_cached_too(tmp_path: Path) -> None:
    root = tmp_path / os.fsdecode(b"store-\xff")
    remote = RemoteStore(FileBackend(root))
    src = tmp_path / "src"
    src.mkdir()
    (src / "chroma.sqlite3").write_bytes(b"rows" * 100)
    remote.publish("db", src)
    with CachedStore(remote, tmp_path / "cache").checkout("db") as snap:
        assert (snap.path / "chroma.sqlite3").read_bytes() == b"rows" * 100


A, B, C = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"


@pytest.mark.parametrize(
    ("conf", "option"),
    [
        ({"s3": {"endpoint_url": A}}, None),
        ({"s3": {"client_kwargs": {"endpoint_url": A}}}, None),
        ({"s3a": {"endpoint_url": A}}, None),
        ({"s3": {"endpoint_url": B}, "s3a": {"endpoint_url": A}}, None),
        ({"s3": {"endpoint_url": B}}, A),
        ({"s3": {"client_kwargs": {"endpoint_url": B}}}, A),
        ({}, A),
    ],
)
def test_fsspec_s_own_endpoint_settings_key_the_store_as_s3fs_reads_them(
    monkeypatch: pytest.MonkeyPatch, conf: dict[str, dict[str, object]], option: str | None
) -> None:
    # FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3 and fsspec's config files sent an fsspec+s3://
    # store to their endpoint, but its cache was keyed without it: one server's data was
    # served, offline or stale, as another's. Online and offline, the key is the endpoint
    # s3fs itself connects to (A every time, --region given or not). The option wins
    # (s3fs given it as well as fsspec's client_kwargs endpoint failed to make a client).
    import fsspec.config
    import s3fs

    from chroma_snapshots.backends.registry_factories import s3fs_endpoint, s3fs_options
    from chroma_snapshots.backends.s3 import S3Settings

    for protocol, settings in conf.items():
        monkeypatch.setitem(fsspec.config.conf, protocol, settings)
    for region in (None, "eu-west-1"):
        options = s3fs_options(S3Settings(endpoint_url=option, region=region))
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.connect()  # makes the client it would send requests with (contacts nothing)
        assert fs.s3.meta.endpoint_url == s3fs_endpoint(options) == A
    cfg = StoreConfig(url="fsspec+s3://bkt/p", s3_endpoint_url=option, s3_region="eu-west-1")
    keys = {open_remote(replace(cfg, offline=offline)).identity for offline in (False, True)}
    assert len(keys) == 1
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": C})
    monkeypatch.delitem(fsspec.config.conf, "s3a", raising=False)
    elsewhere = open_remote(replace(cfg, offline=True)).identity
    assert (elsewhere in keys) == (option is not None)  # the option wins over the config


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:9001/other", "http://h:9000/?x=1", "http://h:99999", "http://[::1",
     "h:9000", "http://user:secret@h:9000", 123],
)  # fmt: skip
@pytest.mark.parametrize("offline", [False, True])
def test_an_endpoint_from_fsspec_s_settings_is_checked_as_the_others_are(
    monkeypatch: pytest.MonkeyPatch, endpoint: object, offline: bool
) -> None:
    # from FSSPEC_S3_ENDPOINT_URL a path was taken as the bucket (a publish to
    # fsspec+s3://zzz/q wrote into "other"), and a bad port or bracket was an outage
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": endpoint}})
    cfg = StoreConfig(url="fsspec+s3://zzz/q", offline=offline)
    with pytest.raises(ConfigError, match="fsspec's S3 endpoint") as got:
        open_remote(cfg)
    assert "secret" not in str(got.value)


def test_one_bucket_on_two_servers_has_two_labels_naming_the_server() -> None:
    # fallback warnings and snap.source named both "s3://bkt/p": which one served was unsaid
    for url in ("s3://bkt/p", "fsspec+s3://bkt/p"):
        a, b = (open_remote(StoreConfig(url=url, s3_endpoint_url=at)).label for at in (A, B))
        assert (a, b) == (f"{url} at {A}", f"{url} at {B}")
    offline = open_remote(StoreConfig(url="s3://bkt/p/", s3_endpoint_url=A + "/", offline=True))
    assert offline.label == f"s3://bkt/p at {A}"
    # and its refusal says which server is not contacted (it named the bucket alone)
    refused = re.escape(f"s3://bkt/p at {A} is not contacted")
    with pytest.raises(BackendUnavailableError, match=refused):
        offline.resolve("db")


@pytest.mark.parametrize("when", ["before", "after"])
def test_fsspec_s_settings_changed_while_a_store_opens_cannot_split_its_key_from_its_server(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # fsspec's settings were read more than once while a store opened: by s3fs as it made
    # its filesystem, and again for the cache key. Another thread changing them in between
    # (here, deterministically, just before and just after s3fs is made) left the store
    # connected to one server with its cache keyed by another.
    import fsspec.config

    from chroma_snapshots.backends.fsspec import FsspecBackend

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": A})
    make = FsspecBackend.from_url.__func__  # type: ignore[attr-defined]

    def changing(cls: type[FsspecBackend], /, url: str, **options: object) -> FsspecBackend:
        if when == "before":
            monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": B})
        made: FsspecBackend = make(cls, url, skip_instance_cache=True, **options)
        if when == "after":
            monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": B})
        return made

    monkeypatch.setattr(FsspecBackend, "from_url", classmethod(changing))
    store = open_remote(StoreConfig(url="fsspec+s3://bkt/p"))
    assert isinstance(store.backend, ConditionalWriteCheck)
    inner = store.backend.inner
    assert isinstance(inner, FsspecBackend)
    inner.fs.connect()  # makes the client it would send requests with (contacts nothing)
    assert inner.fs.s3.meta.endpoint_url == A
    assert store.identity == f"s3://bkt/p\0{A}"  # the objects an s3:// store names
    assert store.label == f"fsspec+s3://bkt/p at {A}"


def test_one_bucket_through_s3fs_and_botocore_is_one_store_to_a_fallback() -> None:
    # s3fs reads s3a:// as s3://, and both name the objects an s3:// store names: a
    # fallback from one to the other falls back to itself
    from chroma_snapshots import FallbackStore, InvalidInputError

    for urls in (
        ("fsspec+s3://bkt/p", "fsspec+s3a://bkt/p/"),
        ("s3://bkt/p", "fsspec+s3://bkt/p"),  # the same objects through botocore and s3fs
        ("s3://bkt", "fsspec+s3a://bkt/"),
    ):
        a, b = (open_remote(StoreConfig(url=url, s3_endpoint_url=A)) for url in urls)
        with pytest.raises(InvalidInputError, match="twice"):
            FallbackStore([a, b])
    # s3fs keeps an empty segment that an s3:// URL drops: b//p is two storages there
    a, b = (
        open_remote(StoreConfig(url=url, s3_endpoint_url=A))
        for url in ("s3://bkt//p", "fsspec+s3://bkt//p")
    )
    assert len(FallbackStore([a, b]).stores) == 2
    # and one server's bucket is not another's
    a, b = (
        open_remote(StoreConfig(url=url, s3_endpoint_url=at))
        for url, at in (("s3://bkt/p", A), ("fsspec+s3://bkt/p", B))
    )
    assert len(FallbackStore([a, b]).stores) == 2


def test_backends_built_by_hand_are_the_storage_they_reach_to_a_fallback() -> None:
    """However a store over one bucket was made (a URL, an S3Backend or an s3fs filesystem
    built by hand, the endpoint with or without its slash, a label given by hand), a
    fallback from it to another over the same bucket on the same server is refused."""
    from chroma_snapshots import FallbackStore, InvalidInputError
    from chroma_snapshots.backends import open_backend
    from chroma_snapshots.backends.fsspec import FsspecBackend

    def by_hand(endpoint: str, label: str | None = None) -> RemoteStore:
        return RemoteStore(
            S3Backend("bkt", "p", settings=S3Settings(endpoint_url=endpoint)), label=label
        )

    through_s3fs = RemoteStore(
        FsspecBackend.from_url("s3://bkt/p", endpoint_url=A, skip_instance_cache=True)
    )
    opened = open_remote(StoreConfig(url="s3://bkt/p", s3_endpoint_url=A))
    wrapped = RemoteStore(open_backend("fsspec+s3://bkt/p", endpoint_url=A))
    host, port = A.rsplit(":", 1)
    for pair in (
        (by_hand(A), opened),
        (by_hand(A + "/"), opened),
        (by_hand(f"{host}.:0{port}"), opened),  # a trailing dot, a leading zero
        (through_s3fs, opened),
        (through_s3fs, by_hand(A)),
        (wrapped, by_hand(A)),  # the conditional-write check around it is no other place
        (by_hand(A, label="primary"), by_hand(A, label="mirror")),
    ):
        with pytest.raises(InvalidInputError, match=f"s3://bkt/p at {A} is among them twice"):
            FallbackStore(list(pair))
    for default in ("http://127.0.0.1", "https://127.0.0.1"):  # the scheme's own port
        port_given = f"{default}:{80 if default.startswith('http:') else 443}"
        with pytest.raises(InvalidInputError, match="twice"):
            FallbackStore([by_hand(default), by_hand(port_given)])
    for aws in ("https://s3.us-east-1.amazonaws.com", "https://s3.us-east-1.amazonaws.com."):
        with pytest.raises(InvalidInputError, match="twice"):  # AWS's own: one bucket there
            FallbackStore([by_hand(aws), RemoteStore(S3Backend("bkt", "p", settings=S3Settings()))])
    assert len(FallbackStore([by_hand(A), by_hand(B)]).stores) == 2  # two servers
    assert len(FallbackStore([by_hand(A), by_hand(A.replace("http:", "https:"))]).stores) == 2


@pytest.mark.parametrize("url", ["s3://bkt/p", "fsspec+s3://bkt/p"])
@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_a_hand_built_config_is_keyed_by_the_environment_s_endpoint_it_connects_to(
    monkeypatch: pytest.MonkeyPatch, url: str, variable: str
) -> None:
    # StoreConfig(url) names no endpoint, and botocore (through s3fs too) connected to the
    # environment's while the cache was keyed without one: a stale or offline read served
    # one server's bytes for another's
    keys = set()
    for at in (A, B):
        monkeypatch.setenv(variable, at)
        for offline in (False, True):
            store = open_remote(StoreConfig(url=url, offline=offline))
            assert store.label == f"{url} at {at}"
            keys.add(store.identity)
    assert len(keys) == 2
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")  # as botocore: none
    assert open_remote(StoreConfig(url=url, offline=True)).label == url


@pytest.mark.parametrize(
    "conf",
    [
        {"endpoint_url": A, "client_kwargs": {"endpoint_url": B}},  # s3fs: "multiple values"
        {"endpoint_url": ""},  # FSSPEC_S3_ENDPOINT_URL= : botocore's "Invalid endpoint"
        {"endpoint_url": A, "client_kwargs": {"endpoint_url": None}},  # the key is enough
        {"client_kwargs": "x"},  # s3fs dropped them and reached AWS
    ],
)
@pytest.mark.parametrize("offline", [False, True])
def test_fsspec_s_settings_that_s3fs_cannot_use_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, conf: dict[str, object], offline: bool
) -> None:
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    with pytest.raises(ConfigError, match="fsspec's S3"):
        open_remote(StoreConfig(url="fsspec+s3://bkt/p", offline=offline))


def test_a_hand_built_fsspec_backend_is_keyed_and_labelled_by_its_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RemoteStore(open_backend("fsspec+s3://...", endpoint_url=...)) took "FsspecBackend(s3,
    # 'bkt/p')" as its label and cache key whatever the server: a stale read served one
    # server's bytes for another's (an S3Backend's already named its endpoint)
    from chroma_snapshots.backends import open_backend

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    stores = {
        at: RemoteStore(
            open_backend("fsspec+s3://bkt/p", endpoint_url=at, skip_instance_cache=True)
        )
        for at in (A, B)
    }
    for at, store in stores.items():
        assert f"endpoint_url={at!r}" in store.label
    assert len({store.identity for store in stores.values()}) == 2
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", C)  # none given: botocore's, from the environment
    fs = open_backend("fsspec+s3://bkt/p", skip_instance_cache=True)
    assert f"endpoint_url={C!r}" in repr(fs)
    aws = open_backend("fsspec+s3://bkt/p", endpoint_url="https://s3.eu-west-1.amazonaws.com")
    assert "endpoint_url" not in repr(aws)  # AWS's own: one bucket name is on one of them


SECRET_SPELLINGS = [
    "http://user:s3cr3t@h:9000",
    "user:s3cr3t@h:9000",  # no scheme: the mask began at "//"
    "http:/user:s3cr3t@h",
    "http:user:s3cr3t@h",
    "http:\\user:s3cr3t@h",
    "http://h:9000/?token=s3cr3t",
    "http://user:s3cr3t\uff20h:9000",  # a full-width "@": urllib's error quoted it all
    "http://h:9000/\uff1ftoken=s3cr3t",
    "http://h:9000/#s3cr3t",
    "http://user:s3cr3t%40h:9000",
]


@pytest.mark.parametrize("endpoint", SECRET_SPELLINGS)
def test_an_endpoint_s_secret_is_never_echoed_however_it_is_spelled(
    monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    ways: list[Callable[[], object]] = [
        lambda: StoreConfig.from_env(
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "AWS_ENDPOINT_URL": endpoint}
        ),
        lambda: open_remote(StoreConfig(url="s3://b/p", s3_endpoint_url=endpoint)),
        lambda: S3Backend("b", "p", settings=S3Settings(endpoint_url=endpoint)),
    ]
    for way in ways:
        with pytest.raises(ConfigError) as got:
            way()
        assert "s3cr3t" not in str(got.value)


@pytest.mark.parametrize("value", [" ", "\t", "http://h :9000", "\u00a0http://h:9000"])
def test_a_hand_built_backend_on_a_bad_environment_endpoint_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # botocore reads the variable itself here: its ValueError was raised raw
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", value)
    with pytest.raises(ConfigError):
        RemoteStore(S3Backend("b", "p"))
    with pytest.raises(ConfigError):
        S3Backend("b", "p", settings=S3Settings(endpoint_url=value))


def test_aws_partitions_key_their_stores_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    # a bucket name is one bucket within a partition only: China's and GovCloud's stores
    # shared the main partition's cache folder (found by a review)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    ids = {
        region: open_remote(StoreConfig(url="s3://bkt/p", s3_region=region, offline=True)).identity
        for region in ("us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1")
    }
    assert ids["us-east-1"] == ids["eu-west-1"] == "s3://bkt/p"
    assert len({ids["us-east-1"], ids["cn-north-1"], ids["us-gov-west-1"]}) == 3


@pytest.mark.parametrize("offline", [False, True])
def test_a_profile_fsspec_s_settings_name_keys_the_store_by_its_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: bool
) -> None:
    # fsspec's own settings may name the profile s3fs uses (FSSPEC_S3_PROFILE): its
    # endpoint_url sent s3fs to that server while the cache was keyed without it
    import fsspec.config

    config = tmp_path / "aws-config"
    config.write_text(f"[profile a]\nendpoint_url = {A}\n[profile b]\nendpoint_url = {B}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    labels = set()
    for profile, at in (("a", A), ("b", B)):
        monkeypatch.setitem(fsspec.config.conf, "s3", {"profile": profile})
        store = open_remote(StoreConfig(url="fsspec+s3://bkt/p", offline=offline))
        assert store.label == f"fsspec+s3://bkt/p at {at}"
        labels.add(store.identity)
    assert len(labels) == 2
