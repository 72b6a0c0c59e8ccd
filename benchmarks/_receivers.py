"""One receiving client per process, for receive_bound.py: what a verifying download costs.

usage: python _receivers.py MODE ENDPOINT BUCKET PREFIX NOBJ OUTDIR [OBJ_MIB]
Objects are PREFIX/objNN, each OBJ_MIB MiB (64); keys and sizes are known, so no client lists. Every
mode writes into preallocated files with pwrite in 32 KiB slices, as the checkout's placer
does (engine/placer.WRITE_BYTES: larger writes cost more kernel time on this VM), except the
"receive only" ones, which drop what they receive (no file, no hash); "sha256"
modes hash every byte (the minimal client per 64 KiB chunk, as the checkout verifies).
Prints bytes received, a digest of the digests (so the hashing cannot be optimised away)
and the CPU seconds the process had used when its first request went out (start-up: the
interpreter, imports, the client). Runs in its own venv (boto3, awscrt, obstore), none of
which the project depends on except boto3.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Got = list[tuple[int, str]]  # (bytes, sha256 hex or "") per request

OBJ, PIECE, CHUNK, SLICE, THREADS = 64 << 20, 8 << 20, 64 << 10, 32 << 10, 8
STARTED: list[float] = []  # CPU seconds used when the first request went out
ACCESS, REGION = "S3RVER", "us-east-1"


def _files(keys: list[str], out: str) -> dict[str, int]:
    fds = {}
    for key in keys:
        path = os.path.join(out, key.replace("/", "_"))
        fds[key] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(fds[key], 0, OBJ)
    return fds


def _started() -> None:
    if not STARTED:
        t = os.times()
        STARTED.append(t.user + t.system)


def _place(fd: int | None, data: Any, offset: int) -> None:
    if fd is None:  # receive only: nothing written
        return
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:SLICE], offset)
        view, offset = view[n:], offset + n


def boto(endpoint: str, bucket: str, keys: list[str], fds: dict[str, int], hashed: int) -> Got:
    """8 MiB ranged GETs on 8 threads: the checkout's request shape on botocore. ``hashed``
    is 0 (no hash), 1 (one sha256 per GET) or a piece size (one sha256 per piece, as the
    checkout verifies each 64 KiB chunk: many more calls, each releasing the GIL)."""
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=THREADS, s3={"addressing_style": "path"})
    s3 = boto3.session.Session(ACCESS, ACCESS, region_name=REGION).client(
        "s3", endpoint_url=endpoint, config=config
    )

    def one(task: tuple[str, int]) -> tuple[int, str]:
        key, offset = task
        rng = f"bytes={offset}-{offset + PIECE - 1}"
        data = s3.get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read()
        digest, view = "", memoryview(data)
        if hashed:
            step = len(view) if hashed == 1 else hashed
            parts = [hashlib.sha256(view[i : i + step]).digest() for i in range(0, len(view), step)]
            digest = hashlib.sha256(b"".join(parts)).hexdigest()
        _place(fds.get(key), data, offset)
        return len(data), digest

    tasks = [(k, off) for k in keys for off in range(0, OBJ, PIECE)]
    _started()
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, tasks))


def minimal(endpoint: str, bucket: str, keys: list[str], fds: dict[str, int], hashed: int) -> Got:
    """The least a Python client can do: 8 MiB ranged GETs of presigned URLs over
    http.client on 8 threads, each reading into one reused buffer (readinto: no bytes object
    per read), a hash per 64 KiB chunk as the checkout verifies (``hashed`` 1: sha256, 2:
    BLAKE3, 0: none), pwrite of each 64 KiB. ``hashed`` 3: BLAKE3, and no buffer and no
    pwrite: each GET reads straight into its file's shared mapping (``mmap``, the
    fallocated file's page cache), which is then hashed where it lies. ``hashed`` 4: the
    body received, hashed (BLAKE3) and written by benchmarks/native-loop, without the GIL."""
    import mmap

    import boto3
    from blake3 import blake3

    chunk_hash = blake3 if hashed in (2, 3) else hashlib.sha256
    maps = {}
    if hashed == 3:
        maps = {k: memoryview(mmap.mmap(fd, OBJ, mmap.MAP_SHARED)) for k, fd in fds.items()}

    s3 = boto3.session.Session(ACCESS, ACCESS, region_name=REGION).client(
        "s3", endpoint_url=endpoint
    )
    urls = {k: s3.generate_presigned_url("get_object", {"Bucket": bucket, "Key": k}) for k in keys}
    host, port = endpoint.removeprefix("http://").split(":")
    local = threading.local()

    def one(task: tuple[str, int]) -> tuple[int, str]:
        key, offset = task
        if not hasattr(local, "conn"):
            local.conn, local.buf = http.client.HTTPConnection(host, int(port)), bytearray(PIECE)
        conn, view = local.conn, memoryview(local.buf)
        if maps:
            view = maps[key][offset : offset + PIECE]
        path = urls[key].split(endpoint, 1)[1]
        conn.request("GET", path, headers={"Range": f"bytes={offset}-{offset + PIECE - 1}"})
        resp, got = conn.getresponse(), 0
        if hashed == 4:
            return _native_loop(conn, resp, fds.get(key), offset)
        while got < PIECE and (n := resp.readinto(view[got : got + (1 << 20)])):
            got += n
        parts = []
        for i in range(0, got, CHUNK):
            if hashed:
                parts.append(chunk_hash(view[i : i + CHUNK]).digest())
            if not maps:
                _place(fds.get(key), view[i : min(i + CHUNK, got)], offset + i)
        return got, hashlib.sha256(b"".join(parts)).hexdigest() if hashed else ""

    tasks = [(k, off) for k in keys for off in range(0, OBJ, PIECE)]
    _started()
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, tasks))


def _native_loop(
    conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, fd: int | None, offset: int
) -> tuple[int, str]:
    """The rest of ``resp``'s body read from the socket, each 64 KiB chunk hashed (BLAKE3)
    and written in 32 KiB slices by native code with no Python per buffer (received only
    when ``fd`` is None). Build it first: benchmarks/native-loop/build.sh."""
    from native_loop import receive

    assert conn.sock is not None
    assert resp.fp is not None
    want = resp.length or 0
    prefix = resp.fp.read(min(len(resp.fp.peek(0)), want))  # what http.client already holds
    out = -1 if fd is None else fd
    digests = receive(conn.sock.fileno(), 60_000, prefix, out, offset, want, CHUNK, SLICE)
    resp.length = 0
    resp.close()  # the body is read: the connection can carry the next request
    return want, hashlib.sha256(digests).hexdigest() if fd is not None else ""


def _crt_client(part: int) -> Any:
    """awscrt's S3 client for s3rver (no TLS, static keys), ``part`` bytes a ranged GET."""
    from awscrt import auth, io, s3

    loops = io.EventLoopGroup()
    return s3.S3Client(
        bootstrap=io.ClientBootstrap(loops, io.DefaultHostResolver(loops)),
        region=REGION,
        tls_mode=s3.S3RequestTlsMode.DISABLED,
        credential_provider=auth.AwsCredentialsProvider.new_static(ACCESS, ACCESS),
        part_size=part,
        throughput_target_gbps=10.0,
    )


