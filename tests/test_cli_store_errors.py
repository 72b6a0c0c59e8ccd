"""fsspec stores through the real entry point: a store that does not answer is never "not
found", a missing bucket is named, the S3 flags reach s3fs, a missing filesystem package is
named, as on s3:// stores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inprocess import Run

from chroma_snapshots import StoreConfig, open_remote, open_store
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree
from chroma_snapshots.testing.proxy import CountingProxy, closed_endpoint

pytestmark = pytest.mark.usefixtures("clean_env")


def test_an_unreachable_http_store_is_unavailable_not_a_missing_ref(
    tmp_path: Path, run: Run
) -> None:
    """fsspec's HTTP filesystem reports a refused connection as FileNotFoundError."""
    with closed_endpoint() as url:
        store = ["--store", f"{url}/x"]
        cache = ["--cache-dir", str(tmp_path / "cache")]
        for args in (
            [*store, "checkout", "rec", "--dest", str(tmp_path / "d")],
            [*store, "info", "rec"],
            [*store, "verify", "rec"],
            [*store, "tag", "rec", "stable"],
            [*store, "publish", "rec", str(tmp_path), "--dry-run"],
            [*cache, *store, "checkout", "rec"],
        ):
            code, _, err = run(*args)
            assert code == 7, (args, err)
            assert "Cannot connect" in err, args
            assert "no ref" not in err, args
            assert "no snapshot" not in err, args


def test_an_http_store_still_says_what_is_missing(tmp_path: Path, run: Run) -> None:
    """A 404 is still 'not found': only failures to get an answer became unavailable."""
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"x" * 1000})
    assert run("--store", str(tmp_path / "store"), "publish", "db", str(src))[0] == 0
    serve = [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"]
    server = subprocess.Popen(
        serve, cwd=tmp_path / "store", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split(" port ")[1].split()[0]
        store = ["--store", f"http://127.0.0.1:{port}"]
        assert run(*store, "info", "db")[0] == 0
        code, _, err = run(*store, "info", "nosuch")
        assert (code, err) == (3, "error: no snapshot named 'nosuch' in this store\n")
        code, _, err = run(*store, "info", "db", "nosuchref")
        assert code == 3
        assert "no ref 'nosuchref'" in err
    finally:
        server.kill()
        server.wait()


def test_fsspec_s3_flags_win_over_the_environment(
    moto_server: MotoServer,
    s3_bucket: str,
    tmp_path: Path,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--endpoint-url reaches s3fs: the environment's endpoint (nothing listens) is not used."""
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"x" * 1000})
    with closed_endpoint() as dead, CountingProxy(moto_server.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
        store = ["--endpoint-url", proxy.url, "--store", f"fsspec+s3://{s3_bucket}/x"]
        code, _, err = run(*store, "--region", "eu-west-1", "publish", "db", str(src))
        assert code == 0, err
        code, out, err = run(*store, "ls")
        assert (code, out) == (0, "db\n"), err
        assert any(r.method == "PUT" for r in proxy.requests)
        code, _, err = run("--store", f"fsspec+s3://{s3_bucket}/x", "ls")  # the environment's
    assert code == 7
    assert dead in err


def test_fsspec_s3_a_missing_bucket_is_named_not_an_empty_store(
    moto_server: MotoServer, tmp_path: Path, run: Run
) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"x" * 1000})
    store = ["--endpoint-url", moto_server.endpoint_url, "--store", "fsspec+s3://no-such-bkt-9/x"]
    for args in (
        ["ls"],
        ["checkout", "db", "--dest", str(tmp_path / "o")],
        ["publish", "db", str(src)],
    ):
        code, out, err = run(*store, *args)
        assert code == 3, args
        assert out == ""
        assert "bucket 'no-such-bkt-9' does not exist" in err, args


def test_a_missing_filesystem_package_is_named(run: Run) -> None:
    """fsspec is installed; gcsfs (not in the [fsspec] extra) is not."""
    code, _, err = run("--store", "gs://bkt/x", "ls")
    assert code == 2
    assert err == "error: store URL 'gs://bkt/x' needs gcsfs: pip install gcsfs\n"


def _published(run: Run, store: list[str], src: Path) -> str:
    code, out, err = run(*store, "publish", "db", str(src), "--json")
    assert code == 0, err
    return str(json.loads(out)["version"])


