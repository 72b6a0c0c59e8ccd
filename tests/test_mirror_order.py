"""Two publishers through ``FallbackStore(mirror=True)`` at once: the mirror's ``latest``
ends where the source of truth's is, whatever the order of their steps. Before the mirror
followed the source of truth after a lost compare-and-swap, the older publisher's
mirroring could land between the newer one's read of the mirror's ref and its swap, and
leave the mirror at the older version until the next publish."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from interleave import Gate, MemoryBackend, Schedule, plans, run_actors
from reliability import LONG, record

from chroma_snapshots import ANY, FallbackStore, RemoteStore
from chroma_snapshots.backends.base import Backend
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.testing.conformance import write_tree

NAME = "db"
STRIDE = 4


def _fallback(mirror: Backend, truth: Backend) -> FallbackStore:
    stores = [RemoteStore(b, chunk_size=4096, workers=1) for b in (mirror, truth)]
    return FallbackStore(stores, primary=1, mirror=True)


def _tree(where: Path, seed: str) -> Path:
    return write_tree(where, {"a.bin": random.Random(seed).randbytes(10_000)})


def _latest(backend: Backend) -> str | None:
    return RemoteStore(backend).refs(NAME).get("latest")


Action = Callable[[FallbackStore, str], object]


def _explore(tmp_path: Path, actions: dict[str, Action], figure: str) -> int:
    """The first j calls of one actor at every call boundary i of the other (then each to
    its end), both ways: after every run the mirror's ``latest`` equals the source of
    truth's and names a version whole on the mirror. Returns how many runs."""
    truth, mirror = MemoryBackend(), MemoryBackend()
    _fallback(mirror, truth).publish(NAME, _tree(tmp_path / "v1", "v1"))
    first_version = RemoteStore(truth).refs(NAME)["latest"]

    def act(t: Backend, m: Backend, actor: str, schedule: Schedule | None) -> object:
        return actions[actor](
            _fallback(Gate(m, schedule, actor), Gate(t, schedule, actor)), first_version
        )

    counts = {}
    for a in actions:  # each alone, to count its backend calls
        tg, mg = Gate(truth.copy(), None, a), Gate(mirror.copy(), None, a)
        actions[a](_fallback(mg, tg), first_version)
        counts[a] = tg.calls + mg.calls
    ended: Counter[str] = Counter()
    runs = 0
    for first, second in (("A", "B"), ("B", "A")):
        for plan in plans(counts[first], counts[second], first, second, pairs=True):
            i, j = plan.count(first), plan.count(second)
            if not LONG and (i % STRIDE or j % STRIDE):
                continue  # the short suite: every STRIDE-th step of each; the long, all
            t, m = truth.copy(), mirror.copy()
            schedule = Schedule(plan, [first, second])
            outcomes = run_actors(schedule, {a: partial(act, t, m, a, schedule) for a in actions})
            for actor, o in outcomes.items():
                if o.error is not None and not isinstance(o.error, SnapshotError):
                    raise AssertionError(f"{actor}: {o.error!r} at {plan}") from o.error
                ended[type(o.error).__name__ if o.error else "ok"] += 1
            assert _latest(m) == _latest(t), f"mirror not where the truth is after {plan}"
            assert RemoteStore(m).verify(NAME, _latest(m) or "").ok
            runs += 1
    record(figure, {"runs": runs, "steps": counts, "ended": ended})
    return runs


def test_two_publishers_mirroring_at_once_leave_the_mirror_where_the_truth_is(
    tmp_path: Path,
) -> None:
    sources = {a: _tree(tmp_path / a, a) for a in ("A", "B")}
    actions: dict[str, Action] = {
        a: partial(lambda src, fb, _v1: fb.publish(NAME, src), sources[a]) for a in sources
    }
    assert _explore(tmp_path, actions, "mirror-two-publishers") > 50


def test_a_rollback_racing_a_publish_leaves_the_mirror_where_the_truth_is(
    tmp_path: Path,
) -> None:
    """The rollback's own mirroring finds the mirror already at v1 and writes nothing; the
    publish's swap, read before the rollback, then lands on the mirror after it: without a
    look at the truth after the swap the mirror kept the version rolled back."""
    src = _tree(tmp_path / "A", "A")
    actions: dict[str, Action] = {
        "A": lambda fb, _v1: fb.publish(NAME, src),
        "B": lambda fb, v1: fb.set_ref(NAME, "latest", v1, expected=ANY),
    }
    assert _explore(tmp_path, actions, "mirror-publish-and-rollback") > 50
