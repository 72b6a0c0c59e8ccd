"""Inputs an independent review found escaping the documented errors, or worse: an
``expected`` of the wrong type turned a publish's compare-and-swap off."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from chroma_snapshots import (
    ANY,
    LATEST,
    CachedStore,
    ConfigError,
    ConflictError,
    Deadline,
    InvalidInputError,
    LocalDiskError,
    RemoteStore,
    StoreConfig,
    open_backend,
    open_store,
    wait_for_cleanups,
)
from chroma_snapshots.cli.main import main
from chroma_snapshots.engine.apart import STORE_MARKER
from chroma_snapshots.testing.conformance import write_tree


def _store(tmp_path: Path) -> RemoteStore:
    (tmp_path / "store").mkdir(exist_ok=True)
    return RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))


@pytest.mark.parametrize("expected", [b"v1", 0, 1, True, 0.5, ["x"], float("nan")])
def test_an_expected_that_is_not_a_version_id_is_refused_not_ignored(
    tmp_path: Path, expected: object
) -> None:
    store = _store(tmp_path)
    v1 = store.publish("db", write_tree(tmp_path / "a", {"f": b"1"}))
    v2 = store.publish("db", write_tree(tmp_path / "b", {"f": b"2"}))
    wrong = v1.version.encode() if expected == b"v1" else expected
    with pytest.raises(InvalidInputError, match="expected must be"):
        store.publish("db", write_tree(tmp_path / "c", {"f": b"3"}), expected=wrong)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="expected must be"):
        store.set_ref("db", "latest", v1.version, expected=wrong)  # type: ignore[arg-type]
    found = store.read_ref("db")
    assert found is not None
    assert found[0].version == v2.version  # latest did not move
    with pytest.raises(ConflictError):  # the right type still compares
        store.publish("db", write_tree(tmp_path / "d", {"f": b"4"}), expected=v1.version)
    for ok in (LATEST, ANY):  # and the sentinels still write
        assert store.publish(
            "db", write_tree(tmp_path / f"e{ok}", {"f": str(ok).encode()}), expected=ok
        )


@pytest.mark.parametrize("seconds", [10**400, -(10**400)])
def test_a_deadline_past_any_float_is_invalid_input(tmp_path: Path, seconds: int) -> None:
    with pytest.raises(InvalidInputError):
        Deadline(seconds)
    with pytest.raises(InvalidInputError):
        _store(tmp_path).resolve("db", deadline=seconds)
    with pytest.raises(InvalidInputError):
        wait_for_cleanups(seconds)


@pytest.mark.parametrize(
    ("message", "metadata"), [("\udcff", None), (None, {"k": "\udcff"}), (b"m", None)]
)
def test_a_message_or_metadata_utf8_cannot_hold_is_invalid_input(
    tmp_path: Path, message: object, metadata: dict[str, object] | None
) -> None:
    store = _store(tmp_path)
    src = write_tree(tmp_path / "src", {"f": b"1"})
    with pytest.raises(InvalidInputError):
        store.publish("db", src, message=message, metadata=metadata)  # type: ignore[arg-type]
    assert store.read_ref("db") is None


def test_a_source_path_too_long_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot be read"):
        _store(tmp_path).publish("db", tmp_path / ("a" * 300))


def _cached(tmp_path: Path) -> tuple[CachedStore, str]:
    """A cache holding one version of ``db``, released."""
    store = _store(tmp_path)
    store.publish("db", write_tree(tmp_path / "src", {"f": b"1"}))
    cache = CachedStore(store, tmp_path / "cache")
    with cache.checkout("db") as snap:
        return cache, snap.info.version


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("version", ["x" * 5000, "v\0", "../x", "", 5, None])
def test_a_cache_call_naming_no_version_id_is_invalid_input_and_touches_nothing(
    tmp_path: Path, version: object
) -> None:
    cache, cached = _cached(tmp_path)
    before = _tree(tmp_path / "cache")
    calls = (cache.evict, cache.hold, cache.cached_manifest)
    for call in calls:
        with pytest.raises(InvalidInputError, match="version id"):
            call("db", version)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="snapshot name"):  # as everywhere
            call("../db", cached)
    assert _tree(tmp_path / "cache") == before  # no lock file, not even a folder for one
    assert cache.cached_manifest("db", cached) is not None
    assert cache.evict("db", cached)


@pytest.mark.parametrize(
    "timeout",
    [float("nan"), -1, -0.5, float("inf"), "1", True, pytest.param(10**400, id="10**400")],
)
def test_holds_timeout_is_checked_as_a_deadline_and_never_negative(
    tmp_path: Path, timeout: object
) -> None:
    cache, version = _cached(tmp_path)
    with pytest.raises(InvalidInputError, match="hold's timeout"):
        cache.hold("db", version, timeout)  # type: ignore[arg-type]
    assert not cache.dirs("db").pinned(version)
    held = cache.hold("db", version, 0.5)
    assert held is not None
    held[1].unlink()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("min_free_bytes", float("nan")),
        ("min_free_bytes", float("inf")),
        ("min_free_bytes", "1"),
        ("min_free_bytes", True),
        ("stale_ok", "no"),
        ("patch_in_place", 0),
    ],
)
def test_a_cache_setting_that_means_nothing_is_invalid_input(
    tmp_path: Path, setting: str, value: object
) -> None:
    store = _store(tmp_path)
    with pytest.raises(InvalidInputError, match=setting):
        CachedStore(store, tmp_path / "cache", **{setting: value})  # type: ignore[arg-type]
    assert not (tmp_path / "cache").exists()
    # a negative margin is a setting: the disk's own ENOSPC decides (tests fool the check)
    CachedStore(store, tmp_path / "cache", min_free_bytes=-(1 << 40), refresh_seconds=math.inf)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout", float("nan")),
        ("timeout", True),
        ("s3_timeout", -1),
        ("efs_timeout", "10"),
        ("timeout", float("inf")),
        ("cache_max_bytes", -5),
        ("cache_max_bytes", 1.5),
        ("refresh_seconds", float("nan")),
        ("refresh_seconds", -1),
        ("mirror", "no"),
        ("offline", 1),
    ],
)
def test_a_store_config_field_that_means_nothing_is_a_config_error(
    field: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=f"StoreConfig {field}="):
        StoreConfig("s3://b", **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"StoreConfig {field}="):  # as the CLI changes one
        replace(StoreConfig("s3://b"), **{field: value})  # type: ignore[arg-type]
    StoreConfig("s3://b", timeout=1, cache_max_bytes=1, refresh_seconds=math.inf, mirror=True,
                fallback_url="s3://c")  # fmt: skip


def test_a_relative_cache_dir_is_refused_by_the_flag_as_by_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path)
    store.publish("db", write_tree(tmp_path / "src", {"f": b"1"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHROMA_SNAPSHOTS_CACHE_DIR", raising=False)
    base = ["--store", str(tmp_path / "store")]
    assert main([*base, "--cache-dir", "rel", "checkout", "db"]) == 2
    assert "--cache-dir='rel' must be an absolute path" in capsys.readouterr().err
    monkeypatch.setenv("CHROMA_SNAPSHOTS_CACHE_DIR", "rel")
    assert main([*base, "checkout", "db"]) == 2
    assert "CHROMA_SNAPSHOTS_CACHE_DIR='rel' must be an absolute path" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="StoreConfig cache_dir='rel'"):
        StoreConfig(str(tmp_path / "store"), cache_dir="rel")
    assert not (tmp_path / "rel").exists()


@pytest.mark.parametrize("source", ["", None, b"src"])
def test_an_empty_source_is_refused_not_read_as_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: object
) -> None:
    store = _store(tmp_path)
    monkeypatch.chdir(write_tree(tmp_path / "src", {"f": b"1"}))
    for publisher in (store, CachedStore(store, tmp_path / "cache")):
        with pytest.raises(InvalidInputError, match="source directory"):
            publisher.publish("db", source)  # type: ignore[arg-type]
    assert store.read_ref("db") is None
    assert store.publish("db", ".").file_count == 1  # the working directory, said so


@pytest.mark.parametrize("spelling", ["~/stores/x", "file://~/stores/x"])
def test_a_store_under_tilde_is_in_the_home_folder_not_a_folder_named_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    store = open_store(StoreConfig(spelling))
    info = store.publish("db", write_tree(tmp_path / "src", {"f": b"1"}))
    assert not (tmp_path / "cwd" / "~").exists()
    home = open_store(StoreConfig(str(tmp_path / "home" / "stores" / "x")), create=False)
    assert home.resolve("db").version == info.version


def _published(tmp_path: Path) -> tuple[RemoteStore, list[str]]:
    """A store holding two versions of ``db``, newest first."""
    store = _store(tmp_path)
    store.publish("db", write_tree(tmp_path / "a", {"f": b"1" * 10_000}))
    store.publish("db", write_tree(tmp_path / "b", {"f": b"2" * 10_000}))
    return store, [v.version for v in store.versions("db")]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("workers", 0),  # a publish then waited for its deadline, with no pool to run its work
        ("workers", -1),
        ("workers", True),
        ("workers", 1.5),
        ("workers", 10**6),
        ("pack_target", 0),
        ("pack_target", -5),
        ("pack_target", 10**20),
        ("pack_target", True),
        ("compression_level", "3"),
        ("compression_level", 100),
        ("compression_level", -(10**6)),
        ("compression_level", True),
        ("default_timeout", True),
        ("default_timeout", -1),
        ("default_timeout", 0),
        ("default_timeout", float("nan")),
        ("default_timeout", "10"),
        ("manifest_format", True),
        ("trust_stamps", "no"),
    ],
)
def test_a_remote_store_setting_that_means_nothing_is_refused_when_the_store_is_made(
    tmp_path: Path, setting: str, value: object
) -> None:
    (tmp_path / "store").mkdir()
    backend = open_backend(f"file://{tmp_path / 'store'}")
    with pytest.raises(InvalidInputError, match=setting):  # at once: no publish to wait out
        RemoteStore(backend, **{setting: value})  # type: ignore[arg-type]
    assert _tree(tmp_path / "store") == [STORE_MARKER]  # what opening the backend writes


def test_every_zstd_level_and_the_smallest_settings_still_publish(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    backend = open_backend(f"file://{tmp_path / 'store'}")
    for level in (None, -(1 << 17), -5, 0, 22):
        store = RemoteStore(backend, compression_level=level, workers=1, pack_target=1)
        src = write_tree(tmp_path / f"src{level}", {"f": str(level).encode() * 5000})
        info = store.publish(f"db{abs(level or 0)}", src)
        with store.checkout(f"db{abs(level or 0)}", info.version) as snap:
            assert (snap.path / "f").read_bytes() == str(level).encode() * 5000
    RemoteStore(backend, default_timeout=1e9, workers=1024, trust_stamps=False)


@pytest.mark.parametrize("ref", [None, 123, b"latest"])
def test_a_ref_that_is_no_ref_name_is_invalid_input(tmp_path: Path, ref: object) -> None:
    store, _ = _published(tmp_path)
    cache = CachedStore(store, tmp_path / "cache")
    before = _tree(tmp_path / "cache")
    for reader in (store, cache):
        with pytest.raises(InvalidInputError, match="ref name"):
            reader.checkout("db", ref, dest=tmp_path / "dest")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="ref name"):
            reader.resolve("db", ref)  # type: ignore[arg-type]
    assert not (tmp_path / "dest").exists()
    assert _tree(tmp_path / "cache") == before


@pytest.mark.parametrize(
    ("min_age", "dry_run"),
    [("3", True), (None, True), (True, True), (0, None), (0, "no"), (0, "False"), (0, 0)],
)
def test_prunes_min_age_is_a_number_and_dry_run_a_bool(
    tmp_path: Path, min_age: object, dry_run: object
) -> None:
    store, versions = _published(tmp_path)
    for pruner in (store, CachedStore(store, tmp_path / "cache")):
        with pytest.raises(InvalidInputError, match=r"min_age|dry_run"):
            pruner.prune("db", keep_last=1, min_age=min_age, dry_run=dry_run)  # type: ignore[arg-type]
    assert [v.version for v in store.versions("db")] == versions  # nothing pruned
    assert store.prune("db", keep_last=1, min_age=math.inf, dry_run=False).deleted_versions == ()


@pytest.mark.parametrize(
    "flags",
    [
        {"allow_empty": "False"},
        {"allow_empty": None},
        {"stamps": "no"},
        {"stamps": 0},
        {"parent_dir": 123},
        {"parent_dir": b"/tmp"},
    ],
)
def test_publishs_flags_are_bools_and_its_parent_dir_a_folder(
    tmp_path: Path, flags: dict[str, object]
) -> None:
    store, versions = _published(tmp_path)
    same = tmp_path / "b"  # the latest's files: allow_empty="False" published them again
    with pytest.raises(InvalidInputError, match=next(iter(flags))):
        store.publish("db", same, **flags)  # type: ignore[arg-type]
    if "parent_dir" not in flags and "stamps" not in flags:  # the cache passes its own
        with pytest.raises(InvalidInputError, match=next(iter(flags))):
            CachedStore(store, tmp_path / "cache").publish("db", same, **flags)  # type: ignore[arg-type]
    assert [v.version for v in store.versions("db")] == versions
    store.publish("db", same, stamps=None, parent_dir=tmp_path / "a", allow_empty=False)
    assert [v.version for v in store.versions("db")] == versions  # unchanged: no new one


@pytest.mark.parametrize(
    "cache_dir", ["", "rel", "./~/x", 123, b"/tmp/x", "/tmp/c\0", "~no-such-user-x1/c"]
)
def test_a_cache_dir_is_absolute_as_the_configs_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: object
) -> None:
    store, _ = _published(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(InvalidInputError, match="cache_dir"):
        CachedStore(store, cache_dir)  # type: ignore[arg-type]
    if isinstance(cache_dir, str):  # the argument open_store passes on, said before it opens
        with pytest.raises(InvalidInputError, match="cache_dir"):
            open_store(str(tmp_path / "new-store"), cache_dir=cache_dir)
    assert _tree(tmp_path / "cwd") == []
    assert not (tmp_path / "new-store").exists()


def test_a_cache_dir_under_tilde_is_in_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, versions = _published(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with CachedStore(store, "~/cache").checkout("db") as snap:
        assert snap.path.is_relative_to(tmp_path / "home" / "cache")
        assert snap.info.version == versions[0]
    opened = open_store(str(tmp_path / "store"), cache_dir="~/cache2")
    assert isinstance(opened, CachedStore)
    assert opened.root.parent == tmp_path / "home" / "cache2"
    assert _tree(tmp_path / "cwd") == []  # no folder named ~
    from chroma_snapshots.stores.cache import DEFAULT_CACHE_DIR
    from chroma_snapshots.stores.cache.store import cache_folder

    assert cache_folder(DEFAULT_CACHE_DIR) == Path(DEFAULT_CACHE_DIR)  # the default passes


def test_a_relative_dest_with_the_working_directory_gone_is_a_local_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _ = _published(tmp_path)
    cache = CachedStore(store, tmp_path / "cache")
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()

    def outside() -> list[str]:
        return [p for p in _tree(tmp_path) if not p.startswith("cache")]

    before = outside()
    for reader in (store, cache):
        with pytest.raises(LocalDiskError, match="working directory") as e:
            reader.checkout("db", dest="rel")
        assert e.value.filename == "rel"
    assert main(["--store", str(tmp_path / "store"), "checkout", "db", "--dest", "rel"]) == 1
    err = capsys.readouterr().err
    assert "error: rel: writing the checkout: resolving it against the working directory" in err
    assert outside() == before  # the cache may have been filled; nothing else was made


class _BadPath:
    """A path object whose ``__fspath__`` gives no path (``os.fspath`` raises TypeError)."""

    def __fspath__(self) -> int:
        return 5


def test_a_path_object_that_gives_no_path_is_invalid_input(tmp_path: Path) -> None:
    """Every argument taken as a path (publish's source and parent_dir, a cache's folder)
    refuses it as checkout's dest did: before, the others raised a raw TypeError."""
    store = RemoteStore(open_backend(f"file://{tmp_path / 'store'}"))
    src = write_tree(tmp_path / "src", {"a": b"a"})
    with pytest.raises(InvalidInputError):
        store.publish("db", _BadPath())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        store.publish("db", src, parent_dir=_BadPath())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        CachedStore(store, _BadPath())  # type: ignore[arg-type]
    assert store.read_ref("db") is None


def test_a_relative_store_path_is_fixed_when_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A program that changes directory after opening "st" went on reading and publishing
    # in the new directory's "st", while the cache still named the first: versions mixed.
    for where in ("a", "b"):
        write_tree(tmp_path / where / "src", {"f": where.encode()})
    monkeypatch.chdir(tmp_path / "a")
    store = open_store("st", cache_dir=str(tmp_path / "cache"))
    store.publish("n", "src")
    monkeypatch.chdir(tmp_path / "b")
    assert (store.checkout("n", dest=tmp_path / "d").path / "f").read_bytes() == b"a"
    store.publish("n", str(tmp_path / "b" / "src"))
    assert not (tmp_path / "b" / "st").exists()
    again = open_store(str(tmp_path / "a" / "st"), cache_dir=str(tmp_path / "cache2"))
    assert (again.checkout("n", dest=tmp_path / "e").path / "f").read_bytes() == b"b"
