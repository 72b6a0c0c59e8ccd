"""A pin whose write landed but whose answer was lost is the publisher's own, not a conflict.

The long fault run (docs/RELIABILITY.md) found single-publisher publishes refused with
ConflictError: a 500 or reset after the pin's conditional PUT landed made the client retry it,
and the retry's 412 surfaced. Here the backend does the write and then answers with that
ConflictError, exactly once per pin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chroma_snapshots import LATEST, RemoteStore
from chroma_snapshots.backends.base import ObjectMeta, PutMode
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.models import RefValue
from chroma_snapshots.errors import ConflictError
from chroma_snapshots.testing.conformance import read_tree, write_tree


class LostPinAnswers(FileBackend):
    """Every pin's first write lands, then fails as the retry of a lost answer would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lost: list[str] = []

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        meta = super().put(key, data, mode=mode)
        if "/pins/" in key and key not in self.lost:
            self.lost.append(key)
            raise ConflictError(f"put {key}: precondition failed (PreconditionFailed)")
        return meta


def test_a_pin_whose_answer_was_lost_does_not_fail_the_publish(tmp_path: Path) -> None:
    backend = LostPinAnswers(tmp_path / "store")
    store = RemoteStore(backend, chunk_size=4096)
    src = write_tree(tmp_path / "src", {"chroma.sqlite3": b"a" * 10_000, "seg/h.bin": b"h"})
    first = store.publish("db", src)
    (src / "seg/h.bin").write_bytes(b"changed")
    second = store.publish("db", src)  # pins its parent: a second lost answer
    assert len(backend.lost) >= 2
    assert store.resolve("db").version == second.version != first.version
    assert read_tree(store.checkout("db", dest=tmp_path / "out").path) == read_tree(src)
    assert not list(backend.list("db/pins/"))  # each pin was still dropped afterwards


def test_a_pin_key_holding_other_bytes_is_still_a_conflict(tmp_path: Path) -> None:
    class Taken(FileBackend):
        def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
            if "/pins/" in key:
                super().put(key, b'{"someone": "else"}', mode=PutMode.OVERWRITE)
                raise ConflictError(f"put {key}: precondition failed (PreconditionFailed)")
            return super().put(key, data, mode=mode)

    store = RemoteStore(Taken(tmp_path / "store"), chunk_size=4096)
    src = write_tree(tmp_path / "src", {"a.bin": b"x" * 5000})
    with pytest.raises(ConflictError):  # another writer's bytes are not taken as ours
        store.publish("db", src)
    assert store.read_ref("db") is None  # nothing was made visible


class OvertakenRefAnswer(FileBackend):
    """The first ref write to ``refs/latest`` by M lands; before its answer (lost) arrives,
    ``competitor`` publishes on top of it; then M hears ConflictError, as the retry of its
    lost answer would."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.competitor: RemoteStore | None = None
        self.src: Path | None = None
        self.overtaken = ""
        self.aba = False  # the competitor publishes, rolls back to M's and publishes again

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        meta = super().put(key, data, mode=mode)
        if key.endswith("/refs/latest") and self.competitor is not None and self.src:
            competitor, self.competitor = self.competitor, None
            mine = RefValue.from_json(data).version
            self.overtaken = competitor.publish("db", self.src).version
            if self.aba:  # M's version's retirement note is then about a later generation
                competitor.set_ref("db", "latest", mine, expected=self.overtaken)
                (self.src / "again").write_bytes(b"again")
                self.overtaken = competitor.publish("db", self.src).version
            raise ConflictError(f"put {key}: precondition failed (PreconditionFailed)")
        return meta


@pytest.mark.parametrize("move", ["publish", "set_ref", "publish, then a-b-a"])
def test_a_ref_move_overtaken_before_its_lost_answer_is_still_a_success(
    tmp_path: Path, move: str
) -> None:
    backend = OvertakenRefAnswer(tmp_path / "store")
    backend.aba = move.endswith("a-b-a")
    store = RemoteStore(backend, chunk_size=4096)
    old = store.publish("db", write_tree(tmp_path / "a", {"f": b"a" * 5000})).version
    store.publish("db", write_tree(tmp_path / "b", {"f": b"b" * 5000}))
    backend.competitor = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    backend.src = write_tree(tmp_path / "n", {"f": b"n" * 5000})
    if move.startswith("publish"):  # "nothing was made visible" would be false: it was
        mine = store.publish("db", write_tree(tmp_path / "m", {"f": b"m" * 5000})).version
    else:
        store.set_ref("db", "latest", old, expected=LATEST)
        mine = old
    assert backend.overtaken
    assert store.load_manifest("db", backend.overtaken).parent == mine
    assert store.resolve("db").version == backend.overtaken


def test_a_ref_move_that_lost_its_race_is_still_a_conflict(tmp_path: Path) -> None:
    class Lost(FileBackend):
        def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
            if key.endswith("/refs/latest") and mode.kind == "update":
                other.publish("db", write_tree(tmp_path / "n", {"f": b"n" * 5000}))
            return super().put(key, data, mode=mode)

    store = RemoteStore(Lost(tmp_path / "store"), chunk_size=4096)
    other = RemoteStore(FileBackend(tmp_path / "store"), chunk_size=4096)
    store.publish("db", write_tree(tmp_path / "a", {"f": b"a" * 5000}))
    with pytest.raises(ConflictError, match="nothing was made visible"):
        store.publish("db", write_tree(tmp_path / "m", {"f": b"m" * 5000}))
