"""The base of a backend that reaches another's storage through something: a check, a
deadline, a test's gate.

A wrapper is the same storage as what it wraps, so a store built on it must keep the
wrapped backend's cache folder (:meth:`Backend.place`), source-folder guard
(:meth:`Backend.folder`, :meth:`Backend.mark`) and label. Written by hand, each wrapper
had to remember every one of those: one that passed on only its repr moved a store's
cache to another folder. :class:`WrappedBackend` passes them all on, and routes every
storage call through one hook, :meth:`WrappedBackend.around`, which is all most wrappers
need to write.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from typing import TypeVar

from chroma_snapshots.backends.base import Backend, GetResult, ObjectMeta, PutMode
from chroma_snapshots.engine.apart import Place
from chroma_snapshots.errors import (
    BackendUnavailableError,
    InvalidInputError,
    SnapshotError,
    StorageTimeoutError,
    shown,
)

T = TypeVar("T")


class WrappedBackend(Backend):
    """``inner`` with every storage call made through :meth:`around`; its place, folder,
    label and ``close`` are ``inner``'s."""

    def __init__(self, inner: Backend) -> None:
        if not isinstance(inner, Backend):
            raise InvalidInputError(f"a wrapped backend must be a Backend, not {shown(inner)}")
        self.inner = inner

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        """Make ``call``, the ``op`` (get, put, head, list, delete, sweep or mark) of ``keys``
        on ``inner`` (for a list or sweep: the prefix; for a mark: none). Override to check,
        bound or log it; raise the library's errors (an ``OSError`` raised here is taken as
        the storage being unavailable, a ``TimeoutError`` as a time-out)."""
        return call()

    def _through(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        try:
            return self.around(op, keys, call)
        except SnapshotError:
            raise
        except TimeoutError as e:  # the wrapper's own: never a traceback from inside
            raise StorageTimeoutError(f"{op} {keys_named(keys)}: {e}") from e
        except OSError as e:
            raise BackendUnavailableError(f"{op} {keys_named(keys)}: {e}") from e

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        return self._through("get", (key,), lambda: self.inner.get(key, byte_range=byte_range))

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        return self._through("get", (key,), lambda: self.inner.get_into(key, byte_range, buf))

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        return self._through("put", (key,), lambda: self.inner.put(key, data, mode=mode))

    def head(self, key: str) -> ObjectMeta:
        return self._through("head", (key,), lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        # read whole inside the call: a wrapper that bounds or gates it covers every page
        found = self._through("list", (prefix,), lambda: builtins.list(self.inner.list(prefix)))
        return iter(found)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        return self._through("list", (prefix,), lambda: self.inner.list_dirs(prefix))

    def delete(self, key: str) -> None:
        self._through("delete", (key,), lambda: self.inner.delete(key))

    def delete_many(self, keys: builtins.list[str]) -> None:
        self._through("delete", tuple(keys), lambda: self.inner.delete_many(keys))

    def sweep_temp(self, prefix: str, before: float, remove: bool = True) -> int:
        return self._through(
            "sweep", (prefix,), lambda: self.inner.sweep_temp(prefix, before, remove)
        )

    def place(self) -> str:
        return self.inner.place()

    def folder(self) -> Place | None:
        return self.inner.folder()

    def known_folder(self) -> Place | None:
        return self.inner.known_folder()

    def mark(self) -> None:
        self._through("mark", (), self.inner.mark)  # a write, as the others

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return repr(self.inner)


def keys_named(keys: tuple[str, ...]) -> str:
    """``keys`` in an error message: the key, how many, or the store's folder (a mark)."""
    if len(keys) == 1:
        return keys[0] or "of the store's top level"
    return f"{len(keys)} keys" if keys else "the store's folder"
