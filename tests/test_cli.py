"""The command line, run as users run it: a separate process against a real local S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import read_tree, write_tree


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "chroma_snapshots.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_publish_ls_info_checkout(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
    }
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(200_000), "s/h.bin": b"h"})
    out = _cli("publish", "db", str(src), "-m", "hello", "--json", env=env)
    assert out.returncode == 0, out.stderr
    version = json.loads(out.stdout)["version"]
    listed = json.loads(_cli("ls", "db", "--json", env=env).stdout)
    assert listed["refs"] == {"latest": version}
    assert _cli("ls", env=env).stdout.split() == ["db"]
    info = json.loads(_cli("info", "db", "--json", env=env).stdout)
    assert info["info"]["message"] == "hello"
    assert info["files"] == ["chroma.sqlite3", "s/h.bin"]
    got = _cli("checkout", "db", version, "--dest", str(tmp_path / "out"), env=env)
    assert got.returncode == 0, got.stderr
    assert read_tree(tmp_path / "out") == read_tree(src)


def test_errors_map_to_documented_exit_codes(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    store = ["--store", f"s3://{s3_bucket}/snaps"]
    missing = _cli(*store, "checkout", "nothing", "--dest", str(tmp_path / "o"), env=env)
    assert missing.returncode == 3
    assert "error:" in missing.stderr
    assert "Traceback" not in missing.stderr
    src = write_tree(tmp_path / "src", {"a": b"a"})
    assert _cli(*store, "publish", "db", str(src), "--expected", "none", env=env).returncode == 0
    conflict = _cli(*store, "publish", "db", str(src), "--expected", "none", env=env)
    assert conflict.returncode == 4
    bad_env = {k: v for k, v in env.items() if not k.startswith(("CHROMA", "AWS_ENDPOINT"))}
    unconfigured = _cli("ls", env={**bad_env, "CHROMADB_STORAGE_MODE": "s3"})
    assert unconfigured.returncode == 2
    assert "CHROMADB_BUCKET" in unconfigured.stderr
    assert _cli(*store, "publish", "../x", str(src), env=env).returncode == 2


def test_demo_runs_and_reports_small_incremental_upload() -> None:
    out = _cli("demo", "--size-mb", "8")
    assert out.returncode == 0, out.stderr
    rows = {
        line[:34].strip(): line[34:].split()
        for line in out.stdout.splitlines()
        if line[:1].isalpha()
    }
    # seconds, requests, up MiB, down MiB, reused MiB
    assert float(rows["publish v1 (cold)"][2]) > 3
    assert float(rows["publish v2 (10 rows changed)"][2]) < float(rows["publish v1 (cold)"][2]) / 4
    assert float(rows["checkout v1 (cold, into cache)"][3]) > 3
    assert rows["checkout v1 (warm: cached)"][1] == "1"  # one request: the ref
    assert float(rows["checkout v1 (warm: cached)"][3]) == 0
    assert (
        float(rows["checkout v2 (incremental)"][3])
        < float(rows["checkout v1 (cold, into cache)"][3]) / 4
    )
    assert "rollback" in out.stdout


def test_cache_commands(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    base = ["--store", f"s3://{s3_bucket}/snaps", "--cache-dir", str(tmp_path / "cache")]
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(100_000)})
    assert _cli(*base, "publish", "db", str(src), env=env).returncode == 0
    out = json.loads(_cli(*base, "checkout", "db", "--json", env=env).stdout)
    cached_path = Path(out["path"])
    assert str(cached_path).startswith(str(tmp_path / "cache"))
    listed = json.loads(_cli(*base, "cache", "ls", "--json", env=env).stdout)
    assert [e["version"] for e in listed] == [out["info"]["version"]]
    assert _cli(*base, "cache", "verify", env=env).returncode == 0
    (cached_path / "chroma.sqlite3").write_bytes(b"scribbled")
    bad = _cli(*base, "cache", "verify", env=env)
    assert bad.returncode == 5
    assert "differs" in bad.stdout
    assert _cli(*base, "checkout", "db", env=env).returncode == 0  # repairs the cached copy
    assert _cli(*base, "cache", "verify", env=env).returncode == 0
    cleared = _cli(*base, "cache", "clear", env=env)
    assert "evicted 1 versions" in cleared.stdout
    assert json.loads(_cli(*base, "cache", "ls", "--json", env=env).stdout) == []


def test_doctor_on_a_healthy_s3_store(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
        "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
    }
    out = _cli("doctor", "--json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    found = {f["check"]: f for f in json.loads(out.stdout)}
    for step in ("list", "write", "read", "delete"):
        assert found[f"s3://{s3_bucket}/snaps: {step}"]["status"] == "ok"
    assert found["cache: contents"]["status"] == "ok"
    assert not list(moto_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    bad = _cli("doctor", env={**env, "CHROMA_SNAPSHOTS_URL": "s3://no-such-bucket-here/x"})
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout
    unconfigured = _cli("doctor", env={k: v for k, v in env.items() if not k.startswith("CHROMA")})
    assert unconfigured.returncode == 1
    assert "CHROMA_SNAPSHOTS_URL" in unconfigured.stdout


def test_operator_commands(moto_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url,
    }
    src = write_tree(
        tmp_path / "src", {"chroma.sqlite3": os.urandom(300_000), "seg/a.bin": b"a" * 5000}
    )
    v1 = json.loads(_cli("publish", "db", str(src), "--json", env=env).stdout)["version"]
    (src / "seg" / "new.bin").write_bytes(b"new")
    with open(src / "chroma.sqlite3", "r+b") as f:
        f.write(b"changed first page")
    v2 = json.loads(_cli("publish", "db", str(src), "--json", env=env).stdout)["version"]
    d = json.loads(_cli("diff", "db", v1, "latest", "--json", env=env).stdout)
    assert (d["added"], d["removed"], d["changed"]) == (["seg/new.bin"], [], ["chroma.sqlite3"])
    assert d["new_chunks"] == 2
    assert _cli("verify", "db", env=env).returncode == 0
    assert _cli("tag", "db", "stable", v1, env=env).returncode == 0
    assert _cli("tag", "db", "stable", "latest", env=env).returncode == 4  # exists: CAS refuses
    assert _cli("tag", "db", "stable", "latest", "--move", env=env).returncode == 0
    back = _cli("rollback", "db", v1, env=env)
    assert back.returncode == 0, back.stderr
    refs = json.loads(_cli("ls", "db", "--json", env=env).stdout)["refs"]
    assert refs == {"latest": v1, "stable": v2}
    dry = json.loads(
        _cli("prune", "db", "--keep-last", "1", "--min-age", "0", "--json", env=env).stdout
    )
    assert dry["dry_run"] is True
    assert dry["deleted_versions"] == []  # both versions are named by a ref
    mirror = tmp_path / "mirror"
    synced = _cli("sync", f"s3://{s3_bucket}/snaps", f"file://{mirror}", "--json", env=env)
    assert synced.returncode == 0, synced.stderr
    assert set(json.loads(synced.stdout)) == {f"db/{v1}", f"db/{v2}"}
    local = {**env, "CHROMA_SNAPSHOTS_URL": f"file://{mirror}"}
    assert json.loads(_cli("ls", "db", "--json", env=local).stdout)["refs"] == refs
    assert (
        _cli("checkout", "db", "stable", "--dest", str(tmp_path / "out"), env=local).returncode == 0
    )
    assert read_tree(tmp_path / "out") == read_tree(src)
    again = json.loads(
        _cli("sync", f"s3://{s3_bucket}/snaps", f"file://{mirror}", "--json", env=env).stdout
    )
    assert set(again.values()) == {0}  # nothing missing the second time
