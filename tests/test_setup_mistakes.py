"""The settings operators get wrong (found by an independent review): each is refused with
the documented error type and exit code, never a traceback, never silently ignored."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_inprocess import Run

from chroma_snapshots import StoreConfig, open_remote, open_store
from chroma_snapshots.errors import ConfigError, InvalidInputError
from chroma_snapshots.testing.proxy import closed_endpoint

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS setup leaks in: empty config and credentials files, no profile."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    (tmp_path / "aws-config").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.mark.parametrize(
    ("setup", "said"),
    [
        (
            {"AWS_ACCESS_KEY_ID": "abc", "AWS_SECRET_ACCESS_KEY": ""},
            "missing: AWS_SECRET_ACCESS_KEY",
        ),
        ({"AWS_ACCESS_KEY_ID": "abc"}, "missing: AWS_SECRET_ACCESS_KEY"),
        ({"AWS_CONFIG_FILE": "BAD"}, "Unable to parse config file"),
        ({"AWS_PROFILE": "cp", "AWS_CONFIG_FILE": "PROCESS"}, "custom-process"),
    ],
)
def test_an_aws_setup_mistake_is_a_configuration_error(
    aws_env: pytest.MonkeyPatch, tmp_path: Path, run: Run, setup: dict[str, str], said: str
) -> None:
    """botocore's PartialCredentialsError, ConfigParseError and CredentialRetrievalError
    came out raw: the CLI called them a bug of its own (exit 1)."""
    files = {
        "BAD": "[default\nregion = us-east-1\n",
        "PROCESS": "[profile cp]\ncredential_process = /bin/false\n",
    }
    for var, value in setup.items():
        if value in files:
            (tmp_path / value).write_text(files[value])
            value = str(tmp_path / value)
        aws_env.setenv(var, value)
    with closed_endpoint() as endpoint:
        code, _, err = run("--store", "s3://bkt/pre", "--endpoint-url", endpoint, "ls")
        assert code == 2, err
        assert said in err
        assert "bug" not in err
        with pytest.raises(ConfigError, match=said):
            _first_request(endpoint)


def _first_request(endpoint: str) -> None:
    """Open a store and list it: a credential process runs at the first request."""
    list(open_store(StoreConfig("s3://bkt/pre", s3_endpoint_url=endpoint)).names())


@pytest.mark.parametrize("region", [" ", "us east 1", "us-east-1\n", "-x"])
def test_a_region_that_is_no_region_name_is_named(run: Run, region: str) -> None:
    """It was reported as an endpoint that is not a valid URL."""
    with closed_endpoint() as endpoint:
        code, _, err = run(
            "--store", "s3://b/p", "--endpoint-url", endpoint, "--region", region, "ls"
        )
    assert code == 2
    assert "is not a region name" in err


@pytest.mark.parametrize(
    "fields",
    [
        {"url": 5},
        {"url": None},
        {"url": b"s3://b/p"},
        {"fallback_url": 5},
        {"signing_keys": 123},
        {"signing_keys": ["k:" + "a" * 32]},
        {"s3_endpoint_url": 5},
        {"s3_region": 5},
        {"s3_profile": 5},
        {"chunk_hash": 1},
    ],
)
def test_a_config_field_of_the_wrong_type_is_a_config_error(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    """An int or bytes where text belongs raised AttributeError or TypeError from inside."""
    given = {"url": str(tmp_path / "store"), **fields}
    with pytest.raises(ConfigError, match=f"{next(iter(fields))}=.* must be text"):
        StoreConfig(**given)


def test_a_cache_dir_may_be_a_path_object(tmp_path: Path) -> None:
    """Its own rule (an absolute path, as text or a path object) as before."""
    given: Any = tmp_path / "c"
    assert StoreConfig(str(tmp_path), cache_dir=given).cache_dir == given
    with pytest.raises(ConfigError, match="must be an absolute path"):
        StoreConfig(str(tmp_path), cache_dir=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("environ", [{"CHROMA_SNAPSHOTS_TIMEOUT": 5}, {5: "x"}, ["a"]])
def test_an_environment_that_is_not_text_is_a_config_error(environ: Any) -> None:
    with pytest.raises(ConfigError):
        StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": "/tmp/x", **environ} if isinstance(
            environ, dict) else environ)  # fmt: skip


@pytest.mark.parametrize("target", [5, b"/tmp/x", ["/tmp/x"], Path("/tmp/x")])
def test_open_takes_a_url_a_config_or_nothing(target: Any) -> None:
    for opener in (open_store, open_remote):
        with pytest.raises(InvalidInputError, match="a URL, a StoreConfig or None"):
            opener(target)


def test_create_must_be_a_bool(tmp_path: Path) -> None:
    """``create="no"`` was true: it made the store it was told not to."""
    for opener in (open_store, open_remote):
        with pytest.raises(InvalidInputError, match="create='no' must be True or False"):
            opener(str(tmp_path / "store"), create="no")  # type: ignore[arg-type]
    assert not (tmp_path / "store").exists()


def test_mirror_without_a_second_store_is_refused(tmp_path: Path, run: Run) -> None:
    """It was ignored, and doctor reported the store as mirrored."""
    env = {"CHROMA_SNAPSHOTS_URL": str(tmp_path / "s"), "CHROMA_SNAPSHOTS_MIRROR": "true"}
    with pytest.raises(ConfigError, match=r"CHROMA_SNAPSHOTS_MIRROR.*name one"):
        StoreConfig.from_env(env)
    with pytest.raises(ConfigError, match="mirror=True"):
        StoreConfig(str(tmp_path / "s"), mirror=True)
    both = {**env, "CHROMA_SNAPSHOTS_FALLBACK_URL": str(tmp_path / "f")}
    assert StoreConfig.from_env(both).mirror is True
    # --store names one store: the fallback and the mirror are the environment's store's
    assert StoreConfig.from_env(env, url=str(tmp_path / "other")).mirror is False


@pytest.mark.parametrize(
    ("var", "meant"),
    [
        ("CHROMA_SNAPSHOTS_SIGNING_KEYS", "CHROMA_SNAPSHOTS_SIGNING_KEY"),
        ("CHROMA_SNAPSHOT_SIGNING_KEY", "CHROMA_SNAPSHOTS_SIGNING_KEY"),
        ("CHROMA_SNAPSHOTS_CACHEDIR", "CHROMA_SNAPSHOTS_CACHE_DIR"),
        ("CHROMA_SNAPSHOTS_OFFLNE", "CHROMA_SNAPSHOTS_OFFLINE"),
        ("CHROMA_SNAPSHOTS_LOCKTABLE", "CHROMA_SNAPSHOTS_LOCK_TABLE"),
    ],
)
def test_a_misspelt_variable_is_refused_naming_the_one_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run, var: str, meant: str
) -> None:
    """A plural signing key's name read unsigned data as trusted, exit 0."""
    monkeypatch.setenv(var, "k1:" + "a" * 40)
    code, _, err = run("--store", str(tmp_path / "store"), "ls")
    assert code == 2
    assert f"{var} is not a variable chroma-snapshots reads: did you mean {meant}?" in err


