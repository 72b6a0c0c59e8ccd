"""moto's standalone S3 server, started as a child process on 127.0.0.1.

A separate process (not moto's in-process mock) means botocore's real HTTP
stack, retries and timeouts are exercised, and other processes can connect.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """A running ``moto_server``; ``endpoint_url`` is where to point boto3."""

    def __init__(self, port: int | None = None, *, startup_timeout: float = 30.0) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        """Start the server and wait until it answers."""
        cmd = [
            sys.executable,
            "-c",
            "from moto.server import main; main()",
            "-H",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        env = {**os.environ, **CREDENTIALS}
        self._proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + self._startup_timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self._proc.returncode}; is moto[server] installed?"
                )
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint_url}")

    def stop(self) -> None:
        """Stop the server (its data is gone)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
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
