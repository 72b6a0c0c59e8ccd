"""S3's failures as the library's documented errors: a lost condition is a ConflictError,
a missing bucket a StoreNotFoundError (not an absent object), missing credentials a
ConfigError naming where botocore looks, a refused endpoint an outage naming it, an answer
to a ranged GET that is not the range asked for an outage (not damaged data)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConfigParseError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    InvalidConfigError,
    InvalidRegionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as URLLib3Error
from urllib3.exceptions import ReadTimeoutError as URLLib3ReadTimeout

from chroma_snapshots.engine.deadline import current_deadline
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConfigError,
    ConflictError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
    StoreNotFoundError,
)

# What a call of botocore's client raises. botocore reads the body of an answer it parses
# (a listing, a batch delete, a multipart create or complete) outside its own error
# handling: a connection reset after the headers came is urllib3's ProtocolError, raw.
S3_ERRORS = (ClientError, BotoCoreError, URLLib3Error)
# A body that stalled or broke mid-read, which botocore does not retry: asked for again.
# urllib3's own errors too, for the same reason as above (a 404's body, cut). Caught
# before S3_ERRORS, which they are part of.
BODY_ERRORS = (ReadTimeoutError, ResponseStreamingError, URLLib3Error)

_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}

NO_CREDENTIALS = (
    "no AWS credentials found; botocore looks in the environment (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY), the shared files ~/.aws/credentials and ~/.aws/config (the "
    "profile AWS_PROFILE or --profile names), then a container or instance role: set one "
    "(e.g. `aws configure`) or pass --profile"
)


def error_code(err: ClientError) -> str:
    """S3's code for the error (``NoSuchUpload``, ``SlowDown``, ...), or ''."""
    return str(err.response.get("Error", {}).get("Code", ""))


def wrap_error(err: Exception, op: str, key: str) -> SnapshotError:
    """The documented error for what botocore raised during ``op`` on ``key``."""
    what = f"{op} {key}" if key else f"{op} (the store's root)"
    if isinstance(err, ClientError):
        code = error_code(err)
        status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _CONFLICT_CODES or status in _CONFLICT_CODES:
            return ConflictError(f"{what}: precondition failed ({code or status})")
        if code == "NoSuchBucket":  # not a missing object: say what the fix is
            bucket = err.response.get("Error", {}).get("BucketName") or "the store's bucket"
            return StoreNotFoundError(
                f"bucket {bucket!r} does not exist (S3 NoSuchBucket); "
                "create it or fix the store URL"
            )
        if status == "404" and code in ("", "404") and op != "head":  # S3 names its 404s
            return BackendUnavailableError(
                f"{what}: the endpoint answered 404 without an S3 error code; is the "
                "endpoint an S3 server?"
            )
        if code in _MISSING_CODES or status == "404":
            return SnapshotNotFoundError(f"{key}: no such object")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return BackendUnavailableError(
                f"{what}: S3 refused the request ({code}): check the credentials and what "
                "they may access"
            )
        return BackendUnavailableError(f"{what}: S3 error {code or status}")
    if isinstance(err, (ReadTimeoutError, ConnectTimeoutError, URLLib3ReadTimeout)):
        return StorageTimeoutError(f"{what}: S3 timed out ({err})")
    if isinstance(err, EndpointConnectionError):
        return BackendUnavailableError(f"{what}: {_connect_failure(err)}")
    if (setup := setup_error(err)) is not None:
        return ConfigError(f"{what}: {setup}")  # the fix is the setup, not a retry
    if isinstance(err, ParamValidationError):  # e.g. a bucket name S3 cannot have: a typo
        lines = str(err).strip().splitlines()  # "Parameter validation failed:", the rule
        return ConfigError(f"{what}: {lines[-1].split(': ')[0]}; fix the store URL")
    return BackendUnavailableError(f"{what}: {type(err).__name__}: {err}")


