"""Pieces of the stateful model test (test_model_state.py): a scripted backend seam, the
clients (one per simulated process) and the operations they run.

``ScriptedBackend`` wraps the real backend of one client and counts its calls; at call
``k`` of an operation it can raise an injected error before or after doing the call (after:
a lost answer), kill the client (``Killed``, which tears through ``except Exception`` as a
SIGKILL stops everything, and every later call of that client fails the same way), or pause
the calling thread until the test lets it go, so another client runs in between.
"""

from __future__ import annotations

import builtins
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations, permutations
from pathlib import Path
from typing import Literal, TypeVar

from chroma_snapshots import (
    ANY,
    LATEST,
    Backend,
    CachedStore,
    GetResult,
    LocalSnapshot,
    ObjectMeta,
    PutMode,
    RemoteStore,
)
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConflictError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)
from chroma_snapshots.store import Expected
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


class ScriptedBackend(Backend):
    """``inner`` with a scripted failure, kill or pause at one call; logs every call."""

    def __init__(self, inner: Backend, who: str, journal: list[str]) -> None:
        self.inner, self.who, self.journal = inner, who, journal
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

    def _call(self, what: str, fn: Callable[[], T]) -> T:
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
            return fn()
        if plan.action == "pause":
            self._open.wait(GATE_TIMEOUT)
        elif plan.action == "kill":
            self.dead = True
            raise Killed(f"{self.who} killed at {what}")
        elif plan.action == "fail-before" and plan.error is not None:
            raise plan.error(f"injected before {what}")
        result = fn()
        if plan.action == "fail-after" and plan.error is not None:
            raise plan.error(f"injected after {what} (it happened; the answer was lost)")
        return result

    def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> GetResult:
        return self._call(f"get {key}", lambda: self.inner.get(key, byte_range=byte_range))

    def get_into(self, key: str, byte_range: tuple[int, int], buf: memoryview) -> int:
        return self._call(f"get {key}", lambda: self.inner.get_into(key, byte_range, buf))

    def put(self, key: str, data: bytes, *, mode: PutMode = PutMode.OVERWRITE) -> ObjectMeta:
        return self._call(f"put {key} {mode.kind}", lambda: self.inner.put(key, data, mode=mode))

    def head(self, key: str) -> ObjectMeta:
        return self._call(f"head {key}", lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        return iter(self._call(f"list {prefix}", lambda: builtins.list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))

    def delete_many(self, keys: builtins.list[str]) -> None:
        self._call(f"delete {' '.join(keys)}", lambda: self.inner.delete_many(keys))

    def close(self) -> None:
        self.inner.close()


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
        info = client.store.publish(
            "db",
            call.source,
            expected=call.expected,
            metadata={"op": call.op_id, "content": op.content},
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


@dataclass
class Model:
    """What the test knows: each ref's value as last observed, the versions publishes
    reported, the content each publish used, and publishes that must never become visible."""

    refs: dict[str, str] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    op_content: dict[int, int] = field(default_factory=dict)
    invisible: set[int] = field(default_factory=set)
    # A prune that failed or was killed may leave its record of condemned versions behind;
    # ref movers then refuse them (ConflictError) until the record expires.
    condemned: set[str] = field(default_factory=set)
    prune_failed: bool = False
    # (client, ref) -> what that client's cache may have recorded the ref to name: a stale
    # read must serve one of these, never another version.
    recorded: dict[tuple[str, str], set[str | int | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Write:
    """A ref write a step made (``certain``) or may have made (a fault or kill hit it).
    ``value`` is a version, or the op id of a publish whose version is unknown; a
    compare-and-swap (``cas``) lands only where the ref holds ``base``."""

    ref: str
    value: str | int
    base: str | None
    cas: bool
    certain: bool


def writes_of(o: Outcome) -> list[Write]:
    """The ref writes an outcome made or may have made."""
    call, op = o.call, o.call.op
    if op.kind not in ("publish", "tag", "rollback"):
        return []
    cas = call.expected is not ANY
    base = call.expected if isinstance(call.expected, str) else None
    if o.error is None:
        if op.kind == "publish" and o.version is not None:
            if call.expected is LATEST:
                base = o.parent
            return [Write("latest", o.version, base, cas, True)]
        return [Write(op.ref, call.version, base, cas, True)]
    if not injected(o):
        return []
    value: str | int = call.op_id if op.kind == "publish" else call.version
    unknown_base = call.expected is LATEST  # what it read is not known
    return [Write(op.ref, value, base, cas and not unknown_base, False)]


def injected(o: Outcome) -> bool:
    """A scripted fault or kill (not a pause) hit this operation."""
    return o.fired and o.action in ("fail-before", "fail-after", "kill")


class Judge:
    """Checks each step's outcomes and the store against the model, through an observer
    store (no faults) on its own backend object."""

    def __init__(
        self,
        observer: RemoteStore,
        entries: builtins.list[dict[str, tuple[int, tuple[str, ...]]]],
        contents: builtins.list[dict[str, bytes]],
    ) -> None:
        self.observer, self.entries, self.contents = observer, entries, contents
        self.model = Model()
        self._ops: dict[str, object] = {}  # version -> op id in its manifest
        self._verified: set[str] = set()  # sound versions since the last delete
        self.last_journal: builtins.list[str] = []

    def close(self) -> None:
        self.observer.close()

    def op_of(self, version: str) -> object:
        """The op id a stored version's manifest names; None once the manifest is gone."""
        if version not in self._ops:
            try:
                manifest = self.observer.load_manifest("db", version)
            except SnapshotNotFoundError:
                return None
            self._ops[version] = manifest.metadata.get("op")
        return self._ops[version]

    def same(self, a: str | int | None, b: str | int | None) -> bool:
        if isinstance(a, int) and isinstance(b, str):
            return self.op_of(b) == a
        if isinstance(b, int) and isinstance(a, str):
            return self.op_of(a) == b
        return a == b

    def explains(self, before: str | None, ws: builtins.list[Write], actual: str | None) -> bool:
        """Some order of the certain writes and some of the uncertain ones, each CAS seeing
        the value it expected, ends at ``actual``."""
        certain = [w for w in ws if w.certain]
        maybe = [w for w in ws if not w.certain]
        for r in range(len(maybe) + 1):
            for chosen in combinations(maybe, r):
                for order in permutations(certain + builtins.list(chosen)):
                    cur: str | int | None = before
                    for w in order:
                        if w.cas and not self.same(w.base, cur):
                            break
                        cur = w.value
                    else:
                        if self.same(cur, actual):
                            return True
        return False

    def step(self, outcomes: builtins.list[Outcome], journal: builtins.list[str]) -> None:
        """Judge one step: one operation, or two that overlapped."""
        trace = "backend calls of this step:\n  " + "\n  ".join(journal)
        self.last_journal = builtins.list(journal)
        if any(" delete " in line and "/pins/" not in line for line in journal):
            self._verified.clear()
            self._ops.clear()
        before = dict(self.model.refs)
        actual = self.observer.refs("db")
        writes = [w for o in outcomes for w in writes_of(o)]
        for o in outcomes:
            problem = self._error_problem(o, outcomes, before)
            assert problem is None, f"{o.client} {o.call}: {problem}\n{trace}"
        for ref in set(before) | set(actual) | {w.ref for w in writes}:
            ws = [w for w in writes if w.ref == ref]
            assert self.explains(before.get(ref), ws, actual.get(ref)), (
                f"ref {ref} is {actual.get(ref)}: no order of {ws} from {before.get(ref)} "
                f"gives that (lost update or a write that should not have landed)\n{trace}"
            )
        for o in outcomes:
            if o.error is None and o.call.op.kind in ("checkout", "cached"):
                self._check_served(o, before.get(o.call.op.ref), writes, trace)
        self._learn(outcomes, actual, writes, before)

    def _learn(
        self,
        outcomes: builtins.list[Outcome],
        actual: dict[str, str],
        writes: builtins.list[Write],
        before: dict[str, str],
    ) -> None:
        m = self.model
        for o in outcomes:
            if o.call.op.kind == "prune" and o.error is not None:
                m.prune_failed = True
                m.condemned |= set(m.published) - set(m.refs.values())
            if o.call.op.kind == "cached" and not o.stale:
                ref = o.call.op.ref
                seen = m.recorded.setdefault((o.client, ref), set())
                if o.error is None:
                    seen.clear()  # it read the ref and recorded what it served
                    seen.add(o.version)
                else:  # it may have read the ref (at any moment of the call) and recorded it
                    seen |= {before.get(ref), *(w.value for w in writes if w.ref == ref)}
        m.refs = dict(actual)
        for o in outcomes:
            if o.call.op.kind != "publish":
                continue
            if o.error is None and o.version is not None:
                m.published.append(o.version)
            elif not injected(o):
                m.invisible.add(o.call.op_id)
        m.published += [v for v in actual.values() if v not in m.published]

    def _error_problem(
        self, o: Outcome, outcomes: builtins.list[Outcome], before: dict[str, str]
    ) -> str | None:
        """Why ``o``'s error is not allowed here, or None if it is (or there is none)."""
        e, call, op = o.error, o.call, o.call.op
        if e is None:
            return None
        if isinstance(e, Killed):
            return None if o.action == "kill" and o.fired else "killed without a kill"
        if not isinstance(e, SnapshotError):
            return f"undocumented {type(e).__name__}: {e}"
        if injected(o) and isinstance(e, (BackendUnavailableError, StorageTimeoutError)):
            return None
        others = [x for x in outcomes if x is not o]
        contended = any(w.ref == op.ref for x in others for w in writes_of(x))
        pruning = any(x.call.op.kind == "prune" for x in others)
        if isinstance(e, ConflictError) and op.kind in ("publish", "tag", "rollback"):
            stale = isinstance(call.expected, str) or call.expected is None
            if contended or pruning or (stale and call.expected != before.get(op.ref)):
                return None
            m = self.model
            if m.prune_failed and (op.kind == "publish" or call.version in m.condemned):
                return None
        if isinstance(e, SnapshotNotFoundError):
            gone = op.kind in ("tag", "rollback") and self.op_of(call.version) is None
            absent = op.kind in ("checkout", "cached") and before.get(op.ref) is None
            if pruning or gone or absent:
                return None
        return f"{type(e).__name__}: {e}"

    def _check_served(
        self, o: Outcome, before: str | None, writes: builtins.list[Write], trace: str
    ) -> None:
        named: builtins.list[str | int | None] = [before]
        named += [w.value for w in writes if w.ref == o.call.op.ref]
        if o.stale:  # the ref could not be read: what this client last saw it name
            assert injected(o), f"{o.client} {o.call.op}: a stale answer without an outage"
            named = builtins.list(self.model.recorded.get((o.client, o.call.op.ref), ()))
        assert o.version in named or o.served_op in named, (
            f"{o.client} {o.call.op}: served {o.version}, which the ref did not name during "
            f"the call ({named})\n{trace}"
        )
        content = self.model.op_content.get(o.served_op) if isinstance(o.served_op, int) else None
        assert content is not None, f"served {o.version} names no publish of this run"
        wrong = sorted(
            p
            for p in set(o.tree) | set(self.contents[content])
            if o.tree.get(p) != self.contents[content].get(p)
        )
        assert not wrong, f"{o.client} {o.call.op}: wrong bytes in {wrong} of {o.version}\n{trace}"

    def check_refs(self) -> None:
        """Every ref (as the last step left them) names a complete, sound version holding
        exactly the content it was published from. Verified versions are not downloaded
        again until a step deletes something."""
        trace = "backend calls of the last step:\n  " + "\n  ".join(self.last_journal)
        for ref, version in self.model.refs.items():
            op = self.op_of(version)
            assert op is not None, f"ref {ref} names {version}, whose manifest is gone\n{trace}"
            assert isinstance(op, int), f"{version}: no op id in its metadata"
            assert op in self.model.op_content, f"{version}: op {op} was never run"
            assert op not in self.model.invisible, f"{ref} -> {version}: a failed CAS landed"
            if version in self._verified:
                continue
            report = self.observer.verify("db", version)
            assert report.ok, f"ref {ref} names {version}: {report.problems}\n{trace}"
            manifest = self.observer.load_manifest("db", version)
            files = {f.path: (f.size, f.chunks) for f in manifest.files}
            assert files == self.entries[self.model.op_content[op]], f"{version}: wrong files"
            self._verified.add(version)
