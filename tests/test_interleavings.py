"""Prune, a second publisher, a ref move or a crash at *every* step boundary of another
operation, deterministically (tests/interleave.py), with the invariants checked after each:

- every ref names a manifest that exists and whose every pack exists and verifies;
- every operation ends in success or a documented error (SnapshotError);
- a successful publish or ref move is what the ref names afterwards, unless a later move
  replaced it, and a successful checkout has exactly the bytes of the version it reports.

The store is a FileBackend (fast, real compare-and-swap); objects of the starting versions
are aged by two hours, so ``min_age=3600`` sees them as old and anything new as young.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from interleave import Gate, Killed, Outcome, Schedule, plans, run_actors
from reliability import LONG

from chroma_snapshots import ANY, RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.testing.conformance import read_tree, write_tree

NAME = "db"
AGE = 7200.0


def _content(label: str) -> dict[str, bytes]:
    rnd = random.Random(label)
    return {"a.bin": rnd.randbytes(24_000), "d/b.bin": rnd.randbytes(9_000)}


def _store(backend: FileBackend | Gate) -> RemoteStore:
    return RemoteStore(backend, chunk_size=4096, pack_target=8192, workers=1)


@dataclass
class World:
    """A store folder and what each version in it holds."""

    root: Path
    versions: dict[str, str]  # label -> version id
    contents: dict[str, dict[str, bytes]]  # version id -> files

    def store(self) -> RemoteStore:
        return _store(FileBackend(self.root, fsync=False))

    def source(self, label: str) -> Path:
        return write_tree(self.root.parent / f"src-{label}", _content(label))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    """v1 (content A) and v2 (content B, latest), every object two hours old."""
    root = tmp_path_factory.mktemp("template") / "store"
    world = World(root, {}, {})
    store = world.store()
    for label in ("A", "B"):
        version = store.publish(NAME, world.source(label)).version
        world.versions[label] = version
        world.contents[version] = _content(label)
    for p in root.rglob("*"):
        st = p.stat()
        os.utime(p, (st.st_atime - AGE, st.st_mtime - AGE))
    return world


def _fresh(template: World, where: Path) -> World:
    root = where / "store"
    shutil.copytree(template.root, root)  # copy2 keeps the aged mtimes
    return World(root, dict(template.versions), dict(template.contents))


def assert_sound(world: World) -> dict[str, str]:
    """Every ref names a complete, verifiable version; returns the refs."""
    store = world.store()
    refs = store.refs(NAME)
    for ref, version in refs.items():
        report = store.verify(NAME, version)
        assert report.ok, f"{ref} -> {version}: {report.problems}"
    return refs


Actors = Callable[[World, RemoteStore, RemoteStore, Path], dict[str, Callable[[], object]]]
Check = Callable[[World, dict[str, Outcome], dict[str, str]], None]


def _documented(outcomes: dict[str, Outcome]) -> None:
    for actor, o in outcomes.items():
        if o.error is not None and not isinstance(o.error, (SnapshotError, Killed)):
            raise AssertionError(f"{actor} raised an undocumented {o.error!r}") from o.error


def explore(template: World, tmp: Path, actors: Actors, check: Check) -> int:
    """Run B at every step boundary of A and A at every step boundary of B."""
    counts = {}
    for actor in ("A", "B"):  # each alone, to count its backend calls
        world = _fresh(template, tmp / f"solo-{actor}")
        gates = {a: Gate(FileBackend(world.root, fsync=False), None, a) for a in ("A", "B")}
        fns = actors(world, _store(gates["A"]), _store(gates["B"]), tmp / f"solo-{actor}")
        fns[actor]()
        counts[actor] = gates[actor].calls
    runs_done = 0
    for first, second in (("A", "B"), ("B", "A")):
        for plan in plans(counts[first], counts[second], first, second, pairs=LONG):
            where = tmp / f"run{runs_done}"
            world = _fresh(template, where)
            schedule = Schedule(plan, [first, second])
            stores = {
                a: _store(Gate(FileBackend(world.root, fsync=False), schedule, a))
                for a in ("A", "B")
            }
            outcomes = run_actors(schedule, actors(world, stores["A"], stores["B"], where))
            _documented(outcomes)
            check(world, outcomes, assert_sound(world))
            for store in stores.values():
                store.close()
            shutil.rmtree(where)
            runs_done += 1
    return runs_done


def _prune(min_age: float) -> Callable[[RemoteStore], object]:
    return lambda s: s.prune(NAME, keep_last=1, min_age=min_age)


MIN_AGES = [0.0, 3600.0]


def _publisher_survives(label: str) -> Check:
    def check(world: World, out: dict[str, Outcome], refs: dict[str, str]) -> None:
        info = out["A"].value
        if info is not None:  # a publish that succeeded is what latest names
            assert refs["latest"] == info.version  # type: ignore[attr-defined]

    return check


@pytest.mark.parametrize("min_age", MIN_AGES)
@pytest.mark.parametrize("label", ["A", "C"])  # A: a revert (identical, old packs); C: new
def test_publish_against_prune(template: World, tmp_path: Path, label: str, min_age: float) -> None:
    def actors(
        w: World, a: RemoteStore, b: RemoteStore, _: Path
    ) -> dict[str, Callable[[], object]]:
        src = w.source(label)
        return {"A": lambda: a.publish(NAME, src), "B": lambda: _prune(min_age)(b)}

    assert explore(template, tmp_path, actors, _publisher_survives(label)) > 0


@pytest.mark.parametrize("min_age", MIN_AGES)
def test_publish_any_against_prune(template: World, tmp_path: Path, min_age: float) -> None:
    def actors(
        w: World, a: RemoteStore, b: RemoteStore, _: Path
    ) -> dict[str, Callable[[], object]]:
        src = w.source("A")
        return {
            "A": lambda: a.publish(NAME, src, expected=ANY),
            "B": lambda: _prune(min_age)(b),
        }

    explore(template, tmp_path, actors, _publisher_survives("A"))


@pytest.mark.parametrize("min_age", MIN_AGES)
@pytest.mark.parametrize("ref", ["latest", "stable"])  # a rollback; a new tag
def test_set_ref_against_prune(template: World, tmp_path: Path, ref: str, min_age: float) -> None:
    def actors(
        w: World, a: RemoteStore, b: RemoteStore, _: Path
    ) -> dict[str, Callable[[], object]]:
        v1, v2 = w.versions["A"], w.versions["B"]
        expected = v2 if ref == "latest" else None
        return {
            "A": lambda: a.set_ref(NAME, ref, v1, expected=expected),
            "B": lambda: _prune(min_age)(b),
        }

    def check(w: World, out: dict[str, Outcome], refs: dict[str, str]) -> None:
        if out["A"].error is None:
            assert refs[ref] == w.versions["A"]

    explore(template, tmp_path, actors, check)


def test_two_publishers(template: World, tmp_path: Path) -> None:
    """No lost update: if both succeed, the second one's parent is the first one."""

    def actors(
        w: World, a: RemoteStore, b: RemoteStore, _: Path
    ) -> dict[str, Callable[[], object]]:
        src_c, src_d = w.source("C"), w.source("D")
        return {"A": lambda: a.publish(NAME, src_c), "B": lambda: b.publish(NAME, src_d)}

    def check(w: World, out: dict[str, Outcome], refs: dict[str, str]) -> None:
        won = [o.value for o in out.values() if o.error is None]
        assert won, "one publisher must win"
        chain = {w.store().load_manifest(NAME, refs["latest"]).parent}
        if len(won) == 2:
            versions = {i.version for i in won}  # type: ignore[attr-defined]
            assert refs["latest"] in versions
            assert chain & versions
        else:
            assert refs["latest"] == won[0].version  # type: ignore[attr-defined]

    explore(template, tmp_path, actors, check)


