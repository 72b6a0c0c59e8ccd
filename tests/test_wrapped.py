"""A backend reached through a wrapper (a check, a deadline, a test's gate) is the same
storage: the same cache folder, the same guard on the folders a publish keeps out, the same
label. A wrapper written by hand that passed on only its label moved a store's cache to
another folder (found in CI: the step-marking wrapper of these tests), and one that passed
on nothing let a publish copy the store into itself. And the deadline view bounds every
storage call a backend has, so a call added to ``Backend`` later cannot slip past it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from chroma_snapshots import Backend, CachedStore, RemoteStore
from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.backends.wrapped import WrappedBackend
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.errors import (
    BackendUnavailableError,
    IntegrityError,
    InvalidInputError,
    StorageTimeoutError,
)
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import BackendTests, read_tree, write_tree

T = TypeVar("T")
pytestmark = pytest.mark.usefixtures("clean_env")
# what a wrapper passes on as is: where the storage is, not a call to it
SAME_STORAGE = {"place", "folder", "known_folder", "close"}


class Counting(WrappedBackend):
    """A wrapper as a user writes one: only the hook."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.seen: list[str] = []

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        self.seen.append(op)
        return call()


class OnFiles(BackendTests):
    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        path = _files(backend).root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_get(self, backend: Backend, key: str) -> bytes:
        return (_files(backend).root / key).read_bytes()


def _files(backend: Backend) -> FileBackend:
    inner = backend.inner if isinstance(backend, WrappedBackend) else backend
    assert isinstance(inner, FileBackend)
    return inner


class TestWrapped(OnFiles):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        return Counting(FileBackend(tmp_path / "store"))


class TestDeadlineView(OnFiles):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        return DeadlineBackend(FileBackend(tmp_path / "store"), Deadline(120))


def test_a_wrapped_file_store_keeps_its_cache_folder_and_its_guard(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"rows" * 100})
    inner = FileBackend(src / "store")
    wrapped = Counting(inner)
    assert (wrapped.place(), repr(wrapped), wrapped.folder()) == (
        inner.place(),
        repr(inner),
        inner.folder(),
    )
    assert RemoteStore(wrapped).identity == RemoteStore(inner).identity
    # a folder that holds the store is refused through the wrapper too (it was copied into
    # a new version of itself when the wrapper passed on no folder)
    before = read_tree(src)
    with pytest.raises(InvalidInputError, match="the store's folder"):
        RemoteStore(wrapped).publish("db", src)
    assert read_tree(src) == before
    other = write_tree(tmp_path / "other", {"a.bin": b"a" * 100})
    RemoteStore(wrapped).publish("db", other)
    assert {"put", "mark"} <= set(wrapped.seen)  # the store's calls go through the hook


def test_a_wrapped_s3_store_shares_the_cache_folder(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    inner = S3Backend(s3_bucket, "p", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    src = write_tree(tmp_path / "src", {"a.bin": b"a" * 5000})
    RemoteStore(Counting(inner)).publish("db", src)
    cache = tmp_path / "cache"
    first = CachedStore(RemoteStore(Counting(inner)), cache).checkout("db", "latest")
    again = CachedStore(RemoteStore(inner), cache).checkout("db", "latest")
    # one cache folder: the second store found the version the first one cached
    assert again.source == "cache"
    assert first.path.parents[2] == again.path.parents[2]  # <cache>/<store's folder>/db
    assert read_tree(again.path) == read_tree(src)


class _Hung(Backend):
    """Every storage call waits until released (a stalled connection, a hung mount)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def _hang(self, *args: Any, **kwargs: Any) -> Any:
        self.release.wait(30)
        raise AssertionError("released: the call was not abandoned at the deadline")

    get = put = head = list = delete = _hang


def _storage_calls() -> list[str]:
    return sorted(
        name
        for name, fn in vars(Backend).items()
        if callable(fn) and not name.startswith("_") and name not in SAME_STORAGE
    )


ARGS: dict[str, tuple[Any, ...]] = {
    "get": ("k",),
    "get_into": ("k", (0, 1), memoryview(bytearray(1))),
    "put": ("k", b"x"),
    "head": ("k",),
    "exists": ("k",),
    "list": ("",),
    "list_dirs": ("",),
    "delete": ("k",),
    "delete_many": (["k", "l"],),
    "sweep_temp": ("", 0.0),
    "mark": (),
}


def test_every_storage_call_is_known_to_this_test() -> None:
    # a storage call added to Backend must be added to ARGS, and so to the test below
    assert _storage_calls() == sorted(ARGS)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_the_deadline_view_bounds_every_storage_call(name: str) -> None:
    hung = _Hung()
    for other in _storage_calls():  # the derived calls hang too, as a backend's own would
        setattr(hung, other, hung._hang)
    view = DeadlineBackend(hung, Deadline(0.3))
    try:
        with pytest.raises(StorageTimeoutError):
            getattr(view, name)(*ARGS[name])
    finally:
        hung.release.set()
    view.close()  # a view for one operation: it leaves the store's backend open


@pytest.mark.parametrize("ended", ["passed", "called off"])
def test_a_call_past_its_deadline_is_not_made(tmp_path: Path, ended: str) -> None:
    # it was started, and the write landed while its caller was told it failed
    files = FileBackend(tmp_path / "store")
    dl = Deadline(60)
    if ended == "called off":
        dl.call_off()
    else:
        dl = Deadline(0.0)
    view = DeadlineBackend(files, dl)
    files.put("kept", b"1")
    for name, args in (("put", ("new", b"x")), ("delete", ("kept",)), ("delete_many", (["kept"],))):
        with pytest.raises(StorageTimeoutError):
            getattr(view, name)(*args)
    assert not files.exists("new")
    assert files.get("kept").data == b"1"


class Raising(WrappedBackend):
    def __init__(self, inner: Backend, error: BaseException) -> None:
        super().__init__(inner)
        self.error = error

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        raise self.error


@pytest.mark.parametrize(
    ("raised", "documented"),
    [
        (ConnectionResetError(104, "reset"), BackendUnavailableError),
        (OSError(5, "I/O error"), BackendUnavailableError),
        (TimeoutError("slow"), StorageTimeoutError),
        (IntegrityError("damaged"), IntegrityError),
    ],
)
def test_what_a_wrapper_raises_is_the_documented_error(
    tmp_path: Path, raised: BaseException, documented: type[Exception]
) -> None:
    store = RemoteStore(Raising(FileBackend(tmp_path / "store"), raised))
    with pytest.raises(documented):
        store.resolve("db")


@pytest.mark.parametrize("inner", [None, "s3://b/p", 42])
def test_a_wrapper_of_what_is_not_a_backend_is_refused(inner: Any) -> None:
    with pytest.raises(InvalidInputError, match="must be a Backend"):
        WrappedBackend(inner)
