"""The reference model of the stateful test (test_model_state.py) and the judge that
checks every step's outcomes and the store against it.

A step is one operation, or two that overlapped (one client paused at a backend call while
the other ran). Its ref writes, certain (the call succeeded) or possible (a fault or kill hit
it), must explain the refs found afterwards in some order in which every compare-and-swap
saw the value it expected: that is the no-lost-update check.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from itertools import combinations, permutations

from model_support import Killed, Outcome

from chroma_snapshots import ANY, LATEST, RemoteStore
from chroma_snapshots.engine.chunkids import short_id
from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConflictError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)


@dataclass
class Model:
    """What the test knows: each ref's value as last observed, the versions publishes
    reported, the content each publish used, and publishes that must never become visible."""

    refs: dict[str, str] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    op_content: dict[int, int] = field(default_factory=dict)
    invisible: set[int] = field(default_factory=set)
    # Every prune leaves its record of condemned versions and packs behind (a delete it
    # sent may still land); ref movers then refuse them (ConflictError) until it expires,
    # and a publish that would write a condemned pack again (a revert) is refused too.
    condemned: set[str] = field(default_factory=set)
    prune_recorded: bool = False
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
            if o.call.op.kind == "prune":
                m.prune_recorded = True
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
                # a publish through the cache records what latest names once it moved it
                m.recorded[(o.client, "latest")] = {o.version}
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
            if m.prune_recorded and (op.kind == "publish" or call.version in m.condemned):
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
            files = {f.path: (f.size, tuple(map(short_id, f.chunks))) for f in manifest.files}
            want = {p: (n, tuple(map(short_id, hs))) for p, (n, hs) in self.entries[
                self.model.op_content[op]].items()}  # fmt: skip
            assert files == want, f"{version}: wrong files"
            self._verified.add(version)
