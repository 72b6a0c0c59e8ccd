"""The npm package s3rver as a disk-backed S3 server on 127.0.0.1, started and stopped here.

Throughput only: s3rver ignores conditional headers, so never use it for correctness.
Every request is logged by the server (one line, with the response size), which is how the
benchmark counts requests and downloaded bytes from the server's side for every tool. s3rver
cuts the first 16 characters off its log lines, leaving "h/key" for HEAD and POST (whose
logged size is the object's, not bytes sent) and "/key" for GET and PUT (PUT logs no size).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

ACCESS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}
REGION = "us-east-1"
_ANSI = re.compile(r"\x1b\[\d+m")
# koa-logger's time reads "1,234ms" or "12s"; the size is blank for 204 and "-" if unknown
_LINE = re.compile(r"info: (\S+) (\d{3}) [\d,]+m?s(?: ([\d.]+)(b|kb|mb|gb))?")
_UNIT = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def s3rver_script(tools: Path) -> Path:
    """Where ``npm install --prefix TOOLS s3rver`` put the server."""
    script = tools / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if not script.exists():
        raise SystemExit(f"s3rver not found at {script}: npm install --prefix {tools} s3rver@3.7.1")
    return script


class S3rver:
    """``with S3rver(tools, data_dir) as s:`` -> s.endpoint, s.env, s.requests()."""

    def __init__(self, tools: Path, data_dir: Path, bucket: str = "bench") -> None:
        self.script, self.data_dir, self.bucket = s3rver_script(tools), data_dir, bucket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **ACCESS, "AWS_DEFAULT_REGION": REGION}
        self.log = data_dir.parent / f"s3rver-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._mark = 0

    def __enter__(self) -> S3rver:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        node = shutil.which("node") or "node"
        args = [node, str(self.script), "-d", str(self.data_dir), "-a", "127.0.0.1"]
        args += ["-p", str(self.port), "--configure-bucket", self.bucket]
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"s3rver did not listen on {self.endpoint}; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far (/proc): with the
        client on the same two cores, a client that makes the server work harder per GiB
        loses wall time it did not spend itself."""
        assert self._proc is not None
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests(self) -> tuple[int, int]:
        """(requests, response bytes) the server logged since the last call.

        s3rver logs a request when it has finished sending, which can be after the client
        has its bytes: wait until the log stops growing first."""
        size, still = -1, 0
        while still < 3:
            time.sleep(0.1)
            now = self.log.stat().st_size
            still, size = (still + 1, size) if now == size else (0, now)
        lines = _ANSI.sub("", self.log.read_text(errors="replace")).splitlines()
        new, self._mark = lines[self._mark :], len(lines)
        hits = [m for m in map(_LINE.search, new) if m]
        sent = sum(float(m[3]) * _UNIT[m[4]] for m in hits if m[4] and not m[1].startswith("h"))
        return len(hits), int(sent)
