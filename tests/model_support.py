"""Pieces of the stateful model test (test_model_state.py): a scripted backend seam, the
clients (one per simulated process) and the operations they run.

``ScriptedBackend`` wraps the real backend of one client and counts its calls; at call
``k`` of an operation it can raise an injected error before or after doing the call (after:
a lost answer), kill the client (``Killed``, which tears through ``except Exception`` as a
SIGKILL stops everything, and every later call of that client fails the same way), or pause
the calling thread until the test lets it go, so another client runs in between.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from chroma_snapshots import (
    ANY,
    LATEST,
    Backend,
    CachedStore,
    LocalSnapshot,
    RemoteStore,
)
from chroma_snapshots.backends.wrapped import WrappedBackend
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.stores.base import Expected
from chroma_snapshots.testing.conformance import read_tree

T = TypeVar("T")
GATE_TIMEOUT = 30.0  # a paused call that is never resumed fails the test instead of hanging
Action = Literal["fail-before", "fail-after", "kill", "pause"]
CHUNK_SIZE, PACK_TARGET = 4096, 8192
CACHE_MAX_BYTES = 48 << 10  # room for two contents: a third evicts


class Killed(BaseException):
    """The simulated process was killed at a backend call."""


@dataclass(frozen=True)
class Plan:
    """What happens at the ``at``-th backend call (from 0) of the next operation."""

    at: int
    action: Action
    error: type[SnapshotError] | None = None


class ScriptedBackend(WrappedBackend):
    """``inner`` with a scripted failure, kill or pause at one call; logs every call."""

    def __init__(self, inner: Backend, who: str, journal: list[str]) -> None:
        super().__init__(inner)
        self.who, self.journal = who, journal
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self.paused = threading.Event()
        self._plan: Plan | None = None
        self._calls = 0
        self.fired = False
        self.dead = False

    def __repr__(self) -> str:
        return f"ScriptedBackend({self.inner!r})"

    def arm(self, plan: Plan | None) -> None:
        """Count calls from 0 again and apply ``plan`` (None: run clean)."""
        with self._lock:
            self._plan, self._calls, self.fired = plan, 0, False
            self.paused.clear()

    def resume(self) -> None:
        """Let a paused operation go on."""
        self._open.set()

    def around(self, op: str, keys: tuple[str, ...], call: Callable[[], T]) -> T:
        what = " ".join((op, *keys))
        self._open.wait(GATE_TIMEOUT)
        with self._lock:
            if self.dead:
                raise Killed(f"{self.who} is dead")
            n = self._calls
            self._calls += 1
            plan = self._plan if self._plan is not None and self._plan.at == n else None
            self.fired = self.fired or plan is not None
            self.journal.append(f"{self.who} #{n} {what}" + (f"  <- {plan.action}" if plan else ""))
            if plan is not None and plan.action == "pause":
                self._open.clear()  # the client's other threads stop at the gate too
                self.paused.set()
        if plan is None:
            return call()
        if plan.action == "pause":
            self._open.wait(GATE_TIMEOUT)
        elif plan.action == "kill":
            self.dead = True
            raise Killed(f"{self.who} killed at {what}")
        elif plan.action == "fail-before" and plan.error is not None:
            raise plan.error(f"injected before {what}")
        result = call()
        if plan.action == "fail-after" and plan.error is not None:
            raise plan.error(f"injected after {what} (it happened; the answer was lost)")
        return result


def remote(backend: Backend, label: str) -> RemoteStore:
    """A store with tiny chunks and packs and one worker, so call order is deterministic."""
    return RemoteStore(
        backend,
        chunk_size=CHUNK_SIZE,
        pack_target=PACK_TARGET,
        workers=1,
        default_timeout=20.0,
        label=label,
    )


class Client:
    """One simulated process: a RemoteStore and a CachedStore on its own backend object.
    A restart (after a kill) builds new ones on the same storage and the same cache folder."""

    def __init__(self, who: str, make: Callable[[], Backend], cache: Path, journal: list[str]):
        self.who, self._make, self._cache, self._journal = who, make, cache, journal
        self.backend, self.store, self.cached = self._open()

    def _open(self) -> tuple[ScriptedBackend, RemoteStore, CachedStore]:
        backend = ScriptedBackend(self._make(), self.who, self._journal)
        store = remote(backend, "model-store")
        cached = CachedStore(
            store, self._cache, max_bytes=CACHE_MAX_BYTES, min_free_bytes=0, stale_ok=True
        )
        return backend, store, cached

    def restart(self) -> None:
        self.store.close()
        self.backend, self.store, self.cached = self._open()

    def close(self) -> None:
        self.store.close()


@dataclass(frozen=True)
class Op:
    """An operation as drawn: ``pick`` chooses among known versions when one is needed."""

    kind: Literal["publish", "tag", "rollback", "prune", "checkout", "cached"]
    content: int = 0
    expect: Literal["latest", "any", "current", "stale"] = "latest"
    ref: str = "latest"
    pick: int = 0
    keep: int = 1


@dataclass(frozen=True)
class Call:
    """An operation with its arguments fixed from what the client knew when it started."""

    op: Op
    op_id: int
    expected: Expected = LATEST
    version: str = ""
    source: Path | None = None


@dataclass
class Outcome:
    """What one call returned or raised, and whether its scripted action happened."""

    call: Call
    client: str
    error: BaseException | None = None
    version: str | None = None  # publish: the new version; checkout: the one served
    parent: str | None = None
    served_op: object = None  # checkout: the op id the served manifest's metadata names
    stale: bool = False  # cached checkout: served from the cache while the store was down
    tree: dict[str, bytes] = field(default_factory=dict)
    fired: bool = False
    action: Action | None = None


def run(client: Client, call: Call, plan: Plan | None) -> Outcome:
    """Run ``call`` on ``client`` under ``plan``; every exception is captured, not raised."""
    out = Outcome(call, client.who, action=plan.action if plan else None)
    client.backend.arm(plan)
    try:
        _dispatch(client, call, out)
    except BaseException as e:  # judged by the test: Killed and undocumented types included
        out.error = e
    out.fired = client.backend.fired
    client.backend.arm(None)
    return out


def _dispatch(client: Client, call: Call, out: Outcome) -> None:
    op = call.op
    if op.kind == "publish":
        assert call.source is not None
        # through the cache: with the parent cached, changed chunks become deltas
        info = client.cached.publish(
            "db",
            call.source,
            expected=call.expected,
            metadata={"op": call.op_id, "content": op.content},
            allow_empty=True,  # the model's publish always makes a version, as before
        )
        out.version, out.parent = info.version, info.parent
    elif op.kind in ("tag", "rollback"):
        client.store.set_ref("db", op.ref, call.version, expected=call.expected)
    elif op.kind == "prune":
        client.store.prune("db", keep_last=op.keep, min_age=0)
    elif op.kind == "checkout":
        dest = Path(tempfile.mkdtemp(prefix="model-checkout-"))
        try:
            snap = client.store.checkout("db", op.ref, dest / "out")
            _served(out, snap)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    else:
        with client.cached.checkout("db", op.ref) as snap:
            _served(out, snap)


def _served(out: Outcome, snap: LocalSnapshot) -> None:
    out.version, out.served_op = snap.info.version, snap.info.metadata.get("op")
    out.stale = snap.stale
    out.tree = read_tree(snap.path)


def expected_of(kind: str, current: str | None, older: str | None) -> Expected:
    """The ``expected=`` a publish passes: the ref it saw, an older version, LATEST or ANY."""
    if kind == "latest":
        return LATEST
    if kind == "any":
        return ANY
    return older if kind == "stale" and older is not None and older != current else current
