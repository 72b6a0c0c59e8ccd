"""A FUSE filesystem that mirrors a directory and can hang or add latency on demand.

It stands in for an EFS mount whose NFS server stops answering. Run it as a
separate process (``FaultyMount``); the mode is read from a control file on
every operation:

- ``ok``: pass every call through;
- ``hang``: block every call until the mode changes (like a dead NFS server);
- ``latency SECONDS [MBPS]``: sleep before every call, and cap read throughput;
- ``hang-after N [TAG]``: pass N calls, then hang every call until the mode changes (a new
  TAG starts the count again: the same N set twice in a row is otherwise one count).

Killing the FUSE process aborts the connection, which releases every blocked
call at once; only then can the mount be unmounted lazily. ``FaultyMount.stop``
does both, so a test never leaves a hung process behind. Needs ``fusepy`` and
libfuse 2 (Debian: ``fuse3`` and ``libfuse2``) and permission to mount (root).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any


def _serve(source: str, mountpoint: str, control: str, counts: str) -> None:
    from fuse import FUSE, FuseOSError, Operations

    class Faulty(Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ops: Counter[str] = Counter()
            self._lock = threading.Lock()
            self._armed, self._passed = "", 0  # the hang-after mode last counted for

        def _gate(self, op: str, nbytes: int = 0) -> None:
            with self._lock:
                self.ops[op] += 1
            passed = None  # for hang-after: how many calls this one is since it was set
            while True:
                try:
                    text = Path(control).read_text()
                except OSError:
                    text = "ok"
                mode = text.split()
                if mode[:1] == ["hang-after"]:
                    passed = self._count(text) if passed is None else passed
                    if passed <= int(mode[1]):
                        break
                elif mode[:1] != ["hang"]:
                    break
                time.sleep(0.02)
            if mode and mode[0] == "latency":
                delay = float(mode[1])
                if len(mode) > 2 and nbytes:
                    delay += nbytes / (float(mode[2]) * 1e6)
                time.sleep(delay)

        def _count(self, text: str) -> int:
            """The number of this call among those made since ``text`` was set."""
            with self._lock:
                if self._armed != text:
                    self._armed, self._passed = text, 0
                self._passed += 1
                return self._passed

        def _p(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def __call__(self, op: str, path: str, *args: Any) -> Any:
            if op not in ("read", "write"):
                self._gate(op)
            try:
                return super().__call__(op, path, *args)
            except OSError as e:
                raise FuseOSError(e.errno or errno.EIO) from e

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.lstat(self._p(path))
            keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink",
                    "st_size", "st_uid", "st_ino")  # fmt: skip
            return {k: getattr(st, k) for k in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def open(self, path: str, flags: int) -> int:
            return os.open(self._p(path), flags)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            self._gate("read", size)
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            self._gate("write", len(data))
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            os.truncate(self._p(path), length)

        def flush(self, path: str, fh: int) -> None:
            return None

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            os.fsync(fh)

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._p(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._p(path))

        def unlink(self, path: str) -> None:
            os.unlink(self._p(path))

        def rename(self, old: str, new: str) -> None:
            os.replace(self._p(old), self._p(new))

        def link(self, target: str, source: str) -> None:
            os.link(self._p(source), self._p(target))

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._p(path), mode)

        def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
            os.utime(self._p(path), times)

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(self._p(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                    "f_files", "f_flag", "f_frsize", "f_namemax")  # fmt: skip
            return {k: getattr(st, k) for k in keys}

    fs = Faulty()
    request = Path(counts + ".request")

    def dump_counts() -> None:
        # libfuse's loop owns the main thread (Python signal handlers never run there),
        # so counts are handed out through a request file polled by this thread.
        while True:
            if request.exists():
                tmp = Path(counts + ".tmp")
                tmp.write_text("\n".join(f"{k} {v}" for k, v in sorted(fs.ops.items())))
                os.replace(tmp, counts)
                request.unlink(missing_ok=True)
            time.sleep(0.01)

    threading.Thread(target=dump_counts, daemon=True).start()
    # hard_remove: an unlink removes the file even while the kernel's release of its last
    # handle is still queued (a close is answered before it reaches us); without it libfuse
    # renames the file to .fuse_hidden*, and the folder it was in cannot be removed
    FUSE(fs, mountpoint, foreground=True, nothreads=False, hard_remove=True)


class FaultyMount:
    """Mount ``source`` at ``mountpoint`` through the faulty filesystem (a child process)."""

    def __init__(self, source: Path, mountpoint: Path, *, state_dir: Path) -> None:
        self.source, self.mountpoint = Path(source), Path(mountpoint)
        self.control = Path(state_dir) / "faultfs.control"
        self.counts_file = Path(state_dir) / "faultfs.counts"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> FaultyMount:
        """Mount and wait until the mount answers."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.set_mode("ok")
        code = (
            "import sys; from chroma_snapshots.testing.faultfs import _serve; _serve(*sys.argv[1:])"
        )
        args = [str(self.source), str(self.mountpoint), str(self.control), str(self.counts_file)]
        self._proc = subprocess.Popen([sys.executable, "-c", code, *args])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if os.path.ismount(self.mountpoint):
                return self
            if self._proc.poll() is not None:
                raise RuntimeError(
                    "the FUSE filesystem exited; is fuse installed and /dev/fuse usable?"
                )
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.mountpoint} was not mounted within {timeout}s")

    def set_mode(self, mode: str) -> None:
        """``ok``, ``hang``, ``hang-after N [TAG]`` or ``latency SECONDS [MBPS]``."""
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(mode)
        os.replace(tmp, self.control)

    def op_counts(self) -> Counter[str]:
        """Operations served so far, by kind (getattr, readdir, open, read, ...)."""
        assert self._proc is not None
        self.counts_file.unlink(missing_ok=True)
        Path(f"{self.counts_file}.request").touch()
        for _ in range(500):
            if self.counts_file.exists():
                break
            time.sleep(0.01)
        pairs = (line.split() for line in self.counts_file.read_text().splitlines())
        return Counter({k: int(v) for k, v in pairs})

    def stop(self) -> None:
        """Kill the filesystem (releasing every blocked call), then unmount lazily."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        subprocess.run(
            ["fusermount", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False
        )

    def __enter__(self) -> FaultyMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
