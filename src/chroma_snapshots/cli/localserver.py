"""moto's standalone S3 server, started as a child process on 127.0.0.1.

A separate process (not moto's in-process mock) means botocore's real HTTP
stack, retries and timeouts are exercised, and other processes can connect.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

import boto3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _serve(host: str) -> None:
    """The child: moto's app on a port the kernel picks, reported as the first stdout line.

    Binding port 0 in the process that serves it leaves no moment in which another process
    could take the port (choosing a free port first and binding it later does)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(host, 0, app, threaded=True, request_handler=MotoRequestHandler)
    os.environ["MOTO_PORT"] = str(server.port)  # moto builds some URLs from it
    print(server.port, flush=True)
    server.serve_forever()


class MotoServer:
    """A running ``moto_server``; ``endpoint_url`` is where to point boto3 (set by ``start``,
    or by hand to talk to a server another process started)."""

    def __init__(self, *, startup_timeout: float = 30.0) -> None:
        self.port = 0
        self.endpoint_url = ""
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> MotoServer:
        """Start the server and wait until it answers."""
        serve = "from chroma_snapshots.cli.localserver import _serve; _serve('127.0.0.1')"
        cmd = [sys.executable, "-c", serve]
        self._proc = subprocess.Popen(
            cmd,
            env={**os.environ, **CREDENTIALS},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            self.port = self._reported_port(self._proc)
            self.endpoint_url = f"http://127.0.0.1:{self.port}"
            urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=10).close()
        except BaseException:
            self.stop()
            raise
        return self

    def _reported_port(self, proc: subprocess.Popen[str]) -> int:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], self._startup_timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            code = proc.poll()
            raise RuntimeError(
                f"moto_server reported no port within {self._startup_timeout} s (exit {code});"
                " is moto[server] installed?"
            )
        return int(line)

    def stop(self) -> None:
        """Stop the server (its data is gone)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, endpoint_url: str | None = None, **config: Any) -> S3Client:
        """A boto3 S3 client for this server (or for a proxy in front of it)."""
        s3: S3Client = self.client_for("s3", endpoint_url, **config)
        return s3

    def client_for(self, service: str, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 client of any service moto serves (dynamodb, sqs, ...)."""
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            **config,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name by default) and return its name."""
        bucket = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket
