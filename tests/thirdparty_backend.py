"""A backend package written apart from chroma-snapshots, as a third party would: it only
uses the public Backend interface and the factory signature ``register_backend`` documents."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from interleave import MemoryBackend

from chroma_snapshots.backends import Backend, OpenOptions

BUCKETS: dict[str, MemoryBackend] = {}
OPENED: list[tuple[str, dict[str, Any]]] = []


class TaggedBackend(MemoryBackend):
    """A MemoryBackend that remembers the option it was opened with."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag


def open_tagged(url: str, opts: OpenOptions, **options: Any) -> Backend:
    """``tagged://bucket``: one in-memory bucket per name, shared by every open."""
    OPENED.append((url, options))
    name = urlsplit(url).netloc
    if name not in BUCKETS:
        BUCKETS[name] = TaggedBackend(options.get("tag", "none"))
    return BUCKETS[name]


def open_broken(url: str, opts: OpenOptions, **options: Any) -> Backend:
    """A factory with a bug of its own."""
    raise RuntimeError("the backend's own bug")


def open_nothing(url: str, opts: OpenOptions, **options: Any) -> Backend:
    """A factory that forgets to return its backend."""
    return None  # type: ignore[return-value]
