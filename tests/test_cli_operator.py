"""What people who use awscli, DVC and huggingface_hub expect of the command line, through
the real entry point: --version and -h, awscli's connection flags, status and a dry-run
publish, ls with dates and messages, version prefixes, a cache that says what it holds and
removes on request, offline and stale reads, --json everywhere, no silent temp folders."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cli_inprocess import Run

from chroma_snapshots import CachedStore
from chroma_snapshots import opening as opening_module
from chroma_snapshots.backends.cas import unchecked
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend
from chroma_snapshots.cli.help import EXAMPLES
from chroma_snapshots.engine.models import VersionId
from chroma_snapshots.errors import InvalidInputError
from chroma_snapshots.stores.base import SnapshotStore
from chroma_snapshots.stores.remote import RemoteStore
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree
from chroma_snapshots.testing.faults import FaultPlan
from chroma_snapshots.testing.proxy import CountingProxy

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("clean_env")


def _published(run: Run, store: list[str], src: Path, *extra: str) -> str:
    code, out, err = run(*store, "publish", "db", str(src), "--json", *extra)
    assert code == 0, err
    return str(json.loads(out)["version"])


def test_version_and_short_help(run: Run) -> None:
    code, out, _ = run("--version")
    assert code == 0
    assert re.fullmatch(r"chroma-snapshots, version \d+\.\d+\.\d+\S*\n", out)
    for args in (["-h"], ["ls", "-h"], ["cache", "rm", "-h"]):
        code, out, _ = run(*args)
        assert code == 0
        assert "Usage: chroma-snapshots" in out


def test_aws_flags_reach_the_s3_client(
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[SnapshotStore] = []
    real = opening_module.open_store

    def spy(*args: Any, **kwargs: Any) -> SnapshotStore:
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(opening_module, "open_store", spy)
    keys = "aws_access_key_id = testing\naws_secret_access_key = testing\n"
    (tmp_path / "config").write_text(f"[profile other]\nregion = eu-west-3\n{keys}")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # the environment's region would beat the profile's
    store = ["--store", f"s3://{s3_bucket}/x"]
    flags = ["--endpoint-url", moto_server.endpoint_url, "--profile", "other"]
    assert run(*flags, *store, "ls")[0] == 0
    assert run(*flags, "--region", "ap-south-1", *store, "ls")[0] == 0
    clients = []
    for s in opened:
        assert isinstance(s, RemoteStore)
        backend = unchecked(s.backend)
        assert isinstance(backend, S3Backend)
        clients.append(backend.client.meta)
    assert [c.endpoint_url for c in clients] == [moto_server.endpoint_url] * 2
    assert [c.region_name for c in clients] == ["eu-west-3", "ap-south-1"]  # profile, flag
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint_url)  # env still works
    assert run(*store, "ls")[0] == 0
    assert run("--endpoint-url", "ftp://x", *store, "ls")[0] == 2


def test_status_and_dry_run_say_what_a_publish_would_upload(tmp_path: Path, run: Run) -> None:
    store = ["--store", str(tmp_path / "store")]
    (tmp_path / "store").mkdir()  # status reads a store, it never creates one
    src = write_tree(
        tmp_path / "src", {"chroma.sqlite3": os.urandom(200_000), "seg/old.bin": b"o" * 10}
    )
    code, out, _ = run(*store, "status", "db", str(src), "--json")
    assert code == 0  # nothing published yet: everything is new
    assert json.loads(out)["base"] is None
    v1 = _published(run, store, src)
    code, out, _ = run(*store, "status", "db", str(src))
    assert "nothing differs" in out
    with open(src / "chroma.sqlite3", "r+b") as f:
        f.write(b"a changed first page")
    (src / "seg" / "old.bin").unlink()
    (src / "seg" / "new.bin").write_bytes(b"n" * 70_000)  # two chunks of 64 KiB
    code, out, _ = run(*store, "status", "db", str(src), "--json")
    plan = json.loads(out)
    assert (plan["base"], plan["added"], plan["removed"]) == (v1, ["seg/new.bin"], ["seg/old.bin"])
    assert plan["changed"] == ["chroma.sqlite3"]
    assert (plan["new_chunks"], plan["new_bytes"]) == (3, 65536 + 70_000)
    code, out, _ = run(*store, "publish", "db", str(src), "--dry-run")
    assert code == 0
    assert out.startswith("dry run: nothing uploaded")
    assert "~ chroma.sqlite3" in out
    assert "3 new chunks" in out
    code, out, _ = run(*store, "ls", "db", "--json")
    assert json.loads(out)["refs"] == {"latest": v1}  # the dry run published nothing
    v2 = _published(run, store, src)
    code, out, _ = run(*store, "info", "db", v2, "--json")
    assert json.loads(out)["info"]["stats"] is not None


def test_ls_shows_dates_sizes_and_messages_and_ids_take_prefixes(tmp_path: Path, run: Run) -> None:
    store = ["--store", str(tmp_path / "store")]
    src = write_tree(tmp_path / "src", {"a.bin": b"a" * 3000})
    v1 = _published(run, store, src, "-m", "first one")
    (src / "b.bin").write_bytes(b"b")
    v2 = _published(run, store, src, "-m", "second")
    code, out, _ = run(*store, "ls", "db")
    lines = out.splitlines()
    assert lines[0].startswith(v2)  # newest first
    assert lines[0].endswith("latest        second")
    stamp = datetime.strptime(VersionId.parse(v1).timestamp, "%Y%m%dT%H%M%S%fZ")
    assert f"{stamp:%Y-%m-%d %H:%M:%S}" in lines[1]
    assert "2.9 KiB" in lines[1]
    assert lines[1].endswith("first one")
    digest = v1.split("-")[1]
    for prefix in (v1[:22], digest[:6]):  # timestamp prefix, digest prefix
        code, out, err = run(*store, "info", "db", prefix, "--json")
        assert code == 0, err
        assert json.loads(out)["info"]["version"] == v1
    code, _, err = run(*store, "info", "db", v1[:8])  # same day: both match
    assert code == 2
    assert "ambiguous" in err
    assert v1 in err
    assert v2 in err
    code, _, err = run(*store, "checkout", "db", "ffffff", "--dest", str(tmp_path / "o"))
    assert code == 3
    assert "no ref or version 'ffffff'" in err


def test_help_examples_use_the_real_version_format() -> None:
    versions = [
        word
        for lines in EXAMPLES.values()
        for line in lines
        for word in line.split()
        if re.fullmatch(r"v?-?\d{8}T\S+-\S+", word)
    ]
    assert versions  # the examples do show full ids
    for word in versions:
        assert VersionId.is_version(word), word


def test_tag_and_rollback_take_json(tmp_path: Path, run: Run) -> None:
    store = ["--store", str(tmp_path / "store")]
    src = write_tree(tmp_path / "src", {"a": b"a"})
    v1 = _published(run, store, src)
    (src / "b").write_bytes(b"b")
    v2 = _published(run, store, src)
    code, out, _ = run(*store, "tag", "db", "stable", v1[:20], "--json")
    assert code == 0
    assert json.loads(out) == {"name": "db", "ref": "stable", "version": v1, "previous": None}
    code, out, _ = run(*store, "rollback", "db", "stable", "--json")
    assert json.loads(out) == {"name": "db", "ref": "latest", "version": v1, "previous": v2}


def test_checkout_without_dest_says_where_it_is_kept(tmp_path: Path, run: Run) -> None:
    store = ["--store", str(tmp_path / "store")]
    _published(run, store, write_tree(tmp_path / "src", {"a": b"a"}))
    code, out, err = run(*store, "checkout", "db", "--json")
    assert code == 0
    path = Path(json.loads(out)["path"])
    try:
        assert path.is_dir()
        assert f"kept: the checkout stays in {path}; remove {path.parent}" in err
        # the library's next temporary checkout sweeps those of killed processes: not this
        RemoteStore(FileBackend(tmp_path / "store")).checkout("db").release()
        assert (path / "a").read_bytes() == b"a"
    finally:
        shutil.rmtree(path.parent)
    code, _, err = run(*store, "--cache-dir", str(tmp_path / "c"), "checkout", "db")
    assert code == 0
    assert "kept" not in err  # the cache's own folder, managed by `cache rm`


def _cache_ls(run: Run, base: list[str]) -> list[dict[str, Any]]:
    code, out, _ = run(*base, "cache", "ls", "--json")
    assert code == 0
    return list(json.loads(out))


def test_cache_lists_per_name_and_version_and_removes_on_request(tmp_path: Path, run: Run) -> None:
    base = ["--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    src = write_tree(tmp_path / "src", {"a": b"a" * 5000})
    v1 = _published(run, base, src)
    assert run(*base, "checkout", "db")[0] == 0
    # held by this process, v1 stays cached (else v2 is built by patching it in place)
    cache = opening_module.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    assert isinstance(cache, CachedStore)
    held = cache.hold("db", v1)
    assert held is not None
    (src / "b").write_bytes(b"b" * 2000)
    v2 = _published(run, base, src)
    assert run(*base, "checkout", "db")[0] == 0
    held[1].unlink()
    code, out, _ = run(*base, "cache", "ls")
    assert re.search(rf"db\s+{v1}\s+4\.9 KiB\s+\d+s ago", out)
    assert "db: 2 versions, 11.7 KiB" in out
    code, out, _ = run(*base, "cache", "rm", "db", v1[:20], "--dry-run")
    assert f"would evict db/{v1}" in out
    code, out, _ = run(*base, "cache", "rm", "db", v1.split("-")[-1][:6], "--dry-run")
    assert f"would evict db/{v1}" in out  # a prefix of the digest, as everywhere else
    assert [e["version"] for e in _cache_ls(run, base)] == [v1, v2]  # dry: nothing gone
    code, out, _ = run(*base, "cache", "rm", "db", v1[:20])
    assert f"evicted db/{v1}" in out
    assert [e["version"] for e in _cache_ls(run, base)] == [v2]
    code, _, err = run(*base, "cache", "rm", "db", v1)
    assert code == 2
    assert "is not cached" in err
    for bad in ("", "../db"):  # not a name: bad usage, not "nothing to remove"
        code, _, err = run(*base, "cache", "rm", bad)
        assert code == 2, err
        assert "snapshot name" in err
    code, out, _ = run(*base, "cache", "clear", "--dry-run", "--json")
    assert [e["version"] for e in json.loads(out)["evicted"]] == [v2]
    assert run(*base, "cache", "clear")[0] == 0
    assert _cache_ls(run, base) == []


def test_offline_serves_the_cache_without_a_request_and_stale_ok_rides_an_outage(
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = write_tree(tmp_path / "src", {"a": b"a" * 5000})
    cache = ["--cache-dir", str(tmp_path / "cache")]
    with CountingProxy(moto_server.endpoint_url) as proxy:
        base = ["--endpoint-url", proxy.url, "--store", f"s3://{s3_bucket}/x", *cache]
        version = _published(run, base, src)
        assert run(*base, "checkout", "db")[0] == 0
        proxy.reset()
        monkeypatch.setenv("CHROMA_SNAPSHOTS_OFFLINE", "1")
        code, out, err = run(*base, "checkout", "db", "--json")
        assert code == 0, err
        assert json.loads(out)["info"]["version"] == version
        assert "offline: served what 'latest' named" in err
        assert "warning" not in err  # offline, a cached read is no failure
        code, out, err = run(*base, "info", "db", "--json")  # the cached version's manifest
        assert code == 0, err
        assert json.loads(out)["info"]["version"] == version
        assert json.loads(out)["files"] == ["a"]
        code, _, err = run(*base, "checkout", "other")
        assert code == 7
        assert "offline (--offline or CHROMA_SNAPSHOTS_OFFLINE=1)" in err
        assert proxy.requests == []  # the store was never contacted
        monkeypatch.delenv("CHROMA_SNAPSHOTS_OFFLINE")
        assert run(*base, "--offline", "ls")[0] == 7
        # the same endpoint, down (every connection reset): the cache is keyed by the
        # endpoint, so an outage must keep the URL, not point somewhere else
        proxy.faults = FaultPlan(1.0, kinds=("reset",))
        assert run(*base, "checkout", "db")[0] == 7  # without --stale-ok: the outage's error
        # a 2 s timeout: the store is given up after half of it (1 s), not the default 3 s
        code, out, err = run(*base, "--timeout", "2", "--stale-ok", "info", "db", "--json")
        assert code == 0, err
        assert json.loads(out)["info"]["version"] == version
        code, out, err = run(*base, "--timeout", "2", "--stale-ok", "checkout", "db", "--json")
    assert code == 0, err
    assert json.loads(out)["info"]["version"] == version
    assert json.loads(out)["stale"] is True


def test_license_matches_pyproject() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_an_unchanged_publish_makes_no_version_unless_allow_empty(tmp_path: Path, run: Run) -> None:
    store = ["--store", str(tmp_path / "store")]
    src = write_tree(tmp_path / "src", {"a": b"a" * 3000})
    v1 = _published(run, store, src)
    code, out, _ = run(*store, "publish", "db", str(src), "-m", "again")
    assert code == 0
    assert (
        out
        == f"nothing changed since latest {v1} of db: no new version (--allow-empty makes one)\n"
    )
    v2 = _published(run, store, src, "--allow-empty", "-m", "forced")
    assert v2 != v1
    code, out, _ = run(*store, "ls", "db", "--json")
    assert [v["version"] for v in json.loads(out)["versions"]] == [v2, v1]
    assert json.loads(out)["refs"] == {"latest": v2}


def test_every_command_and_subcommand_help_ends_with_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README promises examples under every command's --help, subcommands included."""
    import click

    from chroma_snapshots.cli.main import _build

    cli = _build()
    paths = [[n] for n in cli.commands]
    paths += [
        [n, sub]
        for n, cmd in cli.commands.items()
        if isinstance(cmd, click.Group)
        for sub in cmd.commands
    ]
    missing = []
    for path in paths:
        with pytest.raises(SystemExit):
            cli.main(args=[*path, "--help"], prog_name="chroma-snapshots")
        if "Examples:" not in capsys.readouterr().out:
            missing.append(" ".join(path))
    assert not missing, missing


