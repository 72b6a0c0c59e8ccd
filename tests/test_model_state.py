"""A stateful model-based test: two clients (two simulated processes, each with its own
RemoteStore and CachedStore on its own backend object over the same storage) publish, tag,
roll back, prune and check out, with faults, kills and pauses scripted at the backend seam,
checked after every step against a reference model:

- every ref names a version whose manifest exists, whose packs all exist and verify, and
  whose files are exactly the content that version was published from;
- every successful checkout (plain or cached) has exactly the bytes of the version it
  reports, and that version is one the ref named during the call;
- the refs' values are explained by some order of the step's writes in which every
  compare-and-swap saw the value it expected (no lost update; a failed CAS made nothing
  visible);
- an operation fails only with a documented error that the situation explains.

A pause holds one client at its k-th backend call while the other client runs a whole
operation, so races (prune during a publish or a set_ref, a publish during a checkout) are
deterministic and shrink to a short rule sequence.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from model_judge import Judge
from model_support import (
    GATE_TIMEOUT,
    Call,
    Client,
    Op,
    Outcome,
    Plan,
    expected_of,
    remote,
    run,
)
from reliability import record, runs

from chroma_snapshots import Backend
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.engine.chunkids import BLAKE3
from chroma_snapshots.errors import BackendUnavailableError, StorageTimeoutError
from chroma_snapshots.testing import MotoServer
from chroma_snapshots.testing.conformance import write_tree

MISSING = "20000101T000000000000Z-000000000000"  # well-formed, never published
TAGS = ("stable", "canary")


def _contents() -> list[dict[str, bytes]]:
    """Four small trees sharing most chunks: one sqlite page and one segment file differ,
    so dedup, reverts (byte-identical packs) and reused chunks all happen. The segment
    files differ in a few bytes per chunk (as HNSW links do), so a publisher that has the
    parent cached stores them as deltas: chains form, and prunes must keep their bases."""
    rng = random.Random(13)
    base = bytearray(rng.randbytes(3 * 4096 + 100))
    links = rng.randbytes(2 * 4096 + 30)
    out = []
    for i in range(4):
        sqlite = bytearray(base)
        sqlite[4096:8192] = rng.randbytes(4096)
        segment = bytearray(links[: 2 * 4096 + 10 * i])
        for at in (100 + i, 4196 + 7 * i, 8192 + i):
            segment[at % len(segment)] ^= 0x5A
        files = {
            "chroma.sqlite3": bytes(sqlite),
            "seg/data_level0.bin": bytes(segment),
            "seg/empty": b"",
        }
        if i % 2:
            files["seg/extra/notes.txt"] = f"content {i}\n".encode() * 50
        out.append(files)
    return out


CONTENTS = _contents()


def _entries(files: dict[str, bytes]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """What a manifest must list for ``files``: path -> (size, chunk ids: BLAKE3, what a
    new store names chunks by)."""
    name = BLAKE3.key
    return {
        path: (
            len(data),
            tuple(name(BLAKE3.digest(data[i : i + 4096])) for i in range(0, len(data), 4096)),
        )
        for path, data in files.items()
    }


ENTRIES = [_entries(c) for c in CONTENTS]

ops = st.one_of(
    st.builds(
        Op,
        kind=st.just("publish"),
        content=st.integers(0, len(CONTENTS) - 1),
        expect=st.sampled_from(["latest", "latest", "any", "current", "stale"]),
        pick=st.integers(0, 7),
    ),
    st.builds(Op, kind=st.just("tag"), ref=st.sampled_from(TAGS), pick=st.integers(0, 7)),
    st.builds(Op, kind=st.just("rollback"), pick=st.integers(0, 7)),
    st.builds(Op, kind=st.just("prune"), keep=st.integers(1, 3)),
    st.builds(
        Op, kind=st.sampled_from(["checkout", "cached"]), ref=st.sampled_from(["latest", "stable"])
    ),
)
clients = st.integers(0, 1)
calls_at = st.integers(0, 14)
faults = st.sampled_from([BackendUnavailableError, StorageTimeoutError])

BackendFactory = Callable[[Path], Callable[[], Backend]]
STEPS: dict[str, int] = {}  # steps run, by kind, for the figures


class StoreMachine(RuleBasedStateMachine):
    """The model: which content each publish used, which versions publishes reported, and
    what each ref names (as last observed, after checking it was allowed)."""

    def __init__(self, factory: BackendFactory) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="model-state-"))
        make = factory(self.tmp)
        self.journal: list[str] = []
        self.clients = [
            Client(f"c{i}", make, self.tmp / f"cache{i}", self.journal) for i in range(2)
        ]
        self.sources = [write_tree(self.tmp / f"src{i}", c) for i, c in enumerate(CONTENTS)]
        self.judge = Judge(remote(make(), "observer"), ENTRIES, CONTENTS)
        self.next_id = 0

    def teardown(self) -> None:
        for c in self.clients:
            c.close()
        self.judge.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _call(self, op: Op) -> Call:
        self.next_id += 1
        model = self.judge.model
        known = model.published
        picked = known[-1 - op.pick % len(known)] if known else MISSING
        if op.kind == "publish":
            model.op_content[self.next_id] = op.content
            current = model.refs.get("latest")
            expected = expected_of(op.expect, current, picked)
            return Call(op, self.next_id, expected, source=self.sources[op.content])
        if op.kind in ("tag", "rollback"):
            return Call(op, self.next_id, model.refs.get(op.ref), version=picked)
        return Call(op, self.next_id)

    def _judge(self, outcomes: list[Outcome], kind: str) -> None:
        STEPS[kind] = STEPS.get(kind, 0) + 1
        self.judge.step(outcomes, self.journal)
        self.journal.clear()

    @rule(client=clients, op=ops)
    def clean(self, client: int, op: Op) -> None:
        self._judge([run(self.clients[client], self._call(op), None)], "clean")

    @rule(
        client=clients,
        op=ops,
        at=calls_at,
        after=st.booleans(),
        error=faults,
    )
    def fault(
        self, client: int, op: Op, at: int, after: bool, error: type[BackendUnavailableError]
    ) -> None:
        """The ``at``-th backend call fails, before doing its work or after (a lost answer)."""
        plan = Plan(at, "fail-after" if after else "fail-before", error)
        self._judge([run(self.clients[client], self._call(op), plan)], "fault")

    @rule(client=clients, ref=st.sampled_from(["latest", "stable"]), error=faults)
    def outage(self, client: int, ref: str, error: type[BackendUnavailableError]) -> None:
        """A cached checkout while the store does not answer: the ref's read fails, so the
        cache may serve (stale) only the version this client last saw the ref name."""
        call = self._call(Op("cached", ref=ref))
        self._judge([run(self.clients[client], call, Plan(0, "fail-before", error))], "outage")

    @rule(client=clients, op=ops, at=calls_at)
    def crash(self, client: int, op: Op, at: int) -> None:
        """The process dies at its ``at``-th backend call and starts again."""
        c = self.clients[client]
        out = run(c, self._call(op), Plan(at, "kill"))
        c.restart()
        self._judge([out], "crash")

    @rule(client=clients, op=ops, at=calls_at, other=ops)
    def interleave(self, client: int, op: Op, at: int, other: Op) -> None:
        """``client`` stops at its ``at``-th backend call while the other client runs
        ``other`` to the end; then it goes on."""
        self._overlap(client, op, at, other)

    @rule(client=clients, op=ops, at=calls_at, keep=st.integers(1, 3))
    def prune_inside(self, client: int, op: Op, at: int, keep: int) -> None:
        """A whole prune (``min_age=0``) at the ``at``-th step boundary of ``op``: the race
        the prune protocol exists for, so it gets a rule of its own."""
        self._overlap(client, op, at, Op("prune", keep=keep))

    def _overlap(self, client: int, op: Op, at: int, other: Op) -> None:
        a, b = self.clients[client], self.clients[1 - client]
        first, second = self._call(op), self._call(other)
        box: list[Outcome] = []
        backend = a.backend
        t = threading.Thread(target=lambda: box.append(run(a, first, Plan(at, "pause"))))
        t.start()
        while t.is_alive() and not backend.paused.wait(0.002):
            pass
        if not backend.paused.is_set():  # done before the pause: just one after the other
            t.join()
            self._judge(box, "clean")
            self._judge([run(b, second, None)], "clean")
            return
        out = run(b, second, None)
        backend.resume()
        t.join(GATE_TIMEOUT)
        assert not t.is_alive(), f"{a.who} did not finish after the pause"
        self._judge([box[0], out], "interleaved")

    @invariant()
    def refs_name_complete_versions(self) -> None:
        self.judge.check_refs()


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def _run(factory: BackendFactory, examples: int, steps: int, figure: str) -> None:
    STEPS.clear()
    t0 = time.monotonic()
    conf = _settings(examples, steps)
    run_state_machine_as_test(lambda: StoreMachine(factory), settings=conf)  # type: ignore[arg-type]
    record(figure, {**STEPS, "examples": examples, "seconds": round(time.monotonic() - t0, 1)})


def _file_factory(tmp: Path) -> Callable[[], Backend]:
    return lambda: FileBackend(tmp / "store", fsync=False)


@pytest.mark.timeout(runs(ci=600, long=1800))  # room for shrinking a failure
def test_model_two_clients_on_local_files() -> None:
    _run(_file_factory, runs(ci=50, long=200), runs(ci=30, long=50), "model-state-file")


@pytest.mark.timeout(runs(ci=600, long=1800))  # room for shrinking a failure
def test_model_two_clients_on_s3(moto_server: MotoServer, s3_bucket: str) -> None:
    """A few short runs against a real HTTP server (moto): the same invariants hold."""

    def factory(tmp: Path) -> Callable[[], Backend]:
        prefix = f"model-{uuid.uuid4().hex[:8]}"
        conf = S3Settings(endpoint_url=moto_server.endpoint_url)
        return lambda: S3Backend(s3_bucket, prefix, settings=conf)

    _run(factory, runs(ci=3, long=10), runs(ci=12, long=30), "model-state-s3")
