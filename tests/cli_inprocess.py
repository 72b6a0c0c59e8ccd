"""Fixtures (a pytest plugin, see conftest.py) for CLI tests that call the real entry point
in-process: ``run``, and ``clean_env`` (no store configuration leaks in from the machine
running the tests; a module opts in with ``pytestmark = pytest.mark.usefixtures("clean_env")``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from chroma_snapshots.cli import main

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store configuration leaks in from the machine running the tests."""
    for var in list(os.environ):
        if var.startswith(("CHROMA_SNAPSHOTS_", "CHROMADB_")) or var == "CHROMA_ROOT":
            monkeypatch.delenv(var)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """``main(args)`` as the console script runs it: (exit code, stdout, stderr)."""

    def call(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call