@pytest.mark.parametrize("min_age", MIN_AGES)
def test_checkout_against_publish_and_prune(
    template: World, tmp_path: Path, min_age: float
) -> None:
    """A reader of v2 while v2 is replaced and pruned: with a grace, it always gets v2's
    exact bytes; without one it may fail, but only with a documented error."""

    def actors(
        w: World, a: RemoteStore, b: RemoteStore, where: Path
    ) -> dict[str, Callable[[], object]]:
        src = w.source("C")

        def replace_and_prune() -> object:
            b.publish(NAME, src)
            return _prune(min_age)(b)

        return {"A": lambda: a.checkout(NAME, dest=where / "out"), "B": replace_and_prune}

    def check(w: World, out: dict[str, Outcome], refs: dict[str, str]) -> None:
        snap = out["A"].value
        if min_age > 0:
            assert out["A"].error is None, out["A"].error
        if snap is not None:
            got = read_tree(snap.path)  # type: ignore[attr-defined]
            version = snap.info.version  # type: ignore[attr-defined]
            assert got == _content("B") or got == _content("C")
            assert version in (w.versions["B"], refs["latest"])

    explore(template, tmp_path, actors, check)


@pytest.mark.parametrize("label", ["A", "C"])
def test_crashed_publisher_then_prune(template: World, tmp_path: Path, label: str) -> None:
    """A publisher killed at every step, a prune, then a new publish: always sound."""
    world = _fresh(template, tmp_path / "count")
    gate = Gate(FileBackend(world.root, fsync=False), None, "A")
    _store(gate).publish(NAME, world.source(label))
    for step in range(1, gate.calls + 1):
        where = tmp_path / f"kill{step}"
        w = _fresh(template, where)
        schedule = Schedule([], ["A"], kill={"A": step})
        store = _store(Gate(FileBackend(w.root, fsync=False), schedule, "A"))
        src = w.source(label)
        out = run_actors(schedule, {"A": partial(store.publish, NAME, src)})
        assert isinstance(out["A"].error, Killed), (step, out["A"])
        w.store().prune(NAME, keep_last=1, min_age=0)
        assert_sound(w)
        info = w.store().publish(NAME, w.source("D"))
        assert assert_sound(w)["latest"] == info.version
        shutil.rmtree(where)
