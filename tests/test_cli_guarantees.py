"""The CLI keeps the library's guarantees: one configuration reader (``--store`` replaces the
URL only), URL typos and missing stores are errors, and endpoints that ignore conditional
writes are refused for publishing."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chroma_snapshots import (
    Backend,
    CachedStore,
    ConfigError,
    FallbackStore,
    ObjectMeta,
    PutMode,
    RemoteStore,
    SnapshotStore,
    StoreConfig,
    open_backend,
    open_remote,
    open_store,
)
from chroma_snapshots import opening as opening_module
from chroma_snapshots.backends.cas import (
    ConditionalWriteCheck,
    probe_conditional_writes,
    unchecked,
)
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.cli.main import main
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree
from chroma_snapshots.testing.faults import FaultPlan
from chroma_snapshots.testing.proxy import CountingProxy

KEY = "k1:" + "a-signing-secret-" * 2
CLI = str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "chroma-snapshots")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store configuration leaks in from the machine running the tests."""
    for var in list(os.environ):
        if var.startswith(("CHROMA_SNAPSHOTS_", "CHROMADB_")) or var in ("CHROMA_ROOT",):
            monkeypatch.delenv(var)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def _script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed ``chroma-snapshots`` console script, as users run it."""
    cli = CLI if Path(CLI).exists() else "chroma-snapshots"
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120, env=env)


def test_store_flag_keeps_the_signing_key(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"s" * 5000})
    url = f"file://{tmp_path}/store"
    env = {**os.environ, "CHROMA_SNAPSHOTS_SIGNING_KEY": KEY}
    out = _script("--store", url, "publish", "db", str(src), "--json", env=env)
    assert out.returncode == 0, out.stderr
    version = json.loads(out.stdout)["version"]
    assert (tmp_path / "store" / "db" / "manifests" / f"{version}.json.sig").is_file()
    reader = RemoteStore(FileBackend(tmp_path / "store"), signer=Signer.from_spec(KEY))
    assert reader.resolve("db").version == version  # a key-holding reader accepts it
    open_remote(f"file://{tmp_path}/unsigned").publish("db", src)  # no key: unsigned
    dest = tmp_path / "out"
    refused = _script(
        "--store", f"{tmp_path}/unsigned", "checkout", "db", "--dest", str(dest), env=env
    )
    assert refused.returncode == 5, refused.stderr
    assert "not signed" in refused.stderr
    assert not dest.exists()


def test_store_flag_keeps_the_cache_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"c" * 5000})
    store = ["--store", str(tmp_path / "store")]
    assert main([*store, "publish", "db", str(src)]) == 0
    capsys.readouterr()
    monkeypatch.setenv("CHROMA_SNAPSHOTS_CACHE_DIR", str(tmp_path / "cache"))
    assert main([*store, "checkout", "db", "--json"]) == 0
    path = Path(json.loads(capsys.readouterr().out)["path"])
    assert path.is_relative_to(tmp_path / "cache")
    assert read_tree(path) == read_tree(src)
    assert main([*store, "info", "db", "--json"]) == 0  # manifests from the source, not the cache
    assert json.loads(capsys.readouterr().out)["files"] == ["chroma.sqlite3"]
    assert main([*store, "diff", "db", "latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] == []


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[SnapshotStore]:
    """Every store the CLI opens (through the library's open_store)."""
    seen: list[SnapshotStore] = []
    real = opening_module.open_store

    def spy(*args: Any, **kwargs: Any) -> SnapshotStore:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(opening_module, "open_store", spy)
    return seen


def _remote(store: SnapshotStore) -> RemoteStore:
    inner = store.inner if isinstance(store, CachedStore) else store
    assert isinstance(inner, RemoteStore)  # --store names one store: never a fallback pair
    return inner


def _s3(store: SnapshotStore) -> S3Backend:
    backend = unchecked(_remote(store).backend)
    assert isinstance(backend, S3Backend)
    return backend


Check = Callable[[SnapshotStore, str], bool]
# Each documented variable, a value, and what must be true of the store `--store URL ls` opens.
VARIABLES: list[tuple[str, str, Check]] = [
    ("CHROMA_SNAPSHOTS_SIGNING_KEY", KEY, lambda s, tmp: _remote(s).signer is not None),
    ("CHROMA_SNAPSHOTS_S3_TIMEOUT", "7.5", lambda s, tmp: _s3(s).settings.read_timeout == 7.5),
    ("CHROMA_SNAPSHOTS_CACHE_DIR", "{tmp}/cache", lambda s, tmp: _cache_root(s, tmp)),
    (
        "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES",
        "1048576",  # with CHROMA_SNAPSHOTS_CACHE_DIR, set for every row below
        lambda s, tmp: isinstance(s, CachedStore) and s.max_bytes == 1 << 20,
    ),
    (
        "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS",
        "1",
        lambda s, tmp: not isinstance(_remote(s).backend, ConditionalWriteCheck),
    ),
    # The URL variables (and the fallback, which belongs to that store) are replaced: not
    # even read (mode "auto" without a bucket would be a ConfigError), never a fallback pair.
    ("CHROMA_SNAPSHOTS_URL", "s3://elsewhere/x", lambda s, tmp: _one_store(s)),
    ("CHROMADB_STORAGE_MODE", "auto", lambda s, tmp: _one_store(s)),
    ("CHROMA_SNAPSHOTS_FALLBACK_URL", "s3://other/x", lambda s, tmp: _one_store(s)),
    ("CHROMA_SNAPSHOTS_MIRROR", "true", lambda s, tmp: _one_store(s)),
]


def _one_store(store: SnapshotStore) -> bool:
    inner = store.inner if isinstance(store, CachedStore) else store
    return isinstance(inner, RemoteStore) and not isinstance(inner, FallbackStore)


def _cache_root(store: SnapshotStore, tmp: str) -> bool:
    return isinstance(store, CachedStore) and store.root.is_relative_to(f"{tmp}/cache")


@pytest.mark.parametrize(("variable", "value", "check"), VARIABLES, ids=[v[0] for v in VARIABLES])
def test_each_variable_applies_next_to_store(
    variable: str,
    value: str,
    check: Check,
    opened: list[SnapshotStore],
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint_url)
    if variable == "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES":
        monkeypatch.setenv("CHROMA_SNAPSHOTS_CACHE_DIR", f"{tmp_path}/cache")
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    url = f"s3://{s3_bucket}/snaps"
    assert main(["--store", url, "ls"]) == 0
    (store,) = opened
    assert _remote(store).label == f"{url} at {moto_server.endpoint_url}"
    assert _s3(store).client.meta.endpoint_url == moto_server.endpoint_url  # AWS_ENDPOINT_URL_S3
    assert check(store, str(tmp_path))


def test_efs_timeout_applies_next_to_store(
    opened: list[SnapshotStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHROMA_SNAPSHOTS_EFS_TIMEOUT", "3.5")
    assert main(["--store", f"efs://{tmp_path}", "ls"]) == 0
    backend = _remote(opened[0]).backend
    assert isinstance(backend, FileBackend)
    assert backend.guard is not None
    assert backend.guard.op_timeout == 3.5
    backend.close()


@pytest.mark.parametrize(("env", "flag", "want"), [("90", None, 90.0), ("90", "7", 7.0)])
def test_the_operation_timeout_comes_from_the_environment_or_the_flag(
    opened: list[SnapshotStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    flag: str | None,
    want: float,
) -> None:
    monkeypatch.setenv("CHROMA_SNAPSHOTS_TIMEOUT", env)
    args = ["--timeout", flag] if flag else []
    assert main([*args, "--store", str(tmp_path), "ls"]) == 0
    assert _remote(opened[0]).default_timeout == want


# Arabic-Indic "12" and a fullwidth 5, which float() would read, and "1_0", which it
# reads as 10 (a slip for 1.0 or 10?)
BAD_SECONDS = ["nan", "inf", "-1", "0", "soon", "1e10", "\u0661\u0662", "\uff15", "1_0"]


@pytest.mark.parametrize("bad", BAD_SECONDS)
@pytest.mark.parametrize("option", [["--timeout"], ["doctor", "--budget"]])
def test_seconds_options_follow_the_variables_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], bad: str
) -> None:
    args = ["--store", str(tmp_path), *option, bad]
    assert main(args if option[0] == "doctor" else [*args, "ls"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option[-1]}={bad!r}"), err
    assert err.count("\n") == 1, err


def test_an_invalid_variable_is_reported_with_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHROMA_SNAPSHOTS_S3_TIMEOUT", "soon")
    assert main(["--store", str(tmp_path), "ls"]) == 2
    assert "CHROMA_SNAPSHOTS_S3_TIMEOUT" in capsys.readouterr().err


TYPOS = ["s3:/my-bucket/chroma", "s3:my-bucket", "file:relative", "efs:/x", "memory:x"]
TYPOS += ["s3//my-bucket/chroma", "s3;//my-bucket", "S3//b", "file//tmp/x"]  # colon lost


@pytest.mark.parametrize("url", ["file://", "file://localhost", "efs://", "file:///"])
def test_a_file_url_without_a_path_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="needs an absolute path"):
        open_backend(url)


ENDPOINT_SOURCES = ["option", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "profile", "services"]


def _endpoint_args(
    source: str, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """The CLI arguments (and environment) that give ``endpoint`` through ``source``: the
    option, either variable, a profile's endpoint_url or a [services] section."""
    if source == "option":
        return ["--endpoint-url", endpoint]
    if source.startswith("AWS_"):
        monkeypatch.setenv(source, endpoint)
        return []
    config = tmp_path / "aws-config"
    if source == "profile":
        config.write_text(f"[profile ep]\nendpoint_url = {endpoint}\n")
    else:
        config.write_text(
            f"[profile ep]\nservices = svc\n[services svc]\ns3 =\n  endpoint_url = {endpoint}\n"
        )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    return ["--profile", "ep"]


# A secret key often holds "/": urllib then ends the host early and finds no user at all.
@pytest.mark.parametrize("password", ["hunter2", "wJalr/XUtnFEMI", "s3cr3t?x", "s3cr3t#x"])
@pytest.mark.parametrize("source", ENDPOINT_SOURCES)
def test_an_endpoint_with_a_password_is_refused_without_echoing_it(
    source: str,
    password: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = f"http://AKIA:{password}@127.0.0.1:1"
    args = _endpoint_args(source, endpoint, tmp_path, monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    assert main(["--store", "s3://b/p", *args, "ls"]) == 2
    err = capsys.readouterr().err
    assert "user or password" in err
    assert password.split("/")[0].split("?")[0].split("#")[0] not in err


@pytest.mark.parametrize("source", ENDPOINT_SOURCES)
def test_an_endpoint_with_a_path_is_refused_wherever_it_is_set(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore reads the path as the bucket: a publish to s3://zzz/q wrote into "bkt"
    args = _endpoint_args(source, "http://127.0.0.1:1/bkt", tmp_path, monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    assert main(["--store", "s3://zzz/q", *args, "ls"]) == 2
    assert "path, query or fragment" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--store", "s3://[my-bucket]/p"],
        ["--store", "s3://[bkt/p"],
        ["--store", "fsspec+s3://[b/p"],
        ["--store", "efs://[x/y"],
        ["--store", "file://[x]/y"],
        ["--store", "s3://b/p", "--endpoint-url", "http://[::1"],
        ["--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:99999"],
        ["--store", "s3://b/p", "--endpoint-url", "http://:9000"],
        ["--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9000/?x=1"],
        ["--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9000#frag"],
        ["--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9000?"],
        # a path would be read as a bucket: requests for s3://b/p would go to bucket "bkt"
        ["--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9000/bkt"],
        ["--store", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9000/;params"],
    ],
)
def test_urls_urllib_cannot_split_are_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "ls"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("url", TYPOS)
def test_url_typos_are_config_errors_everywhere(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for opener in (open_store, open_remote, open_backend):
        with pytest.raises(ConfigError, match=r"no ':?//'"):
            opener(url)
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_URL"):
        StoreConfig.from_env({"CHROMA_SNAPSHOTS_URL": url})
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_FALLBACK_URL"):
        StoreConfig.from_env(
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_FALLBACK_URL": url}
        )
    src = write_tree(tmp_path / "src", {"a": b"a"})
    assert main(["--store", url, "publish", "db", str(src)]) == 2
    err = capsys.readouterr().err
    assert repr(url) in err
    assert "did you mean" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written anywhere


def test_a_plain_path_is_a_local_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    src = write_tree(tmp_path / "src", {"a": b"a"})
    assert main(["--store", "rel/store", "publish", "db", str(src)]) == 0
    assert (tmp_path / "rel" / "store" / "db" / "refs" / "latest").is_file()
    assert main(["--store", "./odd:name", "publish", "db", str(src)]) == 0  # ./ makes it a path
    assert (tmp_path / "odd:name" / "db").is_dir()
    capsys.readouterr()


READS = [
    ["ls"],
    ["ls", "db"],
    ["info", "db"],
    ["checkout", "db"],
    ["verify", "db"],
    ["diff", "db", "latest"],
    ["tag", "db", "stable"],
    ["rollback", "db", "v1"],
    ["prune", "db"],
    ["cache", "ls"],
]


@pytest.mark.parametrize("args", READS, ids=[" ".join(a) for a in READS])
def test_commands_other_than_publish_never_create_a_store(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nonexistent" / "x"
    for store in (str(missing), f"file://{missing}"):
        assert main(["--store", store, "--cache-dir", str(tmp_path / "c"), *args]) == 3
        assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nonexistent").exists()


def test_doctor_and_sync_do_not_create_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nonexistent"
    assert main(["--store", str(missing), "doctor", "--json"]) == 1
    found = {f["check"]: f for f in json.loads(capsys.readouterr().out)}
    assert found[f"{missing}: open"]["status"] == "fail"
    assert main(["sync", str(missing), str(tmp_path / "dst")]) == 3
    assert not missing.exists()
    assert not (tmp_path / "dst").exists()


CAS_HEADERS = ("If-None-Match", "If-Match")


@pytest.fixture
def ignoring(moto_server: MotoServer) -> Iterator[CountingProxy]:
    """An endpoint that ignores conditional writes: moto behind a proxy dropping the headers."""
    with CountingProxy(moto_server.endpoint_url, strip_headers=CAS_HEADERS) as proxy:
        yield proxy


def _probes(proxy: CountingProxy) -> list[str]:
    return [r.method for r in proxy.requests if "/_probes/" in r.path]


def _keys(moto_server: MotoServer, bucket: str) -> list[str]:
    listed = moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return [o["Key"] for o in listed]


@pytest.mark.parametrize("scheme", ["s3", "fsspec+s3"])
def test_probe_passes_on_moto_and_catches_an_ignoring_endpoint(
    scheme: str, moto_server: MotoServer, s3_bucket: str, ignoring: CountingProxy
) -> None:
    def opened_at(endpoint: str) -> Backend:
        url = f"{scheme}://{s3_bucket}/p"
        if scheme == "s3":
            return open_backend(url, s3_settings=S3Settings(endpoint_url=endpoint))
        return open_backend(url, endpoint_url=endpoint)  # s3fs's own option

    assert probe_conditional_writes(unchecked(opened_at(moto_server.endpoint_url))) is None
    liar = opened_at(ignoring.url)
    assert probe_conditional_writes(unchecked(liar)) == "ignores If-None-Match and If-Match"
    with pytest.raises(ConfigError, match="conditional writes"):
        liar.put("db/refs/latest", b"{}", mode=PutMode.CREATE)
    liar.put("plain", b"overwrites need no check")
    assert _keys(moto_server, s3_bucket) == ["p/plain"]  # every probe cleaned up


def test_threads_arriving_together_share_one_probe(tmp_path: Path) -> None:
    creates: list[str] = []

    class Recording(FileBackend):
        def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
            if key.startswith("_probes/") and mode.kind == "create":
                creates.append(key)
            return super().put(key, data, mode=mode)

    checked = ConditionalWriteCheck(Recording(tmp_path), f"test {uuid.uuid4().hex}")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: checked.put(f"k{i}", b"x", mode=PutMode.CREATE), range(16)))
    assert len(creates) == 2  # one probe: its create and the create that must be refused
    assert sorted(m.key for m in checked.list()) == sorted(f"k{i}" for i in range(16))


def test_publish_and_set_ref_refuse_an_endpoint_that_ignores_cas(
    moto_server: MotoServer, s3_bucket: str, ignoring: CountingProxy, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(20_000)})
    cfg = StoreConfig(url=f"s3://{s3_bucket}/snaps", s3_endpoint_url=ignoring.url)
    store = open_remote(cfg)
    with pytest.raises(ConfigError, match="ignores If-None-Match and If-Match") as e:
        store.publish("db", src)
    assert "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS=1" in str(e.value)
    assert _keys(moto_server, s3_bucket) == []  # refused before the first byte of data
    unsafe = open_remote(replace(cfg, unsafe_no_cas=True))  # the explicit opt-out proceeds
    version = unsafe.publish("db", src).version
    with pytest.raises(ConfigError, match="conditional writes"):
        store.set_ref("db", "stable", version, expected=None)
    with pytest.raises(ConfigError, match="conditional writes"):
        open_remote(cfg).publish("db", src)  # a second store object: the verdict is kept
    assert _probes(ignoring) == ["PUT", "PUT", "PUT", "DELETE"]  # one probe per process


def test_cli_publish_refuses_unless_opted_out_and_doctor_reports(
    moto_server: MotoServer, s3_bucket: str, ignoring: CountingProxy, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(20_000)})
    store = ["--store", f"s3://{s3_bucket}/snaps"]
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": ignoring.url}
    refused = _script(*store, "publish", "db", str(src), env=env)
    assert refused.returncode == 2, refused.stderr
    assert "ignores If-None-Match and If-Match" in refused.stderr
    assert "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS=1" in refused.stderr
    doctor = _script(*store, "doctor", "--json", env=env)
    assert doctor.returncode == 1
    check = f"s3://{s3_bucket}/snaps: conditional writes"
    assert {f["check"]: f for f in json.loads(doctor.stdout)}[check]["status"] == "fail"
    opted = {**env, "CHROMA_SNAPSHOTS_UNSAFE_NO_CAS": "1"}
    assert _script(*store, "publish", "db", str(src), env=opted).returncode == 0
    warned = _script(*store, "doctor", "--json", env=opted)
    assert {f["check"]: f for f in json.loads(warned.stdout)}[check]["status"] == "warn"
    honest = _script(
        *store, "doctor", "--json", env={**env, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    )
    assert {f["check"]: f for f in json.loads(honest.stdout)}[check]["status"] == "ok"
    assert [k for k in _keys(moto_server, s3_bucket) if "_probes" in k] == []


def test_an_honest_endpoint_is_probed_once_per_process(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(20_000)})
    with CountingProxy(moto_server.endpoint_url) as proxy:
        cfg = StoreConfig(url=f"s3://{s3_bucket}/snaps", s3_endpoint_url=proxy.url)
        first = open_remote(cfg).publish("db", src).version
        (src / "more").write_bytes(b"more")
        second = open_remote(cfg).publish("db", src, expected=first).version
        assert open_remote(cfg).resolve("db").version == second
        assert _probes(proxy) == ["PUT", "PUT", "PUT", "DELETE"]


def test_a_missing_bucket_is_named_as_a_missing_bucket(moto_server: MotoServer) -> None:
    """Not "no such object": the message names the bucket and says it does not exist."""
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    out = _script("--store", "s3://no-such-bucket-here/chroma", "ls", env=env)
    assert out.returncode == 3, out.stderr
    assert "no-such-bucket-here" in out.stderr
    assert "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def _versions_on_moto(moto_server: MotoServer, bucket: str, tmp_path: Path, n: int) -> None:
    """``n`` versions of "db" in ``s3://bucket/snaps``, published straight to the server."""
    settings = S3Settings(endpoint_url=moto_server.endpoint_url)
    store = RemoteStore(S3Backend(bucket, "snaps", settings=settings))
    for i in range(n):
        store.publish("db", write_tree(tmp_path / f"v{i}", {"f": os.urandom(3000)}))


def test_timeout_bounds_the_whole_command_not_each_call(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    # `sync --all-versions` gave every version and ref move a --timeout of its own: at
    # 0.3 s a request, --timeout 5 took 14 s and succeeded. Now the command ends by it.
    _versions_on_moto(moto_server, s3_bucket, tmp_path, 6)
    plan = FaultPlan(1.0, kinds=("latency",), latency_seconds=0.25)
    with CountingProxy(moto_server.endpoint_url, faults=plan) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url}
        dest = f"file://{tmp_path}/mirror"
        args = ["--timeout", "2", "sync", f"s3://{s3_bucket}/snaps", dest, "--all-versions"]
        t = time.monotonic()
        out = _script(*args, env=env)
        took = time.monotonic() - t
    assert out.returncode == 6, out.stderr  # a timeout, named as one
    assert "Traceback" not in out.stderr
    assert took < 2 + 1.5 + 1.0  # its deadline, a clean-up wait, the process's start-up


class _HoldManifests(FaultPlan):
    """Holds every GET of a manifest (until the proxy stops); everything else goes through."""

    def __init__(self) -> None:
        super().__init__(0.0, latency_seconds=30.0)

    def draw(self, method: str, path: str) -> str | None:
        return "latency" if method == "GET" and "/manifests/" in path else None


def test_a_timed_out_prune_removes_its_record_before_the_command_exits(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    # The record's removal runs on its own budget in the background; the CLI exited before
    # it was sent, and the record refused ref moves to what it named for 15 minutes.
    _versions_on_moto(moto_server, s3_bucket, tmp_path, 3)
    with CountingProxy(moto_server.endpoint_url, faults=_HoldManifests()) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url}
        args = ["--timeout", "2", "--store", f"s3://{s3_bucket}/snaps", "prune", "db"]
        out = _script(*args, "--keep-last", "1", "--min-age", "0", "--apply", env=env)
        assert out.returncode == 6, out.stderr
        deletes = [r for r in proxy.requests if r.method == "DELETE" or "delete" in r.path]
    assert deletes, [(r.method, r.path) for r in proxy.requests]
    assert [k for k in _keys(moto_server, s3_bucket) if "/gc/" in k] == []


@pytest.mark.parametrize(
    ("var", "bad"),
    [
        *(
            (var, bad)
            for var in ("CHROMA_SNAPSHOTS_TIMEOUT", "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES")
            for bad in ("5\u00a0", "\u20075", "\u2028 5")
        ),
        ("CHROMA_SNAPSHOTS_REFRESH_SECONDS", "9" * 50),
        ("CHROMA_SNAPSHOTS_REFRESH_SECONDS", "5\u00a0"),
    ],
)
def test_number_variables_take_only_ascii_white_space_and_their_range(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    var: str,
    bad: str,
) -> None:
    """str.strip took a no-break space away unseen (the option refused the same text),
    and the refresh period had no upper bound (1e50 seconds was taken)."""
    monkeypatch.setenv(var, bad)
    assert main(["--store", str(tmp_path), "ls"]) == 2
    assert var in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        *(("--min-age", v) for v in ("1_0", "\u0661", "inf", "1e400", "-1", "nan")),
        *(("--keep-last", v) for v in ("1_0", "\u0663", "\uff15", "9" * 26, "-1", "2.5")),
    ],
)
def test_prune_s_numbers_follow_the_variables_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, bad: str
) -> None:
    """click's int and float read "1_0" as 10 and other scripts' digits as numbers."""
    assert main(["--store", str(tmp_path), "prune", "db", option, bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}={bad!r}"), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("bad", ["1_0", "\u0663", "0", "-1", "4097", "9" * 26, "2.5"])
def test_demo_s_size_follows_the_counts_rule_and_is_bounded(
    capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """click's int read "1_0" as 10, and a digit too many would fill the disk."""
    assert main(["demo", "--size-mb", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --size-mb={bad!r} must be a whole number, 1 to 4096"), err
    assert err.count("\n") == 1, err
