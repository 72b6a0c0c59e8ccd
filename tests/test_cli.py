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
    out = _cli("demo", "--size-mb", "8", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["step"]: r for r in json.loads(out.stdout)}
    cold_up = rows["publish v1 (cold)"]["mib_up"]
    cold_down = rows["checkout v1 (cold, into cache)"]["mib_down"]
    assert cold_up > 3
    assert cold_down > 3
    assert rows["publish v2 (10 records added)"]["mib_up"] < cold_up / 4
    assert rows["checkout v1 (warm: cached)"]["requests"] == 1  # one request: the ref
    assert rows["checkout v1 (warm: cached)"]["mib_down"] == 0
    assert rows["checkout v2 (incremental)"]["mib_down"] < cold_down / 4
    assert rows["checkout via EFS mirror (cold)"]["source"] == "efs"
    hung = rows["same, EFS hung: ref from S3 (2s)"]
    assert hung["mib_down"] == 0
    assert 2.0 <= hung["seconds"] < 6.0  # the EFS timeout, then S3, within the deadline
    assert "rollback: latest" in out.stderr
    # the expected EFS failover is announced, not warned about above the table
    assert "as expected: 1 EFS read timed out and S3 answered instead" in out.stderr
    assert "trying the next store" not in out.stderr
    assert "nearest to probe 0 is receipt-" in out.stderr


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
    # the checks keep the URL as their name; the list says which server it reached
    reached = f"s3://{s3_bucket}/snaps at {moto_server.endpoint_url}: "
    assert found[f"s3://{s3_bucket}/snaps: list"]["detail"].startswith(reached)
    assert found["cache: contents"]["status"] == "ok"
    assert found["configuration"]["detail"] == (
        f"store s3://{s3_bucket}/snaps; S3 endpoint {moto_server.endpoint_url}; signing off"
    )
    keyed = {**env, "CHROMA_SNAPSHOTS_SIGNING_KEY": f"a:{'1' * 32},b:{'2' * 32}"}
    said = json.loads(_cli("doctor", "--json", env=keyed).stdout)
    detail = next(f["detail"] for f in said if f["check"] == "configuration")
    assert detail.endswith("; signing on (2 keys)")
    assert "1111" not in detail
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


def test_help_has_examples_and_completion_completes(tmp_path: Path) -> None:
    commands = ["publish", "checkout", "ls", "info", "diff", "verify", "tag", "rollback"]
    for command in [*commands, "prune", "sync", "cache", "doctor", "demo", "completion"]:
        out = _cli(command, "--help")
        assert out.returncode == 0, out.stderr
        assert "Examples:" in out.stdout
        assert f"chroma-snapshots {command}" in out.stdout
    script = _cli("completion", "bash")
    assert "_CHROMA_SNAPSHOTS_COMPLETE=bash_complete" in script.stdout
    env = {**os.environ, "_CHROMA_SNAPSHOTS_COMPLETE": "bash_complete"}
    env.update(COMP_WORDS="chroma-snapshots pru", COMP_CWORD="1")
    assert _cli(env=env).stdout.split() == ["plain,prune"]
    assert _cli("completion", "tcsh").returncode == 2


def _drain(fd: int) -> str:
    """Everything written to a pty whose other end is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the writer is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    import pty

    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    store = ["--store", f"s3://{s3_bucket}/snaps"]
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": os.urandom(3_000_000)})
    piped = _cli(*store, "publish", "db", str(src), env=env)
    assert piped.returncode == 0
    assert "%|" not in piped.stderr
    primary, secondary = pty.openpty()
    cmd = [sys.executable, "-m", "chroma_snapshots.cli", *store, "checkout", "db"]
    cmd += ["--dest", str(tmp_path / "out")]
    done = subprocess.run(cmd, stderr=secondary, stdout=subprocess.PIPE, env=env, timeout=120)
    os.close(secondary)
    shown = _drain(primary)
    assert done.returncode == 0
    assert "checkout: 100%|" in shown
    assert "2.86M/2.86M" in shown