def test_a_short_prefix_says_the_minimum_and_a_tag_cannot_hide_a_version(
    tmp_path: Path, run: Run
) -> None:
    store = ["--store", str(tmp_path / "store")]
    version = _published(run, store, write_tree(tmp_path / "src", {"a.bin": b"a" * 3000}))
    digest = version.split("-")[1]
    code, _, err = run(*store, "info", "db", digest[:3])
    assert code == 3
    assert f"no ref {digest[:3]!r} (a version prefix needs at least 4 characters)" in err
    for hiding in (digest[:4], version[:10]):
        code, _, err = run(*store, "tag", "db", hiding)
        assert code == 2, hiding
        assert f"tag {hiding!r} is also the start of version {version}" in err
    assert set(open_remote(str(tmp_path / "store")).refs("db")) == {"latest"}  # none written
    assert run(*store, "tag", "db", "abc")[0] == 0  # too short to be read as a prefix
    code, out, _ = run(*store, "info", "db", "abc", "--json")  # an existing short tag: a ref
    assert code == 0
    assert json.loads(out)["info"]["version"] == version
    assert run(*store, "info", "db", digest[:4])[0] == 0  # the version is still reachable


def test_offline_commands_do_not_warn_that_the_store_did_not_answer(
    tmp_path: Path, run: Run
) -> None:
    """Offline the store is never asked: no 'stale: the store did not answer' warning, and the
    error names the flag as well as the variable."""
    base = ["--cache-dir", str(tmp_path / "cache"), "--store", str(tmp_path / "store")]
    _published(run, base, write_tree(tmp_path / "src", {"a.bin": b"a" * 3000}))
    assert run(*base, "checkout", "db")[0] == 0
    for args in (["verify", "db"], ["tag", "db", "stable"]):
        code, _, err = run("--offline", *base, *args)
        assert code == 7, args
        assert "warning" not in err, args
        assert "offline (--offline or CHROMA_SNAPSHOTS_OFFLINE=1)" in err, args


def test_an_offline_checkout_says_what_it_served_and_nothing_stale(
    tmp_path: Path, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """Offline, the command says what it served; the cache's stale warning is not logged
    (it named "the store did not answer": the CLI quieted another module's logger)."""
    base = ["--cache-dir", str(tmp_path / "cache"), "--store", str(tmp_path / "store")]
    _published(run, base, write_tree(tmp_path / "src", {"a.bin": b"a" * 3000}))
    assert run(*base, "checkout", "db")[0] == 0
    caplog.clear()
    code, _, err = run("--offline", *base, "checkout", "db")
    assert code == 0
    assert "offline: served what 'latest' named" in err
    assert not [r for r in caplog.records if "stale" in r.getMessage()]


def test_a_stale_version_is_logged_with_the_stores_error(
    tmp_path: Path, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the library (nothing quiets it), the warning for a version served stale
    names the store's error."""
    base = ["--cache-dir", str(tmp_path / "cache"), "--store", str(tmp_path / "store")]
    _published(run, base, write_tree(tmp_path / "src", {"a.bin": b"a" * 3000}))
    assert run(*base, "checkout", "db")[0] == 0
    cfg = StoreConfig(url=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), offline=True)
    caplog.clear()
    with open_store(cfg).checkout("db") as snap:
        assert snap.stale
    (said,) = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert "offline (--offline or CHROMA_SNAPSHOTS_OFFLINE=1)" in said
    assert "did not answer" not in said


@pytest.mark.parametrize("status", [200, 404])
def test_an_endpoint_that_is_not_s3_is_unavailable_in_one_line(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A web server given as the S3 endpoint by mistake (a console's port) answers 200 (or
    404) with HTML to everything: each command says the endpoint is not S3 (exit 7), never
    a traceback, an empty listing or "no snapshot"."""
    import http.server
    import threading

    class Html(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            body = b"<html><body>console</body></html>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _page

        def log_message(self, *args: object) -> None:
            pass

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        base = ["--store", "s3://bucket/snaps", "--endpoint-url", url]
        src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"x" * 1000})
        for args in (
            [*base, "ls"],
            [*base, "ls", "rec"],
            [*base, "checkout", "rec", "--dest", str(tmp_path / "d")],
            [*base, "publish", "rec", str(src)],
        ):
            code, _, err = run(*args)
            assert code == 7, (args, err)
            assert "is the endpoint an S3 server?" in err, (args, err)
            assert "Traceback" not in err, args
        code, out, _ = run(*base, "doctor")  # a failed check is exit 1, its line says why
        assert code == 1
        assert "is the endpoint an S3 server?" in out
    finally:
        server.shutdown()
