"""pytest fixtures: ``moto_server`` (one per session) and ``s3_bucket`` (one per test)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .s3server import CREDENTIALS, MotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's S3 server on a free loopback port; AWS credentials set to dummies for the session."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with MotoServer() as server:
        yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    """A fresh, empty bucket on the session's moto server."""
    return moto_server.create_bucket()
