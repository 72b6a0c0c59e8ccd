"""One cold download, run as its own process so its peak RSS can be read (os.wait4).

usage: python benchmarks/_contender.py {tar,s3fs} ENDPOINT BUCKET DEST
Prints the seconds spent inside the process (after imports) as JSON.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
from pathlib import Path


def tar(endpoint: str, bucket: str, dest: Path) -> None:
    """What the field deployment did: get one tar.gz with boto3 and extract it."""
    import boto3

    body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key="db.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(body["Body"].read()), mode="r:gz") as archive:
        archive.extractall(dest, filter="data")


def s3fs(endpoint: str, bucket: str, dest: Path) -> None:
    import s3fs as s3fs_

    fs = s3fs_.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.get(f"{bucket}/raw/", str(dest), recursive=True)


if __name__ == "__main__":
    kind, endpoint, bucket, dest = sys.argv[1:5]
    fn = {"tar": tar, "s3fs": s3fs}[kind]
    t = time.perf_counter()
    fn(endpoint, bucket, Path(dest))
    print(json.dumps({"seconds": time.perf_counter() - t}))
