"""What an S3 endpoint may be: a server, named by an http(s) URL, and nothing else."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from chroma_snapshots.errors import ConfigError, shown


def check_endpoint(raw: str, what: str) -> None:
    """ConfigError (``what`` then the value) unless ``raw`` is an http(s) URL of a server:
    a host, a valid port and nothing else. An unbalanced ``[`` or port 99999 is a typo, not
    an outage; a path would be read as a bucket (``http://h/bkt`` + ``s3://b/p`` writes into
    ``bkt``); a user or password is not how S3 takes credentials, and is never echoed."""
    # Everything up to the last "@" may be a password, "/", "?" and "#" included (secret
    # keys hold "/"), whatever comes before it ("user:pw@h", "http:/user:pw@h"), so it is
    # refused before urllib, whose error would quote a piece of it; a query may hold a
    # token, so it is not echoed either.
    if not raw.isascii():  # a full-width at sign or question mark hides a secret from below
        raise ConfigError(
            f"{what}(not shown: it may hold a password) has a character that is not ASCII; "
            "an international host name goes in its xn-- form"
        )
    safe = shown(_QUERY.sub("?***", "***@" + raw.rsplit("@", 1)[1] if "@" in raw else raw))
    if "@" in raw:
        raise ConfigError(
            f"{what}{safe} has a user or password: an endpoint names a server; credentials "
            "come from the AWS environment (AWS_ACCESS_KEY_ID, a profile or a role)"
        )
    if any(c.isspace() or not c.isprintable() for c in raw):  # urllib strips some of it
        raise ConfigError(f"{what}{safe} has white space or a control character")
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - parsing it raises for a port out of range
    except ValueError:  # urllib's message quotes the host and port, perhaps a password
        raise ConfigError(
            f"{what}(not shown: it may hold a password) is not a valid URL (its host or port)"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}{safe} must be an http(s) URL, e.g. http://127.0.0.1:9000")
    if parts.path not in ("", "/") or parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise ConfigError(
            f"{what}{safe} has a path, query or fragment: an endpoint names a server; the "
            "bucket and prefix go in the store URL (s3://BUCKET/PREFIX)"
        )


_QUERY = re.compile(r"[?#;%].*", re.DOTALL)  # a query, fragment or escape may hold a token


def is_aws_endpoint(url: str) -> bool:
    """Whether ``url`` is one of AWS's own S3 endpoints in its main partition (left out of
    a store's label: a bucket name is one bucket there). China (``.amazonaws.com.cn``),
    GovCloud and the isolated regions are partitions of their own, where the same bucket
    name is another bucket: their endpoints key the store as any other does."""
    host = (urlsplit(url).hostname or "").rstrip(".")  # "host." is "host" (endpoint_label)
    apart = any(part in host for part in ("us-gov-", "-iso-", "-isob-", "-isof-", "-isoe-"))
    return host.endswith(".amazonaws.com") and not apart


_DEFAULT_PORTS = {"http": 80, "https": 443}


def endpoint_label(endpoint: str) -> str:
    """One spelling of a (checked) endpoint: ``HTTP://Host.:09000/`` is
    ``http://host:9000``, and ``https://h:443`` is ``https://h``."""
    parts = urlsplit(endpoint)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    host = f"[{host}]" if ":" in host else host  # IPv6, bracketed again
    port = parts.port
    at = "" if port is None or port == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{host}{at}"


def s3_place(path: str, endpoint: str | None) -> str:
    """One spelling of S3 storage, whoever opens it (a URL, a backend built by hand):
    ``path`` (``s3://bucket/prefix``), then the endpoint, unless it is none or one of
    AWS's own in its main partition (a bucket name is one bucket there). It keys a
    store's cache folder and FallbackStore's check that its stores differ."""
    if endpoint is None or is_aws_endpoint(endpoint):
        return path
    return f"{path}\0{endpoint_label(endpoint)}"


def s3fs_path(rest: str) -> str | None:
    """The ``s3://`` spelling of a path s3fs reads (``bucket/prefix``, a slash at the end
    naming the same folder), or None where the two differ: s3fs keeps an empty segment
    (``b//p``, ``/b``) that an ``s3://`` URL drops."""
    rest = rest.rstrip("/")
    return f"s3://{rest}" if "//" not in rest and not rest.startswith("/") else None