def _damage(store: Path, version: str) -> None:
    manifest = next((store / "db" / "manifests").glob(f"{version}.*"))
    manifest.chmod(0o644)
    manifest.write_bytes(b"garbage")


def _listed_damaged(run: Run, store: list[str], good: str, bad: str, why: str) -> None:
    """``ls`` shows ``bad`` (latest) as DAMAGED, for ``why``, above the readable ``good``."""
    code, out, err = run(*store, "ls", "db")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{bad}  DAMAGED latest {why}")
    assert lines[1].startswith(good)
    code, out, _ = run(*store, "ls", "db", "--json")
    listing = json.loads(out)
    assert [v["version"] for v in listing["versions"]] == [good]
    assert list(listing["damaged"]) == [bad]


def test_a_damaged_latest_manifest_is_listed_rolled_back_and_published_over(
    tmp_path: Path, run: Run
) -> None:
    root = tmp_path / "store"
    store = ["--store", str(root)]
    src = write_tree(tmp_path / "src", {"a": b"a" * 5000})
    v1 = _published(run, store, src)
    (src / "b").write_bytes(b"b")
    v2 = _published(run, store, src)
    _damage(root, v2)
    _listed_damaged(run, store, v1, v2, f"manifest db/{v2}:")
    code, _, err = run(*store, "info", "db")
    assert code != 0
    assert f"manifest db/{v2}" in err
    # a publish over it reuses nothing of it but still moves latest
    (src / "c").write_bytes(b"c")
    v3 = _published(run, store, src)
    code, out, err = run(*store, "checkout", "db", "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "c").read_bytes() == b"c"
    _damage(root, v3)
    code, out, err = run(*store, "rollback", "db", v1, "--json")
    assert code == 0, err
    assert json.loads(out) == {"name": "db", "ref": "latest", "version": v1, "previous": v3}


@pytest.mark.parametrize("move", ["rollback", "publish"])
def test_offline_after_a_ref_moved_through_the_same_cache_serves_the_new_target(
    tmp_path: Path, run: Run, move: str
) -> None:
    store = ["--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    src = write_tree(tmp_path / "src", {"a": b"a" * 5000})
    v1 = _published(run, store, src)
    assert run(*store, "checkout", "db")[0] == 0  # the cache reads latest: v1
    (src / "b").write_bytes(b"b")
    v2 = _published(run, store, src)
    assert run(*store, "checkout", "db")[0] == 0  # the cache reads latest: v2
    if move == "rollback":
        code, _, err = run(*store, "rollback", "db", v1)
        target = v1
    else:
        (src / "c").write_bytes(b"c")
        code, out, err = run(*store, "publish", "db", str(src), "--json")
        target = json.loads(out)["version"]
    assert code == 0, err
    assert run(*store, "checkout", "db", target)[0] == 0  # by its id: no ref is read
    for command in (["checkout", "db", "--json"], ["info", "db", "--json"]):
        code, out, err = run(*store, "--offline", *command)
        assert code == 0, err
        assert json.loads(out)["info"]["version"] == target != v2


@pytest.mark.parametrize("how", ["deleted", "a directory"])
def test_ls_lists_a_ref_whose_manifest_is_missing(tmp_path: Path, run: Run, how: str) -> None:
    root = tmp_path / "store"
    store = ["--store", str(root)]
    src = write_tree(tmp_path / "src", {"a": b"a"})
    v1 = _published(run, store, src)
    (src / "b").write_bytes(b"b")
    v2 = _published(run, store, src)
    manifest = next((root / "db" / "manifests").glob(f"{v2}.*"))
    manifest.unlink()
    if how == "a directory":
        manifest.mkdir()
    _listed_damaged(run, store, v1, v2, "")


def test_ls_lists_the_versions_when_a_ref_is_damaged(tmp_path: Path, run: Run) -> None:
    root = tmp_path / "store"
    store = ["--store", str(root)]
    v1 = _published(run, store, write_tree(tmp_path / "src", {"a": b"a"}))
    ref = next((root / "db" / "refs").iterdir())
    ref.chmod(0o644)
    ref.write_bytes(b'{"version": "zzz"}')
    code, out, err = run(*store, "ls", "db")
    assert code == 0, err
    assert out.splitlines()[0].startswith(v1)
    assert "DAMAGED REFS: " in out
    code, out, _ = run(*store, "ls", "db", "--json")
    assert [v["version"] for v in json.loads(out)["versions"]] == [v1]
    assert "damaged_refs" in json.loads(out)


@pytest.mark.parametrize("damage", [b'{"version": "zzz"}', b"\x00" * 10, b""])
def test_a_damaged_latest_is_repaired_by_rollback_force(
    tmp_path: Path, run: Run, damage: bytes
) -> None:
    root = tmp_path / "store"
    store = ["--store", str(root)]
    v1 = _published(run, store, write_tree(tmp_path / "src", {"a": b"a"}))
    v2 = _published(run, store, write_tree(tmp_path / "src", {"a": b"b"}))
    # a reader in another process has seen latest at its generation (2)
    reader = RemoteStore(FileBackend(root))
    assert reader.resolve("db").version == v2
    ref = root / "db" / "refs" / "latest"
    ref.chmod(0o644)
    ref.write_bytes(damage)
    code, _, err = run(*store, "rollback", "db", v1)
    assert code == 5, err
    assert "rollback --force" in err
    code, out, err = run(*store, "rollback", "db", v1, "--force", "--json")
    assert code == 0, err
    assert json.loads(out) == {"name": "db", "ref": "latest", "version": v1, "previous": None}
    # the repaired ref reads everywhere, also where a higher generation than 1 was seen
    assert reader.resolve("db").version == v1
    v3 = _published(run, store, write_tree(tmp_path / "src", {"a": b"c"}))
    assert reader.resolve("db").version == v3
    code, _, err = run(*store, "checkout", "db", v1, "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "a").read_bytes() == b"a"


def test_ctrl_c_says_it_was_interrupted(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(opening_module, "open_store", interrupted)
    code, _, err = run("--store", str(tmp_path), "ls")
    assert code == 130
    assert "interrupted" in err


@pytest.mark.parametrize(("url", "ok"), [("{tmp}/store", True), ("store", False)])
def test_the_store_variable_takes_an_absolute_path_as_the_flag_does(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch, url: str, ok: bool
) -> None:
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("CHROMA_SNAPSHOTS_URL", url.format(tmp=tmp_path))
    code, _, err = run("ls")
    assert (code, "absolute path" in err) == ((0, False) if ok else (2, True))


def test_a_dest_another_checkout_filled_meanwhile_is_the_documented_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two checkouts into one new dest: the one that finishes second finds it full.
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "src", {"a": b"a"}))
    dest = tmp_path / "dest"
    real = store.materialize

    def and_another_writes_dest(*args: Any, **kwargs: Any) -> str:
        out = real(*args, **kwargs)
        dest.mkdir(exist_ok=True)
        (dest / "theirs").write_bytes(b"first")
        return out

    monkeypatch.setattr(store, "materialize", and_another_writes_dest)
    with pytest.raises(InvalidInputError, match="exists and is not empty"):
        store.checkout("db", dest=dest)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    assert [p.name for p in dest.iterdir()] == ["theirs"]


def test_a_message_with_control_characters_stays_on_its_line(tmp_path: Path, run: Run) -> None:
    src = write_tree(tmp_path / "src", {"a": b"a"})
    store = ["--store", str(tmp_path / "store")]
    assert run(*store, "publish", "db", str(src), "-m", "line one\nline two\x07\x1b[2J")[0] == 0
    code, out, _ = run(*store, "ls", "db")
    assert code == 0
    assert len(out.strip().splitlines()) == 1  # one version, one line
    assert "line one\\nline two\\x07\\x1b[2J" in out
    assert "\x07" not in out
    assert "\x1b" not in out
    code, out, _ = run(*store, "ls", "db", "--json")
    assert json.loads(out)["versions"][0]["message"] == "line one\nline two\x07\x1b[2J"


def test_dests_a_checkout_cannot_be_renamed_into_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import tempfile

    from chroma_snapshots.errors import LocalDiskError

    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "src", {"a": b"a"}))
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(InvalidInputError, match="is a symbolic link: name the folder itself"):
        store.checkout("db", dest=tmp_path / "link")
    (tmp_path / "afile").write_bytes(b"x")
    for dest in (tmp_path / "afile" / "sub", tmp_path / "afile" / "sub" / "deeper"):
        with pytest.raises(InvalidInputError, match="a file is in the way of its folder"):
            store.checkout("db", dest=dest)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.fail("this test needs root to mount a tmpfs (CI runs as root)")
    try:
        with pytest.raises(InvalidInputError, match=r"is a mount point: .* new folder inside it"):
            store.checkout("db", dest=mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    def denied(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # as for a parent this user cannot write
    with pytest.raises(LocalDiskError, match="parent folder must be writable"):
        store.checkout("db", dest=tmp_path / "new")


def test_a_cli_checkout_of_a_held_version_without_dest_says_to_use_dest(
    tmp_path: Path, run: Run
) -> None:
    # The CLI's hold ends with the command: a second holder's copy would be gone by the
    # time its path is printed.
    store = RemoteStore(FileBackend(tmp_path / "store"))
    store.publish("db", write_tree(tmp_path / "src", {"a": b"a"}))
    # the CLI's own way of opening the store, so the same cache folder
    cli_store = opening_module.open_store(
        str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")
    )
    holder = cli_store.checkout("db")
    args = ["--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    code, _, err = run(*args, "checkout", "db")
    assert code == 2
    assert "held by another checkout" in err
    code, out, _ = run(*args, "checkout", "db", "--dest", str(tmp_path / "mine"))
    assert code == 0
    assert (tmp_path / "mine" / "a").read_bytes() == b"a"
    holder.release()
    code, out, _ = run(*args, "checkout", "db")
    assert (code, out.split(":")[0]) == (0, str(holder.path))


def test_a_damaged_tag_is_repaired_by_tag_force(tmp_path: Path, run: Run) -> None:
    root = tmp_path / "store"
    store = ["--store", str(root)]
    v1 = _published(run, store, write_tree(tmp_path / "src", {"a": b"a"}))
    code, _, err = run(*store, "tag", "db", "stable", v1)
    assert code == 0, err
    ref = root / "db" / "refs" / "stable"
    ref.chmod(0o644)
    ref.write_bytes(b"garbage{")
    code, _, err = run(*store, "tag", "db", "stable", v1, "--move")
    assert code == 5
    assert "tag --force" in err
    code, _out, err = run(*store, "tag", "db", "stable", v1, "--force", "--json")
    assert code == 0, err
    assert RemoteStore(FileBackend(root)).refs("db")["stable"] == v1


def test_an_any_move_over_a_ref_that_moved_since_it_was_read_is_a_conflict(
    tmp_path: Path,
) -> None:
    # ANY writes whatever the ref held, but over what it read: a publish that landed in
    # between is not dropped with two values at one generation
    from chroma_snapshots.errors import ConflictError
    from chroma_snapshots.stores import refs
    from chroma_snapshots.stores.base import ANY

    store = RemoteStore(FileBackend(tmp_path / "store"))
    v1 = store.publish("db", write_tree(tmp_path / "src", {"a": b"a"})).version
    read = store.read_ref("db")
    assert read is not None
    first = read[0].generation  # the time in microseconds: a new ref
    v2 = store.publish("db", write_tree(tmp_path / "src", {"a": b"b"})).version
    io = store.backend
    with pytest.raises(ConflictError):
        refs.move_ref(io, None, "db", "latest", v1, ANY, read, lambda: store.read_ref("db"))
    assert store.resolve("db").version == v2
    store.set_ref("db", "latest", v1, expected=ANY)  # read afresh: one generation more
    now = store.read_ref("db")
    assert now is not None
    assert now[0].version == v1
    assert now[0].generation == first + 2


def test_an_empty_dest_is_refused_with_a_cache_too(tmp_path: Path) -> None:
    remote = RemoteStore(FileBackend(tmp_path / "store"))
    remote.publish("db", write_tree(tmp_path / "src", {"a": b"a"}))
    for store in (remote, CachedStore(remote, tmp_path / "cache")):
        with pytest.raises(InvalidInputError, match="empty"):
            store.checkout("db", dest="")


@pytest.mark.parametrize(
    "flags",
    [
        ("--store", "{tmp}/store "),
        ("--store", "s3://bkt/prefix "),
        ("--store", "s3://bkt/pre\tfix"),
        ("--store", "{tmp}/store", "--cache-dir", "{tmp}/cache "),
    ],
)
def test_a_flag_with_white_space_at_its_end_is_refused_not_another_store(
    tmp_path: Path, run: Run, flags: tuple[str, ...]
) -> None:
    # The environment's values are stripped; the same value typed as a flag named another
    # prefix or folder (S3 prefix 'ws2 '; URL parsing drops a tab), so it is refused.
    src = write_tree(tmp_path / "src", {"a": b"a"})
    args = [f.format(tmp=tmp_path) for f in flags]
    code, _, err = run(*args, "publish", "db", str(src))
    assert code == 2, err
    assert "white space" in err
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no store or cache folder made


def test_expected_takes_a_version_prefix_and_a_dry_run_checks_it_as_the_publish_does(
    tmp_path: Path, run: Run
) -> None:
    store = tmp_path / "store"
    src = write_tree(tmp_path / "src", {"a": b"1"})
    code, out, _ = run("--store", str(store), "publish", "db", str(src), "--json")
    first = json.loads(out)["version"]
    write_tree(src, {"a": b"2"})
    for expected, code_wanted in (("garbage", 2), ("none", 4), ("2000", 3), (first[:8], 0)):
        code, _, err = run(
            "--store", str(store), "publish", "db", str(src), "--dry-run", "--expected", expected
        )
        assert code == code_wanted, (expected, err)
    code, out, err = run("--store", str(store), "publish", "db", str(src), "--expected", first[:8])
    assert code == 0, err  # a unique prefix, as wherever a version is expected
    code, _, err = run("--store", str(tmp_path / "new"), "publish", "bad/name", str(src))
    assert code == 2, err
    assert not (tmp_path / "new").exists()  # refused before the store's folder was made


def test_every_option_names_what_it_takes() -> None:
    """Every option's --help names what it takes (seconds, a count, a version, a profile),
    not click's TEXT, but the message, which is text: options read as text and parsed by
    the CLI itself (`--keep-last TEXT`, `demo --size-mb TEXT`) said TEXT."""
    import click

    from chroma_snapshots.cli.main import _build

    def commands(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
        found: list[tuple[str, click.Command]] = []
        for name, cmd in group.commands.items():
            found.append((f"{path} {name}".strip(), cmd))
            if isinstance(cmd, click.Group):
                found += commands(cmd, f"{path} {name}")
        return found

    cli = _build()
    shown_as_text = []
    for path, cmd in [("", cli), *commands(cli, "")]:
        ctx = click.Context(cmd, info_name=path or "chroma-snapshots")
        for param in cmd.params:
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record and " TEXT" in record[0] and param.name != "message":
                shown_as_text.append(f"{path}: {record[0]}")
    assert shown_as_text == []
