"""The backend of a store opened offline (``CHROMA_SNAPSHOTS_OFFLINE=1``).

Every call fails at once with BackendUnavailableError and nothing touches the network or
the mount, so a CachedStore with ``stale_ok`` serves what its refs last named from the
cache (as it would in an outage), and anything the cache does not hold is an error that
says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

from chroma_snapshots.backends.base import Backend, GetResult, ObjectMeta, PutMode
from chroma_snapshots.errors import BackendUnavailableError

OFFLINE_VARIABLE = "CHROMA_SNAPSHOTS_OFFLINE"


class OfflineBackend(Backend):
    """Stands in for the store ``url`` names (its label: with the endpoint where one keys
    it); refuses every call."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"OfflineBackend({self.url!r})"

    def _refuse(self, op: str, key: str) -> NoReturn:
        raise BackendUnavailableError(
            f"{op} {key or '(the store root)'}: offline (--offline or {OFFLINE_VARIABLE}=1): "
            f"{self.url} is not contacted; only versions already in the cache can be served"
        )

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        self._refuse("get", key)

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        self._refuse("put", key)

    def head(self, key: str) -> ObjectMeta:
        self._refuse("head", key)

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        self._refuse("list", prefix)

    def delete(self, key: str) -> None:
        self._refuse("delete", key)
