"""What a CLI process pays before its first byte: a checkout from S3 imports botocore but
neither boto3 nor s3transfer, and the command freezes what opening the store loaded (once a
process), with the collector running again afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_snapshots import RemoteStore, open_remote
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree

pytestmark = pytest.mark.usefixtures("clean_env")


def _cli_in_fresh_process(args: list[str], times: int, env: dict[str, str]) -> dict[str, object]:
    """Run ``main(args)`` ``times`` times in a new interpreter; what it imported, the exit
    codes, how many objects were frozen after each run and whether gc is enabled."""
    code = (
        "import gc, json, sys\n"
        "from chroma_snapshots.cli import main\n"
        "codes, frozen = [], []\n"
        f"for _ in range({times}):\n"
        f"    codes.append(main({args!r}))\n"
        "    frozen.append(gc.get_freeze_count())\n"
        "print(json.dumps({'codes': codes, 'frozen': frozen, 'enabled': gc.isenabled(),\n"
        "                  'modules': sorted(sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.fixture
def env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """moto as the S3 endpoint, here and in the child; the child imports this tree."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint_url)
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_a_checkout_from_s3_imports_neither_boto3_nor_s3transfer(
    env: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/snaps"
    write_tree(tmp_path / "src", {"a.bin": b"x" * 70_000, "b/c.txt": b"hello"})
    store = open_remote(url)
    assert isinstance(store, RemoteStore)
    store.publish("db", tmp_path / "src")
    args = ["--store", url, "checkout", "db", "--dest", str(tmp_path / "out")]
    got = _cli_in_fresh_process(args, 1, env)
    assert got["codes"] == [0]
    assert (tmp_path / "out" / "b" / "c.txt").read_bytes() == b"hello"
    modules = set(got["modules"])  # type: ignore[call-overload]
    assert "botocore.client" in modules  # the probe saw the S3 client being made
    assert not {m for m in modules if m.split(".")[0] in ("boto3", "s3transfer")}


def test_the_cli_freezes_what_opening_a_store_loaded_once_a_process(
    env: dict[str, str], s3_bucket: str
) -> None:
    """Frozen objects are never collected: a second command in the same process (tests,
    an embedding application) must not freeze its own garbage too."""
    got = _cli_in_fresh_process(["--store", f"s3://{s3_bucket}/snaps", "ls"], 2, env)
    assert got["codes"] == [0, 0]
    frozen = got["frozen"]
    assert isinstance(frozen, list)
    assert frozen[0] > 10_000  # botocore's S3 model and the modules loaded for it
    assert frozen[1] <= frozen[0]  # (some frozen objects were freed since)
    assert got["enabled"] is True
