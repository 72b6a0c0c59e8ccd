"""The botocore S3 client a backend uses, and the settings it is made from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError

from chroma_snapshots.backends.endpoints import check_endpoint
from chroma_snapshots.backends.s3errors import (
    give_up_connecting,
    setup_error,
    stop_at_deadline,
)
from chroma_snapshots.errors import ConfigError, shown

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


_REGION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # botocore's own rule


@dataclass(frozen=True)
class S3Settings:
    """Connection policy: timeouts, retries, parallelism and multipart sizes."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    connect_timeout: float = 5.0
    # A refused or unresolvable endpoint, or one that takes connections and never answers,
    # is not worth max_attempts backed-off retries (14-22 s, or minutes, before an error):
    # two attempts, then fail.
    connect_attempts: int = 2
    read_timeout: float = 30.0
    # Every request at most this many times, the first included (botocore's own
    # "max_attempts" counts only the retries: 5 there was 6 requests).
    max_attempts: int = 5
    max_pool_connections: int = 32
    multipart_threshold: int = 64 << 20
    part_size: int = 16 << 20
    body_attempts: int = 3

    def __post_init__(self) -> None:
        # here, not when a client is made: an endpoint holding a password is refused
        # before this object can be printed, logged or kept
        if self.endpoint_url is not None:
            check_endpoint(self.endpoint_url, "S3 endpoint ")
        if self.region is not None and not _REGION.fullmatch(str(self.region)):
            # botocore builds the endpoint's host from it: it failed as "not a valid URL"
            raise ConfigError(
                f"S3 region {shown(self.region)} is not a region name (letters, digits and "
                "'-', e.g. us-east-1)"
            )


def make_client(s: S3Settings) -> S3Client:
    """A botocore S3 client with ``s``'s timeouts and retries: it refuses an endpoint with a
    path, gives up on one that does not connect, and sends nothing past a deadline."""
    config = Config(
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        retries={"mode": "adaptive", "total_max_attempts": s.max_attempts},
        max_pool_connections=s.max_pool_connections,
    )
    # botocore's own session, not boto3's: the client is the same, and a process that
    # only checks out then never imports boto3 and s3transfer (~15 ms of a cold start).
    try:
        session = botocore.session.Session(profile=s.profile)
        made = session.create_client(
            "s3", endpoint_url=s.endpoint_url, region_name=s.region, config=config
        )
    except BotoCoreError as e:  # credentials, profile, config file or region
        if (setup := setup_error(e)) is None:
            raise
        raise setup from None
    except ValueError:  # botocore's "Invalid endpoint: <url>", which may hold a secret
        raise ConfigError(
            "the S3 endpoint botocore found in the AWS configuration (AWS_ENDPOINT_URL_S3, "
            "AWS_ENDPOINT_URL, a profile's endpoint_url) is not a valid URL"
        ) from None
    client = cast("S3Client", made)  # the stubs type only boto3's factory by service name
    # the endpoint botocore settled on, from wherever it came (AWS_ENDPOINT_URL, a
    # profile's endpoint_url, a [services] section): a path in it would be the bucket
    check_endpoint(client.meta.endpoint_url, "S3 endpoint (from the AWS configuration) ")
    client.meta.events.register_first("needs-retry.s3", give_up_connecting(s.connect_attempts))
    client.meta.events.register_first("before-send.s3", stop_at_deadline)
    return client