def crt(endpoint: str, bucket: str, keys: list[str], fds: dict[str, int], hashed: bool) -> Got:
    """awscrt's S3 client (the native one boto3 can use): whole objects, body callbacks."""
    from awscrt import http, s3

    client = _crt_client(PIECE)
    host = endpoint.removeprefix("http://")
    results: Got = []
    _started()
    lock, futures = threading.Lock(), []
    for key in keys:
        sha, fd = hashlib.sha256(), fds.get(key)

        def on_body(
            chunk: bytes, offset: int, sha: Any = sha, fd: int | None = fd, **_: Any
        ) -> None:
            if hashed:
                sha.update(chunk)  # CRT delivers one GET's body in order
            _place(fd, chunk, offset)

        def on_done(error: Exception | None = None, sha: Any = sha, **_: Any) -> None:
            if error is None:
                with lock:
                    results.append((OBJ, sha.hexdigest() if hashed else ""))

        request = http.HttpRequest("GET", f"/{bucket}/{key}", http.HttpHeaders([("Host", host)]))
        made = client.make_request(
            type=s3.S3RequestType.GET_OBJECT, request=request, on_body=on_body, on_done=on_done
        )
        futures.append(made.finished_future)
    for future in futures:
        future.result()
    return results


def crt_file(endpoint: str, bucket: str, keys: list[str], out: str, hashed: bool, part: int) -> Got:
    """awscrt's S3 client writing each body to its file in native code (``recv_filepath``:
    no Python per buffer; one ranged GET and one pwrite per ``part`` bytes), then, if
    ``hashed``, a BLAKE3 per 64 KiB chunk read back from the page cache (mmap), as the
    checkout verifies, on 2 threads as objects finish."""
    import mmap

    from awscrt import http, s3
    from blake3 import blake3

    client = _crt_client(part)
    host = endpoint.removeprefix("http://")

    def verify(path: str) -> tuple[int, str]:
        if not hashed:
            return os.path.getsize(path), ""
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            digests = [blake3(view[i : i + CHUNK]).digest() for i in range(0, len(m), CHUNK)]
            size = len(m)
            view.release()
        return size, hashlib.sha256(b"".join(digests)).hexdigest()

    _started()
    pool, checks = ThreadPoolExecutor(2), []
    requests = []
    for key in keys:
        path = os.path.join(out, key.replace("/", "_"))
        request = http.HttpRequest("GET", f"/{bucket}/{key}", http.HttpHeaders([("Host", host)]))
        made = client.make_request(
            type=s3.S3RequestType.GET_OBJECT, request=request, recv_filepath=path
        )
        requests.append((made, path))
    for made, path in requests:
        made.finished_future.result()
        checks.append(pool.submit(verify, path))
    results = [c.result() for c in checks]
    pool.shutdown()
    return results