def test_variables_not_named_like_ours_are_left_alone(tmp_path: Path) -> None:
    env = {
        "CHROMA_SNAPSHOTS_URL": str(tmp_path / "s"),
        "CHROMA_SNAPSHOTS_RELIABILITY": "1",  # the test suite's own switches
        "CHROMA_SNAPSHOTS_FIGURES": "1",
        "CHROMA_HOST": "x",
        "HOME": "/root",
    }
    assert StoreConfig.from_env(env).url == str(tmp_path / "s")


@pytest.mark.parametrize("bad", ["\x01", "\x7f", "\u200b", "\x00", "\u202e"])
def test_a_control_or_invisible_character_in_a_store_url_is_refused(
    tmp_path: Path, run: Run, bad: str
) -> None:
    """The error then named another problem: a 404, or "does not exist" for a folder that
    does (the character does not show)."""
    (tmp_path / "store").mkdir()
    for url in (f"s3://bkt/pre{bad}", f"{tmp_path}/store{bad}"):
        code, _, err = run("--store", url, "ls")
        assert code == 2, err
        assert "control or invisible character" in err
        with pytest.raises(ConfigError, match="control or invisible character"):
            StoreConfig(url)


def test_an_unreachable_ftp_store_is_unavailable(run: Run) -> None:
    """fsspec's FTP filesystem connects as it opens: that was exit 2, a mistyped URL."""
    with closed_endpoint() as endpoint:
        port = endpoint.rsplit(":", 1)[1]
        code, _, err = run("--store", f"ftp://127.0.0.1:{port}/y", "ls")
    assert code == 7, err
    assert "cannot reach the store" in err


