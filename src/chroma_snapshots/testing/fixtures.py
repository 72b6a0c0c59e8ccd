"""pytest fixtures: ``moto_server`` (one server per session) and ``s3_bucket`` (one per test).

The server process lives for the session; the dummy AWS credentials are set per test (with
``monkeypatch``), so no test's environment leaks into another's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chroma_snapshots.cli.localserver import CREDENTIALS, MotoServer


@pytest.fixture(scope="session")
def _moto_server_process() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def moto_server(_moto_server_process: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """moto's S3 server on a loopback port; dummy AWS credentials set for this test."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    return _moto_server_process


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    """A fresh, empty bucket on the session's moto server."""
    return moto_server.create_bucket()