def obstore(endpoint: str, bucket: str, keys: list[str], fds: dict[str, int], hashed: bool) -> Got:
    """obstore (Rust object_store): one streamed GET per object on 8 threads."""
    import obstore as obs
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        region=REGION,
        access_key_id=ACCESS,
        secret_access_key=ACCESS,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )

    def one(key: str) -> tuple[int, str]:
        sha, offset = hashlib.sha256(), 0
        for chunk in obs.get(store, key).stream(min_chunk_size=PIECE):
            if hashed:
                sha.update(chunk)
            _place(fds.get(key), chunk, offset)
            offset += len(chunk)
        return offset, sha.hexdigest() if hashed else ""

    def per_chunk(key: str) -> tuple[int, str]:
        """A BLAKE3 per 64 KiB chunk, as the checkout verifies: a chunk cut between two
        of the stream's pieces is joined (a copy of at most one chunk a piece)."""
        from blake3 import blake3

        digests, offset, carry = [], 0, b""
        for piece in obs.get(store, key).stream(min_chunk_size=1 << 20):
            view, pos = memoryview(piece), 0
            if carry:
                pos = CHUNK - len(carry)
                whole = carry + bytes(view[:pos])
                digests.append(blake3(whole).digest())
                _place(fds.get(key), whole, offset - len(carry))
            end = pos + (len(view) - pos) // CHUNK * CHUNK
            digests += [blake3(view[i : i + CHUNK]).digest() for i in range(pos, end, CHUNK)]
            _place(fds.get(key), view[pos:end], offset + pos)
            carry, offset = bytes(view[end:]), offset + len(view)
        if carry:
            digests.append(blake3(carry).digest())
            _place(fds.get(key), carry, offset - len(carry))
        return offset, hashlib.sha256(b"".join(digests)).hexdigest()

    _started()
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(per_chunk if hashed == 2 else one, keys))


MODES: dict[str, tuple[Callable[..., Got], int]] = {
    "boto3+sha256": (boto, 1),
    "boto3+sha256/64KiB": (boto, 64 << 10),
    "boto3": (boto, 0),
    "awscrt+sha256": (crt, True),
    "awscrt": (crt, False),
    "obstore+sha256": (obstore, True),
    "obstore+blake3/64KiB": (obstore, 2),
    "http.client+sha256/64KiB": (minimal, 1),
    "http.client+blake3/64KiB": (minimal, 2),
    "http.client into mmap+blake3/64KiB": (minimal, 3),
    "http.client": (minimal, 0),
    "receive only: http.client": (minimal, 0),
    "receive only: awscrt": (crt, False),
    "receive only: obstore": (obstore, False),
    "native loop: recv+blake3/64KiB+pwrite": (minimal, 4),
    "receive only: native loop": (minimal, 4),
}
# Receive into memory and drop it: no hash, no file. What a verifying checkout built on that
# receive path cannot beat (it must also hash and write): the measured s5cmd ceiling.
RECEIVE_ONLY = {m for m in MODES if m.startswith("receive only")}
# The body written by the client's native code, then verified from the page cache (or not).
# One pwrite of 8 MiB costs this VM's kernel ~20 ms (the placer writes 32 KiB slices for
# that reason): 1 MiB parts are measured too.
NATIVE_WRITE = {
    "awscrt to file + blake3/64KiB": (True, PIECE),
    "awscrt to file": (False, PIECE),
    "awscrt to file (1 MiB parts) + blake3/64KiB": (True, 1 << 20),
    "awscrt to file (1 MiB parts)": (False, 1 << 20),
}

if __name__ == "__main__":
    mode, endpoint, bucket, prefix, nobj, out = sys.argv[1:7]
    if len(sys.argv) > 7:
        OBJ = int(sys.argv[7]) << 20
    keys = [f"{prefix}/obj{i:02d}" for i in range(int(nobj))]
    os.makedirs(out, exist_ok=True)
    if mode in NATIVE_WRITE:
        got = crt_file(endpoint, bucket, keys, out, *NATIVE_WRITE[mode])
        fds: dict[str, int] = {}
    else:
        fn, hashed = MODES[mode]
        fds = {} if mode in RECEIVE_ONLY else _files(keys, out)
        got = fn(endpoint, bucket, keys, fds, hashed)
    for fd in fds.values():
        os.close(fd)
    total = sum(n for n, _ in got)
    if total != OBJ * len(keys):
        raise SystemExit(f"{mode}: received {total} bytes, expected {OBJ * len(keys)}")
    digest = hashlib.sha256("".join(sorted(d for _, d in got)).encode()).hexdigest()[:16]
    print(total, digest, f"{STARTED[0]:.3f}")