def test_a_joiner_in_a_folder_name_is_not_refused(tmp_path: Path, run: Run) -> None:
    """Persian and Indic names hold zero-width (non-)joiners: they are letters' business."""
    store = tmp_path / "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    assert StoreConfig(str(store)).url == str(store)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    assert run("--store", str(store), "publish", "db", str(tmp_path / "src"))[0] == 0
    assert run("--store", str(store), "ls") == (0, "db\n", "")


def test_keep_last_names_its_real_range(tmp_path: Path, run: Run) -> None:
    code, _, err = run("--store", str(tmp_path / "s"), "prune", "db", "--keep-last", "0")
    assert code == 2
    assert "--keep-last='0' must be a whole number, 1 to" in err


def test_a_bind_mounted_dest_is_a_mount_point(tmp_path: Path, run: Run) -> None:
    """A bind mount from the same file system changes no device: the checkout downloaded
    everything, then failed to rename into it (EBUSY, exit 1)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "chroma.sqlite3").write_bytes(b"x" * 100_000)
    store = ["--store", str(tmp_path / "store")]
    assert run(*store, "publish", "db", str(src))[0] == 0
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "a"), str(tmp_path / "b")], check=True)
    try:
        code, _, err = run(*store, "checkout", "db", "--dest", str(tmp_path / "b"))
        assert code == 2, err
        assert "is a mount point" in err
        assert not any((tmp_path / "b").iterdir())
        assert run(*store, "checkout", "db", "--dest", str(tmp_path / "b" / "db"))[0] == 0
    finally:
        subprocess.run(["umount", str(tmp_path / "b")], check=True)
    assert (tmp_path / "a" / "db" / "chroma.sqlite3").read_bytes() == b"x" * 100_000


def test_a_file_where_the_store_or_cache_folder_must_be_is_named(tmp_path: Path, run: Run) -> None:
    """It was exit 7 ("creating the store directory: EEXIST") and exit 1 ("opening the
    cache: File exists"), read as an outage and a bug."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep")
    code, _, err = run("--store", str(afile), "publish", "db", str(src))
    assert (code, "a file is in the way of the store's folder" in err) == (2, True), err
    store = ["--store", str(tmp_path / "store")]
    assert run(*store, "publish", "db", str(src))[0] == 0
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for cache in (afile, tmp_path / "dangling", Path("/dev/null")):
        code, _, err = run(*store, "--cache-dir", str(cache), "checkout", "db")
        assert code == 2, err
        assert f"cache folder {cache}: a file is in the way of it" in err
    assert afile.read_bytes() == b"keep"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("seconds", [1e10, -1, True, float("nan")])
def test_refresh_seconds_in_code_follows_the_variables_range(seconds: float) -> None:
    """1e10 was taken in code where the variable refuses it (0 to 1e9, or never)."""
    with pytest.raises(ConfigError, match="refresh_seconds"):
        StoreConfig("/tmp/x", refresh_seconds=seconds)
    assert StoreConfig("/tmp/x", refresh_seconds=float("inf")).refresh_seconds == float("inf")


def test_stale_ok_without_a_cache_is_refused(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale read is served from the cache: with none it did nothing and said nothing,
    so an operator counting on it learnt otherwise in the outage."""
    store = str(tmp_path / "s")
    with pytest.raises(ConfigError, match="needs a cache"):
        open_store(StoreConfig(store, stale_ok=True))
    code, _, err = run("--store", store, "--stale-ok", "checkout", "db", str(tmp_path / "d"))
    assert (code, err.count("\n")) == (2, 1), err
    assert "--stale-ok" in err
    assert "needs a cache" in err
    monkeypatch.setenv("CHROMA_SNAPSHOTS_STALE_OK", "1")
    code, _, err = run("--store", store, "info", "db")
    assert code == 2, err
    assert "CHROMA_SNAPSHOTS_STALE_OK" in err
    assert not (tmp_path / "s").exists()  # refused before the store was made
    # with a cache, by argument or variable, it is what it was
    assert open_store(StoreConfig(store, stale_ok=True), cache_dir=str(tmp_path / "c"))
    monkeypatch.setenv("CHROMA_SNAPSHOTS_CACHE_DIR", str(tmp_path / "c2"))
    code, _, err = run("--store", store, "ls")
    assert code == 0, err
