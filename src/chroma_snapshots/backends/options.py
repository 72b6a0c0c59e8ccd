"""What ``open_backend`` hands every backend factory, whatever the scheme."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chroma_snapshots.backends.s3 import S3Settings


@dataclass(frozen=True)
class OpenOptions:
    """What every factory may use. ``s3_settings``: an S3Settings (boto3 timeouts, endpoint);
    ``create``: make a missing local store directory (False: a missing one is
    SnapshotNotFoundError, so reading a mistyped path never creates it); ``unsafe_no_cas``:
    skip the check that an S3 endpoint honours conditional writes (see backends.cas)."""

    s3_settings: S3Settings | None = None
    efs_timeout: float = 10.0
    create: bool = True
    unsafe_no_cas: bool = False
