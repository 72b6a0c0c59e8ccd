"""The query handler's warm path, counted where the requests arrive (a proxy in front of
moto's server): the read-consistency interval, stale reads, and init-phase hydration."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lambda_plugins
import pytest
from chroma_helpers import build

from chroma_snapshots.aws_lambda import query as query_module
from chroma_snapshots.aws_lambda.query import QueryHandler
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import publish_client
from chroma_snapshots.config import LambdaConfig
from chroma_snapshots.errors import ConfigError
from chroma_snapshots.stores.remote import RemoteStore
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.faults import FaultPlan
from chroma_snapshots.testing.lambda_context import FakeContext
from chroma_snapshots.testing.proxy import CountingProxy

DIM = 8
QUERY = {"collection": "receipts", "query_embeddings": [[0.5] * DIM], "n_results": 2}


def event(n: int = 1) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m{i}",
                "receiptHandle": f"rh{i}",
                "body": json.dumps(QUERY),
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:queries",
            }
            for i in range(n)
        ]
    }


def failures(response: dict[str, Any]) -> set[str]:
    return {f["itemIdentifier"] for f in response["batchItemFailures"]}


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logs() -> Iterator[Capture]:
    capture = Capture()
    logger = logging.getLogger("chroma_snapshots.aws_lambda")
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    with CountingProxy(moto_server.endpoint_url) as p:
        yield p


@pytest.fixture
def direct(moto_server: MotoServer, s3_bucket: str) -> RemoteStore:
    """The store, reached without the proxy (its requests are not counted)."""
    settings = S3Settings(endpoint_url=moto_server.endpoint_url)
    return RemoteStore(S3Backend(s3_bucket, "snaps", settings=settings))


@pytest.fixture
def env(
    proxy: CountingProxy, direct: RemoteStore, s3_bucket: str, tmp_path: Path
) -> dict[str, str]:
    publish_client(direct, "db", build(tmp_path / "v1", {"receipts": 50}, dim=DIM))
    return {
        "CHROMA_SNAPSHOTS_URL": f"s3://{s3_bucket}/snaps",
        "AWS_ENDPOINT_URL_S3": proxy.url,
        "CHROMA_SNAPSHOTS_NAME": "db",
        "CHROMA_SNAPSHOTS_CACHE_DIR": str(tmp_path / "cache"),
        "CHROMA_SNAPSHOTS_SINK": "lambda_plugins:collect",
        "CHROMA_SNAPSHOTS_RESERVE_SECONDS": "1",
    }


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lambda_plugins, "RESULTS", {})


def summaries(logs: Capture) -> list[logging.LogRecord]:
    return [r for r in logs.records if r.getMessage() == "query batch done"]


def warm_requests(handler: QueryHandler, proxy: CountingProxy, rounds: int) -> int:
    """Requests that reached the server over ``rounds`` warm invocations."""
    assert failures(handler(event(), FakeContext(30))) == set()  # cold: checks out
    proxy.reset()
    for _ in range(rounds):
        assert failures(handler(event(), FakeContext(30))) == set()
    return len(proxy.reset())


def test_without_an_interval_every_invocation_reads_the_ref(
    env: dict[str, str], proxy: CountingProxy
) -> None:
    handler = QueryHandler(LambdaConfig.from_env(env))
    assert warm_requests(handler, proxy, 5) == 5  # one ref GET each
    handler.close()


def test_within_the_interval_a_warm_invocation_makes_no_request(
    env: dict[str, str], proxy: CountingProxy, direct: RemoteStore, tmp_path: Path, logs: Capture
) -> None:
    config = LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_REFRESH_SECONDS": "3600"})
    handler = QueryHandler(config)
    assert warm_requests(handler, proxy, 5) == 0
    assert summaries(logs)[-1].requests == 0  # type: ignore[attr-defined]
    # The staleness it allows: a version published meanwhile is not seen until the interval
    # ends (here: not in this test), while a handler without the interval sees it at once.
    old = direct.resolve("db").version
    publish_client(direct, "db", build(tmp_path / "v2", {"receipts": 60}, dim=DIM))
    assert failures(handler(event(), FakeContext(30))) == set()
    assert summaries(logs)[-1].version == old  # type: ignore[attr-defined]
    fresh = QueryHandler(LambdaConfig.from_env(env))
    assert failures(fresh(event(), FakeContext(30))) == set()
    assert summaries(logs)[-1].version == direct.resolve("db").version  # type: ignore[attr-defined]
    handler.close()
    fresh.close()


def test_refresh_seconds_configuration() -> None:
    base = {"CHROMA_SNAPSHOTS_URL": "s3://bucket/prefix", "CHROMA_SNAPSHOTS_NAME": "db"}
    read = {
        "": None,
        "0": 0.0,
        "2.5": 2.5,
        "never": float("inf"),
    }
    for raw, want in read.items():
        cfg = LambdaConfig.from_env({**base, "CHROMA_SNAPSHOTS_REFRESH_SECONDS": raw})
        assert cfg.store.refresh_seconds == want
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_REFRESH_SECONDS"):
            LambdaConfig.from_env({**base, "CHROMA_SNAPSHOTS_REFRESH_SECONDS": bad})


def test_stale_ok_serves_the_cached_version_and_logs_it(
    env: dict[str, str], proxy: CountingProxy, direct: RemoteStore, logs: Capture
) -> None:
    handler = QueryHandler(LambdaConfig.from_env({**env, "CHROMA_SNAPSHOTS_STALE_OK": "true"}))
    assert failures(handler(event(), FakeContext(30))) == set()
    proxy.faults = FaultPlan(1.0, kinds=("reset",))  # the store stops answering
    assert failures(handler(event(2), FakeContext(30))) == set()
    version = direct.resolve("db").version
    stale = [r for r in logs.records if getattr(r, "stale", None) is True]
    assert stale
    assert all(r.version == version for r in stale)  # type: ignore[attr-defined]
    assert summaries(logs)[-1].stale is True  # type: ignore[attr-defined]
    handler.close()


@pytest.fixture
def lambda_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``env`` as the process environment, and the module's handler built afresh."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield
    built = query_module.__dict__.pop("handler", None)
    if built is not None:
        built.close()


@pytest.mark.usefixtures("lambda_env")
def test_init_phase_hydration_leaves_the_first_invocation_warm(
    proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHROMA_SNAPSHOTS_INIT_SECONDS", "10")  # the most Lambda allows
    proxy.reset()
    handler = query_module.handler  # what Lambda does during init
    assert [r for r in proxy.reset() if "/packs/" in r.path]  # the checkout happened here
    assert failures(handler(event(), FakeContext(30))) == set()
    seen = proxy.reset()
    assert len(seen) <= 1  # the first invocation only reads the ref
    assert not [r for r in seen if "/packs/" in r.path or "/manifests/" in r.path]


@pytest.mark.usefixtures("lambda_env")
def test_without_init_hydration_the_first_invocation_checks_out(
    proxy: CountingProxy,
) -> None:
    proxy.reset()
    handler = query_module.handler
    assert proxy.reset() == []  # nothing during init
    assert failures(handler(event(), FakeContext(30))) == set()
    assert [r for r in proxy.reset() if "/packs/" in r.path]


@pytest.mark.usefixtures("lambda_env")
def test_init_budget_too_small_leaves_it_to_the_first_invocation(
    proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch, logs: Capture
) -> None:
    monkeypatch.setenv("CHROMA_SNAPSHOTS_INIT_SECONDS", "0.001")
    handler = query_module.handler  # the init phase must not fail
    assert any("did not finish" in r.getMessage() for r in logs.records)
    assert failures(handler(event(), FakeContext(30))) == set()


def test_the_cold_start_example_runs(tmp_path: Path) -> None:
    """examples/lambda/cold_start.py at a tiny size, so it cannot rot: both modes run and
    answer (its figures are in benchmarks/RESULTS.md)."""
    script = Path(__file__).parent.parent / "examples" / "lambda" / "cold_start.py"
    out_file = tmp_path / "cold.json"
    args = ["--records", "300", "--dim", "8", "--runs", "1", "--json", str(out_file)]
    subprocess.run([sys.executable, str(script), *args], check=True, timeout=600)
    runs = json.loads(out_file.read_text())["runs"]
    assert {mode: len(r) for mode, r in runs.items()} == {"without": 1, "with": 1}
    assert all(r["failed"] == 0 for mode in runs.values() for r in mode)