def check_range(resp: Any, key: str, byte_range: tuple[int, int]) -> None:
    """Refuse an answer to a ranged GET that is not bytes ``[start, end)`` of ``key``.

    A 206 must say (Content-Range) it starts at ``start`` and ends at ``end`` or at the
    object's end, whichever comes first; a 200 (the whole object) only answers a range that
    starts at 0 and covers the object. Anything else comes from a server or proxy that
    ignores or rewrites Range: its bytes would land at the wrong offsets and fail
    verification as if the store were damaged, so it is a BackendUnavailableError."""
    start, end = byte_range
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status == 200 and start == 0 and int(resp.get("ContentLength", end + 1)) <= end:
        return
    told = str(resp.get("ContentRange", ""))
    if status == 206:
        unit, _, spec = told.partition(" ")
        first, _, rest = spec.partition("-")
        last, _, total = rest.partition("/")
        with contextlib.suppress(ValueError):
            if unit == "bytes" and int(first) == start and int(last) + 1 == min(end, int(total)):
                return
    resp["Body"].close()  # unread: the connection must not be reused
    answered = f"status {status}" + (f", Content-Range {told!r}" if told else "")
    raise BackendUnavailableError(
        f"get {key}: asked for bytes {start}-{end - 1}, the server answered with something "
        f"else ({answered}): a server or proxy that ignores Range?"
    )


def _connect_failure(err: EndpointConnectionError) -> str:
    """'cannot connect to the S3 endpoint http://host:port ([Errno 111] Connection refused)'."""
    url = str(err.kwargs.get("endpoint_url", ""))
    endpoint = url.split("/", 3)[:3]  # scheme://host:port, without the bucket and query
    cause = str(err.kwargs.get("error", "")).split("): ", 1)[-1]
    detail = cause.split(": ", 1)[-1] if "connection:" in cause else cause
    return f"cannot connect to the S3 endpoint {'/'.join(endpoint)} ({detail or 'no answer'})"


def field(answer: Any, name: str, what: str) -> Any:
    """``answer[name]``, or BackendUnavailableError if the endpoint's answer lacks it: a
    server that is not S3 (a web console's port, a proxy's error page) answers 200 with a
    body botocore parses into nothing."""
    try:
        return answer[name]
    except (KeyError, TypeError):
        raise BackendUnavailableError(
            f"{what}: the endpoint's answer has no {name}; is the endpoint an S3 server?"
        ) from None


def stop_at_deadline(**kwargs: Any) -> None:
    """A ``before-send`` hook: no request goes out once the deadline of the call it serves
    has passed (a retry botocore scheduled, or a call its caller abandoned). The caller was
    told it timed out; a write sent later still could land after every claim covering it
    expired (docs/RELIABILITY.md)."""
    dl = current_deadline()
    if dl is not None and dl.expired():
        request = kwargs.get("request")
        what = f"{request.method} {urlsplit(request.url).path}" if request else "a request"
        raise StorageTimeoutError(f"deadline passed: {what} is not sent")


def give_up_connecting(attempts: int) -> Callable[..., None]:
    """A ``needs-retry`` hook: after ``attempts`` attempts that could not connect, or that
    got no answer within the read timeout (an endpoint that takes connections and never
    answers), raise that error instead of letting the retry policy back off and try again
    (a command against such an endpoint took minutes)."""
    silent = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)

    def check(**kwargs: Any) -> None:
        err = kwargs.get("caught_exception")
        if isinstance(err, silent) and kwargs.get("attempts", 0) >= attempts:
            raise err

    return check


def setup_error(err: Exception) -> ConfigError | None:
    """The AWS setup's mistake ``err`` names (credentials, profile, config file, region),
    as a ConfigError, whether botocore finds it as the client is made or at its first
    request (a credential process runs then); None if ``err`` is not one."""
    if isinstance(err, NoCredentialsError):
        return ConfigError(NO_CREDENTIALS)
    if isinstance(err, PartialCredentialsError):  # e.g. a key id without its secret
        return ConfigError(f"{err}: set both, or neither and use a profile or a role")
    if isinstance(err, ProfileNotFound):
        return profile_not_found(err.kwargs.get("profile"))
    if isinstance(err, (InvalidConfigError, ConfigParseError, CredentialRetrievalError)):
        return ConfigError(f"the AWS configuration: {err}")  # a [services] section missing,
        # a config file that does not parse, a credential_process or role that failed
    if isinstance(err, InvalidRegionError):
        return ConfigError(f"{err}: fix --region, AWS_REGION or the profile's region")
    return None


def profile_not_found(profile: object) -> ConfigError:
    """ConfigError for an AWS profile botocore did not find, naming the files it read
    (``AWS_CONFIG_FILE`` and ``AWS_SHARED_CREDENTIALS_FILE`` move them)."""
    import botocore.session

    session = botocore.session.Session()
    files = [str(session.get_config_variable(f)) for f in ("config_file", "credentials_file")]
    return ConfigError(
        f"AWS profile {profile!r} is not in {' or '.join(files)} (set by --profile or AWS_PROFILE)"
    )
